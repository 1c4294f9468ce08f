"""Real Apache Kafka nodes (KRaft) from Maven Central jars: one by default, a cluster of up to five.

Each node is a broker and a controller in one JVM (``process.roles=broker,controller``); node ``n``
(from 1) has ``node.id`` n, listens on ``stack.kafka_port + n - 1`` and ``stack.kafka_controller_port +
n - 1``, and every node lists all of them as quorum voters. One node keeps the folder and program
name ``kafka``; the nodes of a cluster are ``kafka-1`` ... ``kafka-N``.

Three steps, each idempotent:

1. :func:`fetch_jars` runs ``mvn dependency:copy-dependencies`` on ``infra/kafka/pom.xml`` into
   the cache folder (once; later calls see the jars and return).
2. :func:`prepare` renders each node's ``server.properties`` from the template and formats its
   storage folder with ``kafka.tools.StorageTool``, all with one cluster id (``--ignore-formatted``
   makes a restart keep data).
3. :func:`broker_command` is the ``java ... kafka.Kafka server.properties`` line that the process
   runner (supervisord, see ``streamrec.ops.stack.local_stack``) starts and stops with SIGTERM, which
   Kafka handles with a clean shutdown.

:func:`node_registered` is a node's readiness probe and :func:`client_topics` the topic layout the
stack hands its clients (replicated three times on a cluster). See docs/design/ops.md#a-kafka-cluster.

On a secure stack (``stack.secure``, credentials from ``identities.StackSecrets``) the client
listener, also used between nodes, is SASL_SSL with SCRAM-SHA-512, the controller listener mutual
TLS with the nodes' certificate (PEM keystore and truststore), and KRaft's ``StandardAuthorizer``
denies what no ACL allows (``kafka_access`` holds the table). Every identity's SCRAM credential is
written into the metadata log at format time, from an argument file that StorageTool reads
(``@file``, 0600, removed after), so no password is ever on a command line; the inter-broker
password is in ``server.properties``, which is 0600.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

from confluent_kafka.admin import AdminClient

from streamrec.core.errors import StackError
from streamrec.core.settings import PROJECT_ROOT, KafkaSettings, TopicSettings
from streamrec.ops.settings import StackSettings
from streamrec.ops.stack.certs import write_private
from streamrec.ops.stack.identities import StackSecrets

KAFKA_INFRA_DIR = PROJECT_ROOT / "infra" / "kafka"
POM_PATH = KAFKA_INFRA_DIR / "pom.xml"
TEMPLATE_PATH = KAFKA_INFRA_DIR / "server.properties.template"
SECURITY_TEMPLATE_PATH = KAFKA_INFRA_DIR / "security.properties.template"
SCRAM_MECHANISM = "SCRAM-SHA-512"
# The operator's identity; the nodes also use it for their own replication traffic (SCRAM).
ADMIN_IDENTITY = "admin"
# The principal of a node on the controller listener: its certificate's subject (mutual TLS).
NODE_PRINCIPAL = "User:CN=kafka"
LOG4J_PATH = KAFKA_INFRA_DIR / "log4j.properties"


def fetch_jars(libs_dir: Path) -> Path:
    """Download the broker and its runtime jars into ``libs_dir`` unless they are there."""
    if any(libs_dir.glob("kafka_2.13-*.jar")):
        return libs_dir
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError("Maven (`mvn`) is needed to fetch the Kafka jars: apt-get install -y maven")
    libs_dir.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [
            mvn,
            "-q",
            "-B",
            "-f",
            str(POM_PATH),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={libs_dir}",
            "-DincludeScope=runtime",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 or not any(libs_dir.glob("kafka_2.13-*.jar")):
        raise StackError(f"mvn could not fetch the Kafka jars into {libs_dir}:\n{result.stdout}{result.stderr}")
    return libs_dir


@dataclass(frozen=True)
class KafkaNode:
    """One KRaft node of the stack: its supervisord program, its folder and its two ports."""

    node_id: int
    program: str
    root: Path
    host: str
    port: int
    controller_port: int

    @property
    def config(self) -> Path:
        return self.root / "server.properties"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def nodes(settings: StackSettings) -> list[KafkaNode]:
    """The stack's Kafka nodes, ``stack.brokers`` of them, in node id order."""
    stack = settings.stack
    single = stack.brokers == 1
    return [
        KafkaNode(
            node_id=index + 1,
            program="kafka" if single else f"kafka-{index + 1}",
            root=settings.paths.state_dir / ("kafka" if single else f"kafka-{index + 1}"),
            host=stack.kafka_host,
            port=stack.kafka_port + index,
            controller_port=stack.kafka_controller_port + index,
        )
        for index in range(stack.brokers)
    ]


def bootstrap_servers(settings: StackSettings) -> str:
    """Every node's client address, comma-separated (a client still connects while one is down)."""
    return ",".join(node.address for node in nodes(settings))


def internal_replication(brokers: int) -> tuple[int, int]:
    """Replication factor and min.insync.replicas of Kafka's internal topics (consumer offsets,
    transaction state) and of topics created without their own: min(3, nodes), and 2 in sync from
    three nodes on, so one node can die without losing a committed offset or blocking writes."""
    return min(3, brokers), 2 if brokers >= 3 else 1


