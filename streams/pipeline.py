"""What the worker does with one batch of records, apart from Faust's plumbing.

``streams.app`` hands each ``stream.take_events(N, within=T)`` batch to :class:`FeaturePipeline`:

* ``ingest_batch`` (records of ``topics.interactions``, keyed by user): decode and validate each
  raw value (``decode_event``, which rejects far-future times); anything that fails, and any
  exception while handling a record, goes to the dead-letter topic with its source topic,
  partition and offset (``DeadLetter.for_raw``) and is counted. Valid events update the user's
  state and are forwarded, unchanged, to the item-keyed repartition topic with their original
  Kafka timestamp.
* ``item_batch`` (records of the repartition topic, keyed by item): the same for item states.

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

import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol

from streamrec.errors import EventValidationError
from streamrec.events import DeadLetter, Interaction, decode_event
from streams import metrics
from streams.pusher import FeatureRow, FeatureSink, StateTable, View, ViewPusher
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

    async def forward_to_items(self, item_id: str, value: bytes, timestamp_s: float) -> None: ...


@dataclass
class BatchReport:
    records: int = 0
    accepted: int = 0
    duplicates: int = 0
    late: int = 0
    dead_lettered: int = 0


@dataclass
class FeaturePipeline:
    users: StateTable
    items: StateTable
    outputs: Outputs
    sink: FeatureSink
    window: WindowConfig
    max_future_skew: timedelta
    max_pending: int = 20_000
    clock: Callable[[], float] = time.time
    pushers: dict[View, ViewPusher] = field(default_factory=dict)

    def pusher(self, view: View) -> ViewPusher:
        if view not in self.pushers:
            to_row = self._user_row if view == "user_activity" else self._item_row
            table = self.users if view == "user_activity" else self.items
            self.pushers[view] = ViewPusher(
                view, table, self.sink, to_row, max_pending=self.max_pending, clock=self.clock
            )
        return self.pushers[view]

    async def ingest_batch(self, events: Sequence[EventLike]) -> BatchReport:
        metrics.EVENTS_IN.inc(len(events))
        return await self._process(events, "user_activity", validate_future=True)

    async def item_batch(self, events: Sequence[EventLike]) -> BatchReport:
        return await self._process(events, "item_stats", validate_future=False)

    async def drain(self) -> None:
        """Wait until every held event is pushed and acked."""
        for pusher in list(self.pushers.values()):
            await pusher.drain()

    async def _process(self, events: Sequence[EventLike], view: View, *, validate_future: bool) -> BatchReport:
        report = BatchReport(records=len(events))
        table = self.users if view == "user_activity" else self.items
        pusher = self.pusher(view)
        for event in events:
            record = event.message
            raw = _as_bytes(record.value)
            try:
                if raw is None:
                    raise EventValidationError("undecodable", "the record has no value (tombstone)")
                interaction = decode_event(
                    raw,
                    Interaction,
                    max_future_skew=self.max_future_skew if validate_future else None,
                )
            except EventValidationError as exc:
                await self._dead_letter(record, exc, report)
                continue
            try:
                if view == "user_activity":
                    # Forward first: if it fails, the state is untouched and the event is dead-lettered.
                    await self.outputs.forward_to_items(interaction.item_id, raw, record.timestamp)
                entity_id = interaction.user_id if view == "user_activity" else interaction.item_id
                state = table.get(entity_id)
                if state is None:
                    state = EntityState()
                    table.put(entity_id, state)
                outcome = apply(
                    state,
                    to_us(interaction.event_time),
                    interaction.event_id,
                    interaction.item_id if view == "user_activity" else None,
                    self.window,
                )
            except Exception as exc:  # noqa: BLE001 -- never drop an event silently: dead-letter it
                log.exception("failed on %s[%s]@%s", record.topic, record.partition, record.offset)
                await self._dead_letter(record, exc, report)
                continue
            if outcome is Outcome.LATE:
                report.late += 1
                metrics.LATE_EVENTS.labels(view).inc()
                continue
            if outcome is Outcome.DUPLICATE:
                report.duplicates += 1
                metrics.DUPLICATES.labels(view).inc()
            else:
                report.accepted += 1
                metrics.ACCEPTED.labels(view).inc()
            # A duplicate is pushed again too: its first push may have died with a crashed worker.
            pusher.hold(entity_id, state, record.partition, event)
        await pusher.kick()
        return report

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

    async def save(self, key: str, state: EntityState, partition: int) -> None:
        self.data[key] = state
        await self.send_changelog(partition, key, state)
