"""The impression log: every Recommend answer, as a ``streamrec.core.events.Impression`` on Kafka.

Off the request path entirely: the handler puts a small tuple on a bounded queue
(``put_nowait``, a few microseconds) and returns; one daemon thread builds and validates the
``Impression``, serializes it, calls ``Producer.produce`` and ``poll``s for delivery reports. So
neither pydantic, JSON nor librdkafka's queue ever add to a request's latency, and a broker
outage only fills the queue. When the queue is full the impression is dropped and counted
(``streamrec_api_impressions_total{outcome="dropped"}``); answering the user matters more than
logging the answer. Delivery failures are counted as ``failed``.

Records are keyed by ``user_id`` (one user's impressions stay ordered in one partition, as the
click joiner expects) and carry ``request_id``, arm, model version, items with scores and
positions (and, interleaved, each item's team and the stable version), the fallback and
degraded flags, the serving latency and the raw features the model saw.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from serving.api.metrics import ApiMetrics
from streamrec.core.events import Arm, Impression, ImpressionItem
from streamrec.core.settings import KafkaSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PendingImpression:
    """What the handler hands over: plain values, built into an ``Impression`` off-thread."""

    request_id: str
    user_id: str
    arm: Arm
    model_version: int
    items: tuple[tuple[str, float], ...]
    fallback: bool
    degraded: bool
    serve_latency_ms: float  # the handler's time up to the answer (the A/B latency guardrail)
    features: dict[str, Any]
    event_time: float  # time.time() when the answer was made
    teams: tuple[Arm, ...] | None = None  # interleaved: the team of each item
    shared: tuple[bool, ...] | None = None  # interleaved: each item in both models' own top k
    control_version: int | None = None  # interleaved: the stable version
    propensities: tuple[float, ...] | None = None  # each item's probability under the serving policy
    explored: tuple[bool, ...] | None = None  # each item drawn by exploration
    retrieval_scores: tuple[float, ...] | None = None  # two-stage: each item's retrieval score
    ranker_version: int | None = None  # two-stage: the ranking model's version


class ImpressionLogger:
    """Queue + background producer thread; ``log`` never blocks."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topic: str,
        metrics: ApiMetrics,
        *,
        queue_max: int = 10_000,
        linger_ms: int = 50,
    ) -> None:
        self._topic = topic
        self._metrics = metrics
        self._queue: queue.Queue[PendingImpression | None] = queue.Queue(maxsize=queue_max)
        config: dict[str, Any] = {
            **kafka.client_config(),
            "linger.ms": linger_ms,
            "acks": "all",
            "enable.idempotence": True,
            "compression.type": "lz4",
            # Give up on a record after this long; it is counted as failed, never retried forever.
            "delivery.timeout.ms": 30_000,
            # librdkafka's own log lines (broker down, ...) go through Python logging, not stderr.
            "logger": logging.getLogger("serving.api.kafka"),
        }
        self._producer = Producer(config)
        self._thread = threading.Thread(target=self._run, name="impression-producer", daemon=True)
        self._closed = False
        self._thread.start()

    def log(self, pending: PendingImpression) -> None:
        """Hand an impression to the producer thread; drop (and count) it if the queue is full."""
        if self._closed:
            self._metrics.impressions.labels("dropped").inc()
            return
        try:
            self._queue.put_nowait(pending)
            self._metrics.impressions.labels("queued").inc()
        except queue.Full:
            self._metrics.impressions.labels("dropped").inc()

    def close(self, timeout_s: float = 10.0) -> int:
        """Send what is queued, wait up to ``timeout_s`` for delivery; return records left undelivered."""
        if self._closed:
            return 0
        self._closed = True
        deadline = time.monotonic() + timeout_s
        self._queue.put(None)  # wakes the thread; everything queued before it is produced first
        self._thread.join(timeout=timeout_s)
        left = self._producer.flush(max(0.0, deadline - time.monotonic()))
        if left:
            log.warning("%d impressions were not delivered before shutdown", left)
            self._metrics.impressions.labels("failed").inc(left)
        return int(left)

    # -- background thread -----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                pending = self._queue.get(timeout=0.1)
            except queue.Empty:
                self._producer.poll(0)
                continue
            if pending is None:
                return
            self._produce(pending)
            self._producer.poll(0)

    def _produce(self, pending: PendingImpression) -> None:
        try:
            impression = to_impression(pending)
        except Exception:  # a bug in what the handler passed; never kill the thread for it
            self._metrics.impressions.labels("failed").inc()
            log.exception("could not build the impression of request %s", pending.request_id)
            return
        value = impression.to_bytes()
        while True:
            try:
                self._producer.produce(self._topic, value=value, key=impression.key(), on_delivery=self._delivered)
                return
            except BufferError:  # librdkafka's own queue is full: wait for deliveries, then retry
                self._producer.poll(0.05)
            except Exception:
                self._metrics.impressions.labels("failed").inc()
                log.exception("could not produce the impression of request %s", pending.request_id)
                return

    def _delivered(self, error: KafkaError | None, message: Message) -> None:
        if error is None:
            self._metrics.impressions.labels("delivered").inc()
        else:
            self._metrics.impressions.labels("failed").inc()
            log.warning("impression delivery to %s failed: %s", self._topic, error)


def to_impression(pending: PendingImpression) -> Impression:
    return Impression(
        event_id=f"imp:{pending.request_id}",
        event_time=datetime.fromtimestamp(pending.event_time, tz=UTC),
        user_id=pending.user_id,
        request_id=pending.request_id,
        arm=pending.arm,
        model_version=pending.model_version,
        items=[
            ImpressionItem(
                item_id=item_id,
                score=score,
                position=position,
                team=pending.teams[position] if pending.teams is not None else None,
                shared=pending.shared[position] if pending.shared is not None else None,
                propensity=pending.propensities[position] if pending.propensities is not None else None,
                explored=pending.explored[position] if pending.explored is not None else None,
                retrieval_score=_finite_or_none(pending.retrieval_scores, position),
            )
            for position, (item_id, score) in enumerate(pending.items)
        ],
        fallback=pending.fallback,
        degraded=pending.degraded,
        serve_latency_ms=pending.serve_latency_ms,
        features=pending.features,
        control_version=pending.control_version,
        ranker_version=pending.ranker_version,
    )


def _finite_or_none(values: tuple[float, ...] | None, position: int) -> float | None:
    if values is None or not math.isfinite(values[position]):
        return None
    return values[position]
