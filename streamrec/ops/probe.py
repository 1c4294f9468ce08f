"""``streamrec stack probe``: the stack's view from outside its processes, for Prometheus.

At every scrape it asks Kafka for each consumer group's committed offsets and each topic's end
offsets, and Redis for a PING:

* ``streamrec_consumer_group_lag{group,topic}``: records of ``topic`` the group has not committed
  (a group that never committed counts from the earliest offset), for the feature worker, the
  joiner and the online trainer (the evaluator reads without a group and exports its own);
* ``streamrec_probe_up{service}``: 1 when Kafka / Redis answered within the timeout, else 0.

A custom collector rather than counters updated in a loop: the figures are fresh at each scrape and
cost nothing between scrapes. One admin client and one consumer (never subscribed, never
committing) are kept open; on a secure stack they connect as the identity the stack gives the
probe (its admin).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from streamrec.core.settings import CommonSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WatchedGroup:
    """A consumer group and the topics it reads."""

    group: str
    topics: tuple[str, ...]


def watched_groups() -> list[WatchedGroup]:
    """The stack's consumer groups, named as their processes' settings name them."""
    from online_trainer.settings import TrainerSettings
    from streamrec.core.settings import load
    from streams.joiner_settings import JoinerSettings
    from streams.settings import StreamsSettings

    streams, joiner, trainer = load(StreamsSettings), load(JoinerSettings), load(TrainerSettings)
    return [
        WatchedGroup(streams.streams.app_id, (streams.topics.interactions, streams.by_item_topic)),
        WatchedGroup(joiner.joiner.app_id, (joiner.topics.impressions, joiner.topics.clicks)),
        WatchedGroup(trainer.trainer.group_id, (trainer.topics.interactions,)),
    ]


class StackProbe(Collector):
    """Consumer-group lag and reachability of Kafka and Redis, computed at scrape time."""

    def __init__(self, settings: CommonSettings, groups: Iterable[WatchedGroup], timeout_s: float = 3.0) -> None:
        self.settings = settings
        self.groups = list(groups)
        self.timeout_s = timeout_s
        config = settings.kafka.client_config()
        self._admin = AdminClient(config)
        self._consumer = Consumer(
            {**config, "group.id": "streamrec-probe", "enable.auto.commit": False, "socket.timeout.ms": 5000}
        )
        self._lock = threading.Lock()  # one scrape at a time shares the clients

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            up = GaugeMetricFamily(
                "streamrec_probe_up", "The service answered the probe (1) or not (0).", labels=["service"]
            )
            lag = GaugeMetricFamily(
                "streamrec_consumer_group_lag",
                "Records not committed by the group, per topic.",
                labels=["group", "topic"],
            )
            try:
                for watched in self.groups:
                    for topic, records in self._lag(watched).items():
                        lag.add_metric([watched.group, topic], records)
                up.add_metric(["kafka"], 1.0)
            except (KafkaException, RuntimeError) as exc:
                log.warning("Kafka did not answer the probe: %s", exc)
                up.add_metric(["kafka"], 0.0)
            up.add_metric(["redis"], 1.0 if self._redis_answers() else 0.0)
            yield up
            yield lag

    def _lag(self, watched: WatchedGroup) -> dict[str, int]:
        future = self._admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(watched.group)], request_timeout=self.timeout_s
        )[watched.group]
        committed = {
            (tp.topic, tp.partition): tp.offset for tp in future.result(timeout=self.timeout_s).topic_partitions
        }
        metadata = self._consumer.list_topics(timeout=self.timeout_s)
        lag: dict[str, int] = {}
        for topic in watched.topics:
            described = metadata.topics.get(topic)
            if described is None or described.error is not None:
                continue  # not created yet: nothing to lag behind
            total = 0
            for partition in described.partitions:
                low, high = self._consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=self.timeout_s
                )
                start = committed.get((topic, partition), -1)
                total += max(0, high - (start if start >= 0 else low))
            lag[topic] = total
        return lag

    def _redis_answers(self) -> bool:
        import redis
        from redis.cluster import RedisCluster

        redis_settings = self.settings.redis
        options = {
            **redis_settings.client_options(),
            "socket_timeout": self.timeout_s,
            "socket_connect_timeout": self.timeout_s,
        }
        try:
            if redis_settings.cluster:
                with RedisCluster(host=redis_settings.host, port=redis_settings.port, **options) as cluster:
                    return bool(cluster.ping())
            with redis.Redis(host=redis_settings.host, port=redis_settings.port, **options) as client:
                return bool(client.ping())
        except (redis.RedisError, OSError) as exc:
            log.warning("Redis did not answer the probe: %s", exc)
            return False

    def close(self) -> None:
        self._consumer.close()
