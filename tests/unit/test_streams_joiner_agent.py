"""The joiner agent (``streams.joiner_agent``): records in, labeled examples, dead letters and counts out.

Driven in memory: the state table is a dict, the outputs record what they are given (and
acknowledge it at once, or when the test says), the source offsets are the test's, the clock is
fixed. The last test runs the same agent inside the Faust app (``agent.test_context()``) to
check the wiring: both topics reach it, the table is the Faust table.
"""

from __future__ import annotations

import asyncio
import gc
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client import REGISTRY

from streamrec.core.events import Click, DeadLetter, Impression, ImpressionItem, InteractionKind, LabeledExample
from streamrec.core.settings import PathSettings
from streams.joiner import JoinConfig
from streams.joiner_agent import DeliveryFailed, JoinerAgent, StoredState
from streams.joiner_app import create_joiner
from streams.joiner_settings import JoinerSettings, JoinerTuning

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
IMPRESSIONS, CLICKS = "test.impressions", "test.clicks"


@dataclass
class Record:
    topic: str
    partition: int
    offset: int


@dataclass
class Event:
    key: bytes | None
    value: bytes
    message: Record


@dataclass
class RecordingOutputs:
    """Records every send; Kafka acknowledges at once unless ``hold`` (then ``acknowledge()``)."""

    labeled_examples: list[LabeledExample] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    hold: bool = False
    unacknowledged: list[asyncio.Future[None]] = field(default_factory=list)

    def labeled(self, key: bytes, value: bytes) -> asyncio.Future[None]:
        example = LabeledExample.model_validate_json(value)
        assert key == example.key()
        self.labeled_examples.append(example)
        return self._sent()

    def dead_letter(self, key: bytes | None, value: bytes) -> asyncio.Future[None]:
        self.dead_letters.append(DeadLetter.model_validate_json(value))
        return self._sent()

    def acknowledge(self) -> None:
        for future in self.unacknowledged:
            if not future.done():
                future.set_result(None)
        self.unacknowledged.clear()

    def _sent(self) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.hold:
            self.unacknowledged.append(future)
        else:
            future.set_result(None)
        return future


@dataclass
class SourceOffsets:
    """The source partitions' (committed, end) offsets the test sets; unset: nothing to read."""

    offsets: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)

    async def __call__(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], tuple[int, int]]:
        return {tp: self.offsets.get(tp, (0, 0)) for tp in partitions}


@dataclass
class Harness:
    agent: JoinerAgent
    outputs: RecordingOutputs
    states: dict[str, StoredState]
    changelog: list[tuple[int, str, StoredState | None]]
    now: list[datetime]
    source: SourceOffsets

    def run(self, *steps: Any) -> None:
        async def main() -> None:
            for step in steps:
                await (self.agent.handle(step) if isinstance(step, Event) else step())

        asyncio.run(main())

    def at(self, seconds: float) -> Any:
        """A step that moves the clock to ``T0 + seconds`` and labels closed windows."""

        async def tick() -> None:
            self.now[0] = T0 + timedelta(seconds=seconds)
            await self.agent.label_closed_windows()

        return tick


@pytest.fixture
def harness() -> Harness:
    return make_harness(JoinConfig(window_s=60, grace_s=5))


def make_harness(config: JoinConfig) -> Harness:
    outputs = RecordingOutputs()
    states: dict[str, StoredState] = {}
    changelog: list[tuple[int, str, StoredState | None]] = []
    now = [T0]
    source = SourceOffsets()
    agent = JoinerAgent(
        config=config,
        impressions_topic=IMPRESSIONS,
        clicks_topic=CLICKS,
        states=states,
        send_changelog=lambda partition, user_id, value: changelog.append((partition, user_id, value)),
        outputs=outputs,
        offsets=source,
        clock=lambda: now[0],
    )
    return Harness(agent, outputs, states, changelog, now, source)


