"""Fault 8, the item half: 70,000 events for one item within one hour of event time.

Before states were bounded, that item's state (one changelog record) grew past Kafka's 1 MiB
record limit and the worker's producer crashed. Here a real worker (``faust -A streams.app
worker``) against the session's Kafka and Redis must stay up, serve exactly the reference
features (computed with pandas from the events), fold what its caps do not keep exactly, and
dead-letter and count (``oversize``) the redelivered events it can no longer tell apart.

The same run checks expiry (``streams.expiry``, swept every second here): a user and an item
last seen three days before the hot hour leave the tables with a changelog tombstone, while
their feature rows stay.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from confluent_kafka import Consumer, Producer, TopicPartition

from streamrec.core.events import DeadLetter
from streamrec.kafka.consume import consume_decoded
from streamrec.ops.replay import producer_config
from streamrec.ops.settings import ReplaySettings, StackSettings
from streams.repartition import item_partition
from streams.settings import StreamsSettings
from tests.integration.test_streams_worker import assert_features_match, prepare, start_worker, streams_settings
from tests.support.worker_process import WorkerProcess

T0 = 880_000_000  # 1997-11-20, MovieLens time
HOT_EVENTS = 70_000
EARLIER_EVENTS = 1_000  # of the hot item, two to three hours before the hot hour: in count_24h only
USERS = 50
REDELIVERED = 5  # the first hot events again, after the item folded them
PARTITIONS = 4  # streams_settings' topics
VIEWS = ("user_activity", "item_stats")


def hot_item_events() -> pd.DataFrame:
    """A cold user and item three days back, then the hot item: an earlier hour, then the hot hour."""
    partitions = 4
    cold_item = next(
        f"cold-{n}" for n in range(1000) if item_partition(f"cold-{n}", partitions) == item_partition("hot", partitions)
    )
    rows = [(f"cold-{n}", "cold-user", cold_item, T0 - 3 * 24 * 3600 + n) for n in range(3)]
    rows += [
        (f"earlier-{n}", f"u{n % USERS}", "hot", T0 - 3 * 3600 + n * 3600 // EARLIER_EVENTS)
        for n in range(EARLIER_EVENTS)
    ]
    rows += [(f"hot-{n}", f"u{n % USERS}", "hot", T0 + n * 3600 // HOT_EVENTS) for n in range(HOT_EVENTS)]
    return pd.DataFrame(rows, columns=["event_id", "user_id", "item_id", "epoch_s"])


def produce(settings: StreamsSettings, events: pd.DataFrame) -> None:
    """Every event to partition 0 of the interactions topic, in order: the by-item partition of
    the hot item then sees them in event-time order, as a paced source would send them."""
    producer = Producer(producer_config(ReplaySettings(kafka=settings.kafka, topics=settings.topics)))
    for event_id, user_id, item_id, epoch_s in events.itertuples(index=False):
        value = json.dumps({"event_id": event_id, "user_id": user_id, "item_id": item_id, "event_time": epoch_s})
        producer.produce(settings.topics.interactions, value=value.encode(), key=user_id.encode(), partition=0)
        producer.poll(0)
    assert producer.flush(60) == 0


def last_changelog_values(settings: StreamsSettings, table: str, partition: int) -> dict[bytes, bytes | None]:
    """The last value of each key on one partition of a table's changelog (None: a tombstone)."""
    topic = f"{settings.streams.app_id}-{table}-changelog"
    consumer = Consumer(
        {**settings.kafka.client_config(), "group.id": f"read-{uuid.uuid4().hex}", "enable.auto.commit": False}
    )
    try:
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=30)
        consumer.assign([TopicPartition(topic, partition, 0)])
        last: dict[bytes, bytes | None] = {}
        offset = -1
        deadline = time.monotonic() + 60
        while offset < high - 1 and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=1000, timeout=1.0):
                assert message.error() is None, message.error()
                key, at = message.key(), message.offset()
                assert key is not None and at is not None
                last[key], offset = message.value(), at
        assert offset == high - 1, f"read {topic}[{partition}] up to offset {offset} of {high}"
        return last
    finally:
        consumer.close()


