"""Idle entities leave the worker's tables, so its memory follows the entities still active.

A Faust timer (:func:`install`, every ``streams.expiry_interval_s``) sweeps each table per
changelog partition. An entity **expires** when it is idle

* in event time: its newest event is more than ``retention + expiry_grace_s`` older than its
  partition's progress, the 90th percentile of the newest event times of the partition's
  entities (a percentile, so that a few entities with far-off event times cannot expire the
  rest); retention is ``WindowConfig.retention_us``;
* and on the wall clock: its state was not written (pushed, or read back from the changelog at
  recovery) for ``expiry_idle_s``.

Why both: a replay carries 1997 timestamps, so wall-clock idleness alone says nothing about
event time; and a fast replay compresses days of event time into seconds, so a source partition
that lags another by seconds lags by days of event time: the wall-clock condition keeps such a
lag from expiring an entity whose late events are still on their way.

What stays exact: every expired event is older than ``progress - retention - grace``. An event
that reaches the entity later starts a fresh state; if it is newer than that, the expired events
lie outside all its windows (and, older than its lateness, could only be late redeliveries), so
the counts, kind counts, ``last_event_ts`` and ``trending_score`` are those of the full state.
Only an event more than ``expiry_grace_s`` behind its partition's progress could miss expired
events in its windows. A user's ``recent_items`` starts over from such a return (the full state
would have kept items from before it); the online row keeps the old list until then.

An expired entity leaves the table and its changelog partition gets a tombstone (a record with
no value), so a recovering worker (Faust's memory store deletes a key on a tombstone) does not
bring it back. The tombstone is sent before the entity leaves memory: if the pusher wrote the
entity while the tombstone was on its way, that record may precede the tombstone, so the entity
stays and its state is written again after it. The sweep only touches partitions assigned to
this worker, never during a rebalance or recovery, and counts what it expired
(``streams_expired_entities_total``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import faust
from faust.serializers import codecs
from faust.types import TableT

from streams import metrics
from streams.settings import StreamsTuning
from streams.windows import US_PER_S, EntityState

log = logging.getLogger(__name__)

PROGRESS_PERCENTILE = 90
SendChangelog = Callable[[int, str, EntityState], Awaitable[object]]
SendTombstone = Callable[[int, str], Awaitable[object]]


@dataclass
class KeyIndex:
    """Each key's changelog partition and when (wall clock) its state was last written, for one table.

    Fed by the pusher's changelog writes (:meth:`tracking`) and by recovery's changelog events
    (:meth:`on_changelog_event`, Faust's ``Table(on_changelog_event=...)``).
    """

    clock: Callable[[], float] = time.time
    entries: dict[str, tuple[int, float]] = field(default_factory=dict)

    def touch(self, key: str, partition: int) -> None:
        self.entries[key] = (partition, self.clock())

    def tracking(self, send: SendChangelog) -> SendChangelog:
        """``send`` (a table's changelog sender), noting each key it writes."""

        async def send_and_note(partition: int, key: str, state: EntityState) -> object:
            self.touch(key, partition)
            return await send(partition, key, state)

        return send_and_note

    async def on_changelog_event(self, event: Any) -> None:
        """A changelog record read at recovery: a state (noted) or a tombstone (forgotten)."""
        key = event.key
        if not isinstance(key, str):
            return
        if event.message.value is None:
            self.entries.pop(key, None)
        else:
            self.touch(key, event.message.partition)


@dataclass
class TableExpiry:
    """The expiry of one table (see the module docstring); :meth:`sweep` runs one pass."""

    view: str
    data: MutableMapping[str, EntityState]
    index: KeyIndex
    send_changelog: SendChangelog
    send_tombstone: SendTombstone
    owned_partitions: Callable[[], set[int]]
    retention_us: int
    grace_us: int
    idle_s: float

    async def sweep(self) -> int:
        """Expire this table's idle entities; returns how many left."""
        owned = self.owned_partitions()
        now = self.index.clock()
        by_partition: dict[int, list[tuple[int, str, tuple[int, float]]]] = {}
        for key, entry in list(self.index.entries.items()):
            state = self.data.get(key)
            if state is None or entry[0] not in owned:
                del self.index.entries[key]  # gone, or no longer this worker's: recovery notes it again
                continue
            latest = state.latest_us
            if latest is not None:
                by_partition.setdefault(entry[0], []).append((latest, key, entry))
        candidates: list[tuple[int, str, tuple[int, float]]] = []
        for entities in by_partition.values():
            threshold = _progress([latest for latest, _, _ in entities]) - self.retention_us - self.grace_us
            candidates += [
                (latest, key, entry)
                for latest, key, entry in entities
                if latest < threshold and now - entry[1] >= self.idle_s
            ]
        expired = 0
        for latest, key, entry in candidates:
            state, partition = self.data.get(key), entry[0]
            # the sends below wait: an entity may have had an event or a write since the pass above
            if state is None or state.latest_us != latest or self.index.entries.get(key) is not entry:
                continue
            await self.send_tombstone(partition, key)
            if self.data.get(key) is state and self.index.entries.get(key) is entry:
                del self.data[key]
                del self.index.entries[key]
                expired += 1
                continue
            # written while the tombstone was on its way: its record may precede the tombstone
            current = self.data.get(key)
            if current is not None:
                await self.send_changelog(partition, key, current)
        metrics.EXPIRED_ENTITIES.labels(self.view).inc(expired)
        metrics.TABLE_ENTITIES.labels(self.view).set(len(self.data))
        return expired


def _progress(latest_times: list[int]) -> int:
    """The partition's event-time progress: the 90th percentile (nearest rank) of its entities'
    newest event times."""
    ordered = sorted(latest_times)
    return ordered[max(0, -(-len(ordered) * PROGRESS_PERCENTILE // 100) - 1)]


@dataclass
class Sweeper:
    """Sweeps every table in turn; never raises (a failed sweep is logged and retried next time)."""

    tables: Sequence[TableExpiry]
    paused: Callable[[], bool] = lambda: False

    async def sweep(self) -> None:
        if self.paused():
            return
        for table in self.tables:
            try:
                expired = await table.sweep()
            except Exception:  # noqa: BLE001 -- a timer that raises stops for good; the next sweep retries
                log.exception("expiry sweep of %s failed", table.view)
                continue
            if expired:
                log.info("expired %d idle %s entities (%d left)", expired, table.view, len(table.data))


@dataclass(frozen=True)
class ExpiringTable:
    """What :func:`install` needs of one Faust table of ``EntityState``."""

    view: str
    table: TableT[Any, Any]
    source_topic: str  # the topic its agent reads: a changelog partition is that topic's partition
    index: KeyIndex
    send_changelog: SendChangelog  # the pusher's sender (``index.tracking(...)``)


def install(
    app: faust.App, tuning: StreamsTuning, retention_us: int, tables: Sequence[ExpiringTable]
) -> Sweeper | None:
    """Sweep ``tables`` every ``tuning.expiry_interval_s`` (None and nothing installed for 0)."""
    if tuning.expiry_interval_s <= 0:
        return None

    def owned_partitions(topic: str) -> Callable[[], set[int]]:
        return lambda: {tp.partition for tp in app.consumer.assignment() if tp.topic == topic}

    sweeper = Sweeper(
        [
            TableExpiry(
                view=table.view,
                data=table.table.data,
                index=table.index,
                send_changelog=table.send_changelog,
                send_tombstone=tombstone_sender(app, table.table),
                owned_partitions=owned_partitions(table.source_topic),
                retention_us=retention_us,
                grace_us=round(tuning.expiry_grace_s * US_PER_S),
                idle_s=tuning.expiry_idle_s,
            )
            for table in tables
        ],
        paused=lambda: bool(app.rebalancing or app.in_recovery),
    )
    app.timer(tuning.expiry_interval_s, name="streams.expire_idle")(sweeper.sweep)
    return sweeper


def tombstone_sender(app: faust.App, table: TableT[Any, Any]) -> SendTombstone:
    """Send a key's tombstone straight to the app's producer, keyed as ``streams.app``'s
    changelog sender keys its records (the table's ``json`` key codec)."""
    topic_name = table.changelog_topic.get_topic_name()
    key_codec = codecs.get_codec("json")

    async def send(partition: int, key: str) -> object:
        return await app.producer.send(topic_name, key_codec.dumps(key), None, partition, None, None)

    return send
