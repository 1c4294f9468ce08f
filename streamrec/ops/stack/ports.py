"""Free TCP ports on loopback, for stacks that must not collide with one already running."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

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


def _ephemeral_low(default: int = 32_768) -> int:
    """The first port of the kernel's ephemeral range (``net.ipv4.ip_local_port_range``)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def free_port_block(count: int, *, low: int = 10_000, high: int | None = None, attempts: int = 200) -> int:
    """The first of ``count`` consecutive ports that are all free now (for services numbered from a
    base port, such as the nodes of a Kafka or Redis cluster).

    The block lies below the kernel's ephemeral range unless ``high`` says otherwise: a port in
    that range can be taken by any outgoing connection between this check and the service's bind
    (a broker of a test cluster once failed with "Address already in use" that way).
    """
    import random

    high = high if high is not None else _ephemeral_low()
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


def stack_settings_on_free_ports(state_dir: Path, *, brokers: int = 1, **tuning: Any) -> StackSettings:
    """A local stack (Kafka, Redis, supervisord) on free ports with its state in ``state_dir``:
    tests and benchmarks start their own beside any stack a user already runs. ``brokers`` Kafka
    nodes take one block of consecutive ports (clients first, then controllers), the processes'
    metrics ports another; ``tuning`` sets other ``StackTuning`` fields."""
    if brokers == 1:
        kafka_port, controller_port, redis_port, supervisor_port = free_ports(4)
    else:
        kafka_port = free_port_block(2 * brokers)
        controller_port = kafka_port + brokers
        block = range(kafka_port, kafka_port + 2 * brokers)
        redis_port, supervisor_port = next(
            ports for ports in iter(lambda: free_ports(2), None) if not set(ports) & set(block)
        )
    metrics_port_base = free_port_block(8)  # below the ephemeral range, where free_ports' are
    (prometheus_port,) = free_ports(1)
    stack = StackTuning(
        **{
            "brokers": brokers,
            "kafka_port": kafka_port,
            "kafka_controller_port": controller_port,
            "supervisor_port": supervisor_port,
            "metrics_port_base": metrics_port_base,
            "prometheus_port": prometheus_port,
            **tuning,
        }
    )
    bootstrap = ",".join(f"{stack.kafka_host}:{kafka_port + n}" for n in range(brokers))
    return StackSettings(
        kafka=KafkaSettings(bootstrap_servers=bootstrap),
        redis=RedisSettings(port=redis_port),
        paths=PathSettings(state_dir=state_dir),
        stack=stack,
    )
