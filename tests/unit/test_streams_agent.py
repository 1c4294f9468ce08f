"""The worker's agents in Faust's in-memory harness (``agent.test_context()``).

Kafka and Feast are replaced at the transport boundary only: the dead-letter/repartition outputs
and the feature sink record what they are given. Tables, batching and acking are Faust's own.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import threading
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest

from streamrec.core.attributes import AttributeSchema, write_schema
from streamrec.core.errors import EventValidationError
from streamrec.core.events import DeadLetter
from streamrec.core.settings import PathSettings
from streams import metrics, repartition
from streams.app import Worker, create_app
from streams.pipeline import FeatureRow, View
from streams.settings import StreamsSettings, StreamsTuning
from streams.windows import EntityState, apply

T0 = 880_000_000  # 1997-11-20, MovieLens time


class RecordingSink:
    def __init__(self, failures: int = 0) -> None:
        self.pushes: list[tuple[View, list[FeatureRow]]] = []
        self.failures = failures
        self.epoch: str | None = None

    def warm_up(self) -> None:
        pass

    def store_epoch(self) -> str | None:
        return self.epoch

    def push(self, view: View, rows: Sequence[FeatureRow]) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("redis is down")
        self.pushes.append((view, list(rows)))

    def latest(self, view: View) -> dict[str, dict[str, object]]:
        return {row.entity_id: row.features for pushed_view, rows in self.pushes if pushed_view == view for row in rows}


class RecordingOutputs:
    def __init__(self, fail_forward_for: str | None = None) -> None:
        self.dead_letters: list[DeadLetter] = []
        self.forwarded: list[tuple[int, bytes, float]] = []  # (partition, bundle, timestamp)
        self.fail_forward_for = fail_forward_for

    async def dead_letter(self, letter: DeadLetter, key: bytes | None) -> None:
        self.dead_letters.append(letter)

    async def forward_to_items(self, partition: int, value: bytes, timestamp_s: float) -> None:
        if any(entry.item_id == self.fail_forward_for for entry in repartition.decode(value)):
            raise RuntimeError("repartition topic unavailable")
        self.forwarded.append((partition, value, timestamp_s))

    def entries(self) -> list[tuple[int, repartition.ItemEvent]]:
        return [(partition, entry) for partition, value, _ in self.forwarded for entry in repartition.decode(value)]


def event(event_id: str, user: str, item: str, seconds: float, kind: str = "view") -> bytes:
    return json.dumps(
        {"event_id": event_id, "user_id": user, "item_id": item, "event_time": seconds, "kind": kind}
    ).encode()


Put = Callable[..., Awaitable[Any]]


def run_agent(
    tmp_path: Path,
    sink: RecordingSink,
    outputs: RecordingOutputs,
    agent_name: str,
    body: Callable[[Put], Awaitable[None]],
    *,
    prepare: Callable[[Worker], None] | None = None,
    schema: AttributeSchema | None = None,
    **tuning: Any,
) -> dict[int, Any]:
    """Build a worker inside a fresh event loop (Faust binds to the running loop), feed one agent.

    ``schema`` is written where ``features setup`` writes it, for the worker to read at build.
    """
    settings = StreamsSettings(
        paths=PathSettings(state_dir=tmp_path),
        streams=StreamsTuning(
            app_id=f"unit-{uuid.uuid4().hex[:8]}", push_max_wait_s=0.01, push_batch_size=100, **tuning
        ),
    )
    if schema is not None:
        write_schema(settings.data_dir, schema)

    async def main() -> dict[int, Any]:
        worker = create_app(settings, sink=sink)
        worker.pipeline.outputs = outputs
        worker.pipeline.rewind = None  # the harness numbers offsets across partitions; no consumer to seek
        worker.pipeline.start_offset = None  # no broker to ask
        for table in (worker.pipeline.users, worker.pipeline.items):
            table.send_changelog = _no_producer  # type: ignore[attr-defined]  # replaced below if recorded
        if prepare is not None:
            prepare(worker)
        try:
            async with getattr(worker, agent_name).test_context() as harness:
                _deliver_like_a_consumer(harness)
                sent = 0

                async def put(*args: Any, **kwargs: Any) -> Any:
                    nonlocal sent
                    sent += 1
                    return await harness.put(*args, **kwargs)

                await body(put)
                # put(wait=True) returns at the first batch that ends; wait for every record's batch,
                # then for the pushes, which run beside the agent.
                await _poll(lambda: sum(report.records for report in harness.results.values()) >= sent)
                await worker.pipeline.drain()
                return dict(harness.results)
        finally:
            _close_unstarted_consumer_loop(worker)

    results = asyncio.run(main())
    gc.collect()  # surface any leaked loop or socket here, in this test, not in a later one
    return results


async def _poll(done: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Wait until ``done()``; fail after ``timeout_s`` (a generous bound: it normally takes milliseconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not done():
        if loop.time() > deadline:
            raise AssertionError(f"not done within {timeout_s}s")
        await asyncio.sleep(0.01)


async def _no_producer(partition: int, key: str, state: EntityState) -> object:
    """The harness never starts Faust's Kafka producer; changelog records go nowhere here (the
    integration tests restore state from the real changelog after a SIGKILL)."""
    return None


def _deliver_like_a_consumer(harness: Any) -> None:
    """Faust's conductor adds one reference per subscribed stream to each message it delivers
    (``message.incref``), which the stream's ack releases; the harness does not, so add it."""
    to_message = harness.to_message

    def with_delivery_reference(*args: Any, **kwargs: Any) -> Any:
        message = to_message(*args, **kwargs)
        message.incref()
        return message

    harness.to_message = with_delivery_reference


