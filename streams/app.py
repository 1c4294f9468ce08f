"""The Faust app of the feature worker: ``faust -A streams.app worker -l info``.

Topology (every name from settings)::

    topics.interactions (raw bytes, keyed by user)
        -> agent ``ingest``: validate | dead-letter -> topics.deadletter
             forward, one bundle per item partition per batch -> <interactions>.by-item (internal)
             user state table (changelog-backed) -> push user_activity
    <interactions>.by-item (bundles, see streams.repartition)
        -> agent ``item_stats``: item state table -> push item_stats

Why raw values: a record that is not JSON, or not an ``Interaction``, must reach the dead-letter
topic with its original bytes; a typed Faust value would fail inside Faust's decoding, outside
our error handling. Why a second topic for items: a table is partitioned like the topic its
agent reads, and the interactions topic is keyed by user; repartitioning by item keeps each
item's state on one partition, so more workers in the group split both tables.

State lives in Faust tables on the ``memory://`` store, backed by their changelog topics: on
restart the worker reads the changelogs back before consuming (RocksDB is not available here;
it would make recovery incremental). Processing is at-least-once (Faust acks a batch after the
pipeline returns, and commits offsets only after flushing the producer, changelogs included);
deduplication by ``event_id`` makes redelivery harmless (see ``streams.pipeline``).

The features follow the dataset's ``AttributeSchema`` (``attribute_schema.json`` in the feature
data directory, written by ``streamrec features setup``): where it counts kinds on their own,
the windows and the views carry ``<kind>_count_<window>`` too. It is read once, at build.

The app is built by :func:`create_app` (through ``streams.faust_app.build_app``); the module's
``app`` and ``worker`` attributes build it from ``STREAMREC_*`` settings on first access, not
at import.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import timedelta
from types import FrameType
from typing import Any, cast

import faust
from faust.serializers import codecs
from faust.streams import Stream
from faust.types import TP
from tenacity import AsyncRetrying, stop_after_delay, wait_exponential

from streamrec.core.attributes import AttributeSchema, read_schema
from streamrec.core.events import DeadLetter
from streamrec.core.settings import load
from streams import expiry
from streams.faust_app import build_app, revoke_fence
from streams.joiner_progress import KafkaOffsets
from streams.pipeline import BatchReport, FeaturePipeline, FeatureSink, MappingTable, Outputs, View
from streams.settings import StreamsSettings
from streams.windows import EntityState, WindowConfig

STATE_CODEC = "streamrec_entity_state"
log = logging.getLogger(__name__)


class _EntityStateCodec(codecs.Codec):
    """Changelog encoding of ``EntityState`` (compact binary, see ``streams.windows``)."""

    def _dumps(self, obj: Any) -> bytes:
        if not isinstance(obj, EntityState):
            raise TypeError(f"expected an EntityState, got {type(obj).__name__}")
        return obj.to_bytes()

    def _loads(self, s: bytes) -> Any:
        return EntityState.from_bytes(s)


codecs.register(STATE_CODEC, _EntityStateCodec())


class FaustOutputs:
    """``Outputs`` on Faust topics: sends are buffered and flushed before each offset commit.

    By-item bundles are already bytes on a raw topic, so they go to the app's producer directly,
    like the changelog records (see ``_changelog_sender``); dead letters are rare and keep
    Faust's ``Topic.send``.
    """

    def __init__(self, app: faust.App, deadletter: faust.types.TopicT, by_item: faust.types.TopicT) -> None:
        self.app = app
        self.deadletter = deadletter
        self.by_item_name = by_item.get_topic_name()

    async def dead_letter(self, letter: DeadLetter, key: bytes | None) -> None:
        await self.deadletter.send(key=key, value=letter.to_bytes())

    async def forward_to_items(self, partition: int, value: bytes, timestamp_s: float) -> None:
        await self.app.producer.send(self.by_item_name, None, value, partition, timestamp_s, None)


@dataclass
class Worker:
    """The app and what its agents use; tests swap ``pipeline.outputs`` / ``pipeline.sink``."""

    settings: StreamsSettings
    app: faust.App
    pipeline: FeaturePipeline
    ingest: Any  # faust AgentT (its generic types do not help here)
    item_stats: Any


def _changelog_sender(
    app: faust.App, table: faust.types.TableT[Any, Any]
) -> Callable[[int, str, EntityState], Awaitable[object]]:
    """Send a state's changelog record straight to the app's Kafka producer.

    Faust's ``changelog_topic.send`` runs its channel layer (serializer lookup, a
    ``FutureMessage``, sensors, a callback) for every record, and each push writes one record
    per dirty entity; see docs/design/streams.md#changelog-sends. The bytes are the ones that
    layer produces (the table's ``json`` key codec and ``STATE_CODEC``; a unit test checks them
    against the topic's own serializers), so recovery reads them the same way; the producer is
    the one Faust flushes before every offset commit, so a committed offset stays covered by
    its changelog records.
    """
    topic_name = table.changelog_topic.get_topic_name()
    key_codec, value_codec = codecs.get_codec("json"), codecs.get_codec(STATE_CODEC)

    async def send(partition: int, key: str, state: EntityState) -> object:
        return await app.producer.send(
            topic_name, key_codec.dumps(key), value_codec.dumps(state), partition, None, None
        )

    return send


class GroupStartOffsets:
    """Where the worker group should resume each newly assigned partition: its committed offset,
    else the earliest (read with a confluent consumer that never joins the group); None when Kafka
    does not say in time.

    The reads start when partitions are assigned (:meth:`prefetch`, one blocking call for all of
    them, in a thread) and an agent waits at most ``wait_s`` for a partition's answer: while a
    broker is down these reads can take many seconds, and an agent waiting on them holds its
    batch, which holds up the next revoke past the group's rebalance timeout. A failed read is
    tried again for ``retry_s`` (a broker stop fails it at once). Without an answer in time the
    gap check starts at the partition's first record (``FeaturePipeline._check_offsets``), and an
    answer that comes later is handed to ``on_late`` (``FeaturePipeline.late_start_offset``), which
    checks that first record against it.
    """

    def __init__(self, offsets: KafkaOffsets, wait_s: float, *, retry_s: float | None = None) -> None:
        self.offsets = offsets
        self.wait_s = wait_s
        self.retry_s = 4 * wait_s if retry_s is None else retry_s
        self.on_late: Callable[[str, int, int], None] | None = None
        self._reads: dict[tuple[str, int], asyncio.Future[int | None]] = {}
        self._assignments: dict[tuple[str, int], int] = {}  # a late answer counts for its own assignment only
        self._lock = asyncio.Lock()  # one blocking client

    def prefetch(self, partitions: Collection[tuple[str, int]]) -> None:
        """Start reading ``partitions`` (replacing any earlier read of them: a revoke between two
        assignments makes that one stale)."""
        if not partitions:
            return
        read = asyncio.ensure_future(self._read(sorted(partitions)))
        for key in partitions:
            self._assignments[key] = self._assignments.get(key, 0) + 1
            future = asyncio.get_running_loop().create_future()
            self._reads[key] = future
            read.add_done_callback(functools.partial(_settle, future, key))

    async def _read(self, partitions: list[tuple[str, int]]) -> dict[tuple[str, int], tuple[int, int]]:
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_delay(self.retry_s), wait=wait_exponential(multiplier=0.2, max=2.0), reraise=True
            ):
                with attempt:
                    async with self._lock:  # per attempt: a newer assignment's read goes between retries
                        return await asyncio.to_thread(self.offsets.read, partitions)
        except Exception:  # noqa: BLE001 -- the gap check then starts at the first record
            log.warning("could not read where %s start for the group in %.0fs", partitions, self.retry_s, exc_info=True)
        return {}

    async def __call__(self, topic: str, partition: int) -> int | None:
        key = (topic, partition)
        future = self._reads.pop(key, None)
        if future is None:  # a record before the assignment's signal: read it now
            self.prefetch([key])
            future = self._reads.pop(key)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.wait_s)
        except TimeoutError:
            log.warning(
                "where %s[%d] starts for this group is not known after %.1fs; its gap check starts at its first record",
                topic,
                partition,
                self.wait_s,
            )
            future.add_done_callback(functools.partial(self._answered_late, key, self._assignments.get(key)))
            return None

    def _answered_late(self, key: tuple[str, int], assignment: int | None, future: asyncio.Future[int | None]) -> None:
        start = None if future.cancelled() else future.result()
        if start is not None and self.on_late is not None and self._assignments.get(key) == assignment:
            self.on_late(*key, start)


def _settle(
    future: asyncio.Future[int | None],
    key: tuple[str, int],
    read: asyncio.Future[dict[tuple[str, int], tuple[int, int]]],
) -> None:
    if not future.done():
        offsets = read.result() if not read.cancelled() else {}
        future.set_result(offsets[key][0] if key in offsets else None)


def _dump_tasks() -> None:
    """SIGUSR2: log every asyncio task's stack. A stalled worker has idle threads (py-spy shows
    nothing); what waits, and on what, is in its coroutines."""
    tasks = asyncio.all_tasks()
    log.warning("SIGUSR2: %d asyncio tasks", len(tasks))
    for task in tasks:
        where = " -> ".join(
            f"{frame.f_code.co_name} ({frame.f_code.co_filename.rsplit('/', 2)[-1]}:{frame.f_lineno})"
            for frame in _awaited_frames(task.get_coro())
        )
        log.warning("task %s: %s", task.get_name(), where or "(no frames)")


def _awaited_frames(awaitable: object) -> Iterator[FrameType]:
    """The frames of a suspended coroutine and of everything it awaits, outermost first (a task's
    own ``get_stack`` stops at its coroutine's frame)."""
    seen = 0
    while awaitable is not None and seen < 64:
        seen += 1
        frame = next(
            (getattr(awaitable, name) for name in ("cr_frame", "ag_frame", "gi_frame") if hasattr(awaitable, name)),
            None,
        )
        if frame is not None:
            yield frame
        if frame is None:  # an async generator's asend/athrow object refers to its generator
            awaitable = next((ref for ref in gc.get_referents(awaitable) if hasattr(ref, "ag_frame")), None)
            continue
        awaitable = next(
            (
                getattr(awaitable, name)
                for name in ("cr_await", "ag_await", "gi_yieldfrom")
                if getattr(awaitable, name, None) is not None
            ),
            None,
        )


def create_app(
    settings: StreamsSettings, *, sink: FeatureSink | None = None, schema: AttributeSchema | None = None
) -> Worker:
    """Build the app, topics, tables and agents for ``settings``.

    ``schema`` defaults to the one ``features setup`` wrote under ``settings.data_dir``.
    """
    tuning = settings.streams
    if schema is None:
        schema = read_schema(settings.data_dir)
    if schema.counted_kinds:
        log.info("counting event kinds on their own: %s", ", ".join(schema.counted_kinds))
    partitions = settings.topics.partitions
    app = build_app(
        settings,
        tuning,
        state_dir=settings.streams_state_dir,
        web_port=tuning.web_port,
        producer_linger=tuning.producer_linger_s,
        broker_session_timeout=tuning.session_timeout_s,
        broker_rebalance_timeout=tuning.session_timeout_s,
        broker_heartbeat_interval=max(1.0, tuning.session_timeout_s / 10),
        table_standby_replicas=0,
    )
    interactions = app.topic(settings.topics.interactions, key_serializer="raw", value_serializer="raw")
    by_item = app.topic(
        settings.by_item_topic,
        key_serializer="raw",
        value_serializer="raw",
        partitions=partitions,
        internal=True,
    )
    deadletter = app.topic(settings.topics.deadletter, key_serializer="raw", value_serializer="raw")
    # each key's changelog partition and last write, for the expiry of idle entities (streams.expiry)
    user_keys, item_keys = expiry.KeyIndex(), expiry.KeyIndex()
    user_table = app.Table(
        "user_state",
        partitions=partitions,
        help="EntityState by user id",
        on_changelog_event=user_keys.on_changelog_event,
    )
    item_table = app.Table(
        "item_state",
        partitions=partitions,
        help="EntityState by item id",
        on_changelog_event=item_keys.on_changelog_event,
    )
    for table in (user_table, item_table):
        # Faust derives a table's serializers from its key/value *types*; ours is a codec by name,
        # so the changelog topic (used by sends and by recovery) is rebuilt with it. (TableT, the
        # type Faust declares, does not list these attributes of its concrete tables.)
        concrete = cast(Any, table)
        concrete.key_serializer = "json"
        concrete.value_serializer = STATE_CODEC
        concrete.changelog_topic = table.changelog_topic.derive(key_serializer="json", value_serializer=STATE_CODEC)
    if sink is None:
        from streams.sink import FeastSink

        sink = FeastSink(settings, schema)
    outputs: Outputs = FaustOutputs(app, deadletter, by_item)
    send_user_state = user_keys.tracking(_changelog_sender(app, user_table))
    send_item_state = item_keys.tracking(_changelog_sender(app, item_table))
    # an agent's wait for a partition's start stays well inside the revoke fence's (see GroupStartOffsets)
    start_offsets = GroupStartOffsets(
        KafkaOffsets(settings.kafka.client_config(), tuning.app_id), wait_s=revoke_fence(app).wait_s * 0.5
    )
    pipeline = FeaturePipeline(
        users=MappingTable(user_table.data, send_user_state),
        items=MappingTable(item_table.data, send_item_state),
        outputs=outputs,
        sink=sink,
        window=WindowConfig.from_seconds(
            tuning.allowed_lateness_s,
            counted_kinds=schema.counted_kinds,
            max_exact_events=tuning.max_exact_events,
            max_fold_buckets=tuning.max_fold_buckets,
            max_record_bytes=tuning.max_state_record_bytes,
        ),
        max_future_skew=timedelta(seconds=tuning.max_future_skew_s),
        item_partitions=partitions,
        max_pending=tuning.max_held_events,
        push_min_interval_s=tuning.push_min_interval_s,
        push_busy_share=tuning.push_busy_share,
        rewind=lambda topic, partition, offset: app.consumer.seek(TP(topic, partition), offset),
        rewind_retry_s=tuning.rewind_retry_s,
        start_offset=start_offsets,
    )
    start_offsets.on_late = pipeline.late_start_offset

    # ``take_events`` is on Faust's Stream class, not on the StreamT interface it declares. An
    # agent lets go of its batch before it yields: the loop variable would otherwise keep the
    # batch's records referenced while the agent waits for the next one, and a fenced revoke
    # waits until the records it dropped unacked are referenced no more (RevokeFence).
    async def ingest(stream: faust.StreamT[bytes]) -> AsyncIterator[BatchReport]:
        async for events in cast(Stream[bytes], stream).take_events(
            tuning.push_batch_size, within=tuning.push_max_wait_s
        ):
            report = await pipeline.ingest_batch(events)
            del events
            yield report

    async def item_stats(stream: faust.StreamT[bytes]) -> AsyncIterator[BatchReport]:
        async for events in cast(Stream[bytes], stream).take_events(
            tuning.push_batch_size, within=tuning.push_max_wait_s
        ):
            report = await pipeline.item_batch(events)
            del events
            yield report

    ingest_agent = app.agent(interactions, name="streams.ingest")(ingest)
    item_agent = app.agent(by_item, name="streams.item_stats")(item_stats)

    async def start_up() -> None:
        # Pushes run Feast in a thread beside the event loop; a short GIL switch interval lets
        # the loop run between that thread's bytecodes (docs/design/streams.md#event-loop-and-gil).
        sys.setswitchinterval(tuning.gil_switch_interval_s)
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, _dump_tasks)
        # Faust's Monitor sensor keeps per-event statistics for its web views (off here); our
        # metrics are streams.metrics (docs/design/streams.md#faust-monitor). The monitor object
        # stays for Faust's own calls to it.
        if app.monitor in app.sensors:
            app.sensors.remove(app.monitor)
        try:
            await asyncio.to_thread(pipeline.sink.warm_up)
        except Exception:  # noqa: BLE001 -- the first push retries and reports it properly
            log.exception("could not open the feature store at start; the first push will retry")

    app.task(start_up)
    expiry.install(
        app,
        tuning,
        pipeline.window.retention_us,
        [
            expiry.ExpiringTable("user_activity", user_table, settings.topics.interactions, user_keys, send_user_state),
            expiry.ExpiringTable("item_stats", item_table, settings.by_item_topic, item_keys, send_item_state),
        ],
    )

    if tuning.store_check_interval_s > 0:

        async def check_feature_store() -> None:
            if app.rebalancing:
                return
            assigned = app.consumer.assignment()
            owned: dict[View, list[tuple[str, int]]] = {}
            sources: tuple[tuple[View, str, expiry.KeyIndex], ...] = (
                ("user_activity", settings.topics.interactions, user_keys),
                ("item_stats", settings.by_item_topic, item_keys),
            )
            for view, topic, keys in sources:
                mine = {tp.partition for tp in assigned if tp.topic == topic}
                owned[view] = [(key, partition) for key, (partition, _) in keys.entries.items() if partition in mine]
            try:
                await pipeline.check_feature_store(owned)
            except Exception:  # noqa: BLE001 -- a timer that raises stops for good; check again next time
                log.exception("could not check the online store for a restart")

        app.timer(interval=tuning.store_check_interval_s)(check_feature_store)

    async def retry_rewinds() -> None:
        if not app.rebalancing:
            await pipeline.retry_rewinds()

    app.timer(interval=tuning.rewind_retry_s)(retry_rewinds)

    def fence_revoked(partitions: set[TP]) -> None:
        # A revoke still waiting at its fence time: write nothing more for these (see RevokeFence).
        pipeline.fence_partitions(
            {(tp.topic, tp.partition) for tp in partitions}, settings.topics.interactions, settings.by_item_topic
        )

    revoke_fence(app).listeners.append(fence_revoked)
    revoke_fence(app).waiting.append(pipeline.hurry_pushes)

    @app.on_partitions_assigned.connect
    def unfence_assigned(_: Any, /, *args: Any, signal: Any, **__: Any) -> None:
        assigned: set[TP] = args[0]
        pipeline.unfence_partitions(
            {(tp.topic, tp.partition) for tp in assigned}, settings.topics.interactions, settings.by_item_topic
        )
        sources = {settings.topics.interactions, settings.by_item_topic}
        if pipeline.start_offset is start_offsets:  # (tests without a broker replace it)
            start_offsets.prefetch({(tp.topic, tp.partition) for tp in assigned if tp.topic in sources})

    @app.on_partitions_revoked.connect
    def forget_revoked(_: Any, /, *args: Any, signal: Any, **__: Any) -> None:
        # Called with the revoked TPs after Faust has waited for (and committed) what the agents
        # hold: see FeaturePipeline.forget_partitions.
        revoked: set[TP] = args[0]
        pipeline.forget_partitions(
            {(tp.topic, tp.partition) for tp in revoked}, settings.topics.interactions, settings.by_item_topic
        )

    return Worker(settings, app, pipeline, ingest_agent, item_agent)


@functools.cache
def main_worker() -> Worker:
    """This process's worker, from ``STREAMREC_*`` settings; built on the first call only."""
    return create_app(load(StreamsSettings))


def __getattr__(name: str) -> object:
    """``app`` and ``worker`` (PEP 562): built on first access, so an import does no work.

    ``faust -A streams.app worker`` reads ``app`` here (Faust's ``find_app``).
    """
    if name == "app":
        return main_worker().app
    if name == "worker":
        return main_worker()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
