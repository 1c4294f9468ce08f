"""The joiner's Faust app: ``faust -A streams.joiner_app worker``.

One agent reads ``topics.impressions`` and ``topics.clicks`` together. Both are keyed by user id,
so a user's impressions and clicks arrive on the same partition number and one changelog-backed
table keyed by user holds that user's :class:`~streams.joiner.JoinState`. A timer labels closed
windows: labeled examples go to ``topics.labeled``, and every click that cannot be joined
(late, before its impression, not shown, no impression) goes to ``topics.deadletter`` with its
reason, so nothing is lost silently; each outcome is counted in Prometheus.

The table is written through ``table.data`` plus an explicit ``send_changelog`` to the
partition recorded in the state, because the timer runs outside any stream event (Faust only
infers the changelog partition inside one).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import faust
from prometheus_client import Counter, start_http_server

from streamrec.core.errors import EventValidationError
from streamrec.core.events import Click, DeadLetter, Impression, LabeledExample, decode_event
from streamrec.core.settings import load
from streams import watchdog
from streams.joiner import DEAD_LETTER_OUTCOMES, JoinConfig, JoinState, utc_now
from streams.joiner_settings import JoinerSettings

CLICKS = Counter("streamrec_joiner_clicks_total", "Clicks by join outcome", ["outcome"])
IMPRESSIONS = Counter("streamrec_joiner_impressions_total", "Impressions read")
LABELED = Counter("streamrec_joiner_labeled_total", "Labeled examples emitted", ["clicked"])
INVALID = Counter("streamrec_joiner_invalid_total", "Undecodable or invalid records", ["topic"])
LABELED_EARLY = Counter(
    "streamrec_joiner_labeled_early_total", "Labeled examples of impressions labeled before their window closed"
)


def create_joiner(settings: JoinerSettings) -> faust.App:
    tuning = settings.joiner
    config = JoinConfig(
        window_s=tuning.label_window_s, grace_s=tuning.grace_s, max_open_per_user=tuning.max_open_per_user
    )
    topics = settings.topics
    settings.joiner_state_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        tuning.app_id,
        broker=[f"kafka://{server.strip()}" for server in settings.kafka.bootstrap_servers.split(",")],
        store="memory://",
        datadir=str(settings.joiner_state_dir),
        processing_guarantee="at_least_once",
        broker_commit_interval=tuning.commit_interval_s,
        consumer_auto_offset_reset="earliest",
        topic_partitions=topics.partitions,
        topic_replication_factor=topics.replication_factor,
        web_enabled=False,
        key_serializer="raw",
        value_serializer="raw",
    )
    source = app.topic(topics.impressions, topics.clicks, key_serializer="raw", value_serializer="raw")
    labeled_topic = app.topic(topics.labeled, key_serializer="raw", value_serializer="raw")
    deadletter = app.topic(topics.deadletter, key_serializer="raw", value_serializer="raw")
    table = app.Table(
        "join_state", partitions=topics.partitions, key_type=str, value_type=dict, help="JoinState by user id"
    )

    def save(user_id: str, state: JoinState, partition: int) -> None:
        value: dict[str, Any] = {**state.to_json(), "partition": partition}
        table.data[user_id] = value
        table.send_changelog(partition, user_id, value)

    async def emit(examples: list[LabeledExample]) -> None:
        for example in examples:
            await labeled_topic.send(key=example.key(), value=example.to_bytes())
            LABELED.labels(str(example.clicked).lower()).inc()

    async def dead_letter(click: Click, reason: str, partition: int, offset: int) -> None:
        error = EventValidationError(
            f"click_{reason}", f"click {click.event_id} on request {click.request_id}: {reason}"
        )
        letter = DeadLetter.for_raw(
            value=click.to_bytes(),
            key=click.key(),
            topic=topics.clicks,
            partition=partition,
            offset=offset,
            error=error,
        )
        await deadletter.send(key=click.key(), value=letter.to_bytes())

    @app.agent(source, name="streams.joiner")
    async def join(stream: faust.StreamT[bytes]) -> AsyncIterator[None]:
        async for event in stream.events():
            message = event.message
            is_impression = message.topic == topics.impressions
            try:
                record: Impression | Click = (
                    decode_event(event.value, Impression) if is_impression else decode_event(event.value, Click)
                )
            except EventValidationError as error:
                INVALID.labels(message.topic).inc()
                letter = DeadLetter.for_raw(
                    value=event.value,
                    key=event.key,
                    topic=message.topic,
                    partition=message.partition,
                    offset=message.offset,
                    error=error,
                )
                await deadletter.send(key=event.key, value=letter.to_bytes())
                yield None
                continue
            state = JoinState.from_json(table.data.get(record.user_id))
            if isinstance(record, Impression):
                IMPRESSIONS.inc()
                outcomes = state.add_impression(record, config)
                early = state.label_overflow(config)
                await emit(early)
                LABELED_EARLY.inc(len(early))
            else:
                outcomes = [(record, state.add_click(record, config))]
            for click, outcome in outcomes:
                CLICKS.labels(outcome).inc()
                if outcome in DEAD_LETTER_OUTCOMES:
                    await dead_letter(click, outcome, message.partition, message.offset)
            save(record.user_id, state, message.partition)
            yield None

    async def label_closed_windows() -> None:
        now = utc_now()
        for user_id, value in list(table.data.items()):
            state = JoinState.from_json(value)
            labeled, expired = state.expire(now, config)
            if not labeled and not expired:
                continue
            await emit(labeled)
            for click in expired:
                CLICKS.labels("no_impression").inc()
                await dead_letter(click, "no_impression", int(value["partition"]), -1)
            save(user_id, state, int(value["partition"]))

    app.timer(interval=tuning.expire_interval_s)(label_closed_windows)
    watchdog.install(app)
    if tuning.metrics_port:

        async def serve_metrics() -> None:
            start_http_server(tuning.metrics_port)

        app.task(serve_metrics)
    return app


app = create_joiner(load(JoinerSettings))