def _close_unstarted_consumer_loop(worker: Worker) -> None:
    """The harness creates Faust's Kafka consumer (never started: no broker) and with it a
    thread's event loop, which only a started thread closes; close it so nothing leaks."""
    thread = getattr(worker.app.consumer, "_thread", None)
    loop = getattr(thread, "thread_loop", None)
    if isinstance(loop, asyncio.AbstractEventLoop) and not loop.is_running() and not loop.is_closed():
        loop.close()


@pytest.fixture
def sink() -> RecordingSink:
    return RecordingSink()


@pytest.fixture
def outputs() -> RecordingOutputs:
    return RecordingOutputs()


def test_a_batch_updates_user_state_pushes_once_and_forwards_by_item(
    tmp_path: Path, sink: RecordingSink, outputs: RecordingOutputs
) -> None:
    changelog: list[tuple[int, str]] = []

    def record_changelog(worker: Worker) -> None:
        async def recording(partition: int, key: str, state: EntityState) -> object:
            changelog.append((partition, key))
            return None

        worker.pipeline.users.send_changelog = recording  # type: ignore[attr-defined]

    async def body(put: Put) -> None:
        await put(event("e1", "u1", "i1", T0), key=b"u1", partition=1, timestamp=1000.0, wait=False)
        await put(event("e2", "u1", "i2", T0 + 600), key=b"u1", partition=1, timestamp=1001.0, wait=False)
        await put(event("e3", "u2", "i1", T0 + 7200), key=b"u2", partition=3, timestamp=1002.0)

    results = run_agent(tmp_path, sink, outputs, "ingest", body, prepare=record_changelog)
    assert sum(report.records for report in results.values()) == 3
    assert len(sink.pushes) <= len(results)  # at most one push per batch, never one per event
    assert sink.latest("user_activity") == {
        "u1": {"recent_items": ["i2", "i1"], "count_1h": 2, "count_24h": 2, "last_event_ts": T0 + 600},
        "u2": {"recent_items": ["i1"], "count_1h": 1, "count_24h": 1, "last_event_ts": T0 + 7200},
    }
    assert sorted(changelog) == [(1, "u1"), (3, "u2")]  # one record per entity, on its own partition
    # forwarded in bundles, each entry on its item's partition with its original Kafka timestamp
    partitions = StreamsSettings().topics.partitions
    entries = sorted(outputs.entries(), key=lambda forwarded: forwarded[1].origin_ts)
    assert [(partition, entry.item_id, entry.event_id, entry.origin_ts) for partition, entry in entries] == [
        (repartition.item_partition("i1", partitions), "i1", "e1", 1000.0),
        (repartition.item_partition("i2", partitions), "i2", "e2", 1001.0),
        (repartition.item_partition("i1", partitions), "i1", "e3", 1002.0),
    ]
    assert entries[1][1].time_us == (T0 + 600) * 1_000_000
    assert len(outputs.forwarded) <= len(results) * partitions  # one record per partition per batch
    assert not outputs.dead_letters


