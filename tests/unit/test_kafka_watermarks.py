"""Reading a partition's offsets while its leadership moves: asked again, never a crash; any
other Kafka error still surfaces at once (the consumer is a fake at its client boundary)."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from streamrec.kafka.consume import watermarks

pytestmark = pytest.mark.unit


class FlakyConsumer:
    """Raises the given errors in turn, then answers (3, 17)."""

    def __init__(self, *codes: int) -> None:
        self.codes = list(codes)
        self.calls = 0

    def get_watermark_offsets(self, partition: Any, timeout: float) -> tuple[int, int]:
        self.calls += 1
        if self.codes:
            raise KafkaException(KafkaError(self.codes.pop(0)))
        return 3, 17


def test_a_partition_changing_leader_is_asked_again_until_it_answers() -> None:
    consumer = FlakyConsumer(KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE)
    assert watermarks(consumer, "t", 0, timeout_s=5.0) == (3, 17)  # type: ignore[arg-type]
    assert consumer.calls == 3


def test_another_error_is_raised_at_once() -> None:
    consumer = FlakyConsumer(KafkaError._AUTHENTICATION)
    with pytest.raises(KafkaException):
        watermarks(consumer, "t", 0, timeout_s=5.0)  # type: ignore[arg-type]
    assert consumer.calls == 1


def test_a_leader_that_never_comes_raises_after_the_timeout() -> None:
    consumer = FlakyConsumer(*[KafkaError.NOT_LEADER_FOR_PARTITION] * 100)
    with pytest.raises(KafkaException):
        watermarks(consumer, "t", 0, timeout_s=0.5)  # type: ignore[arg-type]
    assert 1 < consumer.calls < 100