def wait_for(worker: WorkerProcess, what: str, done: Callable[[str], bool], timeout_s: float) -> str:
    """Poll the worker's /metrics every half second (a scrape costs the worker CPU) until ``done``."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert worker.alive(), f"the worker exited; see {worker.log_path}"
        text = worker.metrics_text() or ""
        if done(text):
            return text
        assert time.monotonic() < deadline, f"no {what} within {timeout_s}s; see {worker.log_path}"
        time.sleep(0.5)


def test_a_hot_item_folds_instead_of_crashing_and_keeps_exact_features(
    local_stack: object, stack_settings: StackSettings, tmp_path: Path
) -> None:
    settings = streams_settings(stack_settings, tmp_path, expiry_interval_s=1.0, expiry_idle_s=2.0, expiry_grace_s=0.0)
    prepare(settings)
    events = hot_item_events()
    frame = events.assign(event_time=pd.to_datetime(events["epoch_s"], unit="s", utc=True))
    worker = start_worker(settings, tmp_path / "worker.log")
    try:
        worker.wait_serving(timeout_s=60)
        cpu_at_start = worker_cpu_seconds(worker.pid)
        started = time.monotonic()
        produce(settings, events)
        wait_for(worker, "consumed events", lambda text: metric(text, "streams_events_in_total") >= len(events), 120)
        consumed_s, consumed_cpu_s = time.monotonic() - started, worker_cpu_seconds(worker.pid) - cpu_at_start

        # Expiry: the cold user and item, three days behind, leave their tables.
        def both_expired(text: str) -> bool:
            return all(metric(text, "streams_expired_entities_total", view) >= 1 for view in VIEWS)

        text = wait_for(worker, "expired entities", both_expired, 60)
        assert [metric(text, "streams_expired_entities_total", view) for view in VIEWS] == [1, 1], text

        # Redelivered hot events that the item has folded: dead-lettered as oversize.
        produce(settings, events[events["event_id"].str.startswith("hot-")].iloc[:REDELIVERED])
        text = wait_for(
            worker,
            "oversize dead letters",
            lambda text: (
                metric(text, "streams_oversize_events_total") >= REDELIVERED
                and metric(text, "streams_dead_letters_total") >= 1
            ),
            60,
        )
        letters = [
            decoded.event
            for decoded in consume_decoded(
                settings,
                settings.topics.deadletter,
                DeadLetter,
                group_id=f"dlq-{uuid.uuid4().hex}",
                max_records=int(metric(text, "streams_dead_letters_total")),
                idle_timeout_s=30,
            )
        ]
        assert metric(text, "streams_oversize_events_total") == REDELIVERED
        assert [(letter.reason, letter.source_topic) if letter else None for letter in letters] == [
            ("oversize", settings.by_item_topic)
        ] * int(metric(text, "streams_dead_letters_total"))

        # The features are the reference's over every distinct event, the cold ones' rows included.
        assert_features_match(settings, frame, timeout_s=60)
        assert metric(text, "streams_folded_events_total") >= len(events) - settings.streams.max_exact_events

        # The changelog: a tombstone for the cold item, and the hot item's last record under the cap.
        cold_item = str(events["item_id"].iloc[0])
        records = last_changelog_values(settings, "item_state", item_partition(cold_item, PARTITIONS))
        assert records[json.dumps(cold_item).encode()] is None
        hot_record = records[b'"hot"']
        assert hot_record is not None and len(hot_record) <= settings.streams.max_state_record_bytes
    finally:
        worker.stop()
    log = worker.log_tail(100_000)
    assert "MessageSizeTooLarge" not in log and "Crashed" not in log
    print(
        f"{len(events):,} events consumed in {consumed_s:.1f}s (worker CPU {consumed_cpu_s:.1f}s); "
        f"hot item record {len(hot_record):,} bytes"
    )


def metric(text: str, name: str, view: str | None = None) -> float:
    """A sample of the /metrics ``text``: summed over label sets, or the one of ``view``."""
    total = 0.0
    for line in text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == name or (sample.startswith(name + "{") and (view is None or f'view="{view}"' in sample)):
            total += float(value)
    return total


def worker_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process so far (Linux ``/proc``), for the log line."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