def test_poison_records_are_dead_lettered_with_their_reason_and_position(
    tmp_path: Path, sink: RecordingSink, outputs: RecordingOutputs
) -> None:
    future = (datetime.now(UTC) + timedelta(days=2)).timestamp()

    async def body(put: Put) -> None:
        await put(event("ok-1", "u1", "i1", T0), key=b"u1", partition=0, wait=False)
        await put(b"\xff\xfenot json", key=b"u1", partition=0, wait=False)
        await put(json.dumps({"event_id": "bad", "user_id": "u1"}).encode(), key=b"u1", partition=0, wait=False)
        await put(event("from-the-future", "u1", "i9", future), key=b"u1", partition=0, wait=False)
        await put(event("ok-2", "u1", "i2", T0 + 1), key=b"u1", partition=0)

    run_agent(tmp_path, sink, outputs, "ingest", body)
    reasons = [(letter.reason, letter.source_partition, letter.source_offset) for letter in outputs.dead_letters]
    assert reasons == [("undecodable", 0, 1), ("schema", 0, 2), ("event_time", 0, 3)]
    assert base64.b64decode(outputs.dead_letters[0].original_value_b64) == b"\xff\xfenot json"
    assert outputs.dead_letters[0].original_key_b64 == base64.b64encode(b"u1").decode()
    assert sink.latest("user_activity")["u1"]["recent_items"] == ["i2", "i1"]
    assert sink.latest("user_activity")["u1"]["count_24h"] == 2


def test_an_exception_while_processing_dead_letters_the_event_and_the_rest_goes_on(
    tmp_path: Path, sink: RecordingSink
) -> None:
    outputs = RecordingOutputs(fail_forward_for="broken-item")
    partitions = StreamsSettings().topics.partitions
    # an item whose bundle goes to another partition than the broken one's, so it is sent
    other = next(
        f"i{n}"
        for n in range(100)
        if repartition.item_partition(f"i{n}", partitions) != repartition.item_partition("broken-item", partitions)
    )

    async def body(put: Put) -> None:
        await put(event("e1", "u1", "broken-item", T0), key=b"u1", partition=2, wait=False)
        await put(event("e2", "u1", other, T0 + 1), key=b"u1", partition=2)

    run_agent(tmp_path, sink, outputs, "ingest", body)
    assert [(letter.reason, letter.source_offset) for letter in outputs.dead_letters] == [("RuntimeError", 0)]
    assert "repartition topic unavailable" in outputs.dead_letters[0].error
    # the failed event did not reach the state
    assert sink.latest("user_activity")["u1"] == {
        "recent_items": [other],
        "count_1h": 1,
        "count_24h": 1,
        "last_event_ts": T0 + 1,
    }


def test_redelivered_events_change_nothing_but_are_pushed_again(
    tmp_path: Path, sink: RecordingSink, outputs: RecordingOutputs
) -> None:

    async def body(put: Put) -> None:
        await put(event("e1", "u1", "i1", T0), key=b"u1", partition=0, wait=False)
        await put(event("e2", "u1", "i2", T0 + 5), key=b"u1", partition=0)
        # a redelivery of both (as after a crash before the commit), in the next batch
        await put(event("e1", "u1", "i1", T0), key=b"u1", partition=0, wait=False)
        await put(event("e2", "u1", "i2", T0 + 5), key=b"u1", partition=0)

    results = run_agent(tmp_path, sink, outputs, "ingest", body)
    totals = [sum(getattr(report, name) for report in results.values()) for name in ("accepted", "duplicates")]
    assert totals == [2, 2]
    rows = [row for _, pushed in sink.pushes for row in pushed]
    complete = next(row for row in rows if row.features["count_24h"] == 2)
    assert rows[-1] == complete  # same features, same version: Feast keeps the stored row


