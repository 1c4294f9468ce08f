"""Reading events back from Kafka with the shared validation.

:func:`consume_decoded` yields one :class:`Decoded` per record: either the validated event or
the :class:`EventValidationError` that says why it is not one, together with the record's
topic, partition and offset. Consumers never drop a bad record silently: they get it here and
decide (count it, print it, or dead-letter it).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_fixed

from streamrec.core.errors import EventValidationError
from streamrec.core.events import EventT, decode_event
from streamrec.core.settings import CommonSettings


@dataclass(frozen=True)
class Decoded(Generic[EventT]):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    event: EventT | None
    error: EventValidationError | None


def consumer_config(
    settings: CommonSettings, group_id: str, *, from_beginning: bool
) -> dict[str, str | int | float | bool]:
    return {
        **settings.kafka.client_config(),
        "group.id": group_id,
        "auto.offset.reset": "earliest" if from_beginning else "latest",
        "enable.auto.commit": True,
        "enable.partition.eof": False,
    }


def consume_decoded(
    settings: CommonSettings,
    topic: str,
    event_type: type[EventT],
    *,
    group_id: str,
    from_beginning: bool = True,
    max_records: int | None = None,
    idle_timeout_s: float | None = None,
) -> Iterator[Decoded[EventT]]:
    """Yield decoded records until ``max_records`` or ``idle_timeout_s`` without a record."""
    consumer = Consumer(consumer_config(settings, group_id, from_beginning=from_beginning))
    consumer.subscribe([topic])
    seen = 0
    last_record = time.monotonic()
    try:
        while max_records is None or seen < max_records:
            if idle_timeout_s is not None and time.monotonic() - last_record > idle_timeout_s:
                return
            batch = consumer.consume(num_messages=1000, timeout=0.5)
            for message in batch:
                kafka_error = message.error()
                if kafka_error is not None:
                    if kafka_error.code() == KafkaError._PARTITION_EOF:
                        continue
                    raise RuntimeError(f"consumer error on {topic}: {kafka_error}")
                last_record = time.monotonic()
                seen += 1
                value = message.value()
                try:
                    event, error = decode_event(value, event_type), None
                except EventValidationError as exc:
                    event, error = None, exc
                yield Decoded(
                    topic=str(message.topic()),
                    partition=int(message.partition() or 0),
                    offset=int(message.offset() or 0),
                    key=message.key(),
                    value=value,
                    event=event,
                    error=error,
                )
    finally:
        consumer.close()


# Leadership moves or is not known yet (a topic just created, a broker restarting, the client's
# metadata not loaded yet: the local _UNKNOWN_PARTITION): ask again.
_LEADERSHIP_ERRORS = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError._UNKNOWN_PARTITION,
    }
)


def _leadership_changing(exc: BaseException) -> bool:
    return isinstance(exc, KafkaException) and exc.args[0].code() in _LEADERSHIP_ERRORS


def watermarks(consumer: Consumer, topic: str, partition: int, timeout_s: float) -> tuple[int, int]:
    """The (low, high) offsets of one partition; while its leadership is changing, asked again
    for up to ``timeout_s`` (other errors are raised at once)."""
    for attempt in Retrying(
        retry=retry_if_exception(_leadership_changing),
        stop=stop_after_delay(timeout_s),
        wait=wait_fixed(0.2),
        reraise=True,
    ):
        with attempt:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout_s)
    return int(low), int(high)


def end_offsets(settings: CommonSettings, topic: str, timeout_s: float = 10.0) -> dict[int, int]:
    """The next offset of every partition of ``topic`` (where a new record will land)."""
    consumer = Consumer(consumer_config(settings, "streamrec-offsets", from_beginning=True))
    try:
        partitions = consumer.list_topics(topic, timeout=timeout_s).topics[topic].partitions
        return {partition: watermarks(consumer, topic, partition, timeout_s)[1] for partition in partitions}
    finally:
        consumer.close()


def group_lag(settings: CommonSettings, group_id: str, topic: str, timeout_s: float = 10.0) -> int:
    """Records of ``topic`` not yet committed by ``group_id`` (all partitions; no commit = all)."""
    consumer = Consumer(consumer_config(settings, group_id, from_beginning=True))
    try:
        ends = end_offsets(settings, topic, timeout_s)
        committed = consumer.committed([TopicPartition(topic, partition) for partition in ends], timeout=timeout_s)
        lag = 0
        for position in committed:
            low, high = watermarks(consumer, topic, position.partition, timeout_s)
            start = position.offset if position.offset >= 0 else low
            lag += max(0, high - start)
        return lag
    finally:
        consumer.close()


def commit_group_offsets(settings: CommonSettings, group_id: str, offsets: dict[int, int], topic: str) -> None:
    """Set ``group_id``'s committed position on ``topic`` (e.g. to start a new consumer at "now")."""
    consumer = Consumer(consumer_config(settings, group_id, from_beginning=True))
    try:
        consumer.commit(
            offsets=[TopicPartition(topic, partition, offset) for partition, offset in offsets.items()],
            asynchronous=False,
        )
    finally:
        consumer.close()
