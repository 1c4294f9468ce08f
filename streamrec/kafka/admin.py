"""Topic creation with the layout from settings (partitions, replication, min.insync.replicas,
retention).

Under ACLs (the secure stack) a principal sees only the topics it may use, and only the operator
creates the project topics: :func:`ensure_topics` leaves alone a topic the caller may neither see
nor create (another service's), and refuses, naming the fix, one it may use but that is missing."""

from __future__ import annotations

import time
from collections.abc import Sequence

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from streamrec.core.errors import StackError
from streamrec.core.settings import CommonSettings, TopicSettings


def topic_config(topics: TopicSettings) -> dict[str, str]:
    """The per-topic configuration every project topic is created with."""
    return {"retention.ms": str(topics.retention_ms), "min.insync.replicas": str(topics.min_insync_replicas)}


def ensure_topics(
    settings: CommonSettings, timeout_s: float = 30.0, extra: Sequence[str] = (), broker_wait_s: float = 15.0
) -> list[str]:
    """Create every project topic (and ``extra`` ones, same layout) that does not exist yet and wait
    until the brokers' metadata shows a leader for each of their partitions; return the names
    created. Refuses, naming the fix, a replication factor above the live brokers, after waiting up
    to ``broker_wait_s`` for more to show up (a node just started, or briefly fenced, is missing
    from the other nodes' metadata for a moment). Topics the caller's principal may not describe
    or create are another service's and are skipped."""
    admin = AdminClient(settings.kafka.client_config())
    metadata = admin.list_topics(timeout=timeout_s)
    existing = set(metadata.topics)
    topics = settings.topics
    missing = [name for name in dict.fromkeys([*topics.all_names(), *extra]) if name not in existing]
    if not missing:
        return []
    live = _wait_for_brokers(admin, topics.replication_factor, len(metadata.brokers), min(timeout_s, broker_wait_s))
    if topics.replication_factor > live:
        raise StackError(
            f"cannot create {', '.join(missing)} with replication factor {topics.replication_factor}: "
            f"{live} broker(s) are live at {settings.kafka.bootstrap_servers}. Start more "
            "(`streamrec stack up --brokers 3`) or lower STREAMREC_TOPICS__REPLICATION_FACTOR "
            "(and STREAMREC_TOPICS__MIN_INSYNC_REPLICAS)"
        )
    wanted = [
        NewTopic(
            name,
            num_partitions=topics.partitions,
            replication_factor=topics.replication_factor,
            config=topic_config(topics),
        )
        for name in missing
    ]
    created = []
    for name, future in admin.create_topics(wanted, operation_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
            created.append(name)
        except KafkaException as exc:
            error = exc.args[0]
            if isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            if isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
                _check_not_needed(admin, settings, name, timeout_s)
                continue
            raise StackError(f"could not create topic {name!r}: {error}") from exc
    _wait_until_led(admin, created, topics.partitions, timeout_s)
    return created


def _check_not_needed(admin: AdminClient, settings: CommonSettings, name: str, timeout_s: float) -> None:
    """The caller may not create ``name``. If it may not describe it either, the topic is not its
    own (existing or not, this principal could not use it): fine. If it may describe it, the ACLs
    let it use the topic, which is missing: only the operator can fix that."""
    described = admin.list_topics(topic=name, timeout=timeout_s).topics.get(name)
    error = described.error if described is not None else None
    if error is not None and error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
        return
    if error is not None and error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
        kafka = settings.kafka
        raise StackError(
            f"topic {name!r} does not exist and {kafka.sasl_username or 'this client'} may not create it: create "
            "the project topics as the operator (`streamrec topics create` in a shell set up by "
            "`eval $(streamrec stack env)`; `streamrec stack up` does it)"
        )


def _wait_for_brokers(admin: AdminClient, wanted: int, live: int, timeout_s: float) -> int:
    """The number of live brokers once it reaches ``wanted``, or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while live < wanted and time.monotonic() < deadline:
        time.sleep(0.5)
        live = len(admin.list_topics(timeout=max(0.5, deadline - time.monotonic())).brokers)
    return live


def _wait_until_led(admin: AdminClient, names: list[str], partitions: int, timeout_s: float) -> None:
    """A created topic is in the controller's log at once but in a broker's metadata a moment later;
    a client that asks that broker first would see an unknown topic."""
    deadline = time.monotonic() + timeout_s
    pending = list(names)
    while pending:
        described = admin.list_topics(timeout=timeout_s).topics
        pending = [
            name
            for name in pending
            if name not in described
            or described[name].error is not None
            or len(described[name].partitions) < partitions
            or any(partition.leader < 0 for partition in described[name].partitions.values())
        ]
        if pending and time.monotonic() > deadline:
            raise StackError(f"topics {', '.join(pending)} have no leader {timeout_s:.0f}s after their creation")
        if pending:
            time.sleep(0.1)
