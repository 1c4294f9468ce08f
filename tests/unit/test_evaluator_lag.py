"""The evaluator's own lag (``serving/rollout/lag.py``) against a consumer faked at its watermark calls."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from prometheus_client import REGISTRY

from serving.rollout.lag import reader_lag, update_lag

TOPIC = "labeled"
INVALID = -1001  # librdkafka's "no offset known", what a partition with nothing fetched has cached


@dataclass
class Watermarks:
    """``cached``: what the consumer's fetches saw; ``broker``: what a query returns (None: timeout)."""

    cached: dict[int, tuple[int, int]]
    broker: dict[int, tuple[int, int] | None]
    fail: bool = False
    queries: list[int] = field(default_factory=list)

    def get_watermark_offsets(self, partition: Any, timeout: float | None = None, cached: bool = False) -> Any:
        assert partition.topic == TOPIC
        if cached:
            return self.cached.get(partition.partition, (INVALID, INVALID))
        self.queries.append(partition.partition)
        if self.fail:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT))
        return self.broker[partition.partition]


def test_lag_is_the_records_beyond_the_positions_summed_over_partitions() -> None:
    # 0: read up to 40 of 100 (cached); 1: nothing fetched yet but read to 5 (asked: end 9);
    # 2: never read, starts at its low watermark 20 of 50 (asked)
    consumer = Watermarks(cached={0: (INVALID, 100)}, broker={1: (0, 9), 2: (20, 50)})
    assert reader_lag(consumer, TOPIC, [0, 1, 2], {0: 40, 1: 5}) == 60 + 4 + 30
    assert consumer.queries == [1, 2]  # the cached partition costs no broker round trip


def test_a_reader_at_the_end_has_no_lag() -> None:
    consumer = Watermarks(cached={0: (0, 7), 1: (0, 3)}, broker={})
    assert reader_lag(consumer, TOPIC, [0, 1], {0: 7, 1: 3}) == 0
    assert consumer.queries == []


def test_the_gauge_is_left_as_it_was_when_the_broker_does_not_answer() -> None:
    group = "evaluator-lag-test"
    assert update_lag(Watermarks(cached={0: (0, 12)}, broker={}), group, TOPIC, [0], {0: 2}) == 10
    sample = {"group": group, "topic": TOPIC}
    assert REGISTRY.get_sample_value("streamrec_consumer_group_lag", sample) == 10
    assert update_lag(Watermarks(cached={}, broker={0: None}), group, TOPIC, [0], {0: 2}) is None
    assert update_lag(Watermarks(cached={}, broker={}, fail=True), group, TOPIC, [0], {0: 2}) is None
    assert REGISTRY.get_sample_value("streamrec_consumer_group_lag", sample) == 10
