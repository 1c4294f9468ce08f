"""Expiry of idle entities (``streams.expiry``): the rule on hand-made tables, the tombstone's
bytes, and a seeded simulation whose features must equal a pandas reference over every event."""

from __future__ import annotations

import asyncio
import gc
import random
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pandas as pd
import pytest
from faust.types import TableT

from streamrec.core import contracts
from streamrec.core.settings import PathSettings
from streams.app import create_app
from streams.expiry import KeyIndex, Sweeper, TableExpiry
from streams.settings import StreamsSettings, StreamsTuning
from streams.windows import US_PER_S, EntityState, WindowConfig, apply, item_features
from tests.unit.test_streams_agent import RecordingSink, _close_unstarted_consumer_loop

H = 3600
CONFIG = WindowConfig.from_seconds(allowed_lateness_s=24 * H)  # retention 24 h
GRACE_S = 6 * H
IDLE_S = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class Changelog:
    """The changelog records sent, in order: (partition, key, state bytes or None for a tombstone)."""

    def __init__(self) -> None:
        self.records: list[tuple[int, str, bytes | None]] = []

    async def send_state(self, partition: int, key: str, state: EntityState) -> None:
        self.records.append((partition, key, state.to_bytes()))

    async def send_tombstone(self, partition: int, key: str) -> None:
        self.records.append((partition, key, None))


def make_expiry(owned: set[int] | None = None) -> tuple[TableExpiry, dict[str, EntityState], Changelog, Clock]:
    clock, changelog, data = Clock(), Changelog(), cast(dict[str, EntityState], {})
    index = KeyIndex(clock=clock)
    expiry = TableExpiry(
        view="item_stats",
        data=data,
        index=index,
        send_changelog=index.tracking(changelog.send_state),
        send_tombstone=changelog.send_tombstone,
        owned_partitions=lambda: {0, 1} if owned is None else owned,
        retention_us=CONFIG.retention_us,
        grace_us=GRACE_S * US_PER_S,
        idle_s=IDLE_S,
    )
    return expiry, data, changelog, clock


def put(expiry: TableExpiry, key: str, partition: int, *hours: float) -> None:
    """Apply events at ``hours`` to ``key``'s state and write it, as the pusher does."""
    state = expiry.data.get(key) or EntityState()
    for hour in hours:
        apply(state, round(hour * H * US_PER_S), f"{key}@{hour}", None, CONFIG)
    expiry.data[key] = state
    asyncio.run(cast(Any, expiry.send_changelog(partition, key, state)))


def sweep(expiry: TableExpiry) -> int:
    return asyncio.run(expiry.sweep())


def test_an_entity_idle_in_event_time_and_on_the_wall_clock_expires_with_a_tombstone() -> None:
    expiry, data, changelog, clock = make_expiry()
    # partition 0 progresses to 100 h; expiry needs a newest event before 100 - 24 - 6 = 70 h
    for index in range(9):
        put(expiry, f"active-{index}", 0, 99 + index / 10)
    put(expiry, "old", 0, 60)
    put(expiry, "edge", 0, 70.5)  # just inside the grace
    put(expiry, "old-on-1", 1, 60)  # alone on partition 1: it is that partition's progress
    changelog.records.clear()
    assert sweep(expiry) == 0  # every state was written just now
    clock.now += IDLE_S
    put(expiry, "old-but-written", 0, 61)  # idle in event time, not on the wall clock
    changelog.records.clear()
    assert sweep(expiry) == 1
    assert changelog.records == [(0, "old", None)]
    assert "old" not in data and "old" not in expiry.index.entries
    assert {"edge", "old-on-1", "old-but-written", "active-0"} <= set(data)


