"""The recent labeled examples the off-policy gate judges candidates on (``ope_gate``), and the
ranking model's training rows (``ranker_line``, through ``on_example``).

A consumer of ``topics.labeled`` in no consumer group: at start it seeks every partition to the
first record of the last ``lookback_s`` (Kafka's offsets for times) and keeps the newest
``max_examples`` examples that carry a propensity. Nothing is committed: after a restart it
reads the same window again, so the gate has its evidence back without a state of its own.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, TopicPartition

from streamrec.core.errors import EventValidationError
from streamrec.core.events import LabeledExample, decode_event
from streamrec.core.settings import CommonSettings

log = logging.getLogger(__name__)


class LoggedExamples:
    """The newest labeled examples with propensities (``examples()``), read by ``poll()``."""

    def __init__(
        self,
        settings: CommonSettings,
        *,
        group_id: str,
        lookback_s: float,
        max_examples: int,
        on_example: Callable[[LabeledExample], None] | None = None,
    ) -> None:
        """``on_example``: also told every example read (the ranking model's training rows)."""
        self._settings = settings
        self._on_example = on_example
        self._group_id = group_id
        self._lookback_s = lookback_s
        self._kept: deque[LabeledExample] = deque(maxlen=max_examples)
        self._consumer: Consumer | None = None
        self.invalid = 0

    def start(self) -> None:
        """Seek each partition of the labeled topic to the start of the look-back window."""
        topic = self._settings.topics.labeled
        config: dict[str, Any] = {
            **self._settings.kafka.client_config(),
            "group.id": self._group_id,  # required by the client; never joined (assign, no commits)
            "enable.auto.commit": False,
            "enable.partition.eof": False,
            "auto.offset.reset": "latest",
        }
        consumer = Consumer(config)
        metadata = consumer.list_topics(topic, timeout=30)
        partitions = metadata.topics[topic].partitions if topic in metadata.topics else {}
        since_ms = int((time.time() - self._lookback_s) * 1000)
        wanted = [TopicPartition(topic, partition, since_ms) for partition in sorted(partitions)]
        found = consumer.offsets_for_times(wanted, timeout=30) if wanted else []
        # a partition with nothing newer gets offset -1 (its end): read what comes from now on
        consumer.assign([TopicPartition(topic, tp.partition, tp.offset if tp.offset >= 0 else -1) for tp in found])
        self._consumer = consumer
        log.info("off-policy gate reads %s from %.0f s ago (%d partitions)", topic, self._lookback_s, len(found))

    def poll(self, timeout_s: float = 0.0, max_records: int = 1_000) -> int:
        """Read what is there; returns the number of records read."""
        if self._consumer is None:
            return 0
        messages = self._consumer.consume(num_messages=max_records, timeout=timeout_s)
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    log.warning("off-policy gate's reader: %s", error)
                continue
            try:
                example = decode_event(message.value(), LabeledExample)
            except EventValidationError:
                self.invalid += 1  # the joiner's own output; the evaluator dead-letters and counts it
                continue
            if example.propensity is not None:
                self._kept.append(example)
            if self._on_example is not None:
                self._on_example(example)
        return len(messages)

    def add(self, example: LabeledExample) -> None:
        """Take ``example`` as if read (tests, and a trainer that reads the labeled topic itself)."""
        if example.propensity is not None:
            self._kept.append(example)
        if self._on_example is not None:
            self._on_example(example)

    def examples(self) -> list[LabeledExample]:
        return list(self._kept)

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
