"""Kafka as a three-node KRaft cluster in the local stack (``stack up --brokers 3``): topics replicated
three times with ``min.insync.replicas`` 2, and a SIGKILLed partition leader that loses no
acknowledged record and rejoins the in-sync replicas when it is started again."""

from __future__ import annotations

import time
import uuid

import pytest
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource

from streamrec.core.errors import StackError
from streamrec.core.settings import CommonSettings, TopicSettings
from streamrec.kafka.admin import ensure_topics
from streamrec.ops.replay import producer_config
from streamrec.ops.settings import ReplaySettings, StackSettings, StackTuning
from streamrec.ops.stack.local_stack import LocalStack
from tests.support.cluster import cluster_settings

RECORDS_PER_PHASE = 200


def partition_replicas(settings: CommonSettings, topic: str) -> dict[int, tuple[list[int], list[int]]]:
    """Replicas and in-sync replicas of each partition of ``topic``."""
    metadata = AdminClient(settings.kafka.client_config()).list_topics(topic, timeout=10)
    if metadata.topics[topic].error is not None:  # not yet in this node's metadata
        return {}
    return {
        number: (sorted(partition.replicas), sorted(partition.isrs))
        for number, partition in metadata.topics[topic].partitions.items()
    }


def test_the_cluster_layout_follows_the_node_count() -> None:
    def layout(brokers: int, **topics: int) -> tuple[int, int]:
        settings = StackSettings(
            stack=StackTuning(brokers=brokers), **({"topics": TopicSettings(**topics)} if topics else {})
        )
        chosen = LocalStack(settings).topic_settings()
        return chosen.replication_factor, chosen.min_insync_replicas

    assert layout(1) == (1, 1)
    assert layout(2) == (2, 1)
    assert layout(3) == (3, 2)
    assert layout(5) == (3, 2)
    assert layout(3, replication_factor=2) == (2, 1)  # explicit settings win
    assert layout(3, replication_factor=3, min_insync_replicas=3) == (3, 3)


def test_topics_need_as_many_live_brokers_as_replicas(fresh_settings: CommonSettings) -> None:
    replicated = fresh_settings.model_copy(
        update={"topics": TopicSettings.prefixed(f"rf{uuid.uuid4().hex[:8]}", replication_factor=3)}
    )
    with pytest.raises(StackError, match=r"replication factor 3: 1 broker\(s\) are live .*--brokers 3"):
        ensure_topics(replicated, broker_wait_s=1.0)


def test_every_node_registers_and_topics_replicate_three_times(cluster: LocalStack) -> None:
    assert cluster.health() == {"kafka-1": True, "kafka-2": True, "kafka-3": True, "redis": True}
    settings = cluster_settings(cluster)
    admin = AdminClient(settings.kafka.client_config())
    assert set(admin.list_topics(timeout=10).brokers) == {1, 2, 3}
    assert len(settings.kafka.bootstrap_servers.split(",")) == 3

    # a new topic reaches every node's metadata, and its followers the ISR, within moments
    expected = {number: ([1, 2, 3], [1, 2, 3]) for number in range(settings.topics.partitions)}
    for topic in settings.topics.all_names():
        deadline = time.monotonic() + 30
        while (layout := partition_replicas(settings, topic)) != expected:
            assert time.monotonic() < deadline, f"{topic}: {layout}"
            time.sleep(0.5)
    resource = ConfigResource(ConfigResource.Type.TOPIC, settings.topics.interactions)
    config = admin.describe_configs([resource])[resource].result(timeout=10)
    assert config["min.insync.replicas"].value == "2"
    assert config["retention.ms"].value == str(settings.topics.retention_ms)
    # Kafka's own topics (consumer offsets, transaction state) and topics without their own config
    broker = ConfigResource(ConfigResource.Type.BROKER, "2")
    defaults = admin.describe_configs([broker])[broker].result(timeout=10)
    assert {
        name: defaults[name].value
        for name in ("min.insync.replicas", "offsets.topic.replication.factor", "transaction.state.log.min.isr")
    } == {"min.insync.replicas": "2", "offsets.topic.replication.factor": "3", "transaction.state.log.min.isr": "2"}

    environment = cluster.client_environment()
    assert environment["STREAMREC_KAFKA__BOOTSTRAP_SERVERS"] == cluster.bootstrap_servers()
    assert environment["STREAMREC_TOPICS__REPLICATION_FACTOR"] == "3"
    assert environment["STREAMREC_TOPICS__MIN_INSYNC_REPLICAS"] == "2"
    # `streamrec stack status` and friends find the three nodes without --brokers
    one_node = cluster.settings.model_copy(
        update={"stack": StackTuning(**{**cluster.settings.stack.model_dump(), "brokers": 1})}
    )
    assert LocalStack(one_node).kafka_programs() == ["kafka"]
    assert LocalStack.attach(one_node).kafka_programs() == ["kafka-1", "kafka-2", "kafka-3"]


