"""One factory for the Faust apps of ``streams``: the feature worker and the joiner.

:func:`build_app` builds a ``faust.App`` from the shared settings (Kafka, topic layout and a
``FaustAppTuning`` section) and installs what every app needs: the crash watchdog and the
Prometheus ``/metrics`` server, and Kafka security (:func:`broker_credentials`: SASL/SCRAM over
TLS on a secure stack, as the confluent-kafka clients get from ``KafkaSettings.client_config``).
Each app module (``streams.app``, ``streams.joiner_app``) adds only its topics, tables and agents,
so the two apps connect, commit, keep state and export metrics the same way.

Nothing here runs at import, and both app modules build their app on first access of their
``app`` attribute (a module ``__getattr__``): importing a module of ``streams`` loads no
settings and creates no directory, and ``faust -A streams.app worker`` still finds the app.

Durability: the apps produce with ``acks=all`` and aiokafka's idempotence (a batch retried after a
broker failover is written once), and the topics Faust creates itself (table changelogs, the
by-item repartition topic, the leader topic) get the settings' replication factor and
``min.insync.replicas``, like the project topics. Faust turns idempotence on only inside
transactions (exactly-once), through its producer's ``_settings_extra``; this module is the one
place that overrides it (:class:`IdempotentProducer`), and a unit test fails if the producer Faust
builds stops being idempotent. See docs/design/ops.md#a-kafka-cluster. Commits never pass a record
that was not processed (:class:`GaplessConsumer`).
"""

from __future__ import annotations

import gc
import logging
import ssl
import time
import types
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types import TP, Message
from faust.types.auth import CredentialsT
from prometheus_client import Counter, start_http_server

from streamrec.core.errors import SettingsError
from streamrec.core.settings import CommonSettings, KafkaSettings
from streams import watchdog
from streams.settings import FaustAppTuning

log = logging.getLogger(__name__)

# Faust's web server port when the app's web server is off (Faust still wants a number).
_FAUST_DEFAULT_WEB_PORT = 6066


def broker_urls(bootstrap_servers: str) -> list[str]:
    """``host:port,host:port`` as Faust's ``kafka://`` broker URLs."""
    return [f"kafka://{server.strip()}" for server in bootstrap_servers.split(",") if server.strip()]


