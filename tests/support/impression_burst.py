"""One user's burst of open impressions: the join state that once outgrew Kafka's 1 MiB limit."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from confluent_kafka import Producer

from streamrec.core.events import Impression, ImpressionItem
from streamrec.core.settings import CommonSettings


def produce_one_users_burst(settings: CommonSettings, count: int, user_id: str = "burst") -> None:
    """``count`` impressions of ``user_id``, 1 ms apart (~1.3 KB of join state each while open)."""
    now = datetime.now(UTC)
    recent = [f"item-{n:04d}" for n in range(50)]
    producer = Producer(settings.kafka.client_config())
    for n in range(count):
        impression = Impression(
            event_id=f"r{n}",
            event_time=now + timedelta(milliseconds=n),
            user_id=user_id,
            request_id=f"r{n}",
            arm="stable",
            model_version=1,
            items=[ImpressionItem(item_id=f"i{j}", score=1.0, position=j) for j in range(3)],
            features={"recent_items": recent},
        )
        producer.produce(settings.topics.impressions, key=impression.key(), value=impression.to_bytes())
    if producer.flush(10):
        raise RuntimeError("impressions still unsent after 10 s; is the broker up?")
