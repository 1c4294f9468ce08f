"""Topic creation with the layout from settings (partitions, replication, retention)."""

from __future__ import annotations

from collections.abc import Sequence

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from streamrec.core.errors import StackError
from streamrec.core.settings import CommonSettings


def ensure_topics(settings: CommonSettings, timeout_s: float = 30.0, extra: Sequence[str] = ()) -> list[str]:
    """Create every project topic (and ``extra`` ones, same layout) that does not exist yet; return
    the names created."""
    admin = AdminClient(settings.kafka.client_config())
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    topics = settings.topics
    wanted = [
        NewTopic(
            name,
            num_partitions=topics.partitions,
            replication_factor=topics.replication_factor,
            config={"retention.ms": str(topics.retention_ms)},
        )
        for name in dict.fromkeys([*topics.all_names(), *extra])
        if name not in existing
    ]
    if not wanted:
        return []
    created = []
    for name, future in admin.create_topics(wanted, operation_timeout=timeout_s).items():
        try:
            future.result(timeout=timeout_s)
            created.append(name)
        except KafkaException as exc:
            error = exc.args[0]
            if isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise StackError(f"could not create topic {name!r}: {error}") from exc
    return created