def client_topics(settings: StackSettings) -> TopicSettings:
    """The topic layout of the stack's clients: the settings' own, except that on a cluster the
    replication factor defaults to min(3, nodes) and ``min.insync.replicas`` to 2 once the factor
    is 3 (one node may die without losing an acknowledged record). A value set explicitly
    (``STREAMREC_TOPICS__REPLICATION_FACTOR``, ``..._MIN_INSYNC_REPLICAS``) is kept."""
    topics = settings.topics
    if settings.stack.brokers == 1:
        return topics
    explicit = topics.model_fields_set
    replication = topics.replication_factor if "replication_factor" in explicit else min(3, settings.stack.brokers)
    min_insync = topics.min_insync_replicas if "min_insync_replicas" in explicit else (2 if replication >= 3 else 1)
    return TopicSettings(
        **{**topics.model_dump(), "replication_factor": replication, "min_insync_replicas": min_insync}
    )


def client_security(secrets: StackSecrets | None, identity: str = ADMIN_IDENTITY) -> dict[str, Any]:
    """The ``KafkaSettings`` fields that connect as ``identity`` to the stack's brokers (SASL_SSL,
    its password file, the stack's CA); none on a plaintext stack."""
    if secrets is None:
        return {}
    return {
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": SCRAM_MECHANISM,
        "sasl_username": identity,
        "sasl_password": None,
        "sasl_password_file": secrets.identities[identity].kafka_password_file,
        "ssl_ca_file": secrets.ca_file,
    }


def admin_client(bootstrap: str, security: Mapping[str, Any] | None = None) -> AdminClient:
    """A Kafka admin client that gives up on a node after 2 s and logs nothing (for probes);
    ``security`` holds :func:`client_security`'s fields on a secure stack."""
    config = KafkaSettings(bootstrap_servers=bootstrap, **(security or {})).client_config()
    return AdminClient({**config, "socket.timeout.ms": 2000, "log_level": 0})


def node_registered(node: KafkaNode, security: Mapping[str, Any] | None = None) -> bool:
    """The node answers a metadata request on its own listener, and the metadata lists it among
    the live brokers (registered with the controller quorum and not fenced)."""
    try:
        metadata = admin_client(node.address, security).list_topics(timeout=2)
    except Exception:  # noqa: BLE001 -- any failure means "not yet"
        return False
    return node.node_id in metadata.brokers


def _cluster_id(*data_dirs: Path) -> str:
    """The id the nodes' storage was formatted with, or a new one when none is formatted yet.

    StorageTool's ``--ignore-formatted`` still refuses a *different* id, so a restart must reuse it,
    and a node whose folder was removed rejoins with the others' id.
    """
    formatted: dict[str, list[Path]] = {}
    for data_dir in data_dirs:
        meta = data_dir / "meta.properties"
        if not meta.is_file():
            continue
        for line in meta.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "cluster.id" and value.strip():
                formatted.setdefault(value.strip(), []).append(data_dir)
    if len(formatted) > 1:
        listing = "; ".join(f"{cluster_id}: {', '.join(map(str, dirs))}" for cluster_id, dirs in formatted.items())
        raise StackError(
            f"the Kafka nodes' storage belongs to different clusters ({listing}); stop the stack and "
            "remove those folders to start a new cluster"
        )
    if formatted:
        return next(iter(formatted))
    # Kafka's Uuid.toString(): URL-safe base64 of 16 random bytes, without padding. Like Kafka's
    # Uuid.randomUuid(), never one that starts with "-" (1 in 64): StorageTool's argument parser
    # reads "-t -Xy..." as a missing value ("argument --cluster-id/-t: expected one argument").
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _java(settings: StackSettings) -> str:
    java = shutil.which(settings.stack.java_bin)
    if java is None:
        raise StackError(
            f"Java 17 is needed to run Kafka; `{settings.stack.java_bin}` is not on PATH "
            "(apt-get install -y openjdk-17-jre-headless)"
        )
    return java


def _classpath(libs_dir: Path) -> str:
    return f"{libs_dir}/*"


def _password(secrets: StackSecrets, identity: str) -> str:
    """An identity's Kafka password, checked to be safe inside a JAAS string and a properties file."""
    password = secrets.identities[identity].kafka_password()
    if not password or any(not (char.isalnum() or char in "-_.~") for char in password):
        raise StackError(
            f"the Kafka password in {secrets.identities[identity].kafka_password_file} must be letters, digits "
            "and -_.~ only; remove the file to have `stack up --secure` create a new one"
        )
    return password


