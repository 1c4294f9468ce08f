"""The replay producer: an interaction frame into ``streamrec.interactions``, in event-time order.

Delivery is ``acks=all`` with idempotence on, so a retried batch is written once and a user's
events keep their order within their partition (the key is ``user_id``). Batching (``linger.ms``,
``batch.size``, compression) comes from ``ReplaySettings.replay``.

Pacing: ``rate`` spaces events evenly at that many per second; ``speedup`` keeps the gaps of
event time, divided by the factor; neither means as fast as the broker takes them. Pacing is
checked once per ``_PACE_EVERY`` events so the check costs nothing at full speed.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from confluent_kafka import KafkaError, Message, Producer
from pydantic import TypeAdapter
from tqdm import tqdm

from streamrec.core.events import Interaction
from streamrec.ops.settings import ReplaySettings

_PACE_EVERY = 64


@dataclass
class ReplayReport:
    produced: int = 0
    delivered: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def events_per_s(self) -> float:
        return self.delivered / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def plus(self, other: ReplayReport) -> ReplayReport:
        """Two replays, one after the other, as one report."""
        return ReplayReport(
            produced=self.produced + other.produced,
            delivered=self.delivered + other.delivered,
            failed=self.failed + other.failed,
            elapsed_s=self.elapsed_s + other.elapsed_s,
            errors=self.errors + other.errors,
        )

    def summary(self) -> str:
        text = (
            f"delivered {self.delivered:,} of {self.produced:,} events, failed {self.failed:,}, "
            f"in {self.elapsed_s:.1f}s ({self.events_per_s:,.0f} events/s)"
        )
        if self.errors:
            text += "; errors: " + ", ".join(f"{name} x{count}" for name, count in self.errors.most_common(5))
        return text


def producer_config(settings: ReplaySettings) -> dict[str, str | int | float | bool]:
    tuning = settings.replay
    return {
        **settings.kafka.client_config(),
        "acks": "all",
        "enable.idempotence": True,
        "linger.ms": tuning.linger_ms,
        "batch.size": tuning.batch_size_bytes,
        "compression.type": tuning.compression,
        "queue.buffering.max.messages": tuning.queue_max_messages,
        "delivery.timeout.ms": tuning.delivery_timeout_ms,
        # Only failed deliveries call back into Python; successes are counted from what is left
        # in the queue after flush. Saves a Python callback per event at 100k events/s.
        "delivery.report.only.error": True,
    }


_INTERACTION_BATCH = TypeAdapter(list[Interaction])
_CHUNK_ROWS = 4096


def interactions_from_frame(frame: pd.DataFrame) -> Iterator[Interaction]:
    """Validated events from an interaction frame (see ``streamrec.datasets.frames``).

    Rows are validated a chunk at a time through one ``TypeAdapter`` call: the same model and
    rules as one event at a time, with the per-call overhead paid once per chunk.
    """
    for start in range(0, len(frame), _CHUNK_ROWS):
        chunk = frame.iloc[start : start + _CHUNK_ROWS]
        ratings = chunk["rating"].to_numpy()
        records = [
            {
                "event_id": event_id,
                "user_id": user_id,
                "item_id": item_id,
                "kind": kind,
                "rating": None if rating != rating else float(rating),  # NaN -> no rating
                "event_time": event_time,
            }
            for event_id, user_id, item_id, kind, rating, event_time in zip(
                chunk["event_id"].tolist(),
                chunk["user_id"].tolist(),
                chunk["item_id"].tolist(),
                chunk["kind"].tolist(),
                ratings,
                pd.DatetimeIndex(chunk["event_time"]).to_pydatetime(),
                strict=True,
            )
        ]
        yield from _INTERACTION_BATCH.validate_python(records)


class Pacer:
    """Sleeps so that event ``index`` (with time ``event_time_s``) is not sent early."""

    def __init__(self, rate: float | None, speedup: float | None, first_event_time_s: float) -> None:
        if rate is not None and speedup is not None:
            raise ValueError("give either rate or speedup, not both")
        if (rate is not None and rate <= 0) or (speedup is not None and speedup <= 0):
            raise ValueError("rate and speedup must be positive")
        self.rate = rate
        self.speedup = speedup
        self.first_event_time_s = first_event_time_s
        self.started = time.monotonic()

    def wait(self, index: int, event_time_s: float) -> None:
        if self.rate is not None:
            due = index / self.rate
        elif self.speedup is not None:
            due = (event_time_s - self.first_event_time_s) / self.speedup
        else:
            return
        ahead = due - (time.monotonic() - self.started)
        if ahead > 0:
            time.sleep(ahead)


def replay(
    frame: pd.DataFrame,
    settings: ReplaySettings,
    *,
    rate: float | None = None,
    speedup: float | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> ReplayReport:
    """Produce ``frame`` (already in event-time order) and wait until every event is acknowledged."""
    if limit is not None:
        frame = frame.head(limit)
    report = ReplayReport()
    topic = settings.topics.interactions

    def on_delivery(error: KafkaError | None, _message: Message) -> None:
        if error is not None:
            report.failed += 1
            report.errors[error.name()] += 1

    # One global delivery callback (config) rather than one per produce() call: cheaper per event.
    producer = Producer({**producer_config(settings), "on_delivery": on_delivery})
    event_seconds: np.ndarray = (frame["event_time"].astype("int64") // 1_000_000_000).to_numpy()
    pacer = Pacer(rate, speedup, float(event_seconds[0]) if len(event_seconds) else 0.0)
    started = time.monotonic()
    with tqdm(total=len(frame), unit="ev", disable=not progress, desc=f"replay -> {topic}") as bar:
        for index, event in enumerate(interactions_from_frame(frame)):
            if index % _PACE_EVERY == 0:
                pacer.wait(index, float(event_seconds[index]))
                producer.poll(0)
                bar.update(index - bar.n)
            while True:
                try:
                    producer.produce(topic, value=event.to_bytes(), key=event.key())
                    break
                except BufferError:
                    producer.poll(0.05)  # local queue full: let deliveries drain, then retry
            report.produced += 1
        remaining = producer.flush(settings.replay.delivery_timeout_ms / 1000)
        bar.update(len(frame) - bar.n)
    report.elapsed_s = time.monotonic() - started
    if remaining:
        report.failed += remaining
        report.errors["not_delivered_before_timeout"] += remaining
    report.delivered = report.produced - report.failed
    return report
