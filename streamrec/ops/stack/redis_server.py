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

Secure stack (``stack.secure``, given the stack's :class:`StackSecrets`): every server speaks TLS
only (``port 0``, ``tls-port`` on the client port; the cluster bus and replication too), verifies
client certificates it is shown against the stack's CA, keeps ``protected-mode`` on and loads its
users from one ACL file (:func:`write_acl_file`, 0600 beside the secrets): ``default`` is off and
each identity gets what :data:`REDIS_ACCESS` says, its password stored as a SHA-256 hash. The
stack's own probes and the cluster formation connect as ``admin`` (:func:`stack_client_settings`).

:func:`redis_programs` are the supervised processes, :func:`redis_healthy` / :func:`node_healthy`
their readiness probes and :func:`finish_start` what runs once they are up.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import redis

from streamrec.core import contracts
from streamrec.core.errors import StackError
from streamrec.core.settings import RedisSettings
from streamrec.ops.stack.certs import write_private
from streamrec.ops.stack.programs import Program

if TYPE_CHECKING:
    from streamrec.ops.settings import StackSettings
    from streamrec.ops.stack.identities import StackSecrets

HASH_SLOTS = 16384
CLUSTER_FORM_TIMEOUT_S = 30.0

# Feast keys an online row by its serialized entity key, then the project name: three little-endian
# uint32 (join key count, value type, name length), the join key's name, the value, the project.
# These globs match the rows of both entities whatever the project, and no key of another shape.
FEATURE_KEY_PATTERNS: tuple[str, ...] = tuple(
    f"{'?' * 12}{join_key}*" for join_key in (contracts.USER_JOIN_KEY, contracts.ITEM_JOIN_KEY)
)
# A cluster client learns the slot map with these; harmless on one server.
_CLUSTER_DISCOVERY = ("+cluster|slots", "+cluster|shards")
_READ_FEATURES = (
    *(f"%R~{pattern}" for pattern in FEATURE_KEY_PATTERNS),
    "-@all",
    "+@connection",
    "+@read",
    "-@dangerous",
    *_CLUSTER_DISCOVERY,
)
# Each identity's Redis ACL rules (after ``on`` and its password); None: no access (the user is
# off). The feature worker reads and writes feature rows and reads INFO (the server's run_id,
# ``streams.sink.FeastSink.store_epoch``); the API and the trainer read them (``%R~``: a write
# is refused whatever the command); the operator (``features setup``, the stack) may do anything.
REDIS_ACCESS: Mapping[str, tuple[str, ...] | None] = {
    "admin": ("~*", "&*", "+@all"),
    "streams": (
        *(f"~{pattern}" for pattern in FEATURE_KEY_PATTERNS),
        "-@all",
        "+@connection",
        "+@read",
        "+@write",
        "-@dangerous",
        "+info",
        *_CLUSTER_DISCOVERY,
    ),
    "api": _READ_FEATURES,
    "trainer": _READ_FEATURES,
    "replay": None,
    "joiner": None,
    "evaluator": None,
    "model-server": None,
    "skew": None,  # reads the offline log and the registry, never Redis
}


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


def _checked(settings: StackSettings, secrets: StackSecrets | None) -> StackSecrets | None:
    if settings.stack.secure and secrets is None:
        raise StackError("stack.secure is on but no StackSecrets were given; pass LocalStack(settings).secrets")
    return secrets if settings.stack.secure else None


def stack_client_settings(settings: StackSettings, secrets: StackSecrets | None = None) -> RedisSettings:
    """How the stack itself reaches its Redis: ``settings.redis`` as it is, or on a secure stack
    as ``admin`` over TLS (credentials from the secrets' files, read at each connect)."""
    secrets = _checked(settings, secrets)
    if secrets is None:
        return settings.redis
    admin = secrets.identities["admin"]
    return RedisSettings(
        **{
            **settings.redis.model_dump(),
            "username": "admin",
            "password": None,
            "password_file": admin.redis_password_file,
            "tls": True,
            "ca_file": secrets.ca_file,
            "cert_file": admin.certificate.cert_file,
            "key_file": admin.certificate.key_file,
        }
    )


def acl_file(secrets: StackSecrets) -> Path:
    """The Redis users of a secure stack, shared by every node."""
    return secrets.directory / "redis-users.acl"


def render_acl(secrets: StackSecrets) -> str:
    """The ACL file's text: ``default`` off, then every identity by :data:`REDIS_ACCESS`, each with
    its password as ``#<sha256>`` (Redis compares hashes; the file never holds a password)."""
    unknown = sorted(set(secrets.identities) - set(REDIS_ACCESS))
    if unknown:
        raise StackError(f"no Redis access is defined for identities {unknown}; add them to REDIS_ACCESS")
    lines = ["user default off resetpass resetkeys resetchannels -@all"]
    for name, identity in secrets.identities.items():
        rules = REDIS_ACCESS[name]
        if rules is None:
            lines.append(f"user {name} off resetpass resetkeys resetchannels -@all")
            continue
        digest = hashlib.sha256(identity.redis_password().encode()).hexdigest()
        lines.append(" ".join(("user", name, "on", f"#{digest}", "resetchannels", *rules)))
    return "\n".join(lines) + "\n"


def write_acl_file(secrets: StackSecrets) -> Path:
    """:func:`render_acl` into :func:`acl_file` (0600), rewritten only when it changes."""
    path = acl_file(secrets)
    text = render_acl(secrets)
    if not path.is_file() or path.read_text() != text:
        write_private(path, text.encode())
    return path


def _client(client_settings: RedisSettings, port: int, timeout_s: float) -> redis.Redis:
    return redis.Redis(
        host=client_settings.host, port=port, socket_timeout=timeout_s, **client_settings.client_options()
    )


def redis_healthy(client_settings: RedisSettings) -> bool:
    try:
        with _client(client_settings, client_settings.port, 1) as client:
            return bool(client.ping())
    except redis.RedisError:
        return False


def node_healthy(client_settings: RedisSettings, port: int) -> bool:
    """The node answers, and once it holds slots, it sees the cluster whole (``cluster_state:ok``):
    a fresh node is ready to be joined, a restarted one only after it has rejoined."""
    try:
        with _client(client_settings, port, 1) as client:
            info = _cluster_info(client)
    except redis.RedisError:
        return False
    return int(info["cluster_slots_assigned"]) == 0 or info["cluster_state"] == "ok"


def redis_command(
    settings: StackSettings, port: int, data_dir_name: str = "redis", secrets: StackSecrets | None = None
) -> list[str]:
    """One ``redis-server`` with its append-only file under ``<state_dir>/<data_dir_name>``; with
    ``secrets``, TLS only on ``port``, the stack's ACL users and protected mode."""
    data_dir = settings.paths.state_dir / data_dir_name
    data_dir.mkdir(parents=True, exist_ok=True)
    if secrets is None:
        listen = ["--port", str(port)]
        security = ["--protected-mode", "no"]
    else:
        server = secrets.servers["redis"]
        listen = ["--port", "0", "--tls-port", str(port)]
        security = [
            "--tls-cert-file",
            str(server.cert_file),
            "--tls-key-file",
            str(server.key_file),
            "--tls-ca-cert-file",
            str(secrets.ca_file),
            "--tls-auth-clients",
            "optional",
            "--aclfile",
            str(write_acl_file(secrets)),
            "--protected-mode",
            "yes",
        ]
    return [
        settings.stack.redis_server_bin,
        *listen,
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
        *security,
    ]


def cluster_node_command(settings: StackSettings, node: ClusterNode, secrets: StackSecrets | None = None) -> list[str]:
    """``redis_command`` for one cluster master, its ``nodes.conf`` beside its append-only file;
    with ``secrets`` the cluster bus (and replication) speak TLS too."""
    return [
        *redis_command(settings, node.port, node.name, secrets),
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        str(settings.paths.state_dir / node.name / "nodes.conf"),
        "--cluster-port",
        str(node.bus_port),
        "--cluster-require-full-coverage",
        "no",
        *(() if secrets is None else ("--tls-cluster", "yes", "--tls-replication", "yes")),
    ]


def redis_programs(settings: StackSettings, secrets: StackSecrets | None = None) -> list[Program]:
    """The supervised Redis process(es) of the stack: one server, or a program per cluster node.
    ``secrets``: the stack's, required with ``stack.secure`` (writes the ACL file)."""
    secrets = _checked(settings, secrets)
    client_settings = stack_client_settings(settings, secrets)
    if not settings.redis.cluster:
        return [
            Program(
                "redis",
                redis_command(settings, settings.redis.port, secrets=secrets),
                functools.partial(redis_healthy, client_settings),
                10,
            )
        ]
    return [
        Program(
            node.name,
            cluster_node_command(settings, node, secrets),
            functools.partial(node_healthy, client_settings, node.port),
            10,
        )
        for node in cluster_nodes(settings)
    ]


def finish_start(
    settings: StackSettings, secrets: StackSecrets | None = None, timeout_s: float = CLUSTER_FORM_TIMEOUT_S
) -> None:
    """Nothing for one server. For a cluster: form it if it is not whole (the first start), then
    wait until every node sees it whole. Idempotent: nodes that already hold their slots (from
    their ``nodes.conf``) are only met again, which changes nothing."""
    if not settings.redis.cluster:
        return
    host = settings.redis.host
    nodes = cluster_nodes(settings)
    client_settings = stack_client_settings(settings, secrets)
    clients = [_client(client_settings, node.port, 5) for node in nodes]
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
