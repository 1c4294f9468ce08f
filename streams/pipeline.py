"""What the worker does with one batch of records, apart from Faust's plumbing.

``streams.app`` hands each ``stream.take_events(N, within=T)`` batch to :class:`FeaturePipeline`:

* ``ingest_batch`` (records of ``topics.interactions``, keyed by user): decode and validate each
  raw value (``decode_event``, which rejects far-future times); anything that fails, and any
  exception while handling a record, goes to the dead-letter topic with its source topic,
  partition and offset (``DeadLetter.for_raw``) and is counted. Valid events are forwarded to
  the repartition topic, one bundle per item partition per batch (``streams.repartition``: item
  id, event time, event id and the original Kafka timestamp), then update the users' states.
* ``item_batch`` (bundles of the repartition topic): every entry updates its item's state.

Where the dataset counts event kinds on their own (``WindowConfig.counted_kinds``), both sides
pass each event's kind to its state (the bundle entries carry it); a one-kind dataset forwards
no kind and its states record none.

Accepted events (and duplicates: their first push may have died with a crashed worker) mark
their entity dirty in the view's :class:`~streams.pusher.ViewPusher`, which writes the entity's
changelog record, pushes its feature row and only then releases the event's Kafka message for
commit. A crash before that redelivers the event: it is a duplicate of the recovered state (or,
when the changelog was not written either, applied again) and the same row is pushed again,
which Feast ignores or applies by timestamp. Late events are counted and dropped: they lie
outside every window (see ``streams.windows``), so there is nothing to push and nothing to
replay, and dead-lettering them would flood the DLQ during any catch-up.

The outputs (dead letters, repartition) and the feature sink are small interfaces so the unit
tests can replace them at the transport boundary and run the agents in ``test_context()``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from pydantic import ValidationError

from streamrec.core.errors import EventValidationError
from streamrec.core.events import DeadLetter, Interaction, decode_event
from streams import metrics, repartition
from streams.pusher import FeatureRow, FeatureSink, StateTable, View, ViewPusher
from streams.repartition import ItemEvent, item_partition
from streams.windows import EntityState, Outcome, WindowConfig, apply, item_features, to_us, user_features

log = logging.getLogger(__name__)

__all__ = ["BatchReport", "FeaturePipeline", "FeatureRow", "FeatureSink", "MappingTable", "Outputs", "View"]


class RecordLike(Protocol):
    """The parts of a Faust ``Message`` the pipeline reads."""

    topic: str
    partition: int
    offset: int
    timestamp: float
    key: Any
    value: Any

    def incref(self, n: int = 1) -> None: ...


class EventLike(Protocol):
    @property
    def message(self) -> RecordLike: ...

    def ack(self) -> bool: ...


class Outputs(Protocol):
    """Where records go besides the feature store (Kafka topics in the worker)."""

    async def dead_letter(self, letter: DeadLetter, key: bytes | None) -> None: ...

    async def forward_to_items(self, partition: int, value: bytes, timestamp_s: float) -> None:
        """Send one by-item bundle (``streams.repartition``) to ``partition`` of the repartition topic."""


@dataclass
class BatchReport:
    records: int = 0
    accepted: int = 0
    duplicates: int = 0
    late: int = 0
    dead_lettered: int = 0
    # (record, error) of events that failed while being applied; dead-lettered at the batch's end
    failed: list[tuple[RecordLike, Exception]] = field(default_factory=list, repr=False)


@dataclass
class FeaturePipeline:
    users: StateTable
    items: StateTable
    outputs: Outputs
    sink: FeatureSink
    window: WindowConfig
    max_future_skew: timedelta
    item_partitions: int = 1
    max_pending: int = 20_000
    push_min_interval_s: float = 0.0
    push_busy_share: float = 1.0
    clock: Callable[[], float] = time.time
    pushers: dict[View, ViewPusher] = field(default_factory=dict)
    # Seeks the consumer of (topic, partition) back to an offset (see _check_offsets); None: only count.
    rewind: Callable[[str, int, int], Awaitable[object]] | None = None
    # Where the group should resume (topic, partition): its committed offset, else the earliest
    # one; None when unknown (see _check_offsets). None here: the first record sets the start.
    start_offset: Callable[[str, int], Awaitable[int | None]] | None = None
    # next expected offset, and a rewind in progress, by (topic, partition) (see _check_offsets)
    next_offsets: dict[tuple[str, int], int] = field(default_factory=dict)
    rewinding: dict[tuple[str, int], int] = field(default_factory=dict)
    # when each open rewind was last sought (``clock``), and how long before it is sought again
    rewind_sought_at: dict[tuple[str, int], float] = field(default_factory=dict)
    rewind_retry_s: float = 5.0
    # the first offset handed over of each partition whose start was not known then (late_start_offset)
    unchecked_starts: dict[tuple[str, int], int] = field(default_factory=dict)
    _late_rewinds: set[asyncio.Future[object]] = field(default_factory=set, repr=False)
    # the online store's run last seen (check_feature_store)
    store_epoch: str | None = None

    def pusher(self, view: View) -> ViewPusher:
        if view not in self.pushers:
            to_row = self._user_row if view == "user_activity" else self._item_row
            table = self.users if view == "user_activity" else self.items
            self.pushers[view] = ViewPusher(
                view,
                table,
                self.sink,
                to_row,
                max_pending=self.max_pending,
                min_interval_s=self.push_min_interval_s,
                busy_share=self.push_busy_share,
                changelog_before_online=view == "item_stats",
                clock=self.clock,
            )
        return self.pushers[view]

    async def ingest_batch(self, events: Sequence[EventLike]) -> BatchReport:
        """Validate, forward to the item side (bundled), then apply to user states."""
        metrics.EVENTS_IN.inc(len(events))
        report = BatchReport(records=len(events))
        valid: list[tuple[EventLike, Interaction]] = []
        now = datetime.fromtimestamp(self.clock(), UTC)  # once a batch: the future-skew check's reference
        events = await self._check_offsets(events)
        for event in events:
            record = event.message
            try:
                valid.append((event, _decode_interaction(_as_bytes(record.value), self.max_future_skew, now)))
            except EventValidationError as exc:
                await self._dead_letter(record, exc, report)
        # Forward first: an event whose bundle cannot be sent is dead-lettered with its state untouched.
        counting_kinds = bool(self.window.counted_kinds)  # else no kind on the wire: nothing counts it
        entries = [
            ItemEvent(
                interaction.item_id,
                to_us(interaction.event_time),
                interaction.event_id,
                event.message.timestamp,
                interaction.kind if counting_kinds else None,
            )
            for event, interaction in valid
        ]
        bundles: dict[int, list[tuple[EventLike, ItemEvent]]] = {}
        for (event, _), entry in zip(valid, entries, strict=True):
            bundles.setdefault(item_partition(entry.item_id, self.item_partitions), []).append((event, entry))
        failed: set[int] = set()
        for partition, bundle in bundles.items():
            try:
                value = repartition.encode([entry for _, entry in bundle])
                await self.outputs.forward_to_items(partition, value, min(entry.origin_ts for _, entry in bundle))
            except Exception as exc:  # noqa: BLE001 -- never drop an event silently: dead-letter it
                log.exception("could not forward %d events to by-item partition %d", len(bundle), partition)
                for event, _ in bundle:
                    failed.add(id(event))
                    await self._dead_letter(event.message, exc, report)
        table, pusher = self.users, self.pusher("user_activity")
        _observe_applied("user_activity", self.clock(), entries)
        for (event, interaction), entry in zip(valid, entries, strict=True):
            if id(event) in failed:
                continue
            self._apply(
                "user_activity", table, pusher, event, report,
                interaction.user_id, entry.time_us, entry.event_id, entry.item_id, entry.origin_ts, interaction.kind,
            )  # fmt: skip
        await self._flush(report, "user_activity")
        await pusher.kick()
        return report

    async def item_batch(self, events: Sequence[EventLike]) -> BatchReport:
        """Apply every entry of each by-item bundle (``streams.repartition``) to item states."""
        report = BatchReport(records=len(events))
        events = await self._check_offsets(events)
        table, pusher = self.items, self.pusher("item_stats")
        for event in events:
            try:
                entries = repartition.decode(_as_bytes(event.message.value))
            except EventValidationError as exc:
                await self._dead_letter(event.message, exc, report)
                continue
            _observe_applied("item_stats", self.clock(), entries)
            for entry in entries:
                self._apply(
                    "item_stats", table, pusher, event, report,
                    entry.item_id, entry.time_us, entry.event_id, None, entry.origin_ts, entry.kind,
                )  # fmt: skip
        await self._flush(report, "item_stats")
        await pusher.kick()
        return report

    async def _check_offsets(self, events: Sequence[EventLike]) -> Sequence[EventLike]:
        """Catch a record the consumer skipped (an offset jump) and have it read again.

        Neither the interactions topic nor the by-item topic is compacted or transactional, so
        their offsets are contiguous and a jump means the consumer never handed a record to the
        agent. Seen here (``streams_offset_gaps_total``): Faust's consumer, when a restarted worker
        resumes its partitions while it seeks them to committed offsets, now and then drops one
        record of a partition that has no committed offset yet (the seek is then a no-op in
        aiokafka, so nothing reads it again), and it marks the hole as a gap that later commits
        pass over. So on a jump the partition is rewound to the first missing offset
        (``rewind``: the consumer's seek); the records after it are read again as duplicates,
        which change nothing.

        Records handed over after the jump but before the rewind still arrive (they wait in the
        agent's stream); they are parked like the first one, without another seek. The consumer
        (``streams.faust_app.GaplessConsumer``) keeps the rewind open until the re-read record
        comes through, so one seek per hole suffices.

        The first record of a newly assigned partition is checked too, against ``start_offset``
        (the group's committed offset, else the partition's earliest): in a group of two workers,
        Faust handed a partition that had no committed offset yet (its killed owner had pushed
        nothing) to the survivor from a later offset, skipping every record before it.

        Returns the events to apply: a record beyond a hole is applied only when it is read again
        after the rewind, in offset order, since applied first its newer events would make the
        hole's older ones late (docs/design/streams.md#offset-gaps). It stays unacked (a reference
        is kept, as the pusher does), so no commit covers it before its second reading.
        """
        expected, rewinding = self.next_offsets, self.rewinding
        rewind_now: dict[tuple[str, int], int] = {}
        parked: set[int] = set()
        if self.start_offset is not None:
            for topic, partition in {(e.message.topic, e.message.partition) for e in events} - expected.keys():
                start = await self.start_offset(topic, partition)
                if start is not None:
                    log.info("%s[%d] assigned to this worker: its records start at offset %d", topic, partition, start)
                    expected[(topic, partition)] = start
        for event in events:
            record = event.message
            key = (record.topic, record.partition)
            want = expected.get(key)
            if want is None:
                log.info("first record of %s[%d] handed to the worker: offset %d", *key, record.offset)
                self.unchecked_starts[key] = record.offset
            elif record.offset > want:
                new_hole = rewinding.get(key) != want  # else a record fetched before our rewind
                if new_hole:
                    metrics.OFFSET_GAPS.inc(record.offset - want)
                    log.error("%s[%d]: offsets %d..%d were never handed to the worker", *key, want, record.offset - 1)
                if self.rewind is not None:
                    if new_hole or self.clock() - self.rewind_sought_at.get(key, 0.0) > self.rewind_retry_s:
                        rewinding[key] = rewind_now[key] = want
                    event.message.incref()  # never acked: its second reading is applied and acked
                    parked.add(id(event))
                    continue
            if want is None or record.offset >= want:
                expected[key] = record.offset + 1
                if key in rewinding and record.offset >= rewinding[key]:
                    del rewinding[key]
                    self.rewind_sought_at.pop(key, None)
                    rewind_now.pop(key, None)
        metrics.OPEN_GAPS.set(len(rewinding))
        await self._seek_back(rewind_now)
        return [event for event in events if id(event) not in parked] if parked else events

    def late_start_offset(self, topic: str, partition: int, start: int) -> None:
        """Where a partition starts for the group, known only after its first record was handed
        over (``streams.app.GroupStartOffsets``): records between the two were skipped. They are
        read again like any hole (the partition is rewound to ``start``; what was applied since
        comes again as duplicates), only later, after newer events of theirs were applied.
        """
        key = (topic, partition)
        first = self.unchecked_starts.pop(key, None)
        if first is None or start >= first or key not in self.next_offsets:
            return  # not this worker's any more, or nothing skipped
        metrics.OFFSET_GAPS.inc(first - start)
        log.error(
            "%s[%d]: offsets %d..%d were never handed to the worker (found late: where the partition starts "
            "was read after its first record); reading them again",
            topic,
            partition,
            start,
            first - 1,
        )
        self.next_offsets[key] = start
        self.rewinding[key] = start
        metrics.OPEN_GAPS.set(len(self.rewinding))
        if self.rewind is not None:
            self.rewind_sought_at[key] = self.clock()
            rewind = asyncio.ensure_future(self.rewind(topic, partition, start))
            self._late_rewinds.add(rewind)
            rewind.add_done_callback(self._late_rewinds.discard)

    async def retry_rewinds(self) -> None:
        """Seek again each rewind whose record has not come ``rewind_retry_s`` after its last seek
        (a re-read record Faust dropped before the agent saw it); on a timer, so a partition whose
        every later record is already parked does not wait forever."""
        due_before = self.clock() - self.rewind_retry_s
        await self._seek_back(
            {key: want for key, want in self.rewinding.items() if self.rewind_sought_at.get(key, 0.0) < due_before}
        )

    async def _seek_back(self, rewinds: Mapping[tuple[str, int], int]) -> None:
        if self.rewind is None:
            return
        for (topic, partition), offset in rewinds.items():
            again = (topic, partition) in self.rewind_sought_at
            if again:
                log.warning("%s[%d]: offset %d has not come back; seeking there again", topic, partition, offset)
            else:
                log.info("rewinding %s[%d] to offset %d to read the missing records again", topic, partition, offset)
            self.rewind_sought_at[(topic, partition)] = self.clock()
            await self.rewind(topic, partition, offset)

    def forget_partitions(self, revoked: set[tuple[str, int]], interactions_topic: str, by_item_topic: str) -> None:
        """Partitions (topic, partition) this worker no longer owns after a rebalance.

        Their offset progress is dropped: when a partition comes back, other workers have moved
        it on, and a stale expected offset would look like a gap and rewind over their records.
        Whatever the pushers still hold for them is dropped unpushed (``ViewPusher.forget_partitions``).
        """
        for key in revoked:
            self.next_offsets.pop(key, None)
            self.unchecked_starts.pop(key, None)
            self.rewind_sought_at.pop(key, None)
            if self.rewinding.pop(key, None) is not None:
                metrics.ABANDONED_GAPS.inc()
                log.error("%s[%d] revoked while its skipped records were being read again", *key)
        metrics.OPEN_GAPS.set(len(self.rewinding))
        for pusher, partitions in self._pushers_of(revoked, interactions_topic, by_item_topic):
            dropped = pusher.forget_partitions(partitions)
            if dropped:
                log.warning("dropped %d unpushed %s events of revoked partitions %s", dropped, pusher.view, partitions)

    def fence_partitions(self, revoked: set[tuple[str, int]], interactions_topic: str, by_item_topic: str) -> None:
        """Stop every write for partitions still held at a revoke's fence time (``ViewPusher.fence``):
        another worker may own them already. Lifted by :meth:`unfence_partitions`."""
        for pusher, partitions in self._pushers_of(revoked, interactions_topic, by_item_topic):
            dropped = pusher.fence(partitions)
            log.warning(
                "%s: fenced partitions %s (now %s), %d held events left to their next owner",
                pusher.view,
                partitions,
                sorted(pusher.fenced),
                dropped,
            )

    def unfence_partitions(self, assigned: set[tuple[str, int]], interactions_topic: str, by_item_topic: str) -> None:
        """``assigned`` are this worker's again: their writes resume."""
        for pusher, partitions in self._pushers_of(assigned, interactions_topic, by_item_topic):
            if lifted := sorted(pusher.fenced & partitions):
                log.info("%s: partitions %s assigned again, no longer fenced", pusher.view, lifted)
            pusher.unfence(partitions)

    def _pushers_of(
        self, partitions: set[tuple[str, int]], interactions_topic: str, by_item_topic: str
    ) -> list[tuple[ViewPusher, set[int]]]:
        """Each view's pusher with the partitions of ``partitions`` it writes for (users: the
        interactions topic's, items: the by-item topic's)."""
        views: tuple[tuple[View, str], ...] = (("user_activity", interactions_topic), ("item_stats", by_item_topic))
        found = []
        for view, topic in views:
            mine = {partition for name, partition in partitions if name == topic}
            if mine:
                found.append((self.pusher(view), mine))
        return found

    async def check_feature_store(self, owned: Mapping[View, Iterable[tuple[str, int]]]) -> int:
        """Push every owned entity again if the online store restarted since the last check.

        Redis acknowledges a write before its append-only file is fsynced (every second by
        default), so a Redis that died and came back may lack rows whose events are committed
        here and will never be read again. Its ``run_id`` (``FeatureSink.store_epoch``) tells a
        restart; then every state this worker owns (``owned``: entity id and changelog partition
        per view) is pushed again: the newest state wins in Feast whatever was lost. Returns the
        number of entities marked (0: no restart, or the store does not answer yet).
        """
        epoch = await asyncio.to_thread(self.sink.store_epoch)
        if epoch is None:
            return 0
        previous, self.store_epoch = self.store_epoch, epoch
        if previous is None or previous == epoch:
            return 0
        metrics.STORE_RESTARTS.inc()
        marked = 0
        for view, entities in owned.items():
            table, pusher = self.users if view == "user_activity" else self.items, self.pusher(view)
            found = ((key, table.get(key), partition) for key, partition in entities)
            marked += pusher.mark_dirty((key, state, partition) for key, state, partition in found if state is not None)
            await pusher.kick()
        log.warning("the online store restarted (run %s, was %s): pushing %d entities again", epoch, previous, marked)
        return marked

    def hurry_pushes(self, for_s: float) -> None:
        """Push what is held at once and without pacing for ``for_s`` seconds (a revoke waits
        for the acks: ``ViewPusher.hurry``)."""
        for pusher in self.pushers.values():
            pusher.hurry(for_s)

    async def drain(self) -> None:
        """Wait until every held event is pushed and acked."""
        for pusher in list(self.pushers.values()):
            await pusher.drain()

    def _apply(
        self,
        view: View,
        table: StateTable,
        pusher: ViewPusher,
        event: EventLike,
        report: BatchReport,
        entity_id: str,
        time_us: int,
        event_id: str,
        item_id: str | None,
        origin_ts: float,
        kind: str | None,
    ) -> None:
        """Apply one event to its entity's state and hold it for the push; failures go to ``report.failed``."""
        try:
            state = table.get(entity_id)
            if state is None:
                state = EntityState()
                table.put(entity_id, state)
            outcome = apply(state, time_us, event_id, item_id, self.window, kind)
        except EventValidationError as exc:  # a rule refused it (e.g. oversize): dead-lettered with its reason
            record = event.message
            log.warning("refused %s[%s]@%s (%s): %s", record.topic, record.partition, record.offset, entity_id, exc)
            report.failed.append((record, exc))
            return
        except Exception as exc:  # noqa: BLE001 -- dead-lettered by _flush: never drop an event silently
            record = event.message
            log.exception("failed on %s[%s]@%s (%s)", record.topic, record.partition, record.offset, entity_id)
            report.failed.append((record, exc))
            return
        if outcome is Outcome.LATE:
            report.late += 1
            return
        if outcome is Outcome.DUPLICATE:
            report.duplicates += 1
        else:
            report.accepted += 1
        # A duplicate is pushed again too: its first push may have died with a crashed worker.
        pusher.hold(entity_id, state, event.message.partition, event, origin_ts)

    async def _flush(self, report: BatchReport, view: View) -> None:
        """Count the batch once (a labelled counter per event was a visible cost) and dead-letter failures."""
        metrics.ACCEPTED.labels(view).inc(report.accepted)
        metrics.DUPLICATES.labels(view).inc(report.duplicates)
        metrics.LATE_EVENTS.labels(view).inc(report.late)
        failed, report.failed = report.failed, []
        # One dead letter per record: several entries of one by-item bundle may fail.
        first_error = {id(record): (record, exc) for record, exc in reversed(failed)}
        for record, exc in first_error.values():
            await self._dead_letter(record, exc, report)

    def _user_row(self, entity_id: str, state: EntityState) -> FeatureRow:
        return FeatureRow(entity_id, user_features(state, self.window), state.version_us)

    def _item_row(self, entity_id: str, state: EntityState) -> FeatureRow:
        return FeatureRow(entity_id, item_features(state, self.window), state.version_us)

    async def _dead_letter(self, record: RecordLike, error: Exception, report: BatchReport) -> None:
        letter = DeadLetter.for_raw(
            value=_as_bytes(record.value),
            key=_as_bytes(record.key),
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            error=error,
        )
        await self.outputs.dead_letter(letter, _as_bytes(record.key))
        report.dead_lettered += 1
        metrics.DEAD_LETTERS.labels(letter.reason).inc()


def _observe_applied(view: View, now: float, entries: Sequence[ItemEvent]) -> None:
    """Observe every ``APPLIED_SAMPLE_EVERY``-th event: a diagnostic, and prometheus_client's
    ``observe`` (a lock and a scan of the buckets) per event is a visible cost
    (docs/design/streams.md#per-event-costs)."""
    histogram = metrics.APPLIED_SECONDS.labels(view)
    for entry in entries[:: metrics.APPLIED_SAMPLE_EVERY]:
        histogram.observe(max(0.0, now - entry.origin_ts))


def _decode_interaction(raw: bytes | None, max_future_skew: timedelta, now: datetime) -> Interaction:
    """``decode_event(raw, Interaction, ...)``, in one pass over the JSON when ``raw`` is valid.

    pydantic's own JSON parser validates straight from the bytes, in less than half the time of
    ``json.loads`` and then ``model_validate`` (docs/design/streams.md#per-event-costs); the
    model is not strict, so both accept the same values. Anything it rejects, or that is too far
    in the future, goes through ``decode_event`` for the precise dead-letter reason
    (undecodable, schema_version...).
    """
    if raw is not None:
        try:
            event = Interaction.model_validate_json(raw)
        except ValidationError:
            pass
        else:
            if event.event_time - now <= max_future_skew:
                return event
    return decode_event(raw, Interaction, now=now, max_future_skew=max_future_skew)


def _as_bytes(value: Any) -> bytes | None:
    """Raw topics hand over bytes; the test harness may hand over str."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return bytes(value)


class MappingTable:
    """``StateTable`` over a Faust table's in-memory data and its changelog topic.

    Changelog records are sent with ``await topic.send(...)`` (straight to the Kafka producer's
    batches) rather than Faust's ``table[key] = value``, whose ``send_soon`` buffer holds 100
    messages and then blocks every stream while it drains them one by one; a push of a few
    hundred items would stall the worker. Offsets are still committed only after the producer
    is flushed, so a committed offset is covered by its changelog record.
    """

    def __init__(
        self,
        data: MutableMapping[str, EntityState],
        send_changelog: Callable[[int, str, EntityState], Awaitable[object]],
    ) -> None:
        self.data = data
        self.send_changelog = send_changelog

    def get(self, key: str) -> EntityState | None:
        return self.data.get(key)

    def put(self, key: str, state: EntityState) -> None:
        """Keep a new state in memory (its changelog record is written when it is pushed)."""
        self.data[key] = state

    async def save(self, key: str, state: EntityState, partition: int) -> Awaitable[object] | None:
        """Keep ``state`` and send its changelog record; returns the producer's delivery future."""
        self.data[key] = state
        receipt = await self.send_changelog(partition, key, state)
        return receipt if inspect.isawaitable(receipt) else None
