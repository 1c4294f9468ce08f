"""How far the joiner has read its source topics: when a label window may close.

A window closes on the joiner's clock (``expire``), but after a restart or during a catch-up
the joiner reads minutes-old impressions and clicks, and every such window is already past its
end. Labeled at the next tick, an impression would miss the clicks still unread behind it in the
clicks topic, and a held click would miss its impression unread in the impressions topic. So the
joiner labels partition ``p`` only "as of" a time it has caught up to:

    ``caught_up_at(p)`` = the latest tick ``t`` such that the joiner has read partition ``p`` of
    both source topics up to their end offsets sampled at ``t``.

Everything produced before ``t`` has been joined, so labeling with ``now = t`` sees every click
that was in Kafka when the window (plus grace) closed. In steady state ``t`` is the last tick; in
a catch-up it trails until the backlog is read. The read position of a partition is the larger of
the next offset after the last record this process handled and the group's committed offset
(records before it were handled by some incarnation, and their state is in the changelog: Faust
flushes its producer before it commits).

:class:`ReadProgress` is the bookkeeping (pure); :class:`KafkaOffsets` reads committed and end
offsets with confluent-kafka (blocking, so the joiner calls it in a thread).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

TopicPartition = tuple[str, int]
# (committed offset, or the log start without one; end offset) of one source partition
Offsets = Mapping[TopicPartition, tuple[int, int]]

# Unmet samples kept per partition while the joiner lags (one per tick); past it the oldest go,
# which only delays labeling, never makes it early.
MAX_SAMPLES = 10_000


@dataclass
class ReadProgress:
    """Read positions of the source partitions and the end offsets sampled at each tick."""

    topics: tuple[str, ...]
    _handled: dict[TopicPartition, int] = field(default_factory=dict)
    _committed: dict[TopicPartition, int] = field(default_factory=dict)
    _samples: dict[int, deque[tuple[datetime, dict[str, int]]]] = field(default_factory=dict)
    _caught_up: dict[int, datetime] = field(default_factory=dict)

    def handled(self, topic: str, partition: int, offset: int) -> None:
        """The joiner has handled the record at ``offset`` (and its state is in the table)."""
        key = (topic, partition)
        self._handled[key] = max(self._handled.get(key, 0), offset + 1)

    def observe(self, at: datetime, offsets: Offsets) -> None:
        """End and committed offsets read at ``at`` (read after ``at``: their ends are at least those of ``at``)."""
        ends: dict[int, dict[str, int]] = {}
        for (topic, partition), (committed, end) in offsets.items():
            self._committed[(topic, partition)] = committed
            ends.setdefault(partition, {})[topic] = end
        for partition, by_topic in ends.items():
            if set(by_topic) == set(self.topics):
                samples = self._samples.setdefault(partition, deque(maxlen=MAX_SAMPLES))
                samples.append((at, by_topic))

    def caught_up_at(self, partition: int) -> datetime | None:
        """The latest sampled time up to which both topics' partition ``partition`` have been read."""
        samples = self._samples.get(partition)
        while samples and all(self.position(topic, partition) >= end for topic, end in samples[0][1].items()):
            self._caught_up[partition] = samples.popleft()[0]
        return self._caught_up.get(partition)

    def forget(self, partitions: set[TopicPartition]) -> None:
        """These source partitions were revoked: what was read of them here no longer holds."""
        for key in partitions:
            self._handled.pop(key, None)
            self._committed.pop(key, None)
        for partition in {partition for _, partition in partitions}:
            self._samples.pop(partition, None)
            self._caught_up.pop(partition, None)

    def position(self, topic: str, partition: int) -> int:
        key = (topic, partition)
        return max(self._handled.get(key, 0), self._committed.get(key, 0))


class KafkaOffsets:
    """The joiner group's committed offsets and the end offsets of its source partitions.

    A confluent-kafka consumer in the joiner's group id that never subscribes (so it never joins
    the group): ``committed`` and ``get_watermark_offsets`` only. Blocking; created on first use.
    """

    def __init__(self, client_config: Mapping[str, Any], group_id: str, timeout_s: float = 5.0) -> None:
        self.config = {**client_config, "group.id": group_id, "enable.auto.commit": False}
        self.timeout_s = timeout_s
        self._consumer: Any = None

    def read(self, partitions: list[TopicPartition]) -> dict[TopicPartition, tuple[int, int]]:
        from confluent_kafka import Consumer, KafkaException
        from confluent_kafka import TopicPartition as KafkaTopicPartition

        from streamrec.kafka.consume import watermarks

        if self._consumer is None:
            self._consumer = Consumer(self.config)
        consumer = self._consumer
        committed = consumer.committed([KafkaTopicPartition(t, p) for t, p in partitions], timeout=self.timeout_s)
        offsets: dict[TopicPartition, tuple[int, int]] = {}
        for position in committed:
            if position.error is not None:
                raise KafkaException(position.error)
            low, high = watermarks(consumer, position.topic, position.partition, self.timeout_s)
            offsets[(position.topic, position.partition)] = (position.offset if position.offset >= 0 else low, high)
        return offsets

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
