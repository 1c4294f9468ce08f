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
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from string import Template

from confluent_kafka.admin import AdminClient

from streamrec.core.errors import StackError
from streamrec.core.settings import PROJECT_ROOT, TopicSettings
from streamrec.ops.settings import StackSettings

KAFKA_INFRA_DIR = PROJECT_ROOT / "infra" / "kafka"
POM_PATH = KAFKA_INFRA_DIR / "pom.xml"
TEMPLATE_PATH = KAFKA_INFRA_DIR / "server.properties.template"
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


def admin_client(bootstrap: str) -> AdminClient:
    """A Kafka admin client that gives up on a node after 2 s and logs nothing (for probes)."""
    return AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 2000, "log_level": 0})


def node_registered(node: KafkaNode) -> bool:
    """The node answers a metadata request on its own listener, and the metadata lists it among
    the live brokers (registered with the controller quorum and not fenced)."""
    try:
        metadata = admin_client(node.address).list_topics(timeout=2)
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


def _render(settings: StackSettings, node: KafkaNode, quorum_voters: str) -> None:
    replication, min_insync = internal_replication(settings.stack.brokers)
    node.config.write_text(
        Template(TEMPLATE_PATH.read_text()).substitute(
            node_id=node.node_id,
            quorum_voters=quorum_voters,
            host=node.host,
            port=node.port,
            controller_port=node.controller_port,
            log_dirs=node.data,
            partitions=settings.topics.partitions,
            replication=replication,
            min_insync=min_insync,
        )
    )


def prepare(settings: StackSettings) -> list[KafkaNode]:
    """Render every node's config and format its storage; safe to call again on existing nodes."""
    libs_dir = fetch_jars(settings.paths.kafka_libs_dir)
    cluster = nodes(settings)
    for node in cluster:
        node.data.mkdir(parents=True, exist_ok=True)
    cluster_id = _cluster_id(*(node.data for node in cluster))
    quorum_voters = ",".join(f"{node.node_id}@{node.host}:{node.controller_port}" for node in cluster)
    for node in cluster:
        _render(settings, node, quorum_voters)
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
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            ),
        )
        for node in cluster
    ]
    failures = []
    for node, process in formats:
        output, _ = process.communicate()
        if process.returncode != 0:
            failures.append(f"{node.data}:\n{output}")
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