def _render(settings: StackSettings, node: KafkaNode, quorum_voters: str, secrets: StackSecrets | None) -> None:
    replication, min_insync = internal_replication(settings.stack.brokers)
    text = Template(TEMPLATE_PATH.read_text()).substitute(
        node_id=node.node_id,
        quorum_voters=quorum_voters,
        host=node.host,
        port=node.port,
        controller_port=node.controller_port,
        client_listener="SASL_SSL" if secrets else "PLAINTEXT",
        controller_protocol="SSL" if secrets else "PLAINTEXT",
        log_dirs=node.data,
        partitions=settings.topics.partitions,
        replication=replication,
        min_insync=min_insync,
    )
    if secrets is not None:
        text += Template(SECURITY_TEMPLATE_PATH.read_text()).substitute(
            inter_broker_user=ADMIN_IDENTITY,
            inter_broker_password=_password(secrets, ADMIN_IDENTITY),
            keystore=secrets.servers["kafka"].bundle_file,
            truststore=secrets.ca_file,
            super_users=f"User:{ADMIN_IDENTITY};{NODE_PRINCIPAL}",
        )
    write_private(node.config, text.encode())  # holds the inter-broker password on a secure stack


def _scram_marker(node: KafkaNode) -> Path:
    """Present once the node's storage was formatted with the identities' SCRAM credentials."""
    return node.root / "scram-formatted"


def _scram_arguments(secrets: StackSecrets, path: Path) -> Path:
    """StorageTool's ``--add-scram`` arguments for every identity, one per line, in a 0600 file
    (StorageTool expands ``@path``), so the passwords stay off the command line."""
    lines = [
        line
        for identity in secrets.identities
        for line in ("--add-scram", f"{SCRAM_MECHANISM}=[name={identity},password={_password(secrets, identity)}]")
    ]
    write_private(path, ("\n".join(lines) + "\n").encode())
    return path


def prepare(settings: StackSettings, secrets: StackSecrets | None = None) -> list[KafkaNode]:
    """Render every node's config and format its storage; safe to call again on existing nodes.
    With ``secrets`` (a secure stack) the nodes are configured for SASL_SSL and ACLs, and a new
    storage gets every identity's SCRAM credential."""
    if settings.stack.secure and secrets is None:
        raise StackError("stack.secure needs the stack's secrets (LocalStack.secrets) to configure Kafka")
    cluster = nodes(settings)
    formatted = {node.node_id: (node.data / "meta.properties").is_file() for node in cluster}
    if secrets is not None:
        plain = [str(node.data) for node in cluster if formatted[node.node_id] and not _scram_marker(node).is_file()]
        if plain:
            raise StackError(
                f"the Kafka storage in {', '.join(plain)} was formatted without SCRAM credentials (a plaintext "
                "stack); `streamrec stack down` and remove those folders to start the stack secure"
            )
    libs_dir = fetch_jars(settings.paths.kafka_libs_dir)
    for node in cluster:
        node.data.mkdir(parents=True, exist_ok=True)
        if secrets is not None:
            node.root.chmod(0o700)  # its metadata log holds the identities' SCRAM hashes
    cluster_id = _cluster_id(*(node.data for node in cluster))
    quorum_voters = ",".join(f"{node.node_id}@{node.host}:{node.controller_port}" for node in cluster)
    for node in cluster:
        _render(settings, node, quorum_voters, secrets)
    scram = (
        [f"@{_scram_arguments(secrets, secrets.directory / 'kafka-scram.args')}"]
        if secrets is not None and not all(formatted.values())
        else []
    )
    # One JVM per node; started together, they format in the time of one. A short-lived tool needs
    # neither the optimizing JIT nor G1's threads (half the CPU on a 2-core machine).
    formats = [
        (
            node,
            subprocess.Popen(
                [
                    _java(settings),
                    "-Xmx256m",
                    "-XX:TieredStopAtLevel=1",
                    "-XX:+UseSerialGC",
                    "-cp",
                    _classpath(libs_dir),
                    f"-Dlog4j.configuration=file:{LOG4J_PATH}",
                    "kafka.tools.StorageTool",
                    "format",
                    "-t",
                    cluster_id,
                    "-c",
                    str(node.config),
                    "--ignore-formatted",
                    *scram,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            ),
        )
        for node in cluster
    ]
    failures = []
    try:
        for node, process in formats:
            output, _ = process.communicate()
            if process.returncode != 0:
                failures.append(f"{node.data}:\n{output}")
            elif scram and not formatted[node.node_id]:
                _scram_marker(node).touch()
    finally:
        if secrets is not None:
            (secrets.directory / "kafka-scram.args").unlink(missing_ok=True)
    if failures:
        raise StackError("kafka StorageTool format failed for " + "\n".join(failures))
    return cluster


def broker_command(settings: StackSettings, node: KafkaNode) -> list[str]:
    """The JVM of one node; ``stack.kafka_heap_mb`` is each node's heap."""
    heap_mb = settings.stack.kafka_heap_mb
    return [
        _java(settings),
        f"-Xmx{heap_mb}m",
        f"-Xms{min(heap_mb, 256)}m",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-Djava.awt.headless=true",
        f"-Dlog4j.configuration=file:{LOG4J_PATH}",
        f"-Dkafka.logs.dir={node.root / 'logs'}",
        "-cp",
        _classpath(settings.paths.kafka_libs_dir),
        "kafka.Kafka",
        str(node.config),
    ]
