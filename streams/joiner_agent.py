"""What the joiner does with each record and on each timer tick, apart from Faust's plumbing.

``streams.joiner_app`` hands every event of ``topics.impressions`` and ``topics.clicks`` to
:meth:`JoinerAgent.handle` and calls :meth:`JoinerAgent.label_closed_windows` on a timer. The
join rules are :class:`~streams.joiner.JoinState`'s; this class decodes records, keeps each
user's state in the table, emits labeled examples, dead-letters every click that cannot be
joined (and every record that cannot be decoded or is over a cap) with its source position, and
counts each outcome (``streams.joiner_metrics``).

Crash safety (the worker is at-least-once):

* A user's new state goes into the table, and the records it implies into the producer's queue,
  in one step without an ``await``: the timer and the agent interleave at every ``await``, and
  so always build on each other's latest state.
* Its changelog record is written only once every labeled example and dead letter queued so far
  has been acknowledged by Kafka. A crash can then re-emit a label (the state on the changelog is
  older; consumers deduplicate on the example's stable ``event_id``) but never lose one (a
  changelog that says "labeled" while the labels died in the producer's buffer).
* Windows close only as of a time the joiner has read both source topics up to
  (``streams.joiner_progress``), so a catch-up after downtime joins every click first.

docs/design/streams.md#joiner-crash-safety says what went wrong without each.

The table and the two output topics are small interfaces, so a unit test drives the agent with
a dict and recording outputs; the worker passes the Faust table's data, its ``send_changelog``
and the topics' ``send``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from streamrec.core.errors import EventValidationError
from streamrec.core.events import Click, DeadLetter, Impression, LabeledExample, decode_event
from streams import joiner_metrics as metrics
from streams.joiner import DEAD_LETTER_OUTCOMES, ClickOutcome, JoinConfig, JoinState, fit_features, utc_now
from streams.joiner_progress import Offsets, ReadProgress, TopicPartition

log = logging.getLogger(__name__)

# A user's join state as the table holds it: ``JoinState.to_json()`` plus the partition it lives on.
StoredState = dict[str, Any]

# A dead letter carries its original value base64-encoded (4/3 of its size); past this many bytes
# the value is cut, so the letter stays under Kafka's 1 MiB message limit.
DEAD_LETTER_VALUE_LIMIT = 600_000


class DeliveryFailed(RuntimeError):
    """Kafka did not acknowledge a labeled example or dead letter. The table in memory is then
    ahead of what Kafka holds; only a restart (states from the changelog, which never recorded
    the labeling) makes them agree again, so the worker exits (``streams.joiner_app``)."""


class JoinerRecord(Protocol):
    """The parts of a Faust ``Message`` the joiner reads."""

    @property
    def topic(self) -> str: ...

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...


class JoinerEvent(Protocol):
    """The parts of a Faust ``Event`` the joiner reads: raw key and value bytes and their position."""

    @property
    def key(self) -> Any: ...

    @property
    def value(self) -> Any: ...

    @property
    def message(self) -> JoinerRecord: ...


class JoinerOutputs(Protocol):
    """Where the joiner's records go (Kafka topics in the worker). A send queues the record
    without waiting; the awaitable it returns completes when Kafka has acknowledged it."""

    def labeled(self, key: bytes, value: bytes) -> Awaitable[object]: ...

    def dead_letter(self, key: bytes | None, value: bytes) -> Awaitable[object]: ...


@dataclass
class JoinerAgent:
    """One joiner's state table, outputs, source offsets and rules.

    ``states`` is the table's in-memory data by user id; ``send_changelog(partition, user_id,
    value)`` writes a state's changelog record (``value`` None: the user's state is deleted).
    States are written through both, with the partition stored in the state, because the timer
    runs outside any stream event and Faust infers the changelog partition only inside one.
    ``offsets(partitions)`` reads the source partitions' committed and end offsets.
    """

    config: JoinConfig
    impressions_topic: str
    clicks_topic: str
    states: MutableMapping[str, StoredState]
    send_changelog: Callable[[int, str, StoredState | None], object]
    outputs: JoinerOutputs
    offsets: Callable[[list[TopicPartition]], Awaitable[Offsets]]
    # The partitions (of the impressions and clicks topics) this joiner owns now; None from it
    # during a rebalance. None here: every state is this joiner's (one process, unit tests).
    owned: Callable[[], set[int] | None] | None = None
    clock: Callable[[], datetime] = utc_now
    progress: ReadProgress = field(init=False)
    _unacknowledged: set[asyncio.Future[Any]] = field(default_factory=set, init=False)
    _partitions: dict[str, int] = field(default_factory=dict, init=False)  # users whose changelog is due

    def __post_init__(self) -> None:
        self.progress = ReadProgress((self.impressions_topic, self.clicks_topic))

    async def handle(self, event: JoinerEvent) -> None:
        """Join one impression or click into its user's state; dead-letter what cannot be joined."""
        message = event.message
        is_impression = message.topic == self.impressions_topic
        try:
            record: Impression | Click = (
                decode_event(event.value, Impression) if is_impression else decode_event(event.value, Click)
            )
        except EventValidationError as error:
            metrics.INVALID.labels(message.topic).inc()
            self._letter(event.value, event.key, message, error)
            self.progress.handled(message.topic, message.partition, message.offset)
            return
        # Nothing below awaits before the changelog write: state and sends change together.
        state = JoinState.from_json(self.states.get(record.user_id))
        oversize: EventValidationError | None = None
        if isinstance(record, Impression):
            metrics.IMPRESSIONS.inc()
            stored, oversize = self._fit(record)
            outcomes = state.add_impression(stored, self.config) if stored is not None else []
        else:
            outcomes = [(record, state.add_click(record, self.config))]
        caps = state.enforce_caps(self.config)
        self._put(record.user_id, state, message.partition)
        if oversize is not None:
            self._letter(event.value, event.key, message, oversize)
        self.emit(caps.labeled)
        metrics.LABELED_EARLY.inc(len(caps.labeled))
        if caps.over_bytes:
            metrics.OVERSIZE.labels("state").inc()
        evicted: list[tuple[Click, ClickOutcome]] = [(click, "evicted") for click in caps.evicted]
        for click, outcome in [*outcomes, *evicted]:
            metrics.CLICKS.labels(outcome).inc()
            if outcome in DEAD_LETTER_OUTCOMES:
                self.dead_letter(click, outcome, message.partition, message.offset)
        await self._write_changelog([record.user_id])
        self.progress.handled(message.topic, message.partition, message.offset)

    async def label_closed_windows(self) -> None:
        """Label every impression whose window has closed (as of the time the joiner has read its
        partition up to); dead-letter clicks that waited in vain; delete states left empty."""
        now = self.clock()
        if self.owned is not None:
            mine = self.owned()
            if mine is None:  # a rebalance is under way: whose users these are is not known now
                return
            # A user of a partition this joiner no longer owns is its new owner's to label: labeling
            # it here would label items twice, from a state that misses the clicks read there.
            for user_id in [user for user, value in self.states.items() if int(value["partition"]) not in mine]:
                del self.states[user_id]  # memory only: the changelog belongs to the new owner
        partitions = sorted({int(value["partition"]) for value in self.states.values()})
        metrics.USERS.set(len(self.states))
        if not partitions:
            return
        sources = [(topic, p) for p in partitions for topic in (self.impressions_topic, self.clicks_topic)]
        try:
            offsets = await self.offsets(sources)
        except Exception as error:  # noqa: BLE001 -- a broker hiccup: windows stay open until the next tick
            metrics.OFFSET_READS_FAILED.inc()
            log.warning("could not read the source offsets (%s); labeling waits for the next tick", error)
            return
        self.progress.observe(now, offsets)
        caught_up = {p: self.progress.caught_up_at(p) for p in partitions}
        metrics.LABEL_HOLD.set(max((now - (at or now)).total_seconds() for at in caught_up.values()))
        examples: list[LabeledExample] = []
        expired: list[tuple[Click, int]] = []
        touched: list[str] = []
        for user_id, value in list(self.states.items()):
            partition = int(value["partition"])
            until = caught_up.get(partition)
            if until is None:
                continue
            state = JoinState.from_json(value)
            labeled, gave_up = state.expire(until, self.config)
            forgotten = state.forget(until)
            if labeled or gave_up or forgotten or state.is_empty():
                self._put(user_id, state, partition)
                touched.append(user_id)
                examples += labeled
                expired += [(click, partition) for click in gave_up]
        self.emit(examples)
        for click, partition in expired:
            metrics.CLICKS.labels("no_impression").inc()
            self.dead_letter(click, "no_impression", partition, -1)
        await self._write_changelog(touched)

    def emit(self, examples: list[LabeledExample]) -> None:
        for example in examples:
            self._track(self.outputs.labeled(example.key(), example.to_bytes()))
            metrics.LABELED.labels(str(example.clicked).lower()).inc()

    def dead_letter(self, click: Click, reason: str, partition: int, offset: int) -> None:
        """A click that cannot be joined, as a dead letter with reason ``click_<reason>``
        (``offset`` -1: found by the timer, not at a record)."""
        error = EventValidationError(
            f"click_{reason}", f"click {click.event_id} on request {click.request_id}: {reason}"
        )
        letter = DeadLetter.for_raw(
            value=click.to_bytes(),
            key=click.key(),
            topic=self.clicks_topic,
            partition=partition,
            offset=offset,
            error=error,
        )
        self._track(self.outputs.dead_letter(click.key(), letter.to_bytes()))

    # -- internals -------------------------------------------------------------------------
    def _fit(self, impression: Impression) -> tuple[Impression | None, EventValidationError | None]:
        """The impression to store (None: too large to hold at all) and the dead letter's error
        when a cap changed it."""
        fitted, dropped = fit_features(impression, self.config.max_features_bytes)
        if dropped:
            metrics.OVERSIZE.labels("features").inc()
        size = len(fitted.model_dump_json())
        if size > self.config.max_state_bytes // 2:
            metrics.OVERSIZE.labels("impression").inc()
            return None, EventValidationError(
                "impression_oversize",
                f"impression {impression.request_id} is {size} bytes even without its largest features, above "
                f"half of joiner.max_state_bytes ({self.config.max_state_bytes}); it is not labeled",
            )
        if dropped:
            return fitted, EventValidationError(
                "impression_features_oversize",
                f"the features of impression {impression.request_id} are above joiner.max_features_bytes "
                f"({self.config.max_features_bytes}); its labels carry them without {dropped}",
            )
        return fitted, None

    def _put(self, user_id: str, state: JoinState, partition: int) -> None:
        """The user's new state into the table (an empty one deleted); its changelog is now due."""
        if state.is_empty():
            if self.states.pop(user_id, None) is None and user_id not in self._partitions:
                return  # nothing stored, nothing to delete
        else:
            self.states[user_id] = {**state.to_json(), "partition": partition}
        self._partitions[user_id] = partition

    async def _write_changelog(self, user_ids: list[str]) -> None:
        """Each user's current state (or its deletion) to the changelog, once Kafka has
        acknowledged every record sent before (module docstring)."""
        try:
            while self._unacknowledged:
                await asyncio.gather(*list(self._unacknowledged))
        except Exception as error:
            raise DeliveryFailed(f"a labeled example or dead letter was not delivered: {error!r}") from error
        for user_id in dict.fromkeys(user_ids):
            partition = self._partitions.pop(user_id, None)
            if partition is None:
                continue  # written by a concurrent call already
            self.send_changelog(partition, user_id, self.states.get(user_id))

    def _track(self, sent: Awaitable[object]) -> None:
        future = asyncio.ensure_future(sent)
        self._unacknowledged.add(future)
        future.add_done_callback(self._unacknowledged.discard)

    def _letter(self, value: bytes | None, key: bytes | None, message: JoinerRecord, error: Exception) -> None:
        """Dead-letter a source record (cut to ``DEAD_LETTER_VALUE_LIMIT`` bytes if larger)."""
        if value is not None and len(value) > DEAD_LETTER_VALUE_LIMIT:
            reason = error.reason if isinstance(error, EventValidationError) else type(error).__name__
            error = EventValidationError(
                reason, f"{error} (value cut to its first {DEAD_LETTER_VALUE_LIMIT} of {len(value)} bytes)"
            )
            value = value[:DEAD_LETTER_VALUE_LIMIT]
        letter = DeadLetter.for_raw(
            value=value,
            key=key,
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            error=error,
        )
        self._track(self.outputs.dead_letter(key, letter.to_bytes()))
