"""One user's burst of open impressions: the join state that once outgrew Kafka's 1 MiB limit."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from confluent_kafka import Producer

from streamrec.core.events import Event, Impression, ImpressionItem
from streamrec.core.settings import CommonSettings


def one_users_burst(
    count: int, user_id: str = "burst", *, items: int = 3, context_bytes: int = 0, start: datetime | None = None
) -> list[Impression]:
    """``count`` impressions of ``user_id``, 1 ms apart, shaped as the API logs them: the user's
    recent items (~1.3 KB of join state each while open) and, with ``context_bytes``, a request
    context of about that size."""
    start = start or datetime.now(UTC)
    recent = [f"item-{n:04d}" for n in range(50)]
    features: dict[str, object] = {"recent_items": recent}
    if context_bytes:
        features["context"] = {"page": "home", "blob": "c" * context_bytes}
    return [
        Impression(
            event_id=f"{user_id}-r{n}",
            event_time=start + timedelta(milliseconds=n),
            user_id=user_id,
            request_id=f"{user_id}-r{n}",
            arm="stable",
            model_version=1,
            items=[ImpressionItem(item_id=f"i{j}", score=1.0, position=j) for j in range(items)],
            features=features,
        )
        for n in range(count)
    ]


def produce(settings: CommonSettings, topic: str, events: Sequence[Event]) -> None:
    """Produce ``events`` (keyed as they say) and wait until the broker has them."""
    producer = Producer(settings.kafka.client_config())
    for event in events:
        producer.produce(topic, key=event.key(), value=event.to_bytes())
    if producer.flush(10):
        raise RuntimeError(f"records for {topic} still unsent after 10 s; is the broker up?")


def produce_one_users_burst(settings: CommonSettings, count: int, user_id: str = "burst") -> None:
    """:func:`one_users_burst` to ``topics.impressions``."""
    produce(settings, settings.topics.impressions, one_users_burst(count, user_id))
