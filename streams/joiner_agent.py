"""What the joiner does with each record and on each timer tick, apart from Faust's plumbing.

``streams.joiner_app`` hands every event of ``topics.impressions`` and ``topics.clicks`` to
:meth:`JoinerAgent.handle` and calls :meth:`JoinerAgent.label_closed_windows` on a timer. The
join rules are :class:`~streams.joiner.JoinState`'s; this class decodes records, keeps each
user's state in the table, emits labeled examples, dead-letters every click that cannot be
joined (and every record that cannot be decoded) with its source position, and counts each
outcome (``streams.joiner_metrics``).

The table and the two output topics are small interfaces, so a unit test drives the agent with
a dict and recording outputs; the worker passes the Faust table's data, its ``send_changelog``
and the topics' ``send``.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from streamrec.core.errors import EventValidationError
from streamrec.core.events import Click, DeadLetter, Impression, LabeledExample, decode_event
from streams import joiner_metrics as metrics
from streams.joiner import DEAD_LETTER_OUTCOMES, JoinConfig, JoinState, utc_now

# A user's join state as the table holds it: ``JoinState.to_json()`` plus the partition it lives on.
StoredState = dict[str, Any]


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
    """Where the joiner's records go (Kafka topics in the worker)."""

    async def labeled(self, key: bytes, value: bytes) -> None: ...

    async def dead_letter(self, key: bytes | None, value: bytes) -> None: ...


@dataclass
class JoinerAgent:
    """One joiner's state table, outputs and rules.

    ``states`` is the table's in-memory data by user id; ``send_changelog(partition, user_id,
    value)`` writes a state's changelog record. States are written through both, with the
    partition stored in the state, because the timer runs outside any stream event and Faust
    infers the changelog partition only inside one.
    """

    config: JoinConfig
    impressions_topic: str
    clicks_topic: str
    states: MutableMapping[str, StoredState]
    send_changelog: Callable[[int, str, StoredState], object]
    outputs: JoinerOutputs
    clock: Callable[[], datetime] = utc_now

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
            letter = DeadLetter.for_raw(
                value=event.value,
                key=event.key,
                topic=message.topic,
                partition=message.partition,
                offset=message.offset,
                error=error,
            )
            await self.outputs.dead_letter(event.key, letter.to_bytes())
            return
        state = JoinState.from_json(self.states.get(record.user_id))
        if isinstance(record, Impression):
            metrics.IMPRESSIONS.inc()
            outcomes = state.add_impression(record, self.config)
            early = state.label_overflow(self.config)
            await self.emit(early)
            metrics.LABELED_EARLY.inc(len(early))
        else:
            outcomes = [(record, state.add_click(record, self.config))]
        for click, outcome in outcomes:
            metrics.CLICKS.labels(outcome).inc()
            if outcome in DEAD_LETTER_OUTCOMES:
                await self.dead_letter(click, outcome, message.partition, message.offset)
        self.save(record.user_id, state, message.partition)

    async def label_closed_windows(self) -> None:
        """Label every impression whose window has closed; dead-letter clicks that waited in vain."""
        now = self.clock()
        for user_id, value in list(self.states.items()):
            state = JoinState.from_json(value)
            labeled, expired = state.expire(now, self.config)
            if not labeled and not expired:
                continue
            await self.emit(labeled)
            for click in expired:
                metrics.CLICKS.labels("no_impression").inc()
                await self.dead_letter(click, "no_impression", int(value["partition"]), -1)
            self.save(user_id, state, int(value["partition"]))

    def save(self, user_id: str, state: JoinState, partition: int) -> None:
        value: StoredState = {**state.to_json(), "partition": partition}
        self.states[user_id] = value
        self.send_changelog(partition, user_id, value)

    async def emit(self, examples: list[LabeledExample]) -> None:
        for example in examples:
            await self.outputs.labeled(example.key(), example.to_bytes())
            metrics.LABELED.labels(str(example.clicked).lower()).inc()

    async def dead_letter(self, click: Click, reason: str, partition: int, offset: int) -> None:
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
        await self.outputs.dead_letter(click.key(), letter.to_bytes())