def test_a_few_entities_far_ahead_in_event_time_do_not_expire_the_rest() -> None:
    expiry, data, _, clock = make_expiry()
    for index in range(20):
        put(expiry, f"item-{index}", 0, 10 + index / 100)
    put(expiry, "from-the-future", 0, 10 * 365 * 24)  # one entity in 20: above the 90th percentile
    clock.now += IDLE_S
    assert sweep(expiry) == 0
    put(expiry, "also-from-the-future", 0, 10 * 365 * 24)
    put(expiry, "and-another", 0, 10 * 365 * 24)  # 3 in 23: now the percentile moves
    clock.now += IDLE_S
    assert sweep(expiry) == 20
    assert set(data) == {"from-the-future", "also-from-the-future", "and-another"}


def test_only_partitions_of_this_worker_are_swept() -> None:
    expiry, data, changelog, clock = make_expiry(owned={0})
    put(expiry, "new", 0, 100)
    put(expiry, "old", 0, 1)
    put(expiry, "new-elsewhere", 1, 100)
    put(expiry, "old-elsewhere", 1, 1)
    clock.now += IDLE_S
    changelog.records.clear()
    assert sweep(expiry) == 1
    assert changelog.records == [(0, "old", None)]
    # the other partition's keys are left in the table (not this sweep's to delete), and forgotten
    # by the index until recovery reads them again
    assert {"new-elsewhere", "old-elsewhere"} <= set(data)
    assert set(expiry.index.entries) == {"new"}


def test_an_entity_written_while_its_tombstone_is_sent_stays_and_is_written_after_it() -> None:
    expiry, data, changelog, clock = make_expiry()
    put(expiry, "new", 0, 100)
    put(expiry, "old", 0, 1)
    clock.now += IDLE_S
    changelog.records.clear()
    send_tombstone = expiry.send_tombstone

    async def tombstone_while_the_pusher_writes(partition: int, key: str) -> object:
        # the pusher's write starts first and is still on its way when the tombstone is queued
        pushed = asyncio.ensure_future(cast(Any, expiry.send_changelog(partition, key, data[key])))
        await send_tombstone(partition, key)
        return await pushed

    expiry.send_tombstone = tombstone_while_the_pusher_writes
    assert sweep(expiry) == 0
    old = data["old"].to_bytes()
    assert changelog.records == [(0, "old", None), (0, "old", old), (0, "old", old)]


def test_an_entity_that_becomes_active_during_the_sweep_is_kept() -> None:
    expiry, data, changelog, clock = make_expiry()
    put(expiry, "new", 0, 100)
    put(expiry, "old-a", 0, 1)
    put(expiry, "old-b", 0, 2)
    clock.now += IDLE_S
    changelog.records.clear()
    send_tombstone = expiry.send_tombstone

    async def tombstone_while_b_gets_an_event(partition: int, key: str) -> object:
        if key == "old-a":  # the sweep waits here; meanwhile an event comes for "old-b"
            apply(data["old-b"], 99 * H * US_PER_S, "b-again", None, CONFIG)
        return await send_tombstone(partition, key)

    expiry.send_tombstone = tombstone_while_b_gets_an_event
    assert sweep(expiry) == 1
    assert changelog.records == [(0, "old-a", None)]
    assert "old-b" in data


def test_recovery_notes_each_keys_partition_and_a_tombstone_forgets_it() -> None:
    index = KeyIndex(clock=Clock())

    def record(key: str, partition: int, value: bytes | None) -> Any:
        return SimpleNamespace(key=key, message=SimpleNamespace(partition=partition, value=value))

    async def recover() -> None:
        await index.on_changelog_event(record("a", 3, b"state"))
        await index.on_changelog_event(record("b", 1, b"state"))
        await index.on_changelog_event(record("b", 1, None))

    asyncio.run(recover())
    assert index.entries == {"a": (3, 1_000.0)}


def test_a_failing_sweep_is_logged_and_a_paused_sweeper_does_nothing(caplog: pytest.LogCaptureFixture) -> None:
    expiry, data, changelog, clock = make_expiry()
    put(expiry, "new", 0, 100)
    put(expiry, "old", 0, 1)
    clock.now += IDLE_S
    changelog.records.clear()
    asyncio.run(Sweeper([expiry], paused=lambda: True).sweep())
    assert "old" in data

    async def broken(partition: int, key: str) -> object:
        raise ConnectionError("the producer is gone")

    expiry.send_tombstone = broken
    asyncio.run(Sweeper([expiry]).sweep())
    assert "expiry sweep of item_stats failed" in caplog.text
    assert "old" in data  # the tombstone never left: the entity stays, and the next sweep retries