def test_late_events_are_dropped_not_dead_lettered(tmp_path: Path, sink: RecordingSink) -> None:
    outputs = RecordingOutputs()

    async def body(put: Put) -> None:
        await put(event("now", "u1", "i1", T0 + 10 * 3600), key=b"u1", partition=0, wait=False)
        await put(event("30m-late", "u1", "i2", T0 + 10 * 3600 - 1800), key=b"u1", partition=0, wait=False)
        await put(event("5h-late", "u1", "i3", T0 + 5 * 3600), key=b"u1", partition=0)

    results = run_agent(tmp_path, sink, outputs, "ingest", body, allowed_lateness_s=3600)
    totals = [
        sum(getattr(report, name) for report in results.values()) for name in ("accepted", "late", "dead_lettered")
    ]
    assert totals == [2, 1, 0]
    assert sink.latest("user_activity")["u1"]["recent_items"] == ["i1", "i2"]
    assert not outputs.dead_letters


def test_a_failing_push_is_retried_before_the_batch_is_acked(tmp_path: Path, outputs: RecordingOutputs) -> None:
    sink = RecordingSink(failures=2)

    async def body(put: Put) -> None:
        await put(event("e1", "u1", "i1", T0), key=b"u1", partition=0)

    run_agent(tmp_path, sink, outputs, "ingest", body)
    assert sink.failures == 0
    assert len(sink.pushes) == 1


def test_item_agent_counts_per_item_with_the_trending_score(
    tmp_path: Path, sink: RecordingSink, outputs: RecordingOutputs
) -> None:

    def bundle(*entries: tuple[str, str, int]) -> bytes:
        return repartition.encode(
            [
                repartition.ItemEvent(item, T0 * 10**6 + offset * 10**6, event_id, 1000.0)
                for event_id, item, offset in entries
            ]
        )

    async def body(put: Put) -> None:
        # item i1: three users within the last hour, one 5 h earlier; i2: one event
        i1 = [(f"e{index}", "i1", offset) for index, offset in enumerate([0, 4 * 3600, 5 * 3600 - 60])]
        await put(bundle(*i1[:2]), partition=1, wait=False)
        await put(bundle(i1[2], ("e3", "i1", 5 * 3600)), partition=1, wait=False)
        await put(bundle(("e9", "i2", 0)), partition=2, wait=False)
        await put(b"not a bundle", partition=2, wait=False)  # dead-lettered whole
        await put(bundle(("e0", "i1", 0)), partition=1)  # a duplicate from the repartition

    run_agent(tmp_path, sink, outputs, "item_stats", body)
    assert sink.latest("item_stats") == {
        "i1": {"count_1h": 2, "count_24h": 4, "trending_score": 2 / (1 + 4 / 24)},
        "i2": {"count_1h": 1, "count_24h": 1, "trending_score": 1 / (1 + 1 / 24)},
    }
    assert not outputs.forwarded  # the item side does not forward again
    assert [(letter.reason, letter.source_partition) for letter in outputs.dead_letters] == [("undecodable", 2)]