def tls_context(kafka: KafkaSettings) -> ssl.SSLContext:
    """A client TLS context that verifies the brokers against ``ssl_ca_file`` (the system's CAs
    without one) and their host names, and presents this client's certificate where one is set."""
    try:
        context = ssl.create_default_context(cafile=str(kafka.ssl_ca_file) if kafka.ssl_ca_file else None)
        if kafka.ssl_cert_file is not None and kafka.ssl_key_file is not None:
            context.load_cert_chain(kafka.ssl_cert_file, kafka.ssl_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(
            f"kafka TLS files (ssl_ca_file={kafka.ssl_ca_file}, ssl_cert_file={kafka.ssl_cert_file}, "
            f"ssl_key_file={kafka.ssl_key_file}) cannot be loaded: {exc}; fix STREAMREC_KAFKA__SSL_*"
        ) from exc
    return context


def broker_credentials(kafka: KafkaSettings) -> CredentialsT | None:
    """What Faust passes to aiokafka for ``kafka.security_protocol``: SASL (SCRAM or PLAIN) with
    the principal's password, over TLS for ``SASL_SSL``; TLS alone for ``SSL``; None for
    ``PLAINTEXT``. An unreadable password or TLS file fails here, naming the setting."""
    protocol = kafka.security_protocol
    if protocol == "PLAINTEXT":
        return None
    if protocol == "SSL":
        return faust.SSLCredentials(tls_context(kafka))
    return faust.SASLCredentials(
        username=kafka.sasl_username,
        password=kafka.sasl_secret(),
        mechanism=kafka.sasl_mechanism,
        ssl_context=tls_context(kafka) if protocol == "SASL_SSL" else None,
    )


class IdempotentProducer(aiokafka_driver.Producer):
    """Faust's aiokafka producer with ``acks=all`` and idempotence outside transactions too."""

    def _settings_extra(self) -> Mapping[str, Any]:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


# The share of the rebalance timeout a revoke waits for held records (RevokeFence): the rest
# leaves time to flush the producer and rejoin before the group gives up on this member.
_REVOKE_WAIT_SHARE = 0.5

# A rewind sought this many times without its record coming is given up (the records are gone,
# e.g. deleted by retention): reading goes on from the first record that is still there.
_MAX_SEEKS_PER_REWIND = 4

CONSUMER_REWINDS = Counter(
    "faust_consumer_rewinds_total",
    "Seeks back on an agent topic: 'jump' (the consumer skipped records and reads them again), 'again' "
    "(a rewind whose record had not come yet, sought again), 'given_up' (its records are gone).",
    labelnames=("topic", "reason"),
)


REVOKE_FENCES = Counter(
    "faust_consumer_revoke_fences_total",
    "Revokes (or stops) whose records were still held at the RevokeFence time, so their partitions were fenced.",
)


@dataclass
class _Rewind:
    """A seek back to ``offset`` whose record has not come through yet, sought ``seeks`` times,
    last at ``sought_at``."""

    offset: int
    sought_at: float
    seeks: int = 1


@dataclass
class RevokeFence:
    """How long a revoke waits for the records agents hold before it fences their partitions,
    and who is told then.

    In Kafka's eager rebalance the group waits for each member to give its partitions back, but
    no longer than the rebalance timeout; a member still waiting past it is dropped and its
    partitions go to others, whose states start from the changelog. Anything the late member
    writes to a changelog then lands after those states and wins the next recovery (a zombie
    write). So at ``wait_s``, well inside the timeout, each listener stops writing for the
    partitions it is given and drops what it holds for them (``FeaturePipeline.fence_partitions``);
    their unacked records are read again by the next owner. See docs/design/streams.md#revoke-fence.
    Before that, when the wait begins, each of ``waiting`` is told how long it has (``wait_s``):
    the feature pushers then push what they hold without pacing (``ViewPusher.hurry``).
    """

    wait_s: float
    listeners: list[Callable[[set[TP]], None]] = field(default_factory=list)
    waiting: list[Callable[[float], None]] = field(default_factory=list)
    # how long after the fence a revoke still waits for held records (None: ``wait_s`` again,
    # so the rebalance timeout in all)
    give_up_after_s: float | None = None

    @property
    def give_up_s(self) -> float:
        return self.wait_s if self.give_up_after_s is None else self.give_up_after_s

    def notify(self, partitions: set[TP]) -> None:
        for listener in self.listeners:
            listener(partitions)

    def notify_waiting(self) -> None:
        for listener in self.waiting:
            listener(self.wait_s)


class _ReadOffsets(dict[TP, int | None]):
    """Faust's read offsets (the newest offset its drain loop handed on, by partition), never
    raised past an open rewind: a record already on its way to an agent when the rewind was
    sought would otherwise move it past the rewind, and the drain loop would drop the re-read
    record as older. Missing partitions read as None, as in Faust's own ``defaultdict``."""

    def __init__(self, open_rewinds: Mapping[TP, _Rewind]) -> None:
        super().__init__()
        self._open_rewinds = open_rewinds

    def __missing__(self, partition: TP) -> None:
        return None

    def __setitem__(self, partition: TP, offset: int | None) -> None:
        rewind = self._open_rewinds.get(partition)
        if rewind is not None and offset is not None and offset > rewind.offset:
            return
        super().__setitem__(partition, offset)


class GaplessConsumer(aiokafka_driver.Consumer):
    """Faust's aiokafka consumer that never commits past a record no agent has acked, reads again
    the records it skipped, and whose seeks back (rewinds) hold.

    Faust notes an offset jump between two records it reads as a "gap" and commits over it as if
    acked (meant for compacted topics and transaction markers). The agents' topics have contiguous
    offsets (neither compacted nor transactional), where a jump is records the consumer skipped
    (seen around restarts and rebalances). So jumps are not noted, a commit stops at the first
    offset not acked, and a jump on an agent topic (one Faust acks) seeks the partition back to
    the first skipped offset. Table changelogs (compacted, not acked) are left alone.

    A rewind holds until its record comes through: records fetched before the seek but drained
    after it (offsets past the rewind) are dropped (they come again after the re-read), and Faust's
    read offset is not raised past the rewind (:class:`_ReadOffsets`), since its drain loop drops
    any record older than the read offset: the re-read one. A rewind whose record has not come
    ``reseek_after_s`` after its seek is sought again (:meth:`retry_rewinds`, on a timer), a few
    times, then given up. Seeks run on the consumer's own thread: aiokafka's fetcher is not
    thread-safe (docs/design/streams.md#offset-gaps).
    The feature worker also checks where a newly assigned partition starts
    (``FeaturePipeline._check_offsets``) and seeks through the same :meth:`seek`.
    """

    reseek_after_s = 5.0
    # how a revoke stuck past its fence ends the process (a unit test replaces it)
    exit_for_restart: Callable[[], None] = staticmethod(watchdog.exit_for_restart)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.open_rewinds: dict[TP, _Rewind] = {}
        self.next_offsets: dict[TP, int] = {}  # after the last record handed on, by agent partition
        self._read_offset = _ReadOffsets(self.open_rewinds)

    async def _add_gap(self, tp: Any, offset_from: int, offset_to: int) -> None:
        return None

    async def wait_empty(self) -> None:
        """Faust's wait for every record handed to an agent to be acked (before a revoke and at
        stop), committing meanwhile. Past the transport's :class:`RevokeFence` time the partitions
        with records still held, and all assigned ones, are fenced: their listeners drop what
        they hold, unacked (so uncommitted), which ends the wait once agents finish the batches
        in their hands, so an agent is not left in the middle of a batch when the partitions move.

        A record still held ``RevokeFence.give_up_s`` after the fence (by default the rebalance
        timeout since the revoke began, after which the group has moved on anyway) ends the
        process for its supervisor to restart, as the watchdog does, after logging what holds
        it: holders inside Faust (its stream iterator's last event, its fetcher's last records)
        otherwise kept the revoke, and the worker, waiting for good, and a worker that went on
        without them lost events. A restart loses nothing: the record is uncommitted, and the
        states come back from their changelog (docs/design/streams.md#revoke-fence)."""
        fence: RevokeFence | None = getattr(self.transport, "revoke_fence", None)
        started = time.monotonic()
        fenced_at: float | None = None
        holders_logged = False
        if fence is not None and self._unacked_messages:
            fence.notify_waiting()
        while not self.should_stop and self._unacked_messages:
            await self.commit()
            gc.collect()  # records dropped unacked leave the weak set once collected
            self._clean_unacked_messages()
            if not self._unacked_messages:
                break
            now = time.monotonic()
            if fence is not None and fenced_at is None and now - started >= fence.wait_s:
                fenced_at = now
                partitions = {message.tp for message in self._unacked_messages} | set(self.assignment())
                log.warning(
                    "%d records still held after %.1fs; fencing %d partitions (their next owner reads the "
                    "unacked ones again)",
                    len(self._unacked_messages),
                    fence.wait_s,
                    len(partitions),
                )
                REVOKE_FENCES.inc()
                fence.notify(partitions)
                continue
            if fence is not None and fenced_at is not None:
                if now - fenced_at >= fence.give_up_s:
                    held = list(self._unacked_messages)
                    log.critical(
                        "%d records still held %.1fs after the fence (first: %s, held by: %s); exiting so the "
                        "supervisor restarts this worker (the records are uncommitted and read again)",
                        len(held),
                        now - fenced_at,
                        _where(held[0]),
                        describe_holders(held[0]),
                    )
                    self.exit_for_restart()
                    return
                if not holders_logged and now - fenced_at > _HOLDERS_LOG_AFTER_S:
                    holders_logged = True
                    for message in list(self._unacked_messages)[:3]:
                        log.warning(
                            "%s is still held %.0fs after the fence, by: %s",
                            _where(message),
                            now - fenced_at,
                            describe_holders(message),
                        )
            await self._wait_for_ack(timeout=1.0)
            self._clean_unacked_messages()
        await self.commit_and_end_transactions()

    async def seek(self, partition: TP, offset: int) -> None:
        rewind = self.open_rewinds.get(partition)
        seeks = rewind.seeks + 1 if rewind is not None and rewind.offset == offset else 1
        self.open_rewinds[partition] = _Rewind(offset, time.monotonic(), seeks)
        await super().seek(partition, offset)

    async def _seek(self, partition: TP, offset: int) -> None:
        thread = self._thread
        await thread.call_thread(lambda: thread._ensure_consumer().seek(partition, offset))

    async def seek_wait(self, partitions: Mapping[TP, int]) -> None:
        self.forget_partitions(partitions)
        await super().seek_wait(partitions)

    def forget_partitions(self, partitions: Iterable[TP]) -> None:
        """Drop what is tracked for partitions this app no longer owns (or that were sought to)."""
        for partition in partitions:
            self.open_rewinds.pop(partition, None)
            self.next_offsets.pop(partition, None)

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Message]]:
        async for partition, message in super().getmany(timeout):
            if await self._hold_back(partition, message):
                continue
            offset = message.offset
            if offset >= self.next_offsets.get(partition, 0) and self.app.topics.acks_enabled_for(partition.topic):
                self.next_offsets[partition] = offset + 1
            yield partition, message

    async def _hold_back(self, partition: TP, message: Message) -> bool:
        """Whether ``message`` must not be handed on: it lies past an open rewind, or past records
        skipped just now (then the partition is sought back to them)."""
        offset = message.offset
        rewind = self.open_rewinds.get(partition)
        if rewind is not None:
            if offset == rewind.offset:
                del self.open_rewinds[partition]
                log.info("%s: offset %d read again, after %d seek(s)", partition, offset, rewind.seeks)
            return offset > rewind.offset
        expected = self.next_offsets.get(partition)
        if expected is None or offset <= expected:
            return False
        log.error("%s: the consumer skipped offsets %d..%d; reading them again", partition, expected, offset - 1)
        CONSUMER_REWINDS.labels(partition.topic, "jump").inc()
        await self.seek(partition, expected)
        return True

    async def retry_rewinds(self) -> None:
        """Seek again each rewind whose record has not come ``reseek_after_s`` after its last seek;
        give up one sought ``_MAX_SEEKS_PER_REWIND`` times (reading goes on from where the
        consumer stands: the first record still in the topic)."""
        now = time.monotonic()
        for partition, rewind in list(self.open_rewinds.items()):
            if now - rewind.sought_at <= self.reseek_after_s:
                continue
            if rewind.seeks >= _MAX_SEEKS_PER_REWIND:
                log.error("%s: offset %d never came back after %d seeks", partition, rewind.offset, rewind.seeks)
                CONSUMER_REWINDS.labels(partition.topic, "given_up").inc()
                del self.open_rewinds[partition]
                self.next_offsets.pop(partition, None)  # the next record that comes starts anew
                continue
            log.warning("%s: still waiting for offset %d; seeking there again", partition, rewind.offset)
            CONSUMER_REWINDS.labels(partition.topic, "again").inc()
            await self.seek(partition, rewind.offset)