def impression(request_id: str, user_id: str = "u1", at_s: float = 0.0) -> Impression:
    return Impression(
        event_id=request_id,
        event_time=T0 + timedelta(seconds=at_s),
        user_id=user_id,
        request_id=request_id,
        arm="stable",
        model_version=2,
        items=[ImpressionItem(item_id=f"i{n}", score=1.0 - n / 10, position=n) for n in range(3)],
    )


def click(
    request_id: str, item_id: str, after_s: float, user_id: str = "u1", kind: InteractionKind | None = None
) -> Click:
    return Click(
        event_id=f"c-{request_id}-{item_id}-{after_s}",
        event_time=T0 + timedelta(seconds=after_s),
        user_id=user_id,
        request_id=request_id,
        item_id=item_id,
        kind=kind,
    )


def on(topic: str, record: Impression | Click, partition: int, offset: int) -> Event:
    return Event(record.key(), record.to_bytes(), Record(topic, partition, offset))


@pytest.fixture
def counts() -> Iterator[Any]:
    """``counts(name, **labels)``: how much a joiner counter grew during the test."""
    before: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def sample(name: str, labels: dict[str, str]) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    def grown(name: str, **labels: str) -> float:
        return sample(name, labels) - before[(name, tuple(sorted(labels.items())))]

    names = {
        ("streamrec_joiner_impressions_total", ()),
        ("streamrec_joiner_labeled_early_total", ()),
        *(("streamrec_joiner_labeled_total", (("clicked", value),)) for value in ("true", "false")),
        *(
            ("streamrec_joiner_clicks_total", (("outcome", outcome),))
            for outcome in (
                "joined",
                "duplicate",
                "late",
                "before_impression",
                "not_shown",
                "pending",
                "no_impression",
                "evicted",
            )
        ),
        *(("streamrec_joiner_invalid_total", (("topic", topic),)) for topic in (IMPRESSIONS, CLICKS)),
        *(("streamrec_joiner_oversize_total", (("cap", cap),)) for cap in ("features", "impression", "state")),
    }
    for name, labels in names:
        before[(name, labels)] = sample(name, dict(labels))
    yield grown


def test_a_joined_click_labels_its_impression_once_the_window_closes(harness: Harness, counts: Any) -> None:
    harness.run(
        on(IMPRESSIONS, impression("r1"), partition=2, offset=7),
        on(CLICKS, click("r1", "i1", 10), partition=2, offset=3),
        on(CLICKS, click("r1", "i1", 12), partition=2, offset=4),  # a second click on the item
        harness.at(60),  # window plus grace still open
    )
    assert harness.outputs.labeled_examples == []
    harness.run(harness.at(66))
    assert [(e.request_id, e.item_id, e.clicked) for e in harness.outputs.labeled_examples] == [
        ("r1", "i0", False),
        ("r1", "i1", True),
        ("r1", "i2", False),
    ]
    assert harness.outputs.labeled_examples[1].click_time == T0 + timedelta(seconds=10)
    assert harness.outputs.dead_letters == []
    # every change of the state went to the table and its changelog, on the user's partition
    assert [(partition, user) for partition, user, _ in harness.changelog] == [(2, "u1")] * 4
    assert harness.changelog[-1][2] == harness.states["u1"]
    assert harness.states["u1"]["open"] == {} and harness.states["u1"]["partition"] == 2
    assert counts("streamrec_joiner_impressions_total") == 1
    assert counts("streamrec_joiner_clicks_total", outcome="joined") == 1
    assert counts("streamrec_joiner_clicks_total", outcome="duplicate") == 1
    assert counts("streamrec_joiner_labeled_total", clicked="true") == 1
    assert counts("streamrec_joiner_labeled_total", clicked="false") == 2


def test_a_labeled_example_carries_the_kind_of_its_click(harness: Harness) -> None:
    harness.run(
        on(IMPRESSIONS, impression("r1"), partition=0, offset=0),
        on(CLICKS, click("r1", "i0", 5, kind="purchase"), partition=0, offset=0),
        on(CLICKS, click("r1", "i2", 6), partition=0, offset=1),  # an older producer: no kind
        harness.at(66),
    )
    assert [(e.item_id, e.clicked, e.kind) for e in harness.outputs.labeled_examples] == [
        ("i0", True, "purchase"),
        ("i1", False, None),
        ("i2", True, None),
    ]