def test_mixed_kinds_are_counted_per_kind_on_both_sides(tmp_path: Path, sink: RecordingSink) -> None:
    """A dataset with several kinds: each view counts every kind on its own (a kind the schema
    does not declare still counts in the totals); the bundles carry the kinds to the item side."""
    schema = AttributeSchema(event_kinds=("view", "add_to_cart", "purchase"))
    outputs = RecordingOutputs()
    hour = 3600
    events = [  # (event_id, user, item, seconds after T0, kind)
        ("e1", "u1", "i1", 0, "view"),
        ("e2", "u1", "i1", 2 * hour, "add_to_cart"),
        ("e3", "u1", "i1", 2 * hour + 60, "purchase"),
        ("e4", "u2", "i1", 2 * hour + 120, "view"),
        ("e5", "u2", "i2", 2 * hour + 180, "click"),  # not a declared kind
        ("e3", "u1", "i1", 2 * hour + 60, "purchase"),  # redelivered
    ]

    async def ingest(put: Put) -> None:
        for event_id, user, item, offset, kind in events:
            await put(event(event_id, user, item, T0 + offset, kind), key=user.encode(), partition=0, wait=False)
        await put(event("e6", "u2", "i2", T0 + 2 * hour + 240, "purchase"), key=b"u2", partition=0)

    run_agent(tmp_path, sink, outputs, "ingest", ingest, schema=schema)

    def counts(view: int, cart: int, purchase: int, view_1h: int, cart_1h: int, purchase_1h: int) -> dict[str, int]:
        return {
            "view_count_1h": view_1h,
            "view_count_24h": view,
            "add_to_cart_count_1h": cart_1h,
            "add_to_cart_count_24h": cart,
            "purchase_count_1h": purchase_1h,
            "purchase_count_24h": purchase,
        }

    assert sink.latest("user_activity") == {
        "u1": {
            "recent_items": ["i1"],
            **{"count_1h": 2, "count_24h": 3, "last_event_ts": T0 + 2 * hour + 60},
            **counts(view=1, cart=1, purchase=1, view_1h=0, cart_1h=1, purchase_1h=1),
        },
        "u2": {
            "recent_items": ["i2", "i1"],
            **{"count_1h": 3, "count_24h": 3, "last_event_ts": T0 + 2 * hour + 240},
            **counts(view=1, cart=0, purchase=1, view_1h=1, cart_1h=0, purchase_1h=1),
        },
    }
    forwarded_kinds = {entry.event_id: entry.kind for _, entry in outputs.entries()}
    assert forwarded_kinds == {event_id: kind for event_id, _, _, _, kind in events} | {"e6": "purchase"}

    # the item side, from exactly the bundles the user side forwarded
    async def item_side(put: Put) -> None:
        for partition, value, timestamp in outputs.forwarded:
            await put(value, partition=partition, timestamp=timestamp, wait=False)

    item_sink = RecordingSink()
    run_agent(tmp_path / "items", item_sink, RecordingOutputs(), "item_stats", item_side, schema=schema)
    assert item_sink.latest("item_stats") == {
        "i1": {
            **{"count_1h": 3, "count_24h": 4, "trending_score": 3 / (1 + 4 / 24)},
            **counts(view=2, cart=1, purchase=1, view_1h=1, cart_1h=1, purchase_1h=1),
        },
        "i2": {
            **{"count_1h": 2, "count_24h": 2, "trending_score": 2 / (1 + 2 / 24)},
            **counts(view=0, cart=0, purchase=1, view_1h=0, cart_1h=0, purchase_1h=1),
        },
    }


def test_a_one_kind_dataset_forwards_no_kind_and_pushes_no_kind_counts(
    tmp_path: Path, sink: RecordingSink, outputs: RecordingOutputs
) -> None:
    async def body(put: Put) -> None:
        await put(event("e1", "u1", "i1", T0, "rating"), key=b"u1", partition=0)

    run_agent(tmp_path, sink, outputs, "ingest", body, schema=AttributeSchema(event_kinds=("rating",)))
    assert sink.latest("user_activity") == {
        "u1": {"recent_items": ["i1"], "count_1h": 1, "count_24h": 1, "last_event_ts": T0}
    }
    (bundle,) = [json.loads(value) for _, value, _ in outputs.forwarded]
    assert bundle["events"] == [["i1", T0 * 10**6, "e1", bundle["events"][0][3]]]  # four fields: no kind


def test_bundle_entries_carry_a_kind_only_when_given_one() -> None:
    entries = [repartition.ItemEvent("i1", 5, "e1", 1.0, "purchase"), repartition.ItemEvent("i2", 6, "e2", 2.0)]
    raw = repartition.encode(entries)
    assert json.loads(raw)["events"] == [["i1", 5, "e1", 1.0, "purchase"], ["i2", 6, "e2", 2.0]]
    assert repartition.decode(raw) == entries
    for bad in (["i1", 5, "e1", 1.0, ""], ["i1", 5, "e1", 1.0, 7], ["i1", 5, "e1", 1.0, "view", "extra"]):
        with pytest.raises(EventValidationError, match="by-item bundle entry"):
            repartition.decode(json.dumps({"v": 1, "events": [bad]}).encode())


