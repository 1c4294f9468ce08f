"""Redis in the local stack: Debian's ``redis-server`` with its data kept on disk, as one server or,
with ``redis.cluster``, as a Redis Cluster of ``stack.redis_cluster_nodes`` masters.

Persistence: every server keeps an append-only file in its own folder (``<state_dir>/redis``, or
``<state_dir>/redis-<n>`` for cluster node n), fsynced as ``stack.redis_appendfsync`` says (every
second by default, so a crash loses at most the last second of writes, which the feature worker
pushes again from Kafka); no RDB snapshots.

Cluster: node n (from 1) is the program ``redis-<n>``; it serves clients on ``redis.port + n - 1``
and talks to the other nodes on ``stack.redis_cluster_bus_port + n - 1`` (set explicitly: Redis'
default, port + 10000, passes 65535 for high ports). Each node keeps its view of the cluster in
``nodes.conf`` beside its append-only file, so a restarted node rejoins by itself. The first start
forms the cluster (:func:`finish_start`): the 16384 hash slots in equal contiguous ranges, one per
master, then the nodes meet. No replicas: a master that is down takes its slots offline until it is
back, and ``cluster-require-full-coverage no`` keeps the others serving theirs meanwhile.
See docs/design/features.md#redis-cluster.

:func:`redis_programs` are the supervised processes, :func:`redis_healthy` / :func:`node_healthy`
their readiness probes and :func:`finish_start` what runs once they are up.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import redis

from streamrec.core.errors import StackError
from streamrec.ops.stack.programs import Program

if TYPE_CHECKING:
    from streamrec.ops.settings import StackSettings

HASH_SLOTS = 16384
CLUSTER_FORM_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ClusterNode:
    """One master of the stack's Redis Cluster and the hash slots it serves (``first_slot``..``last_slot``)."""

    name: str
    port: int
    bus_port: int
    first_slot: int
    last_slot: int