@pytest.mark.parametrize("seed", range(3))
def test_features_with_expiry_equal_the_reference_over_all_events(seed: int) -> None:
    """Seeded simulation of one partition: 240 items over ten days of event time, a little out
    of order (well within the grace), swept every 50 events. Every item still in the table
    (many of them back after expiring) has the features of the pandas reference over all its
    events, and most idle items left the table."""
    rng = random.Random(seed)
    expiry, data, _, clock = make_expiry()
    start = 880_000_000
    # the items in fashion drift (each day 20 of them go cold for good and 20 new ones come up);
    # 20 sporadic items get an event about every 16 h, so they often expire and come back
    times = sorted(rng.uniform(0, 240 * H) for _ in range(3000))
    drawn = [
        (
            start + time_s,
            f"s{rng.randrange(20)}" if rng.random() < 0.1 else f"i{int(time_s // (24 * H)) * 20 + rng.randrange(40)}",
        )
        for time_s in times
    ]
    events = [(round(time_s + rng.uniform(-H, H)), item) for time_s, item in drawn]  # up to 2 h out of order
    expired_once: set[str] = set()

    async def run() -> None:
        for index, (time_s, item) in enumerate(events):
            clock.now = 1_000 + (time_s - start) / 60  # 1 s of wall clock per minute of event time
            state = data.get(item) or EntityState()
            apply(state, time_s * US_PER_S, f"e{index}", None, CONFIG)
            data[item] = state
            await expiry.send_changelog(0, item, state)
            if index % 50 == 0:
                before = set(data)
                await expiry.sweep()
                expired_once.update(before - set(data))

    asyncio.run(run())
    frame = pd.DataFrame([(time_s * US_PER_S, item) for time_s, item in events], columns=["time_us", "item_id"])
    for item, rows in frame.groupby("item_id"):
        if item not in data:
            continue
        latest = int(rows["time_us"].max())
        counts = {
            window: int((rows["time_us"] > latest - seconds * US_PER_S).sum())
            for window, seconds in contracts.WINDOWS_S.items()
        }
        trending = contracts.trending_score(counts["count_1h"], counts["count_24h"])
        assert item_features(data[str(item)], CONFIG) == {**counts, "trending_score": trending}
    assert len(expired_once & set(data)) > 10  # items that expired and came back
    assert len(data) < frame["item_id"].nunique() / 2


def test_tombstones_are_keyed_like_the_changelog_records(tmp_path: Path) -> None:
    settings = StreamsSettings(
        paths=PathSettings(state_dir=tmp_path), streams=StreamsTuning(app_id=f"unit-{uuid.uuid4().hex[:8]}")
    )
    sent: list[tuple[Any, ...]] = []

    class RecordingProducer:
        async def send(self, *args: Any) -> None:
            sent.append(args)

    async def main() -> tuple[str, bytes]:
        from streams.expiry import tombstone_sender

        worker = create_app(settings, sink=RecordingSink())
        try:
            worker.app.producer = RecordingProducer()  # type: ignore[assignment]
            table = cast(TableT[Any, Any], worker.app.tables["item_state"])
            await tombstone_sender(worker.app, table)(3, "i1")
            await worker.pipeline.items.save("i1", EntityState(), 3)
            return table.changelog_topic.get_topic_name(), table.changelog_topic.prepare_key("i1", None)[0]
        finally:
            _close_unstarted_consumer_loop(worker)

    topic_name, key = asyncio.run(main())
    gc.collect()
    assert sent[0] == (topic_name, key, None, 3, None, None)
    assert sent[1][:2] == (topic_name, key)
