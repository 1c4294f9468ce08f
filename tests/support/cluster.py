"""A Kafka cluster (three KRaft nodes by default, with Redis) under the same ``LocalStack`` that
``streamrec stack up --brokers 3`` runs, for the cluster and fault tests.

``restart_crashed`` is off by default: a test that SIGKILLs a node (``LocalStack.kill``) decides
when it comes back (``LocalStack.start``). Each node gets a 256 MiB heap, so three fit beside the
session stack on a small machine.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from streamrec.core.settings import CommonSettings, TopicSettings
from streamrec.kafka.admin import ensure_topics
from streamrec.ops.stack.local_stack import LocalStack
from streamrec.ops.stack.ports import stack_settings_on_free_ports


@contextmanager
def running_cluster(
    state_dir: Path, brokers: int = 3, *, restart_crashed: bool = False, **tuning: Any
) -> Iterator[LocalStack]:
    """A stack with ``brokers`` Kafka nodes on free ports and its state in ``state_dir``, up until
    the block ends; ``tuning`` sets other ``StackTuning`` fields."""
    settings = stack_settings_on_free_ports(
        state_dir, brokers=brokers, restart_crashed=restart_crashed, **{"kafka_heap_mb": 256, **tuning}
    )
    stack = LocalStack(settings)
    try:
        stack.up()
        yield stack
    finally:
        stack.down()


def cluster_settings(stack: LocalStack, prefix: str | None = None) -> CommonSettings:
    """A client's settings on ``stack`` with topics of their own (``<prefix>.interactions`` ...),
    laid out as the stack lays out its topics (replication 3, min.insync.replicas 2 on three
    nodes), and created."""
    layout = stack.topic_settings()
    topics = TopicSettings.prefixed(
        prefix or f"c{uuid.uuid4().hex[:8]}",
        partitions=layout.partitions,
        replication_factor=layout.replication_factor,
        min_insync_replicas=layout.min_insync_replicas,
    )
    settings = stack.client_settings().model_copy(update={"topics": topics})
    ensure_topics(settings)
    return settings
