"""The Faust feature worker against real Kafka and Redis, run as ``faust -A streams.app worker``.

Every check compares what Feast serves (``FeatureStore.get_online_features``) with a reference
computed here, with pandas, from the same events: window counts relative to each entity's
latest event time (in total and, for a dataset with several kinds, per kind), recent items newest
first and distinct (ties by item id), trending score.

One worker serves the replay and poison tests (each adds its own events and compares *all*
events so far, so they do not depend on each other's order); the kinds and crash tests have
their own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from confluent_kafka import KafkaError, Message, Producer

from streamrec.core.attributes import (
    AttributeSchema,
    item_stats_features,
    kind_count_feature,
    read_schema,
    user_activity_features,
    write_schema,
)
from streamrec.core.events import DeadLetter
from streamrec.core.settings import PathSettings, TopicSettings
from streamrec.datasets import movielens
from streamrec.kafka.admin import ensure_topics
from streamrec.kafka.consume import consume_decoded
from streamrec.ops.replay import producer_config, replay
from streamrec.ops.settings import ReplaySettings, StackSettings
from streamrec.ops.stack.ports import free_ports
from streams.settings import StreamsSettings, StreamsTuning
from tests.support.worker_process import WorkerProcess

HOUR = pd.Timedelta(hours=1)
WINDOWS = {"count_1h": HOUR, "count_24h": 24 * HOUR}
# A dataset with several kinds; events of an undeclared kind ("click") count in the totals only.
KINDS_SCHEMA = AttributeSchema(event_kinds=("view", "add_to_cart", "purchase"))
SPREAD_KINDS = (*KINDS_SCHEMA.event_kinds, "click")


# -- the reference -------------------------------------------------------------------------
def window_counts(rows: pd.DataFrame, counted_kinds: tuple[str, ...]) -> dict[str, int]:
    """count_1h, count_24h and ``<kind>_count_<window>`` of one entity's events."""
    latest = rows["event_time"].max()
    counts: dict[str, int] = {}
    for window, width in WINDOWS.items():
        inside = rows["event_time"] > latest - width
        counts[window] = int(inside.sum())
        for kind in counted_kinds:
            counts[kind_count_feature(kind, window)] = int((inside & (rows["kind"] == kind)).sum())
    return counts


