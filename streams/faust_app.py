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

import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import faust
from faust.transport.drivers import aiokafka as aiokafka_driver
from faust.types.auth import CredentialsT
from prometheus_client import start_http_server

from streamrec.core.errors import SettingsError
from streamrec.core.settings import CommonSettings, KafkaSettings
from streams import watchdog
from streams.settings import FaustAppTuning

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


class GaplessConsumer(aiokafka_driver.Consumer):
    """Faust's aiokafka consumer that never commits past a record no agent has acked.

    Faust notes an offset jump between two records it reads as a "gap" and commits over it as if
    acked (meant for compacted topics and transaction markers). Our agents read topics with
    contiguous offsets, where a jump is a record Faust skipped: the feature worker reads it again
    (``FeaturePipeline._check_offsets``), and a commit over it would let the partition's next owner
    start after records nobody processed. So jumps are not noted, and a commit stops at the first
    offset not acked.
    """

    async def _add_gap(self, tp: Any, offset_from: int, offset_to: int) -> None:
        return None


class IdempotentTransport(aiokafka_driver.Transport):
    """Faust's ``kafka://`` transport, creating :class:`IdempotentProducer` producers and
    :class:`GaplessConsumer` consumers."""

    Producer = IdempotentProducer
    Consumer = GaplessConsumer


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
    app.transport = IdempotentTransport(app.conf.broker_consumer, app)
    watchdog.install(app)
    return app
