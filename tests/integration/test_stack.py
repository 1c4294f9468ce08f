"""The local stack itself: real Kafka and Redis under supervisord."""

from __future__ import annotations

import os
import signal
import time

import redis
from confluent_kafka.admin import AdminClient

from streamrec.core.settings import CommonSettings
from streamrec.kafka.admin import ensure_topics
from streamrec.ops.settings import StackSettings
from streamrec.ops.stack.local_stack import LocalStack


def test_services_are_running_and_answer(local_stack: LocalStack, stack_settings: StackSettings) -> None:
    states = {info["name"]: info["statename"] for info in local_stack.status()}
    assert (states.pop("kafka"), states.pop("redis")) == ("RUNNING", "RUNNING")
    assert set(states.values()) == {"STOPPED"}  # project processes start on request
    assert local_stack.health() == {"kafka": True, "redis": True}
    client = redis.Redis(host=stack_settings.redis.host, port=stack_settings.redis.port)
    client.set("streamrec:test", "1")
    assert client.get("streamrec:test") == b"1"
    # from the start: the session's other tests keep the broker logging, past any fixed tail
    assert "Kafka Server started" in local_stack.logs("kafka", 400_000, from_start=True)


def test_topics_get_partitions_and_retention_from_settings(fresh_settings: CommonSettings) -> None:
    admin = AdminClient(fresh_settings.kafka.client_config())
    metadata = admin.list_topics(timeout=10)
    for name in fresh_settings.topics.all_names():
        assert len(metadata.topics[name].partitions) == fresh_settings.topics.partitions
    from confluent_kafka.admin import ConfigResource

    resource = ConfigResource(ConfigResource.Type.TOPIC, fresh_settings.topics.interactions)
    config = admin.describe_configs([resource])[resource].result(timeout=10)
    assert config["retention.ms"].value == str(fresh_settings.topics.retention_ms)
    assert ensure_topics(fresh_settings) == []  # idempotent


def test_a_second_stack_starts_restarts_and_stops_cleanly(
    tmp_path_factory: object, stack_settings: StackSettings
) -> None:
    from streamrec.ops.stack.ports import free_ports

    kafka_port, controller_port, redis_port = free_ports(3)
    settings = StackSettings(
        redis={"port": redis_port},
        paths={"state_dir": tmp_path_factory.mktemp("second")},  # type: ignore[attr-defined]
        stack={"kafka_port": kafka_port, "kafka_controller_port": controller_port},
    )
    stack = LocalStack(settings)
    stack.up()
    written = redis.Redis(host=settings.redis.host, port=redis_port)
    written.set("streamrec:kept", "1")
    time.sleep(1.5)  # appendfsync everysec: on disk within a second
    redis_pid = next(info["pid"] for info in stack.status() if info["name"] == "redis")
    os.kill(redis_pid, signal.SIGKILL)
    deadline = time.monotonic() + 30  # supervisord restarts it; it replays its append-only file
    while not any(
        info["name"] == "redis" and info["statename"] == "RUNNING" and info["pid"] not in (0, redis_pid)
        for info in stack.status()
    ):
        assert time.monotonic() < deadline, f"redis not restarted: {stack.status()}"
        time.sleep(0.2)
    stack.wait_healthy(30, ["redis"])
    assert redis.Redis(host=settings.redis.host, port=redis_port).get("streamrec:kept") == b"1"
    stack.down()
    stack.up()  # a restart on the same state folder keeps the formatted storage and Redis' data
    assert redis.Redis(host=settings.redis.host, port=redis_port).get("streamrec:kept") == b"1"
    pids = [info["pid"] for info in stack.status() if info["pid"]]
    assert len(pids) == 2
    stack.down()
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"process {pid} still alive after stack down")
    log = (settings.paths.state_dir / "logs" / "kafka.log").read_text()
    assert "[BrokerServer id=1] shut down completed" in log
    assert not stack.is_running()