def test_unjoinable_clicks_are_dead_lettered_with_their_reason_and_position(harness: Harness, counts: Any) -> None:
    harness.run(
        on(IMPRESSIONS, impression("r1"), partition=1, offset=0),
        on(CLICKS, click("r1", "i0", -1), partition=1, offset=10),
        on(CLICKS, click("r1", "i0", 61), partition=1, offset=11),
        on(CLICKS, click("r1", "i9", 5), partition=1, offset=12),
        on(CLICKS, click("ghost", "i0", 5), partition=1, offset=13),  # its impression never comes
        harness.at(69),  # r1 labeled; the held click has waited 64 s of its 65
    )
    letters = [(d.reason, d.source_topic, d.source_partition, d.source_offset) for d in harness.outputs.dead_letters]
    assert letters == [
        ("click_before_impression", CLICKS, 1, 10),
        ("click_late", CLICKS, 1, 11),
        ("click_not_shown", CLICKS, 1, 12),
    ]
    harness.run(harness.at(71))
    ghost = harness.outputs.dead_letters[-1]
    # found by the timer: the partition stored with the state, no offset
    assert (ghost.reason, ghost.source_topic, ghost.source_partition, ghost.source_offset) == (
        "click_no_impression",
        CLICKS,
        1,
        -1,
    )
    assert Click.model_validate_json(ghost.original_value()) == click("ghost", "i0", 5)
    assert len(harness.outputs.labeled_examples) == 3
    assert not any(e.clicked for e in harness.outputs.labeled_examples)
    for outcome in ("before_impression", "late", "not_shown", "pending", "no_impression"):
        assert counts("streamrec_joiner_clicks_total", outcome=outcome) == 1, outcome


def test_undecodable_records_are_dead_lettered_with_their_bytes_and_change_no_state(
    harness: Harness, counts: Any
) -> None:
    harness.run(
        Event(b"u1", b"not json", Record(CLICKS, 3, 40)),
        Event(b"u1", click("r1", "i0", 1).to_bytes(), Record(IMPRESSIONS, 3, 41)),  # a click on the wrong topic
    )
    letters = [(d.reason, d.source_topic, d.source_partition, d.source_offset) for d in harness.outputs.dead_letters]
    assert letters == [("undecodable", CLICKS, 3, 40), ("schema", IMPRESSIONS, 3, 41)]
    assert harness.outputs.dead_letters[0].original_value() == b"not json"
    assert harness.states == {} and harness.changelog == []
    assert counts("streamrec_joiner_invalid_total", topic=CLICKS) == 1
    assert counts("streamrec_joiner_invalid_total", topic=IMPRESSIONS) == 1


def test_past_the_cap_the_oldest_impression_is_labeled_at_once(counts: Any) -> None:
    harness = make_harness(JoinConfig(window_s=60, grace_s=5, max_open_per_user=2))
    harness.run(*(on(IMPRESSIONS, impression(f"r{n}", at_s=n), partition=0, offset=n) for n in range(3)))
    assert [(e.request_id, e.position) for e in harness.outputs.labeled_examples] == [("r0", 0), ("r0", 1), ("r0", 2)]
    assert sorted(harness.states["u1"]["open"]) == ["r1", "r2"]
    assert counts("streamrec_joiner_labeled_early_total") == 3


