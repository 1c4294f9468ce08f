"""``streamrec simulate``: replay held-out interactions as user visits (the replay method).

For each real interaction (user ``u``, item ``i``, kind, time ``t``) in event-time order, the
simulator asks the API for ``u``'s recommendations over gRPC. If ``i`` is among them and the kind
is one of ``simulator.success_kinds`` (every kind when empty) the user "clicked" it: a
:class:`~streamrec.core.events.Click` of the interaction's kind goes to the clicks topic, so the
evaluator's click rate is the rate of the configured success (per kind in its ``event_kind``
segments). The interaction itself always goes to the interactions topic (the user found the item
anyway), so the features and the trainer see the same stream as without recommendations. Per
arm, click-through rate then equals online hit rate@K — the replay method of offline evaluation
for recommenders (Li et al. 2011).

Everything the report needs is logged to ``<simulator_dir>/responses.parquet`` (one row per
call: wall time, request id, user, the real item, arm, model version, hit, fallback, latency)
and ``interactions.parquet`` (one row per produced interaction with its partition, offset and
produce time, for the model freshness figure).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
import pandas as pd
from confluent_kafka import KafkaError, Message, Producer
from tqdm import tqdm

from streamrec.core.events import Click
from streamrec.ops.replay import Pacer, interactions_from_frame
from streamrec.ops.settings import SimulatorSettings


@dataclass
class SimulationReport:
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    hits_by_arm: dict[str, int] = field(default_factory=dict)
    requests_by_arm: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    delivery_failures: int = 0

    def ctr(self, arm: str) -> float:
        requests = self.requests_by_arm.get(arm, 0)
        return self.hits_by_arm.get(arm, 0) / requests if requests else 0.0

    def summary(self) -> str:
        arms = ", ".join(
            f"{arm}: {self.ctr(arm):.3f} CTR over {count:,} requests"
            for arm, count in sorted(self.requests_by_arm.items())
        )
        errors = ", ".join(f"{code} x{count}" for code, count in self.errors.items()) or "none"
        return f"{self.requests:,} requests, failed: {errors}; {arms}"


def held_out(frame: pd.DataFrame, start_fraction: float) -> pd.DataFrame:
    """The part of an interaction frame after ``start_fraction`` of its events (by time)."""
    start = int(len(frame) * start_fraction)
    return frame.iloc[start:].reset_index(drop=True)


def simulate(
    frame: pd.DataFrame,
    settings: SimulatorSettings,
    *,
    rate: float | None = None,
    speedup: float | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> SimulationReport:
    from serving.api.proto import generated
    from serving.grpc_security import open_channel

    stubs = generated()
    if limit is not None:
        frame = frame.head(limit)
    tuning = settings.simulator
    success_kinds = frozenset(tuning.success_kinds)
    out_dir = settings.simulator_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    report = SimulationReport()
    responses: list[dict[str, Any]] = []
    produced: list[dict[str, Any]] = []

    def on_delivery(error: KafkaError | None, message: Message) -> None:
        if error is not None:
            report.delivery_failures += 1
        elif message.topic() == settings.topics.interactions:
            produced.append({"partition": message.partition(), "offset": message.offset(), "produced_at": time.time()})

    producer = Producer(
        {
            **settings.kafka.client_config(),
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            "on_delivery": on_delivery,
        }
    )
    channel = open_channel(tuning.api_target, settings.grpc)  # TLS, verifying the API, with grpc.tls
    stub = stubs.grpc.RecommenderStub(channel)
    event_seconds = (frame["event_time"].astype("int64") // 1_000_000_000).to_numpy()
    pacer = Pacer(rate, speedup, float(event_seconds[0]) if len(frame) else 0.0)
    try:
        events = interactions_from_frame(frame)
        for index, event in enumerate(
            tqdm(events, total=len(frame), disable=not progress, desc="simulate", unit="visit")
        ):
            pacer.wait(index, float(event_seconds[index]))
            started = time.perf_counter()
            try:
                response = stub.Recommend(
                    stubs.pb2.RecommendRequest(user_id=event.user_id, k=tuning.k, exclude_seen=True),
                    timeout=tuning.deadline_ms / 1000,
                )
            except grpc.RpcError as error:
                code = error.code().name
                report.errors[code] = report.errors.get(code, 0) + 1
                response = None
            latency_ms = (time.perf_counter() - started) * 1000
            report.requests += 1
            if response is not None:
                shown = [item.item_id for item in response.items]
                hit = event.item_id in shown and (not success_kinds or event.kind in success_kinds)
                arm = response.arm or "unknown"
                report.requests_by_arm[arm] = report.requests_by_arm.get(arm, 0) + 1
                report.hits_by_arm[arm] = report.hits_by_arm.get(arm, 0) + int(hit)
                report.latencies_ms.append(latency_ms)
                if hit:
                    click = Click(
                        event_id=f"click:{response.request_id}:{event.item_id}",
                        event_time=datetime.now(UTC),
                        user_id=event.user_id,
                        request_id=response.request_id,
                        item_id=event.item_id,
                        position=shown.index(event.item_id),
                        kind=event.kind,
                    )
                    producer.produce(settings.topics.clicks, key=click.key(), value=click.to_bytes())
                responses.append(
                    {
                        "time": time.time(),
                        "request_id": response.request_id,
                        "user_id": event.user_id,
                        "item_id": event.item_id,
                        "arm": arm,
                        "model_version": int(response.model_version),
                        "hit": hit,
                        "fallback": response.fallback,
                        "degraded": response.degraded,
                        "latency_ms": latency_ms,
                    }
                )
            producer.produce(settings.topics.interactions, key=event.key(), value=event.to_bytes())
            producer.poll(0)
    finally:
        producer.flush(60)
        channel.close()
        pd.DataFrame(responses).to_parquet(out_dir / "responses.parquet")
        pd.DataFrame(produced).to_parquet(out_dir / "interactions.parquet")
    return report