class IdempotentTransport(aiokafka_driver.Transport):
    """Faust's ``kafka://`` transport, creating :class:`IdempotentProducer` producers and
    :class:`GaplessConsumer` consumers, whose revokes wait as ``revoke_fence`` says."""

    Producer = IdempotentProducer
    Consumer = GaplessConsumer
    revoke_fence: RevokeFence | None = None


_HOLDERS_LOG_AFTER_S = 10.0  # a fenced wait this long logs who still references its records


def _where(message: Any) -> str:
    return f"{message.tp.topic}[{message.tp.partition}]@{message.offset}"


def describe_holders(target: object, depth: int = 3, breadth: int = 3) -> str:
    """Who references ``target``, as a short tree of types (frames by function): a record still
    held after a fence names what keeps it from Faust's weak set. Slow (a scan of every object
    per referrer), so it runs once per stuck fence."""
    seen = {id(target)}
    own_frames = {"walk", "describe_holders", "wait_empty"}

    def label(obj: object) -> str:
        if isinstance(obj, types.FrameType):
            return f"frame {obj.f_code.co_name} ({obj.f_code.co_filename.rsplit('/', 2)[-1]}:{obj.f_lineno})"
        return type(obj).__qualname__

    def walk(obj: object, level: int) -> list[str]:
        if level == 0:
            return []
        found = []
        for referrer in gc.get_referrers(obj):
            if id(referrer) in seen or (
                isinstance(referrer, types.FrameType) and referrer.f_code.co_name in own_frames
            ):
                continue
            seen.add(id(referrer))
            below = walk(referrer, level - 1)
            found.append(label(referrer) + (" <- [" + "; ".join(below) + "]" if below else ""))
            if len(found) >= breadth:
                break
        return found

    return "; ".join(walk(target, depth)) or "nothing (collectable)"