def test_an_event_is_acked_only_after_the_push_carrying_it_returned(tmp_path: Path, outputs: RecordingOutputs) -> None:
    push_started, release = threading.Event(), threading.Event()

    class BlockingSink(RecordingSink):
        def push(self, view: View, rows: Sequence[FeatureRow]) -> None:
            push_started.set()
            assert release.wait(timeout=30), "the test never released the push"
            super().push(view, rows)

    sink = BlockingSink()
    workers: list[Worker] = []
    observed: dict[str, bool] = {}

    async def body(put: Put) -> None:
        event_in = await put(event("e1", "u1", "i1", T0), key=b"u1", partition=0)
        # the batch is done (put waited for it) and its push is running
        assert await asyncio.to_thread(push_started.wait, 30), "the push never started"
        observed["before_push_returned"] = event_in.message.acked
        release.set()
        await workers[0].pipeline.drain()
        observed["after_push_returned"] = event_in.message.acked

    run_agent(tmp_path, sink, outputs, "ingest", body, prepare=workers.append)
    # take_events released its reference when the batch body returned; the pusher's hold kept
    # the message unacked (its offset uncommittable) until the push returned.
    assert observed == {"before_push_returned": False, "after_push_returned": True}
    assert len(sink.pushes) == 1


def test_changelog_records_have_the_bytes_faust_would_send_and_read_back(tmp_path: Path) -> None:
    """The worker sends changelog records to the producer directly (``streams.app``); recovery reads
    them with the changelog topic's serializers, so the bytes must be the ones that topic produces."""
    settings = StreamsSettings(
        paths=PathSettings(state_dir=tmp_path), streams=StreamsTuning(app_id=f"unit-{uuid.uuid4().hex[:8]}")
    )
    state = EntityState()
    sent: list[tuple[Any, ...]] = []

    class RecordingProducer:
        async def send(self, *args: Any) -> None:
            sent.append(args)

    async def main() -> tuple[Any, Any, Any, Any]:
        worker = create_app(settings, sink=RecordingSink())
        try:
            worker.app.producer = RecordingProducer()  # type: ignore[assignment]
            await worker.pipeline.users.save("u1", state, 2)
            topic = worker.app.tables["user_state"].changelog_topic
            key, _ = topic.prepare_key("u1", None)
            value, _ = topic.prepare_value(state, None)
            decoded_key = cast(Any, topic).key_serializer  # the recovering consumer decodes with it
            return topic.get_topic_name(), key, value, decoded_key
        finally:
            _close_unstarted_consumer_loop(worker)

    topic_name, key, value, key_serializer = asyncio.run(main())
    gc.collect()
    assert key_serializer == "json"
    assert sent == [(topic_name, key, value, 2, None, None)]
    assert EntityState.from_bytes(sent[0][2]).to_bytes() == state.to_bytes()


class _Record:
    def __init__(self, partition: int, offset: int) -> None:
        self.topic, self.partition, self.offset = "t", partition, offset
        self.refs = 0

    def incref(self, n: int = 1) -> None:
        self.refs += n


class _Event:
    def __init__(self, partition: int, offset: int) -> None:
        self.message = _Record(partition, offset)