def produce(
    producer: Producer, topic: str, values: range, partitions: int, acknowledged: list[tuple[int, int]]
) -> None:
    """Send each value to partition ``value % partitions``; delivery reports land in ``acknowledged``."""
    failures: list[str] = []

    def on_delivery(error: KafkaError | None, message: Message) -> None:
        if error is not None:
            failures.append(str(error))
        else:
            acknowledged.append((int(message.partition() or 0), int(message.value() or b"-1")))

    for value in values:
        producer.produce(topic, value=str(value).encode(), partition=value % partitions, on_delivery=on_delivery)
    assert producer.flush(90) == 0, "records still unacknowledged after 90 s"
    assert failures == []


def read_back(settings: CommonSettings, topic: str, group_id: str) -> dict[int, list[int]]:
    """Every record of ``topic`` by partition, read up to the high watermarks; the group's position is
    committed (to the replicated offsets topic) at the end."""
    consumer = Consumer({**settings.kafka.client_config(), "group.id": group_id, "enable.auto.commit": False})
    try:
        ends = {
            number: consumer.get_watermark_offsets(TopicPartition(topic, number), timeout=10)[1]
            for number in range(settings.topics.partitions)
        }
        consumer.assign([TopicPartition(topic, number, 0) for number in ends])
        values: dict[int, list[int]] = {number: [] for number in ends}
        deadline = time.monotonic() + 60
        while sum(map(len, values.values())) < sum(ends.values()):
            assert time.monotonic() < deadline, f"read {values} of {ends}"
            for message in consumer.consume(num_messages=500, timeout=0.5):
                assert message.error() is None, message.error()
                values[int(message.partition() or 0)].append(int(message.value() or b"-1"))
        consumer.commit(asynchronous=False)
        return values
    finally:
        consumer.close()


def test_a_killed_partition_leader_loses_no_acknowledged_record_and_rejoins(cluster: LocalStack) -> None:
    settings = cluster_settings(cluster)
    topic, partitions = settings.topics.interactions, settings.topics.partitions
    replay_settings = ReplaySettings(**{name: getattr(settings, name) for name in CommonSettings.model_fields})
    producer = Producer({**producer_config(replay_settings), "delivery.report.only.error": False})
    acknowledged: list[tuple[int, int]] = []
    produce(producer, topic, range(RECORDS_PER_PHASE), partitions, acknowledged)

    leader = cluster.partition_leader_program(topic, 0)
    cluster.kill(leader)
    time.sleep(1)
    assert {info["name"]: info["statename"] for info in cluster.status()}[leader] == "EXITED"  # not restarted
    produce(producer, topic, range(RECORDS_PER_PHASE, 2 * RECORDS_PER_PHASE), partitions, acknowledged)
    assert cluster.partition_leader_program(topic, 0) != leader

    # every acknowledged record once, in order, while a node is down (offsets commit too)
    values = read_back(settings, topic, f"cluster-{uuid.uuid4().hex}")
    assert len(acknowledged) == 2 * RECORDS_PER_PHASE
    assert values == {number: list(range(number, 2 * RECORDS_PER_PHASE, partitions)) for number in range(partitions)}

    cluster.start(leader, timeout_s=60)
    killed_id = int(leader.rpartition("-")[2])
    deadline = time.monotonic() + 30
    while not all(killed_id in isrs for _, isrs in partition_replicas(settings, topic).values()):
        assert time.monotonic() < deadline, f"{leader} not back in sync: {partition_replicas(settings, topic)}"
        time.sleep(0.5)
    produce(producer, topic, range(2 * RECORDS_PER_PHASE, 2 * RECORDS_PER_PHASE + partitions), partitions, acknowledged)