def revoke_fence(app: faust.App) -> RevokeFence:
    """The :class:`RevokeFence` of an app built by :func:`build_app` (listeners go here)."""
    fence = getattr(app.transport, "revoke_fence", None)
    if not isinstance(fence, RevokeFence):
        raise TypeError(f"{app.conf.id} was not built by streams.faust_app.build_app; it has no revoke fence")
    return fence


def replicated_topic_class(min_insync_replicas: int) -> type[faust.Topic]:
    """A ``faust.Topic`` whose topics, when Faust creates them, carry ``min.insync.replicas``
    (Faust passes its ``topic_replication_factor`` but no broker-side topic config of ours)."""
    durability = {"min.insync.replicas": str(min_insync_replicas)}

    class ReplicatedTopic(faust.Topic):
        def __init__(self, *args: Any, config: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
            super().__init__(*args, config={**durability, **(config or {})}, **kwargs)

    return ReplicatedTopic


def build_app(
    settings: CommonSettings,
    tuning: FaustAppTuning,
    *,
    state_dir: Path,
    web_port: int = 0,
    **app_options: Any,
) -> faust.App:
    """A ``faust.App`` for ``tuning.app_id`` on the settings' broker, with the watchdog and metrics.

    Every app connects as the settings' Kafka principal, is at-least-once, produces with
    ``acks=all`` and idempotence, keeps its tables in memory backed by changelog topics (created
    with the settings' partitions, replication and ``min.insync.replicas``), starts from the
    earliest offset of a new group and reads raw bytes (each agent decodes and dead-letters
    itself). ``web_port`` 0 turns Faust's web server off. ``app_options`` are further
    ``faust.App`` settings of one app.
    """
    credentials = broker_credentials(settings.kafka)
    state_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        tuning.app_id,
        broker=broker_urls(settings.kafka.bootstrap_servers),
        broker_credentials=credentials,
        broker_client_id=(
            f"{settings.kafka.client_id}-{tuning.worker_index}" if tuning.worker_index else settings.kafka.client_id
        ),
        store="memory://",
        datadir=str(state_dir),
        processing_guarantee="at_least_once",
        broker_commit_interval=tuning.commit_interval_s,
        consumer_auto_offset_reset="earliest",
        topic_partitions=settings.topics.partitions,
        topic_replication_factor=settings.topics.replication_factor,
        Topic=replicated_topic_class(settings.topics.min_insync_replicas),
        producer_acks=-1,
        web_enabled=web_port != 0,
        web_port=(web_port + tuning.worker_index) if web_port else _FAUST_DEFAULT_WEB_PORT,
        web_bind="127.0.0.1",
        key_serializer="raw",
        value_serializer="raw",
        **app_options,
    )
    if tuning.resolved_metrics_port:
        metrics_port = tuning.resolved_metrics_port

        async def serve_metrics() -> None:
            start_http_server(metrics_port)  # a daemon thread

        app.task(serve_metrics)
    transport = IdempotentTransport(app.conf.broker_consumer, app)
    transport.revoke_fence = RevokeFence(wait_s=app.conf.broker_rebalance_timeout * _REVOKE_WAIT_SHARE)
    app.transport = transport

    @app.on_partitions_revoked.connect
    def forget_revoked(_: Any, /, *args: Any, signal: Any, **__: Any) -> None:
        consumer = app.consumer
        if isinstance(consumer, GaplessConsumer):
            consumer.forget_partitions(args[0])

    async def retry_rewinds() -> None:
        consumer = app.consumer
        if isinstance(consumer, GaplessConsumer) and not app.rebalancing:
            await consumer.retry_rewinds()

    app.timer(interval=GaplessConsumer.reseek_after_s)(retry_rewinds)

    watchdog.install(app, stall_s=tuning.producer_stall_s)
    return app
