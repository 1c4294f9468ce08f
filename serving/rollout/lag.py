"""``streamrec_consumer_group_lag{group,topic}`` for the evaluator's own reader.

The evaluator reads by assignment, outside any consumer group (``checkpoint.py`` says why), so no
committed offsets exist for a lag probe to read: it exports its lag itself, as the records
between its positions (the next offset it reads, per partition) and the partitions' high
watermarks, summed over the topic. The high watermark is the consumer's cached one, which every
fetch response updates, so an update costs no broker round trip; a partition with nothing cached
yet, or not read yet (its lag then counts from its low watermark, where reading starts), is asked
of the broker. The process updates the gauge every ``evaluator.lag_interval_s``, not per record.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from prometheus_client import Gauge

log = logging.getLogger(__name__)

CONSUMER_GROUP_LAG = Gauge(
    "streamrec_consumer_group_lag", "Records between a reader's positions and the end of the topic", ["group", "topic"]
)


class WatermarkSource(Protocol):
    """The part of ``confluent_kafka.Consumer`` read here."""

    def get_watermark_offsets(self, partition: Any, timeout: float = ..., cached: bool = ...) -> Any: ...


def reader_lag(
    consumer: WatermarkSource,
    topic: str,
    partitions: Iterable[int],
    positions: Mapping[int, int],
    *,
    timeout_s: float = 2.0,
) -> int | None:
    """Records of ``topic`` beyond ``positions``; None when the broker did not answer in time."""
    from confluent_kafka import KafkaException, TopicPartition

    total = 0
    for partition in partitions:
        topic_partition = TopicPartition(topic, partition)
        position = positions.get(partition)
        try:
            watermarks = consumer.get_watermark_offsets(topic_partition, cached=True)
            if watermarks is None or watermarks[1] < 0 or position is None:
                watermarks = consumer.get_watermark_offsets(topic_partition, timeout=timeout_s)
        except KafkaException as error:
            log.warning("no watermarks for %s/%s: %s", topic, partition, error)
            return None
        if watermarks is None:
            return None
        low, high = watermarks
        total += max(high - (low if position is None else position), 0)
    return total


def update_lag(
    consumer: WatermarkSource, group: str, topic: str, partitions: Iterable[int], positions: Mapping[int, int]
) -> int | None:
    """Set the gauge for ``group`` on ``topic`` (left as it was when the broker did not answer)."""
    lag = reader_lag(consumer, topic, partitions, positions)
    if lag is not None:
        CONSUMER_GROUP_LAG.labels(group, topic).set(lag)
    return lag
