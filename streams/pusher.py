"""One view's pusher: coalesces dirty entities, pushes them in the background, then acks.

Why not push inside the agent's batch: a Feast push costs tens of milliseconds plus a fraction
of a millisecond per row, and Faust's ``take_events`` stops buffering while its body runs, so a
push inside the body caps a worker at (batch size / push time). Here the agent applies events
to state and returns at once; the pusher pushes whatever is dirty, one push at a time per view,
while the agent keeps applying the next records. Under load the pushes grow (and coalesce more
events per entity row) instead of falling behind.

At-least-once is kept by holding each event's Kafka message: the agent adds a reference
(``message.incref()``) before its batch is acked, and the pusher releases it (``event.ack()``)
only after the push that carries the event's effect has returned, so Faust never commits an
offset whose features are not written. Each entity's state goes to its table's changelog when
it is pushed (one record per entity per push), before the push, so a committed offset is
always covered by both. ``max_pending`` bounds the events held: beyond it the agent waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from streams import metrics
from streams.windows import EntityState

log = logging.getLogger(__name__)

View = Literal["user_activity", "item_stats"]


@dataclass(frozen=True)
class FeatureRow:
    entity_id: str
    features: dict[str, object]
    version_us: int


class FeatureSink(Protocol):
    """Writes feature rows (blocking: the pusher calls it in a worker thread)."""

    def warm_up(self) -> None:
        """Resolve what pushes need (seconds, once); returns at once when done, and waits for a
        warm-up in progress on another thread."""
        ...

    def push(self, view: View, rows: Sequence[FeatureRow]) -> float | None:
        """Write ``rows``; returns the wall-clock time they became readable online, if known
        (a sink that also writes an offline log returns the time between the two writes), else None."""
        ...

    def store_epoch(self) -> str | None:
        """An id of the online store's current run (it changes when the store restarts and may
        have lost acknowledged writes); None when unknown or unreachable."""
        ...


class StateTable(Protocol):
    """A Faust table of ``EntityState`` by entity id, plus how to persist one key."""

    def get(self, key: str) -> EntityState | None: ...

    def put(self, key: str, state: EntityState) -> None: ...

    async def save(self, key: str, state: EntityState, partition: int) -> Awaitable[object] | None:
        """Send ``state``'s changelog record; returns its delivery future (None: nothing to wait for)."""
        ...


class HeldEvent(Protocol):
    """A Faust event whose message the pusher holds until its push is done."""

    @property
    def message(self) -> Any: ...

    def ack(self) -> bool: ...


@dataclass
class _Dirty:
    state: EntityState
    partition: int


