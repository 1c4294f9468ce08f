"""The joiner's Faust app: ``faust -A streams.joiner_app worker``.

One agent reads ``topics.impressions`` and ``topics.clicks`` together. Both are keyed by user id,
so a user's impressions and clicks arrive on the same partition number and one changelog-backed
table keyed by user holds that user's :class:`~streams.joiner.JoinState`. A timer labels closed
windows: labeled examples go to ``topics.labeled``, and every click that cannot be joined
(late, before its impression, not shown, no impression) goes to ``topics.deadletter`` with its
reason, so nothing is lost silently; each outcome is counted in Prometheus. What happens to each
record is :class:`~streams.joiner_agent.JoinerAgent`'s; this module wires it to Faust.

The app is built by :func:`create_joiner` (through ``streams.faust_app.build_app``); the
module's ``app`` attribute builds it from ``STREAMREC_*`` settings on first access, not at import.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import faust

from streamrec.core.settings import load
from streams.faust_app import build_app
from streams.joiner import JoinConfig
from streams.joiner_agent import JoinerAgent
from streams.joiner_settings import JoinerSettings


class FaustJoinerOutputs:
    """``JoinerOutputs`` on the labeled and dead-letter topics."""

    def __init__(self, labeled_topic: faust.types.TopicT, deadletter: faust.types.TopicT) -> None:
        self.labeled_topic = labeled_topic
        self.deadletter = deadletter

    async def labeled(self, key: bytes, value: bytes) -> None:
        await self.labeled_topic.send(key=key, value=value)

    async def dead_letter(self, key: bytes | None, value: bytes) -> None:
        await self.deadletter.send(key=key, value=value)


@dataclass
class Joiner:
    """The app and what its agent uses; tests swap ``joiner.outputs`` and ``joiner.clock``."""

    settings: JoinerSettings
    app: faust.App
    joiner: JoinerAgent
    agent: Any  # faust AgentT (its generic types do not help here)


def create_joiner(settings: JoinerSettings) -> Joiner:
    """Build the app, topics, join table, agent and labeling timer for ``settings``."""
    tuning = settings.joiner
    topics = settings.topics
    app = build_app(settings, tuning, state_dir=settings.joiner_state_dir)
    source = app.topic(topics.impressions, topics.clicks, key_serializer="raw", value_serializer="raw")
    labeled_topic = app.topic(topics.labeled, key_serializer="raw", value_serializer="raw")
    deadletter = app.topic(topics.deadletter, key_serializer="raw", value_serializer="raw")
    table = app.Table(
        "join_state", partitions=topics.partitions, key_type=str, value_type=dict, help="JoinState by user id"
    )
    joiner = JoinerAgent(
        config=JoinConfig(
            window_s=tuning.label_window_s, grace_s=tuning.grace_s, max_open_per_user=tuning.max_open_per_user
        ),
        impressions_topic=topics.impressions,
        clicks_topic=topics.clicks,
        states=table.data,
        send_changelog=table.send_changelog,
        outputs=FaustJoinerOutputs(labeled_topic, deadletter),
    )

    async def join(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        async for event in stream.events():
            await joiner.handle(event)
            yield None

    async def label_closed_windows() -> None:
        await joiner.label_closed_windows()

    agent = app.agent(source, name="streams.joiner")(join)
    app.timer(interval=tuning.expire_interval_s)(label_closed_windows)
    return Joiner(settings, app, joiner, agent)


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