def test_a_state_reaches_the_changelog_only_after_kafka_acknowledged_the_labels_it_implies(harness: Harness) -> None:
    """Dying with labels in the producer's buffer must not leave a changelog that says "labeled":
    the state written meanwhile still has r1 open, so a restart labels it again (same ids)."""
    states, changelog, outputs = harness.states, harness.changelog, harness.outputs

    async def main() -> None:
        await harness.agent.handle(on(IMPRESSIONS, impression("r1"), partition=0, offset=0))
        assert [user for _, user, _ in changelog] == ["u1"]
        outputs.hold = True
        harness.now[0] = T0 + timedelta(seconds=66)
        tick = asyncio.create_task(harness.agent.label_closed_windows())
        second = on(IMPRESSIONS, impression("r2", at_s=60), partition=0, offset=1)
        await _turns()
        event = asyncio.create_task(harness.agent.handle(second))
        await _turns()
        assert len(outputs.labeled_examples) == 3 and len(outputs.unacknowledged) == 3
        assert list(states["u1"]["open"]) == ["r2"] and list(states["u1"]["labeled"]) == ["r1"]  # in memory
        assert len(changelog) == 1 and list(changelog[0][2]["open"]) == ["r1"]  # not on the changelog yet
        outputs.acknowledge()
        await asyncio.gather(tick, event)

    asyncio.run(main())
    assert len(changelog) == 2 and changelog[-1] == (0, "u1", states["u1"])
    assert list(states["u1"]["labeled"]) == ["r1"] and list(states["u1"]["open"]) == ["r2"]


async def _turns() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


def test_windows_close_as_of_the_time_both_sources_were_read_up_to(harness: Harness, counts: Any) -> None:
    """Catching up after downtime: every window is past its end, but the click on r1 and the
    impression of r2 are still unread; neither may be judged before the joiner has read them."""
    harness.source.offsets = {(IMPRESSIONS, 0): (0, 2), (CLICKS, 0): (0, 2)}
    harness.run(
        on(IMPRESSIONS, impression("r1"), partition=0, offset=0),
        on(CLICKS, click("r2", "i0", 2), partition=0, offset=0),  # overtook its impression
        harness.at(500),
    )
    assert harness.outputs.labeled_examples == [] and harness.outputs.dead_letters == []
    harness.run(on(CLICKS, click("r1", "i1", 10), partition=0, offset=1), harness.at(501))
    assert harness.outputs.labeled_examples == []  # the impression of r2 is unread still
    harness.run(on(IMPRESSIONS, impression("r2", at_s=1), partition=0, offset=1), harness.at(502))
    clicked = [(e.request_id, e.item_id) for e in harness.outputs.labeled_examples if e.clicked]
    assert clicked == [("r1", "i1"), ("r2", "i0")] and len(harness.outputs.labeled_examples) == 6
    assert harness.outputs.dead_letters == []
    assert counts("streamrec_joiner_clicks_total", outcome="joined") == 2


def test_a_committed_offset_counts_as_read(harness: Harness) -> None:
    """After a restart nothing was handled yet; what the group committed before was."""
    harness.source.offsets = {(IMPRESSIONS, 0): (5, 6), (CLICKS, 0): (3, 3)}
    harness.run(on(IMPRESSIONS, impression("r1"), partition=0, offset=5), harness.at(70))
    assert len(harness.outputs.labeled_examples) == 3


def test_a_large_context_is_dead_lettered_and_the_impression_labeled_without_it(harness: Harness, counts: Any) -> None:
    context = {f"field-{n}": "v" * 100 for n in range(150)}  # ~16 KB: over the 8 KB default
    big = impression("r1").model_copy(update={"features": {"recent_items": ["i7"], "context": context}})
    harness.run(on(IMPRESSIONS, big, partition=1, offset=9), on(CLICKS, click("r1", "i2", 5), 1, 0), harness.at(66))
    assert [(e.item_id, e.clicked) for e in harness.outputs.labeled_examples] == [
        ("i0", False),
        ("i1", False),
        ("i2", True),
    ]
    assert all(e.features == {"recent_items": ["i7"]} for e in harness.outputs.labeled_examples)
    (letter,) = harness.outputs.dead_letters
    assert (letter.reason, letter.source_topic, letter.source_offset) == (
        "impression_features_oversize",
        IMPRESSIONS,
        9,
    )
    assert Impression.model_validate_json(letter.original_value()) == big
    assert counts("streamrec_joiner_oversize_total", cap="features") == 1


