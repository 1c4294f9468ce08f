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
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import faust
from faust.serializers import codecs
from faust.streams import Stream
from faust.types import TP

from streamrec.core.errors import SettingsError
from streamrec.core.events import DeadLetter
from streamrec.core.settings import load
from streams import metrics, watchdog
from streams.pipeline import BatchReport, FeaturePipeline, FeatureSink, MappingTable, Outputs
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

    ``changelog_topic.send`` goes through Faust's channel layer (serializer lookup, a
    ``FutureMessage``, sensors, a published callback) for every record: 16% of the worker's
    Python time at 1,000 events/s (py-spy, ``--gil``), as each push writes one record per dirty
    entity. The bytes are the ones that layer produces (the table's ``json`` key codec and
    ``STATE_CODEC``; a unit test checks them against the topic's own serializers), so recovery
    reads them the same way; the producer is the one Faust flushes before every offset commit,
    so a committed offset stays covered by its changelog records.
    """
    topic_name = table.changelog_topic.get_topic_name()
    key_codec, value_codec = codecs.get_codec("json"), codecs.get_codec(STATE_CODEC)

    async def send(partition: int, key: str, state: EntityState) -> object:
        return await app.producer.send(
            topic_name, key_codec.dumps(key), value_codec.dumps(state), partition, None, None
        )

    return send


def _broker_urls(bootstrap_servers: str) -> list[str]:
    return [f"kafka://{server.strip()}" for server in bootstrap_servers.split(",") if server.strip()]


def create_app(settings: StreamsSettings, *, sink: FeatureSink | None = None) -> Worker:
    """Build the app, topics, tables and agents for ``settings``."""
    if settings.kafka.security_protocol != "PLAINTEXT":
        raise SettingsError(
            "The streams worker connects with PLAINTEXT only for now; set STREAMREC_KAFKA__SECURITY_PROTOCOL="
            "PLAINTEXT or add broker_credentials in streams/app.py."
        )
    tuning = settings.streams
    state_dir = settings.streams_state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    partitions = settings.topics.partitions
    app = faust.App(
        tuning.app_id,
        broker=_broker_urls(settings.kafka.bootstrap_servers),
        broker_client_id=settings.kafka.client_id,
        store="memory://",
        datadir=str(state_dir),
        processing_guarantee="at_least_once",
        producer_linger=tuning.producer_linger_s,
        broker_commit_interval=tuning.commit_interval_s,
        broker_session_timeout=tuning.session_timeout_s,
        broker_rebalance_timeout=tuning.session_timeout_s,
        broker_heartbeat_interval=max(1.0, tuning.session_timeout_s / 10),
        consumer_auto_offset_reset="earliest",
        topic_partitions=partitions,
        topic_replication_factor=settings.topics.replication_factor,
        table_standby_replicas=0,
        web_enabled=tuning.web_port != 0,
        web_port=tuning.web_port or 6066,
        web_bind="127.0.0.1",
        key_serializer="raw",
        value_serializer="raw",
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
    user_table = app.Table("user_state", partitions=partitions, help="EntityState by user id")
    item_table = app.Table("item_state", partitions=partitions, help="EntityState by item id")
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

        sink = FeastSink(settings)
    outputs: Outputs = FaustOutputs(app, deadletter, by_item)
    pipeline = FeaturePipeline(
        users=MappingTable(user_table.data, _changelog_sender(app, user_table)),
        items=MappingTable(item_table.data, _changelog_sender(app, item_table)),
        outputs=outputs,
        sink=sink,
        window=WindowConfig.from_seconds(tuning.allowed_lateness_s),
        max_future_skew=timedelta(seconds=tuning.max_future_skew_s),
        item_partitions=partitions,
        max_pending=tuning.max_held_events,
        push_min_interval_s=tuning.push_min_interval_s,
        rewind=lambda topic, partition, offset: app.consumer.seek(TP(topic, partition), offset),
    )

    # ``take_events`` is on Faust's Stream class, not on the StreamT interface it declares.
    async def ingest(stream: faust.StreamT[bytes]) -> AsyncIterator[BatchReport]:
        async for events in cast(Stream[bytes], stream).take_events(
            tuning.push_batch_size, within=tuning.push_max_wait_s
        ):
            yield await pipeline.ingest_batch(events)

    async def item_stats(stream: faust.StreamT[bytes]) -> AsyncIterator[BatchReport]:
        async for events in cast(Stream[bytes], stream).take_events(
            tuning.push_batch_size, within=tuning.push_max_wait_s
        ):
            yield await pipeline.item_batch(events)

    ingest_agent = app.agent(interactions, name="streams.ingest")(ingest)
    item_agent = app.agent(by_item, name="streams.item_stats")(item_stats)

    def dump_tasks() -> None:
        """SIGUSR2: log every asyncio task's stack. A stalled worker has idle threads (py-spy shows
        nothing); what waits, and on what, is in its coroutines."""
        tasks = asyncio.all_tasks()
        log.warning("SIGUSR2: %d asyncio tasks", len(tasks))
        for task in tasks:
            frames = task.get_stack()
            where = " <- ".join(
                f"{f.f_code.co_name} ({f.f_code.co_filename.rsplit('/', 2)[-1]}:{f.f_lineno})" for f in frames
            )
            log.warning("task %s: %s", task.get_name(), where or "(no frames)")

    async def start_up() -> None:
        # Pushes run Feast (pure Python, pandas) in a thread next to the event loop. With the
        # default 5 ms GIL switch interval, every select() of the loop waits up to 5 ms to get the
        # GIL back from a busy push thread (a convoy), capping the loop at a few hundred wake-ups
        # a second; a short interval lets the loop run between the push thread's bytecodes.
        sys.setswitchinterval(tuning.gil_switch_interval_s)
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR2, dump_tasks)
        # Faust's Monitor sensor keeps per-event statistics for its web views (off here) on every
        # message in and out: ~4% of the worker's Python time at 3,300 events/s. Our metrics
        # are streams.metrics; the monitor object stays for Faust's own calls to it.
        if app.monitor in app.sensors:
            app.sensors.remove(app.monitor)
        metrics.serve(tuning.metrics_port)
        try:
            await asyncio.to_thread(pipeline.sink.warm_up)
        except Exception:  # noqa: BLE001 -- the first push retries and reports it properly
            log.exception("could not open the feature store at start; the first push will retry")

    app.task(start_up)
    watchdog.install(app)
    return Worker(settings, app, pipeline, ingest_agent, item_agent)


def _main_worker() -> Worker:
    return create_app(load(StreamsSettings))


worker = _main_worker()
app = worker.app
