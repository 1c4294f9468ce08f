"""Free TCP ports on loopback, for stacks that must not collide with one already running."""

from __future__ import annotations

import socket
from pathlib import Path

from streamrec.core.settings import KafkaSettings, PathSettings, RedisSettings
from streamrec.ops.settings import StackSettings, StackTuning


def free_ports(count: int) -> list[int]:
    """Ports the OS says are free now (all bound at once, so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port_block(count: int, *, low: int = 20_000, high: int = 60_000, attempts: int = 200) -> int:
    """The first of ``count`` consecutive ports that are all free now (for services numbered from a
    base port, such as the nodes of a Kafka or Redis cluster)."""
    import random

    for _ in range(attempts):
        base = random.randrange(low, high - count)  # noqa: S311 -- a port, not a secret
        sockets: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return base
    raise OSError(f"no {count} consecutive free ports between {low} and {high}")


def stack_settings_on_free_ports(state_dir: Path) -> StackSettings:
    """A local stack (Kafka, Redis, supervisord) on free ports with its state in ``state_dir``:
    tests and benchmarks start their own beside any stack a user already runs."""
    kafka_port, controller_port, redis_port, supervisor_port = free_ports(4)
    return StackSettings(
        kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{kafka_port}"),
        redis=RedisSettings(port=redis_port),
        paths=PathSettings(state_dir=state_dir),
        stack=StackTuning(
            kafka_port=kafka_port, kafka_controller_port=controller_port, supervisor_port=supervisor_port
        ),
    )