def test_a_hot_users_state_stays_under_its_byte_cap(counts: Any) -> None:
    """120 requests of one user with 15 KB contexts inside one window (fault suite, hot keys)."""
    harness = make_harness(JoinConfig(window_s=60, grace_s=5))
    context = {"blob": "c" * 15_000}
    shown = [
        impression(f"r{n}", at_s=n / 10).model_copy(update={"features": {"recent_items": ["i7"], "context": context}})
        for n in range(120)
    ]
    harness.run(*(on(IMPRESSIONS, item, partition=0, offset=n) for n, item in enumerate(shown)), harness.at(80))
    largest = max(len(json.dumps(value)) for _, _, value in harness.changelog if value is not None)
    assert largest <= harness.agent.config.max_state_bytes
    assert len({e.request_id for e in harness.outputs.labeled_examples}) == 120
    assert len(harness.outputs.labeled_examples) == 360
    assert counts("streamrec_joiner_oversize_total", cap="features") == 120
    assert [d.reason for d in harness.outputs.dead_letters] == ["impression_features_oversize"] * 120


def test_an_idle_users_state_is_deleted_from_the_table_and_the_changelog() -> None:
    harness = make_harness(JoinConfig(window_s=60, grace_s=5, labeled_memory_s=100))
    harness.run(on(IMPRESSIONS, impression("r1"), partition=3, offset=0), harness.at(66))
    assert list(harness.states["u1"]["labeled"]) == ["r1"]  # remembered for late clicks
    harness.run(harness.at(166))
    assert harness.states == {} and harness.changelog[-1] == (3, "u1", None)
    changes = len(harness.changelog)
    harness.run(on(CLICKS, click("r9", "i0", 170), partition=3, offset=0), harness.at(400))
    assert harness.states == {} and harness.changelog[-1] == (3, "u1", None)  # held, then given up
    assert len(harness.changelog) == changes + 2
    assert [d.reason for d in harness.outputs.dead_letters] == ["click_no_impression"]


def test_the_faust_app_hands_both_topics_to_the_agent_and_keeps_state_in_its_table(tmp_path: Path) -> None:
    settings = JoinerSettings(
        paths=PathSettings(state_dir=tmp_path), joiner=JoinerTuning(app_id=f"unit-{uuid.uuid4().hex[:8]}")
    )
    topics = settings.topics
    outputs = RecordingOutputs()
    changelog: list[tuple[int, str]] = []

    async def main() -> dict[str, Any]:
        joiner = create_joiner(settings)
        joiner.joiner.outputs = outputs
        # No Kafka producer in the harness: record the changelog writes instead.
        joiner.joiner.send_changelog = lambda partition, user_id, value: changelog.append((partition, user_id))
        joiner.joiner.offsets = SourceOffsets()  # no broker: nothing left to read
        try:
            async with joiner.agent.test_context() as agent:
                to_message = agent.to_message

                async def put(topic: str, record: Impression | Click, partition: int) -> None:
                    # The harness names no topic for a two-topic source; the consumer would.
                    def on_topic(*args: Any, **kwargs: Any) -> Any:
                        message = to_message(*args, **kwargs)
                        message.topic = topic
                        return message

                    agent.to_message = on_topic
                    await agent.put(record.to_bytes(), key=record.key(), partition=partition)

                await put(topics.impressions, impression("r1"), 2)
                await put(topics.clicks, click("r1", "i2", 5), 2)
            joiner.joiner.clock = lambda: T0 + timedelta(seconds=70)  # past the window, r1 still remembered
            await joiner.joiner.label_closed_windows()
            table = cast(Any, joiner.app.tables["join_state"])
            state = table.data["u1"]
            # a restarted worker recovers each state from the changelog record Faust wrote for it
            topic, serializers = table.changelog_topic, joiner.app.serializers
            record = serializers.dumps_value(topic.value_type, state, serializer=topic.value_serializer)
            assert serializers.loads_value(topic.value_type, record, serializer=topic.value_serializer) == state
            return dict(table.data)
        finally:
            _close_unstarted_consumer_loop(joiner.app)

    table = asyncio.run(main())
    gc.collect()  # surface any leaked loop or socket here, in this test
    assert [(e.item_id, e.clicked) for e in outputs.labeled_examples] == [("i0", False), ("i1", False), ("i2", True)]
    assert outputs.dead_letters == []
    assert changelog == [(2, "u1")] * 3
    assert table["u1"]["partition"] == 2 and list(table["u1"]["labeled"]) == ["r1"]


