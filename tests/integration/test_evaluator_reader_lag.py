"""The evaluator's lag gauge on a real broker: the consumer's cached watermarks move with fetches."""

from __future__ import annotations

import time

from confluent_kafka import Consumer, Producer, TopicPartition

from serving.rollout.lag import reader_lag
from streamrec.core.settings import CommonSettings
from streamrec.kafka.consume import consumer_config


def produce(settings: CommonSettings, count: int, first: int = 0) -> None:
    producer = Producer(settings.kafka.client_config())
    for n in range(first, first + count):
        producer.produce(settings.topics.labeled, key=f"user-{n}".encode(), value=b"{}")
    assert producer.flush(30) == 0


def lag_within(consumer: Consumer, settings: CommonSettings, positions: dict[int, int], expected: int) -> int | None:
    """The lag once it reads ``expected`` (the fetcher catches up in the background), or the last one."""
    partitions = range(settings.topics.partitions)
    deadline = time.monotonic() + 15
    lag = reader_lag(consumer, settings.topics.labeled, partitions, positions)
    while lag != expected and time.monotonic() < deadline:
        time.sleep(0.2)
        lag = reader_lag(consumer, settings.topics.labeled, partitions, positions)
    return lag


def test_the_reader_lag_follows_the_topic_end_and_the_positions(fresh_settings: CommonSettings) -> None:
    topic = fresh_settings.topics.labeled
    produce(fresh_settings, 30)
    config = consumer_config(fresh_settings, "lag-test", from_beginning=True)
    consumer = Consumer({**config, "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(topic, partition, 0) for partition in range(fresh_settings.topics.partitions)])
        positions: dict[int, int] = {}
        assert lag_within(consumer, fresh_settings, positions, 30) == 30  # nothing read: all of it
        read = 0
        deadline = time.monotonic() + 30
        while read < 30 and time.monotonic() < deadline:
            for message in consumer.consume(num_messages=100, timeout=0.5):
                assert message.error() is None, message.error()
                positions[int(message.partition() or 0)] = int(message.offset() or 0) + 1
                read += 1
        assert read == 30
        assert lag_within(consumer, fresh_settings, positions, 0) == 0
        produce(fresh_settings, 12, first=30)  # not consumed: the fetcher's watermarks still move
        assert lag_within(consumer, fresh_settings, positions, 12) == 12
    finally:
        consumer.close()
