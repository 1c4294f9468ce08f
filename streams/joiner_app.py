"""The joiner's Faust app: ``faust -A streams.joiner_app worker``.

One agent reads ``topics.impressions`` and ``topics.clicks`` together. Both are keyed by user id,
so a user's impressions and clicks arrive on the same partition number and one changelog-backed
table keyed by user holds that user's :class:`~streams.joiner.JoinState`. A timer labels closed
windows: labeled examples go to ``topics.labeled``, and every click that cannot be joined
(late, before its impression, not shown, no impression) goes to ``topics.deadletter`` with its
reason, so nothing is lost silently; each outcome is counted in Prometheus. What happens to each
record is :class:`~streams.joiner_agent.JoinerAgent`'s (crash safety included); this module wires
it to Faust, and the source offsets the timer waits for to
:class:`~streams.joiner_progress.KafkaOffsets` (read in a thread, off the event loop).

The app is built by :func:`create_joiner` (through ``streams.faust_app.build_app``); the
module's ``app`` attribute builds it from ``STREAMREC_*`` settings on first access, not at import.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

import faust
from faust.exceptions import ConsumerNotStarted
from faust.types import TP

from streamrec.core.settings import load
from streams import joiner_metrics as metrics
from streams import watchdog
from streams.faust_app import build_app
from streams.joiner import JoinConfig
from streams.joiner_agent import DeliveryFailed, JoinerAgent, StoredState
from streams.joiner_progress import KafkaOffsets, Offsets, TopicPartition
from streams.joiner_settings import JoinerSettings, JoinerTuning
from streams.offset_guard import OffsetGuard

log = logging.getLogger(__name__)


def exit_for_restart(error: DeliveryFailed) -> None:
    """Exit as the watchdog does: the supervisor restarts the joiner, which relabels from its changelog."""
    log.critical("exiting so the supervisor restarts the joiner: %s", error)
    logging.shutdown()
    os._exit(watchdog.EXIT_CODE)


def _exit_if_refused(user_id: str, sent: asyncio.Future[Any]) -> None:
    error = None if sent.cancelled() else sent.exception()
    if error is not None:
        exit_for_restart(DeliveryFailed(f"Kafka refused the changelog record of user {user_id!r}: {error!r}"))


class FaustJoinerOutputs:
    """``JoinerOutputs`` on the labeled and dead-letter topics: ``send_soon`` queues a record in
    the app's producer buffer and returns the future Faust resolves once Kafka acknowledged it."""

    def __init__(self, labeled_topic: faust.types.TopicT, deadletter: faust.types.TopicT) -> None:
        self.labeled_topic = labeled_topic
        self.deadletter = deadletter

    def labeled(self, key: bytes, value: bytes) -> Awaitable[object]:
        return self.labeled_topic.send_soon(key=key, value=value)

    def dead_letter(self, key: bytes | None, value: bytes) -> Awaitable[object]:
        return self.deadletter.send_soon(key=key, value=value)


def join_config(tuning: JoinerTuning) -> JoinConfig:
    return JoinConfig(
        window_s=tuning.label_window_s,
        grace_s=tuning.grace_s,
        labeled_memory_s=tuning.labeled_memory_s,
        max_open_per_user=tuning.max_open_per_user,
        max_state_bytes=tuning.max_state_bytes,
        max_features_bytes=tuning.max_features_bytes,
    )


@dataclass
class Joiner:
    """The app and what its agent uses; tests swap ``joiner.outputs``, ``joiner.offsets`` and ``joiner.clock``."""

    settings: JoinerSettings
    app: faust.App
    joiner: JoinerAgent
    agent: Any  # faust AgentT (its generic types do not help here)
    kafka_offsets: KafkaOffsets