class _OffsetHarness:
    """A built worker's pipeline (its Faust app bound to a fresh loop), the rewinds it asked for,
    and ``see(partition, *offsets)``: one batch of records of topic ``t`` through the offset check."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.rewinds: list[tuple[str, int, int]] = []

        async def rewind(topic: str, partition: int, offset: int) -> None:
            self.rewinds.append((topic, partition, offset))

        pipeline.rewind, pipeline.start_offset = rewind, None
        pipeline.users.send_changelog = _no_producer

    async def see(self, partition: int, *offsets: int) -> list[int]:
        """The offsets of the batch to apply now; the others must be held unacked (a reference)."""
        events = [_Event(partition, offset) for offset in offsets]
        applied = await self.pipeline._check_offsets(events)  # noqa: SLF001
        assert all(event.message.refs == (0 if event in applied else 1) for event in events)
        return [event.message.offset for event in applied]


def on_a_pipeline(tmp_path: Path, body: Callable[[_OffsetHarness], Awaitable[None]], sink: Any = None) -> None:
    settings = StreamsSettings(
        paths=PathSettings(state_dir=tmp_path), streams=StreamsTuning(app_id=f"unit-{uuid.uuid4().hex[:8]}")
    )

    async def main() -> None:
        worker = create_app(settings, sink=sink or RecordingSink())
        try:
            await body(_OffsetHarness(worker.pipeline))
        finally:
            _close_unstarted_consumer_loop(worker)

    asyncio.run(main())
    gc.collect()


def test_a_skipped_offset_rewinds_its_partition_once_until_the_reread_arrives(tmp_path: Path) -> None:
    """``FeaturePipeline._check_offsets``: a jump rewinds to the first missing offset, once; later
    records from before the rewind are parked without another seek (the consumer keeps the rewind
    open); the re-read record ends it, and a new hole rewinds again."""

    async def body(h: _OffsetHarness) -> None:
        assert await h.see(0, 5, 6, 7) == [5, 6, 7]  # first records after start: no gap
        await h.see(1, 0, 1)
        assert await h.see(0, 9, 10) == []  # 8 never came: nothing beyond it is applied before it
        assert h.rewinds == [("t", 0, 8)]
        assert await h.see(0, 11, 12) == []  # handed over before the rewind: parked, no second seek
        assert await h.see(1, 2) == [2]  # other partitions are unaffected
        assert h.rewinds == [("t", 0, 8)]
        assert await h.see(0, 8, 9, 10, 11, 12) == [8, 9, 10, 11, 12]  # the re-read ends it, in order
        await h.see(0, 13)
        assert h.rewinds == [("t", 0, 8)]
        assert await h.see(0, 11, 15) == [11]  # a duplicate changes nothing; a new hole (14) rewinds again
        assert h.rewinds == [("t", 0, 8), ("t", 0, 14)]
        assert await h.see(0, 14, 15) == [14, 15]
        assert h.pipeline.rewinding == {}

    on_a_pipeline(tmp_path, body)


def test_a_rewind_whose_record_does_not_come_is_sought_again(tmp_path: Path) -> None:
    """Faust can drop the re-read record too: a parked record or the retry timer
    (``retry_rewinds``) seeks again once ``rewind_retry_s`` has passed since the last seek."""
    now = [1000.0]

    async def body(h: _OffsetHarness) -> None:
        h.pipeline.clock = lambda: now[0]
        assert await h.see(0, 5, 6) == [5, 6]
        assert await h.see(0, 9) == [] and h.rewinds == [("t", 0, 7)]
        await h.pipeline.retry_rewinds()
        assert await h.see(0, 10) == [] and h.rewinds == [("t", 0, 7)]  # not due yet
        now[0] += 6
        assert await h.see(0, 11) == [] and h.rewinds == [("t", 0, 7), ("t", 0, 7)]  # a parked record: again
        now[0] += 6
        await h.pipeline.retry_rewinds()  # no record came at all: the timer seeks
        assert h.rewinds == [("t", 0, 7), ("t", 0, 7), ("t", 0, 7)]
        assert await h.see(0, 7, 8, 9, 10, 11) == [7, 8, 9, 10, 11]
        now[0] += 60
        await h.pipeline.retry_rewinds()
        assert len(h.rewinds) == 3 and h.pipeline.rewinding == {} and h.pipeline.rewind_sought_at == {}

    on_a_pipeline(tmp_path, body)


class _Held(_Event):
    acked = False

    def __init__(self, partition: int, offset: int) -> None:
        super().__init__(partition, offset)
        self.message.incref = lambda n=1: None  # type: ignore[attr-defined]
        self.message.timestamp = 0.0  # type: ignore[attr-defined]

    def ack(self) -> bool:
        self.acked = True
        return True


def one_event_state(number: int, window: Any) -> EntityState:
    state = EntityState()
    apply(state, (T0 + number) * 1_000_000, f"e{number}", "i1", window)
    return state


def test_a_revoked_partition_forgets_its_progress_and_what_it_held(tmp_path: Path) -> None:
    """``FeaturePipeline.forget_partitions``: a partition that comes back after a rebalance (other
    workers moved it on meanwhile) is no gap and no rewind; what the pusher held for it is dropped
    unpushed and unacked, the other partitions' holds stay."""

    async def body(h: _OffsetHarness) -> None:
        gaps_before = metrics.OFFSET_GAPS._value.get()  # noqa: SLF001
        await h.see(0, 5, 6, 7)
        await h.see(1, 3)
        pusher = h.pipeline.pusher("user_activity")
        kept, dropped = _Held(1, 4), _Held(0, 8)
        pusher.hold("u1", one_event_state(0, h.pipeline.window), 1, kept)
        pusher.hold("u0", one_event_state(1, h.pipeline.window), 0, dropped)
        h.pipeline.forget_partitions({("t", 0)}, "t", "t.by-item")
        assert (0 in {p for _, p in h.pipeline.next_offsets}, pusher.pending) == (False, 1)
        await h.see(0, 40, 41)  # moved on by another worker while it was away: not a gap
        await h.see(1, 4)
        assert h.rewinds == []
        assert metrics.OFFSET_GAPS._value.get() == gaps_before  # noqa: SLF001
        await pusher.drain()
        assert (kept.acked, dropped.acked) == (True, False)

    on_a_pipeline(tmp_path, body)