@dataclass
class ViewPusher:
    view: View
    table: StateTable
    sink: FeatureSink
    to_row: Callable[[str, EntityState], FeatureRow]
    max_pending: int = 20_000
    min_interval_s: float = 0.0
    # The share of the time a view's pushes may take (see _run): after a push of d seconds the
    # next starts no sooner than d * (1 / busy_share - 1) after it ended.
    busy_share: float = 1.0
    retry_max_s: float = 5.0
    # Wait for the changelog records' delivery before writing the rows online. Needed where a
    # restarted worker may rebuild a state from redelivered events in another order (items: the
    # by-item topic interleaves bundles from several user partitions differently on every run):
    # a row online whose changelog record died with the worker would be rebuilt with a version
    # (Feast's event timestamp, see streams.windows) that can be no newer than that row despite
    # holding more events, and Feast would keep the stale row. A user's events come back in
    # their partition's order, so a rebuilt user state passes through the exact states (and
    # versions) pushed before; there the wait buys nothing (docs/design/streams.md#per-event-costs).
    changelog_before_online: bool = False
    clock: Callable[[], float] = time.time
    _dirty: dict[str, _Dirty] = field(default_factory=dict)
    _held: list[tuple[HeldEvent, float]] = field(default_factory=list)
    _in_flight: int = 0
    _last_write_s: float = 0.0  # how long the last cycle's write to the store took
    _hurry_until: float = -float("inf")  # pushes are not paced until then (time.monotonic; see hurry)
    _hurried: asyncio.Event = field(default_factory=asyncio.Event)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _progress: asyncio.Condition = field(default_factory=asyncio.Condition)
    _task: asyncio.Task[None] | None = None
    # partitions this worker may no longer write for (see fence); how many revokes (forget_partitions)
    # so far, and the count at each partition's last one (a push cycle drops what was revoked during it)
    fenced: set[int] = field(default_factory=set)
    _revokes: int = 0
    _revoked_at: dict[int, int] = field(default_factory=dict)
    _notifiers: set[asyncio.Task[None]] = field(default_factory=set)

    def hold(
        self, entity_id: str, state: EntityState, partition: int, event: HeldEvent, origin_ts: float | None = None
    ) -> None:
        """Mark ``entity_id`` for the next push and keep ``event`` unacked until then.

        ``origin_ts`` is when the event entered the interactions topic (freshness is measured
        from it); it defaults to the record's own timestamp. One record may be held several
        times (a by-item bundle, one hold per entry): each hold is one reference, released once.
        An event of a fenced partition is held for good (never acked, so never committed here).
        """
        event.message.incref()
        if partition in self.fenced:
            return
        self._held.append((event, event.message.timestamp if origin_ts is None else origin_ts))
        self._dirty[entity_id] = _Dirty(state, partition)

    def forget_partitions(self, partitions: set[int]) -> int:
        """Drop the dirty entities and held events of ``partitions`` (revoked from this worker);
        returns how many events were dropped.

        Their events stay unacked, so their offsets are never committed here: the partitions' new
        owner reads them again and rebuilds the states from the changelog, and this worker never
        writes a row or a changelog record for a partition it no longer owns. (Faust waits for
        held events before it revokes, so normally nothing is left; a fence (:meth:`fence`) drops them early.)
        A push cycle in flight writes nothing more for them and acks nothing (its states are the
        old ones: after the rebalance the table holds the ones restored from the changelog).
        """
        if not partitions:
            return 0
        self._revokes += 1
        for partition in partitions:
            self._revoked_at[partition] = self._revokes
        self._dirty = {key: entry for key, entry in self._dirty.items() if entry.partition not in partitions}
        kept = [(event, ts) for event, ts in self._held if event.message.partition not in partitions]
        dropped = len(self._held) - len(kept)
        self._held = kept
        self._wake_waiters()
        return dropped

    def _wake_waiters(self) -> None:
        """Have a :meth:`kick` waiting for room (and :meth:`drain`) look at ``pending`` again:
        events dropped outside a push cycle free room too, and a cycle cancelled before it began
        notifies no one. Without this, a fence during a push's coalescing wait left an agent
        waiting for room forever, and its unacked batch held the revoke up for good."""

        async def notify() -> None:
            async with self._progress:
                self._progress.notify_all()

        try:
            task = asyncio.get_running_loop().create_task(notify())
        except RuntimeError:  # no running loop: nothing can be waiting
            return
        self._notifiers.add(task)
        task.add_done_callback(self._notifiers.discard)

    def fence(self, partitions: set[int]) -> int:
        """Write nothing more for ``partitions``: no changelog record, no row, no ack; returns
        how many held events were dropped.

        Called when a revoke still waits at its fence time (``streams.faust_app.GaplessConsumer.wait_empty``):
        the group may already have given the partitions to another worker, which restored their
        states from the changelog, and a changelog record written by this worker now would
        replace that worker's newer state at the next recovery. Their events stay unacked here, so
        the new owner reads them again, and Faust's wait before the revoke ends once nothing
        references them. :meth:`unfence` lifts it when the partitions are assigned here again.
        """
        self.fenced |= partitions
        if self._task is not None and not self._task.done():
            # A cycle in flight (say, a push retried while the store is down) holds its events;
            # cancelled, it gives back what is still owned and lets go of the rest at once.
            self._task.cancel()
        return self.forget_partitions(partitions)

    def unfence(self, partitions: set[int]) -> None:
        """``partitions`` are this worker's again (a new assignment, their states restored)."""
        self.fenced -= partitions

    def mark_dirty(self, entities: Iterable[tuple[str, EntityState, int]]) -> int:
        """Push these (entity, state, partition) again at the next cycle, holding no event (an
        online store that lost writes gets them back); returns how many were marked."""
        marked = 0
        for entity_id, state, partition in entities:
            if partition in self.fenced:
                continue
            self._dirty.setdefault(entity_id, _Dirty(state, partition))
            marked += 1
        return marked

    @property
    def pending(self) -> int:
        return len(self._held) + self._in_flight

    async def kick(self) -> None:
        """Start a push if none is running; wait while too many events are held (backpressure)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"push-{self.view}")
        self._wake.set()
        if self.pending >= self.max_pending:
            async with self._progress:
                await self._progress.wait_for(lambda: self.pending < self.max_pending)

    def hurry(self, for_s: float) -> None:
        """Push what is held at once, and every push of the next ``for_s`` seconds without pacing.

        A revoke (or a stop) waits for the agents' records to be acked before it fences them
        (``streams.faust_app.RevokeFence``): a push paced after a slow one could miss that time,
        and each fence of a worker that then exits for a restart starts the other's revoke."""
        self._hurry_until = max(self._hurry_until, time.monotonic() + for_s)
        self._hurried.set()
        self._wake.set()

    async def drain(self) -> None:
        """Wait until everything held so far is pushed and acked (tests, shutdown)."""
        while self.pending:
            await self.kick()
            # Wait for progress, not for "no push in flight": between pushes (their pacing)
            # nothing is in flight while events are held, and that predicate made this a busy loop
            # that never let the push task run. The timeout re-kicks a push task that died.
            with contextlib.suppress(TimeoutError):
                async with self._progress:
                    await asyncio.wait_for(self._progress.wait_for(lambda: self.pending == 0), timeout=1.0)

    async def _run(self) -> None:
        """Push cycles, paced by their own cost: after a cycle whose write to the store took d
        seconds (the part that runs Python in a thread beside the agents; a cycle's wait for
        Kafka's acknowledgements costs no CPU) the next one waits until d * (1 / busy_share - 1)
        has passed since it ended, and ``min_interval_s`` since it began. A cheap push (a light
        load) is followed by the next one almost at once, so an event waits little for its push;
        pushes that grow with the load space themselves out by as much, so the dirty entities
        coalesce into fewer, larger pushes (docs/design/streams.md#push-pacing). While hurried
        (:meth:`hurry`) nothing is paced."""
        last_start = last_end = -float("inf")
        rest_share = 1.0 / self.busy_share - 1.0
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._dirty:
                continue
            not_before = max(last_start + self.min_interval_s, last_end + self._last_write_s * rest_share)
            wait_s = not_before - time.monotonic()
            if wait_s > 0 and time.monotonic() >= self._hurry_until:
                self._hurried.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._hurried.wait(), timeout=wait_s)
            last_start = time.monotonic()
            try:
                failed = await self._cycle()
            finally:
                last_end = time.monotonic()
                self._in_flight = 0
                async with self._progress:
                    self._progress.notify_all()
            if failed:
                await asyncio.sleep(self.retry_max_s / 10)
                self._wake.set()
            if self._dirty:
                self._wake.set()

    async def _cycle(self) -> bool:
        """One push cycle of everything dirty; returns whether it failed (its work was given back).

        The cycle's entities and events live in this frame only, and its lists are emptied
        however it ends: a cancelled task keeps its ``CancelledError``, whose traceback keeps the
        frames it passed through, and a stale reference to a fenced partition's record keeps
        that record in Faust's weak set of unacked messages, so the revoke waiting for it never
        ends (the broker fault tests' stalled worker)."""
        dirty, held = self._dirty, self._held
        self._dirty, self._held = {}, []
        self._in_flight = len(held)
        revokes = self._revokes
        try:
            await self._push_cycle(dirty, held, revokes)
        except asyncio.CancelledError:
            self._give_back(dirty, held, revokes)
            raise
        except Exception:  # noqa: BLE001 -- a bug or a dependency failing outside _push's retry
            # Nothing may be lost: the entities stay dirty and the events held (unacked), and
            # the next cycle pushes them again (a pushed row is written again harmlessly).
            # This loop is a bare task no one awaits, so an error that escaped it used to end
            # it silently, taking the events it held with it.
            metrics.PUSH_FAILURES.labels(self.view).inc()
            log.exception("%s push cycle of %d entities failed; retrying them", self.view, len(dirty))
            self._give_back(dirty, held, revokes)
            return True
        finally:
            dirty.clear()
            held.clear()
        return False

    async def _push_cycle(self, dirty: dict[str, _Dirty], held: list[tuple[HeldEvent, float]], revokes: int) -> None:
        """Changelog records, then the feature rows, then (once Kafka has the records) the acks of
        the events they carry. A revoke during the cycle (``revokes`` is the count at its start)
        ends it before its next write: the entities and events of partitions still owned go back
        for the next cycle, and no event of this cycle is acked."""

        def revoked() -> bool:
            if self._revokes == revokes:
                return False
            self._give_back(dirty, held, revokes)
            return True

        receipts = []
        for entity_id, entry in dirty.items():
            if revoked():
                return
            receipts.append(await self.table.save(entity_id, entry.state, entry.partition))
        if self.changelog_before_online:
            await asyncio.gather(*(receipt for receipt in receipts if receipt is not None))
        if revoked():
            return
        rows = [self.to_row(entity_id, entry.state) for entity_id, entry in dirty.items()]
        written_at = await self._push(rows)
        if not self.changelog_before_online:
            # Delivered (normally long since) before the events are acked: a changelog record the
            # broker refused would otherwise fail only its future, and the offsets committed after
            # the acks would leave a state no recovery can rebuild. A refusal fails this cycle,
            # which is retried (records and rows written again, the events still held).
            await asyncio.gather(*(receipt for receipt in receipts if receipt is not None))
        if revoked():
            return
        readable_at = self.clock() if written_at is None else written_at
        freshness = metrics.FRESHNESS_SECONDS.labels(self.view)
        for event, origin_ts in held:
            freshness.observe(max(0.0, readable_at - float(origin_ts)))
            event.ack()

    def _give_back(self, dirty: dict[str, _Dirty], held: list[tuple[HeldEvent, float]], revokes: int) -> None:
        """Put back a cycle's entities and events (the cycle started at ``revokes``), but those of
        partitions revoked since or fenced; states marked dirty since are newer."""

        def owned(partition: int) -> bool:
            return partition not in self.fenced and self._revoked_at.get(partition, 0) <= revokes

        kept = {key: entry for key, entry in dirty.items() if owned(entry.partition)}
        self._dirty = {**kept, **self._dirty}
        self._held = [(event, ts) for event, ts in held if owned(event.message.partition)] + self._held

    async def _push(self, rows: Sequence[FeatureRow]) -> float | None:
        def timed_push() -> tuple[float | None, float]:
            # The write's own cost paces the next push: not a warm-up it waited for (seconds at
            # a worker's start), nor its wait for a thread.
            self.sink.warm_up()
            started = time.perf_counter()
            written_at = self.sink.push(self.view, rows)
            return written_at, time.perf_counter() - started

        delay = 0.1
        while True:
            try:
                written_at, self._last_write_s = await asyncio.to_thread(timed_push)
            except Exception:  # noqa: BLE001 -- retried: acking without the push would lose the rows
                metrics.PUSH_FAILURES.labels(self.view).inc()
                log.exception("push of %d %s rows failed; retrying in %.1fs", len(rows), self.view, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
                continue
            metrics.PUSH_SECONDS.labels(self.view).observe(self._last_write_s)
            metrics.PUSHES.labels(self.view).inc()
            metrics.PUSHED_ROWS.labels(self.view).inc(len(rows))
            return written_at