def create_joiner(settings: JoinerSettings) -> Joiner:
    """Build the app, topics, join table, agent and labeling timer for ``settings``."""
    tuning = settings.joiner
    topics = settings.topics
    app = build_app(
        settings,
        tuning,
        state_dir=settings.joiner_state_dir,
        broker_session_timeout=tuning.session_timeout_s,
        broker_rebalance_timeout=tuning.session_timeout_s,
        broker_heartbeat_interval=max(1.0, tuning.session_timeout_s / 10),
    )
    source = app.topic(topics.impressions, topics.clicks, key_serializer="raw", value_serializer="raw")
    labeled_topic = app.topic(topics.labeled, key_serializer="raw", value_serializer="raw")
    deadletter = app.topic(topics.deadletter, key_serializer="raw", value_serializer="raw")
    # value_type None: Faust decodes the JSON as it is (it knows no ``dict`` type, and recovery
    # from the changelog fails on one).
    table = app.Table(
        "join_state", partitions=topics.partitions, key_type=str, value_type=None, help="JoinState by user id"
    )
    kafka_offsets = KafkaOffsets(settings.kafka.client_config(), tuning.app_id)

    def send_changelog(partition: int, user_id: str, value: StoredState | None) -> None:
        if value is None:  # a tombstone: the user's state is deleted on recovery
            sent = table.send_changelog(partition, user_id, None, value_serializer="raw")
        else:
            sent = table.send_changelog(partition, user_id, value)
        # Faust only logs a changelog record the broker refuses (e.g. over the topic's
        # max.message.bytes); the joiner would go on with a state no restart can recover.
        sent.add_done_callback(functools.partial(_exit_if_refused, user_id))

    async def offsets(partitions: list[TopicPartition]) -> Offsets:
        return await asyncio.to_thread(kafka_offsets.read, partitions)

    def owned_partitions() -> set[int] | None:
        """The impressions partitions this joiner owns now; None during a rebalance. Before the
        consumer runs (a test driving the agent directly) every partition counts as its own."""
        if app.rebalancing:
            return None
        try:
            assignment = app.consumer.assignment()
        except ConsumerNotStarted:
            return set(range(topics.partitions))
        return {tp.partition for tp in assignment if tp.topic == topics.impressions}

    joiner = JoinerAgent(
        config=join_config(tuning),
        impressions_topic=topics.impressions,
        clicks_topic=topics.clicks,
        states=table.data,
        send_changelog=send_changelog,
        outputs=FaustJoinerOutputs(labeled_topic, deadletter),
        offsets=offsets,
        owned=owned_partitions,
    )

    guard = OffsetGuard(
        seek=lambda topic, partition, offset: app.consumer.seek(TP(topic, partition), offset),
        on_gap=lambda topic, count: metrics.OFFSET_GAPS.labels(topic).inc(count),
    )

    async def join(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        async for event in stream.events():
            if not await guard.admit(event.message):
                yield None
                continue
            try:
                await joiner.handle(event)
            except DeliveryFailed as error:
                exit_for_restart(error)
            yield None

    async def label_closed_windows() -> None:
        try:
            await joiner.label_closed_windows()
        except DeliveryFailed as error:
            exit_for_restart(error)

    agent = app.agent(source, name="streams.joiner")(join)

    async def retry_rewinds() -> None:
        if not app.rebalancing:
            await guard.retry()

    app.timer(interval=guard.retry_s)(retry_rewinds)
    app.timer(interval=tuning.expire_interval_s)(label_closed_windows)

    @app.on_partitions_revoked.connect
    def forget_revoked(_: Any, /, *args: Any, signal: Any, **__: Any) -> None:
        revoked: set[Any] = args[0]  # faust TPs
        joiner.progress.forget({(tp.topic, tp.partition) for tp in revoked})
        guard.forget({(tp.topic, tp.partition) for tp in revoked})

    return Joiner(settings, app, joiner, agent, kafka_offsets)


@functools.cache
def main_joiner() -> Joiner:
    """This process's joiner, from ``STREAMREC_*`` settings; built on the first call only."""
    return create_joiner(load(JoinerSettings))


def __getattr__(name: str) -> object:
    """``app`` (PEP 562): built on first access, so an import does no work.

    ``faust -A streams.joiner_app worker`` reads ``app`` here (Faust's ``find_app``).
    """
    if name == "app":
        return main_joiner().app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