def test_a_restarted_online_store_gets_every_owned_state_pushed_again(tmp_path: Path) -> None:
    """``FeaturePipeline.check_feature_store``: a new run id of the store (it may have lost its last
    second of acknowledged writes) pushes every owned entity's state again; the same run id, or
    no answer, pushes nothing."""
    sink = RecordingSink()

    async def body(h: _OffsetHarness) -> None:
        pipeline = h.pipeline
        for number, user in enumerate(("u1", "u2", "u3")):
            pipeline.users.put(user, one_event_state(number, pipeline.window))
        owned: dict[View, list[tuple[str, int]]] = {"user_activity": [("u1", 0), ("u2", 1), ("gone", 1)]}
        assert await pipeline.check_feature_store(owned) == 0  # no answer yet
        sink.epoch = "run-a"
        assert await pipeline.check_feature_store(owned) == 0  # the first run seen
        assert await pipeline.check_feature_store(owned) == 0  # the same run
        sink.epoch = "run-b"
        assert await pipeline.check_feature_store(owned) == 2  # restarted: u1 and u2 (u3 is not owned)
        for _ in range(200):  # the push runs in its task, in a thread
            pushed = {row.entity_id for view, rows in sink.pushes for row in rows if view == "user_activity"}
            if pushed:
                break
            await asyncio.sleep(0.05)
        assert pushed == {"u1", "u2"}

    on_a_pipeline(tmp_path, body, sink)


def test_a_newly_assigned_partition_is_checked_from_where_the_group_should_resume(tmp_path: Path) -> None:
    """``start_offset``: a partition handed over without a committed offset must start at its
    earliest record; a first record later than that is a gap, rewound like any other."""

    async def start_offset(topic: str, partition: int) -> int | None:
        return {0: 0, 1: 40}.get(partition)  # partition 2: Kafka did not say

    async def body(h: _OffsetHarness) -> None:
        h.pipeline.start_offset = start_offset
        await h.see(0, 921, 922)  # records 0..920 were skipped
        await h.see(1, 40, 41)  # resumes at its committed offset
        await h.see(2, 7)  # unknown start: the first record sets it
        assert h.rewinds == [("t", 0, 0)]
        await h.see(0, 0, 1)
        assert h.pipeline.rewinding == {}

    on_a_pipeline(tmp_path, body)


def test_a_start_known_only_after_the_first_record_still_finds_the_records_skipped_before_it(tmp_path: Path) -> None:
    """``FeaturePipeline.late_start_offset``: where a partition starts arrives after its first
    record set the check going (Kafka was slow to say); records skipped before that first one are
    read again like any hole, what was applied since comes again and is applied as duplicates."""

    async def body(h: _OffsetHarness) -> None:
        assert await h.see(3, 50, 51) == [50, 51]  # unknown start: applied from the first record
        assert await h.see(4, 8) == [8]
        h.pipeline.late_start_offset("t", 4, 8)  # nothing skipped there
        h.pipeline.late_start_offset("t", 3, 20)  # 20..49 were skipped
        await asyncio.sleep(0)
        assert h.rewinds == [("t", 3, 20)]
        assert await h.see(3, 52) == []  # fetched before the seek: held until its second reading
        assert await h.see(3, 20, 21) == [20, 21]
        assert h.pipeline.rewinding == {}
        assert await h.see(3, *range(22, 53)) == list(range(22, 53))
        assert h.rewinds == [("t", 3, 20)]
        h.pipeline.forget_partitions({("t", 5)}, "t", "by-item")
        await h.see(5, 9)
        h.pipeline.forget_partitions({("t", 5)}, "t", "by-item")
        h.pipeline.late_start_offset("t", 5, 0)  # revoked meanwhile: no longer this worker's to check
        await asyncio.sleep(0)
        assert h.rewinds == [("t", 3, 20)]

    on_a_pipeline(tmp_path, body)