def _close_unstarted_consumer_loop(app: Any) -> None:
    """The harness creates Faust's Kafka consumer (never started: no broker) and with it a
    thread's event loop, which only a started thread closes; close it so nothing leaks."""
    thread = getattr(app.consumer, "_thread", None)
    loop = getattr(thread, "thread_loop", None)
    if isinstance(loop, asyncio.AbstractEventLoop) and not loop.is_running() and not loop.is_closed():
        loop.close()


def test_read_positions_of_revoked_partitions_are_forgotten(harness: Harness) -> None:
    """Another worker may take a partition and hand it back behind where this one had read."""
    harness.source.offsets = {(IMPRESSIONS, 0): (0, 1), (CLICKS, 0): (0, 0)}
    harness.run(on(IMPRESSIONS, impression("r1"), partition=0, offset=0))
    progress = harness.agent.progress
    progress.observe(T0, {(IMPRESSIONS, 0): (0, 1), (CLICKS, 0): (0, 0)})
    assert progress.caught_up_at(0) == T0
    progress.forget({(IMPRESSIONS, 0), (CLICKS, 0)})
    assert progress.caught_up_at(0) is None and progress.position(IMPRESSIONS, 0) == 0
    progress.observe(T0, {(IMPRESSIONS, 0): (0, 1), (CLICKS, 0): (0, 0)})
    assert progress.caught_up_at(0) is None  # offset 0 must be read again here first


def test_a_label_kafka_refused_stops_the_joiner_before_its_state_is_written(harness: Harness) -> None:
    """The worker exits on it (``streams.joiner_app.exit_for_restart``): its changelog still has
    the impression open, so the restarted joiner labels it again."""
    outputs, changelog = harness.outputs, harness.changelog

    async def main() -> None:
        await harness.agent.handle(on(IMPRESSIONS, impression("r1"), partition=0, offset=0))
        outputs.hold = True
        harness.now[0] = T0 + timedelta(seconds=66)
        tick = asyncio.create_task(harness.agent.label_closed_windows())
        await _turns()
        outputs.unacknowledged[0].set_exception(KafkaRefused("MessageSizeTooLargeError"))
        with pytest.raises(DeliveryFailed, match="MessageSizeTooLargeError"):
            await tick
        outputs.acknowledge()

    asyncio.run(main())
    assert len(changelog) == 1 and list(changelog[0][2]["open"]) == ["r1"]


class KafkaRefused(Exception):
    """What a producer's delivery future fails with."""


def test_users_of_a_partition_it_no_longer_owns_are_left_to_their_new_owner(harness: Harness) -> None:
    """With several joiners, the timer labels only the users of partitions this one owns now (the
    new owner labels the others, from a state that has their later clicks), drops the others from
    memory without a changelog record, and labels nothing while a rebalance is under way."""
    owned: list[set[int] | None] = [{1, 2}]
    harness.agent.owned = lambda: owned[0]
    harness.run(
        on(IMPRESSIONS, impression("mine", user_id="u1"), partition=2, offset=7),
        on(IMPRESSIONS, impression("theirs", user_id="u2"), partition=3, offset=4),
    )
    written = len(harness.changelog)
    owned[0] = None  # rebalancing
    harness.run(harness.at(66))
    assert harness.outputs.labeled_examples == [] and set(harness.states) == {"u1", "u2"}
    owned[0] = {1, 2}
    harness.run(harness.at(66))
    assert {example.request_id for example in harness.outputs.labeled_examples} == {"mine"}
    assert "u2" not in harness.states
    assert all(user != "u2" for _, user, _ in harness.changelog[written:])