def cluster_nodes(settings: StackSettings) -> list[ClusterNode]:
    """The cluster's nodes, in order; the slots split in equal contiguous ranges."""
    count = settings.stack.redis_cluster_nodes
    bounds = [HASH_SLOTS * n // count for n in range(count + 1)]
    return [
        ClusterNode(
            f"redis-{n + 1}",
            settings.redis.port + n,
            settings.stack.redis_cluster_bus_port + n,
            bounds[n],
            bounds[n + 1] - 1,
        )
        for n in range(count)
    ]


def redis_healthy(redis_settings: Any) -> bool:
    try:
        client = redis.Redis(host=redis_settings.host, port=redis_settings.port, socket_timeout=1)
        return bool(client.ping())
    except redis.RedisError:
        return False


def node_healthy(host: str, port: int) -> bool:
    """The node answers, and once it holds slots, it sees the cluster whole (``cluster_state:ok``):
    a fresh node is ready to be joined, a restarted one only after it has rejoined."""
    try:
        with redis.Redis(host=host, port=port, socket_timeout=1) as client:
            info = _cluster_info(client)
    except redis.RedisError:
        return False
    return int(info["cluster_slots_assigned"]) == 0 or info["cluster_state"] == "ok"


def redis_command(settings: StackSettings, port: int, data_dir_name: str = "redis") -> list[str]:
    """One ``redis-server`` with its append-only file under ``<state_dir>/<data_dir_name>``."""
    data_dir = settings.paths.state_dir / data_dir_name
    data_dir.mkdir(parents=True, exist_ok=True)
    return [
        settings.stack.redis_server_bin,
        "--port",
        str(port),
        "--bind",
        settings.redis.host,
        "--dir",
        str(data_dir),
        "--save",
        "",
        "--appendonly",
        "yes",
        "--appendfsync",
        settings.stack.redis_appendfsync,
        "--protected-mode",
        "no",
    ]


def cluster_node_command(settings: StackSettings, node: ClusterNode) -> list[str]:
    """``redis_command`` for one cluster master, its ``nodes.conf`` beside its append-only file."""
    return [
        *redis_command(settings, node.port, node.name),
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        str(settings.paths.state_dir / node.name / "nodes.conf"),
        "--cluster-port",
        str(node.bus_port),
        "--cluster-require-full-coverage",
        "no",
    ]


def redis_programs(settings: StackSettings) -> list[Program]:
    """The supervised Redis process(es) of the stack: one server, or a program per cluster node."""
    redis_settings = settings.redis
    if not redis_settings.cluster:
        return [
            Program("redis", redis_command(settings, redis_settings.port), lambda: redis_healthy(redis_settings), 10)
        ]
    return [
        Program(
            node.name,
            cluster_node_command(settings, node),
            functools.partial(node_healthy, redis_settings.host, node.port),
            10,
        )
        for node in cluster_nodes(settings)
    ]


def finish_start(settings: StackSettings, timeout_s: float = CLUSTER_FORM_TIMEOUT_S) -> None:
    """Nothing for one server. For a cluster: form it if it is not whole (the first start), then
    wait until every node sees it whole. Idempotent: nodes that already hold their slots (from
    their ``nodes.conf``) are only met again, which changes nothing."""
    if not settings.redis.cluster:
        return
    host = settings.redis.host
    nodes = cluster_nodes(settings)
    clients = [redis.Redis(host=host, port=node.port, socket_timeout=5) for node in nodes]
    try:
        if not all(_whole(info, len(nodes)) for info in _infos(clients)):
            _form(host, nodes, clients)
        deadline = time.monotonic() + timeout_s
        while True:
            infos = _infos(clients)
            if all(_whole(info, len(nodes)) for info in infos):
                return
            if time.monotonic() > deadline:
                seen = "; ".join(
                    f"{node.name}: {info['cluster_state']}, {info['cluster_known_nodes']} nodes known, "
                    f"{info['cluster_slots_assigned']} slots assigned"
                    for node, info in zip(nodes, infos, strict=True)
                )
                raise StackError(
                    f"the Redis Cluster is not whole after {timeout_s:.0f}s ({seen}). If its nodes came from "
                    f"different runs, stop the stack and remove {settings.paths.state_dir}/redis-* "
                    "to form a fresh one (its online features are lost; `streamrec features setup` loads the profiles)"
                )
            time.sleep(0.2)
    finally:
        for client in clients:
            client.close()


def _cluster_info(client: redis.Redis) -> dict[str, Any]:
    """``CLUSTER INFO`` of one node, by field (redis-py's sync client returns it parsed)."""
    return cast(dict[str, Any], client.cluster("INFO"))


def _infos(clients: list[redis.Redis]) -> list[dict[str, Any]]:
    return [_cluster_info(client) for client in clients]


def _whole(info: dict[str, Any], count: int) -> bool:
    return (
        info["cluster_state"] == "ok"
        and int(info["cluster_known_nodes"]) == count
        and int(info["cluster_size"]) == count
        and int(info["cluster_slots_assigned"]) == HASH_SLOTS
    )


def _form(host: str, nodes: list[ClusterNode], clients: list[redis.Redis]) -> None:
    """Give each fresh node its slot range and a distinct config epoch, then meet them all.

    What ``redis-cli --cluster create`` does for masters without replicas; a node that already
    holds slots or knows other nodes keeps what it has.
    """
    for epoch, (node, client, info) in enumerate(zip(nodes, clients, _infos(clients), strict=True), start=1):
        if int(info["cluster_known_nodes"]) > 1 or int(info["cluster_slots_assigned"]) > 0:
            continue
        if int(info["cluster_my_epoch"]) == 0:
            client.cluster("SET-CONFIG-EPOCH", epoch)
        client.cluster("ADDSLOTSRANGE", node.first_slot, node.last_slot)
    for node in nodes[1:]:
        clients[0].cluster("MEET", host, node.port, node.bus_port)