def reference(
    events: pd.DataFrame, counted_kinds: tuple[str, ...] = ()
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Per-user and per-item features of ``events``, computed independently of the worker."""
    users: dict[str, dict[str, Any]] = {}
    for user_id, rows in events.groupby("user_id"):
        latest = rows["event_time"].max()
        recent = rows.sort_values(["event_time", "item_id"], ascending=False).drop_duplicates("item_id")
        users[str(user_id)] = {
            "recent_items": recent["item_id"].head(20).tolist(),
            "last_event_ts": int(latest.timestamp()),
            **window_counts(rows, counted_kinds),
        }
    items: dict[str, dict[str, Any]] = {}
    for item_id, rows in events.groupby("item_id"):
        counts = window_counts(rows, counted_kinds)
        items[str(item_id)] = {
            "trending_score": counts["count_1h"] / (1 + counts["count_24h"] / 24),
            **counts,
        }
    return users, items


def with_kinds(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with ``SPREAD_KINDS`` spread over its events (by a hash of the event id)."""
    kinds = [SPREAD_KINDS[zlib.crc32(event_id.encode()) % len(SPREAD_KINDS)] for event_id in frame["event_id"]]
    return frame.assign(kind=kinds)


def online(
    settings: StreamsSettings, view: str, join_key: str, names: tuple[str, ...], ids: list[str]
) -> dict[str, Any]:
    from features.store import open_store

    store = open_store(settings)
    table = store.get_online_features(
        features=[f"{view}:{name}" for name in names], entity_rows=[{join_key: entity} for entity in ids]
    ).to_dict()
    return {entity: {name: table[name][index] for name in names} for index, entity in enumerate(ids)}


def assert_features_match(
    settings: StreamsSettings,
    events: pd.DataFrame,
    timeout_s: float = 60.0,
    while_waiting: Callable[[], object] | None = None,
) -> None:
    """Poll the online store until it equals the reference (the worker is asynchronous).

    The features are the views' for the schema the worker reads (``settings.data_dir``).
    ``while_waiting`` runs before each poll (e.g. restarting a worker its watchdog exited).
    """
    schema = read_schema(settings.data_dir)
    want_users, want_items = reference(events, schema.counted_kinds)
    user_features, item_features = user_activity_features(schema), item_stats_features(schema)
    assert set(user_features) == set(next(iter(want_users.values())))
    assert set(item_features) == set(next(iter(want_items.values())))
    deadline = time.monotonic() + timeout_s
    while True:
        if while_waiting is not None:
            while_waiting()
        got_users = online(settings, "user_activity", "user_id", user_features, sorted(want_users))
        got_items = online(settings, "item_stats", "item_id", item_features, sorted(want_items))
        if got_users == want_users and got_items == want_items:
            return
        if time.monotonic() > deadline:
            bad_users = [(key, got_users[key], want) for key, want in want_users.items() if got_users[key] != want]
            bad_items = [(key, got_items[key], want) for key, want in want_items.items() if got_items[key] != want]
            pytest.fail(
                f"{len(bad_users)}/{len(want_users)} users and {len(bad_items)}/{len(want_items)} items differ "
                f"from the reference after {timeout_s}s; first: {bad_users[:2]} {bad_items[:2]}"
            )
        time.sleep(1.0)


DIAGNOSTIC_METRICS = (
    "streams_events_in_total",
    "streams_accepted_events_total",
    "streams_pushed_rows_total",
    "streams_push_failures_total",
    "streams_offset_gaps_open",
    "streams_offset_gaps_total",
    "streams_pushes_total",
    "streams_duplicate_events_total",
)


def python_stacks(pid: int) -> str:
    """Every thread's Python stack of a live process (``py-spy dump``), for a test that failed on it."""
    py_spy = Path(sys.executable).with_name("py-spy")
    result = subprocess.run([str(py_spy), "dump", "--pid", str(pid)], capture_output=True, text=True, check=False)
    return result.stdout + result.stderr


def wait_for_log_line(process: WorkerProcess, text: str, timeout_s: float) -> None:
    """Poll the worker's log until a line contains ``text`` (diagnostics: give up quietly after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while text not in process.log_tail(1000) and time.monotonic() < deadline:
        time.sleep(0.1)


# -- fixtures ------------------------------------------------------------------------------
@dataclass
class FeatureWorker:
    settings: StreamsSettings
    process: WorkerProcess
    events: list[pd.DataFrame] = field(default_factory=list)

    def all_events(self) -> pd.DataFrame:
        return pd.concat(self.events, ignore_index=True)

    def replay(self, frame: pd.DataFrame) -> None:
        report = replay(frame, ReplaySettings(kafka=self.settings.kafka, topics=self.settings.topics), progress=False)
        assert (report.delivered, report.failed) == (len(frame), 0), report.summary()
        self.events.append(frame)


def streams_settings(stack_settings: StackSettings, state_dir: Path, **tuning: Any) -> StreamsSettings:
    prefix = f"s{uuid.uuid4().hex[:8]}"
    (metrics_port,) = free_ports(1)
    return StreamsSettings(
        kafka=stack_settings.kafka,
        redis=stack_settings.redis,
        paths=PathSettings(state_dir=state_dir),
        topics=TopicSettings(
            interactions=f"{prefix}.interactions",
            impressions=f"{prefix}.impressions",
            clicks=f"{prefix}.clicks",
            labeled=f"{prefix}.labeled",
            deadletter=f"{prefix}.deadletter",
            partitions=4,
        ),
        features={"project": prefix},  # its own Redis key space
        streams=StreamsTuning(app_id=prefix, metrics_port=metrics_port, session_timeout_s=6.0, **tuning),
    )


def prepare(settings: StreamsSettings, schema: AttributeSchema | None = None) -> None:
    """Topics, the dataset's schema (as ``features setup`` writes it), the Feast registry built
    from it, and a warm idempotent producer.

    On a fresh broker the first idempotent producer waits (seconds) for the transaction
    coordinator to load; paying that here keeps the paced replays below really paced.
    """
    from features.store import apply, open_store

    if schema is not None:
        write_schema(settings.data_dir, schema)
    # The by-item topic too, as `streamrec streams worker` creates it: a worker started straight
    # from Faust creates it itself, but its subscription may ignore it until the next rebalance.
    ensure_topics(settings, extra=[settings.by_item_topic])
    apply(open_store(settings))
    producer = Producer(producer_config(ReplaySettings(kafka=settings.kafka, topics=settings.topics)))
    producer.produce(settings.topics.impressions, value=b"warm-up")
    assert producer.flush(60) == 0


def start_worker(settings: StreamsSettings, log_path: Path) -> WorkerProcess:
    process = WorkerProcess(settings, log_path)
    process.start()
    return process


@pytest.fixture(scope="module")
def shared_worker(
    local_stack: object, stack_settings: StackSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FeatureWorker]:
    state_dir = tmp_path_factory.mktemp("streams-shared")
    settings = streams_settings(stack_settings, state_dir)
    prepare(settings)
    process = start_worker(settings, state_dir / "worker.log")
    try:
        yield FeatureWorker(settings, process)
    finally:
        process.stop()
        print(process.log_tail())


# -- tests ---------------------------------------------------------------------------------
def test_replayed_movielens_slice_gives_exactly_the_reference_features(shared_worker: FeatureWorker) -> None:
    frame = movielens.load_interactions().iloc[:5000]
    shared_worker.replay(frame)
    assert_features_match(shared_worker.settings, shared_worker.all_events())
    assert shared_worker.process.metric("streams_dead_letters_total") == 0
    # one push per batch, never one per event
    assert shared_worker.process.metric("streams_pushes_total") < len(frame) / 5


def test_poison_records_are_dead_lettered_and_valid_traffic_still_counts(shared_worker: FeatureWorker) -> None:
    settings = shared_worker.settings
    frame = movielens.load_interactions().iloc[5000:5600]
    first, second = frame.iloc[:300], frame.iloc[300:]
    user = str(second["user_id"].iloc[0])  # poison keyed by a user of the traffic around it
    far_future = (datetime.now(UTC) + timedelta(days=3)).isoformat()
    poison = [
        ("undecodable", b"\x00\xff this is not JSON"),
        ("schema", json.dumps({"event_id": "no-item", "user_id": user, "event_time": 880000000}).encode()),
        (
            "event_time",
            json.dumps({"event_id": "future", "user_id": user, "item_id": "1", "event_time": far_future}).encode(),
        ),
    ]
    delivered: dict[bytes, tuple[int, int]] = {}

    def on_delivery(error: KafkaError | None, message: Message) -> None:
        assert error is None, error
        value, partition, offset = message.value(), message.partition(), message.offset()
        assert value is not None and partition is not None and offset is not None
        delivered[value] = (partition, offset)

    shared_worker.replay(first)
    producer = Producer(settings.kafka.client_config())
    for _, value in poison:
        producer.produce(settings.topics.interactions, value=value, key=user.encode(), on_delivery=on_delivery)
    assert producer.flush(30) == 0
    shared_worker.replay(second)

    letters = list(
        consume_decoded(
            settings,
            settings.topics.deadletter,
            DeadLetter,
            group_id=f"dlq-{uuid.uuid4().hex}",
            max_records=len(poison),
            idle_timeout_s=60,
        )
    )
    assert all(letter.error is None for letter in letters)
    found = {letter.event.original_value(): letter.event for letter in letters if letter.event is not None}
    assert set(found) == {value for _, value in poison}
    for reason, value in poison:
        letter = found[value]
        assert letter.reason == reason, letter.error
        assert (letter.source_topic, letter.source_partition, letter.source_offset) == (
            settings.topics.interactions,
            *delivered[value],
        )
    assert_features_match(settings, shared_worker.all_events())


def test_a_dataset_with_kinds_gets_exact_per_kind_counts_online(
    local_stack: object, stack_settings: StackSettings, tmp_path: Path
) -> None:
    settings = streams_settings(stack_settings, tmp_path)
    prepare(settings, KINDS_SCHEMA)
    frame = with_kinds(movielens.load_interactions().iloc[:4000])
    worker = FeatureWorker(settings, start_worker(settings, tmp_path / "worker.log"))
    try:
        worker.replay(frame)
        assert_features_match(settings, worker.all_events())
        assert worker.process.metric("streams_dead_letters_total") == 0
    finally:
        worker.process.stop()
    # the check has teeth: every kind, the undeclared one too, is among the events, and the
    # per-kind counts are not all equal to the totals
    users, _ = reference(frame, KINDS_SCHEMA.counted_kinds)
    assert set(frame["kind"]) == set(SPREAD_KINDS)
    assert any(row["purchase_count_24h"] not in (0, row["count_24h"]) for row in users.values())


# With kinds only: the same kill on a one-kind dataset is tests/faults/test_worker_rebalance.py's
# (a worker killed mid-replay and restarted leaves the reference features); kinds add the
# per-kind states that must come back from the changelog.
@pytest.mark.parametrize("schema", [KINDS_SCHEMA], ids=["kinds"])
def test_sigkill_mid_replay_then_restart_gives_the_no_crash_features(
    local_stack: object, stack_settings: StackSettings, tmp_path: Path, schema: AttributeSchema | None
) -> None:
    # Offsets are committed rarely, so the restarted worker re-reads what the killed one had
    # already applied: the result must still equal the reference (no loss, no double count).
    # With kinds, the restarted worker's states come back from changelog records that carry them.
    settings = streams_settings(stack_settings, tmp_path, commit_interval_s=30.0)
    prepare(settings, schema)
    # The first worker is throttled so the kill lands inside the first half whatever the machine's
    # speed: it takes 250 events a batch, holds at most 500 unpushed, and starts a push every 5 s,
    # so after 1,500 events counted the other 1,500 need at least two more pushes (10 s).
    throttled = settings.model_copy(
        update={
            "streams": settings.streams.model_copy(
                update={"push_batch_size": 250, "max_held_events": 500, "push_min_interval_s": 5.0}
            )
        }
    )
    frame = movielens.load_interactions().iloc[:6000]
    if schema is not None:
        frame = with_kinds(frame)
    worker = FeatureWorker(settings, start_worker(throttled, tmp_path / "worker-1.log"))
    try:
        # First half of the replay; the worker dies while it is still working through it.
        worker.replay(frame.iloc[:3000])
        consumed_at_kill = worker.process.wait_for_metric("streams_events_in_total", 1500, timeout_s=120)
        worker.process.kill()
        assert consumed_at_kill < 3000, "the throttled worker finished the first half before the kill"
        # The rest of the replay arrives while it is down.
        worker.replay(frame.iloc[3000:])
        worker.process = start_worker(settings, tmp_path / "worker-2.log")
        try:
            assert_features_match(settings, worker.all_events(), timeout_s=90)
        except BaseException:
            # a stalled worker: show where every thread of it waits, and what it counted
            print(python_stacks(worker.process.pid))
            print({name: worker.process.metric(name) for name in DIAGNOSTIC_METRICS})
            os.kill(worker.process.pid, signal.SIGUSR2)  # the worker logs its asyncio tasks
            wait_for_log_line(worker.process, "SIGUSR2:", timeout_s=10)
            print(worker.process.log_tail(400))
            raise
        # the restarted worker saw events the killed one had applied (redelivered, deduplicated)
        assert worker.process.metric("streams_duplicate_events_total") > 0
    finally:
        worker.process.stop()
