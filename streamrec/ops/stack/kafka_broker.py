"""A real Apache Kafka broker (KRaft, single node) from Maven Central jars.

Three steps, each idempotent:

1. :func:`fetch_jars` runs ``mvn dependency:copy-dependencies`` on ``infra/kafka/pom.xml`` into
   the cache folder (once; later calls see the jars and return).
2. :func:`prepare` renders ``server.properties`` from the template and formats the storage
   folder with ``kafka.tools.StorageTool`` (``--ignore-formatted`` makes a restart keep data).
3. :func:`broker_command` is the ``java ... kafka.Kafka server.properties`` line that the process
   runner (supervisord, see ``streamrec.ops.stack.local_stack``) starts and stops with SIGTERM, which
   Kafka handles with a clean shutdown.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from string import Template

from streamrec.core.errors import StackError
from streamrec.core.settings import PROJECT_ROOT
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
class BrokerLayout:
    """Files of one broker instance under ``<state_dir>/kafka``."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "server.properties"

    @property
    def data(self) -> Path:
        return self.root / "data"


def _cluster_id(data_dir: Path) -> str:
    """The id the storage was formatted with, or a new one for empty storage.

    StorageTool's ``--ignore-formatted`` still refuses a *different* id, so a restart must reuse it.
    """
    meta = data_dir / "meta.properties"
    if meta.is_file():
        for line in meta.read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "cluster.id" and value.strip():
                return value.strip()
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


def prepare(settings: StackSettings) -> BrokerLayout:
    """Render the config and format storage; safe to call again on an existing broker."""
    libs_dir = fetch_jars(settings.paths.kafka_libs_dir)
    layout = BrokerLayout(settings.paths.state_dir / "kafka")
    layout.data.mkdir(parents=True, exist_ok=True)
    stack = settings.stack
    layout.config.write_text(
        Template(TEMPLATE_PATH.read_text()).substitute(
            host=stack.kafka_host,
            port=stack.kafka_port,
            controller_port=stack.kafka_controller_port,
            log_dirs=layout.data,
            partitions=settings.topics.partitions,
        )
    )
    result = subprocess.run(
        [
            _java(settings),
            "-Xmx256m",
            "-cp",
            _classpath(libs_dir),
            f"-Dlog4j.configuration=file:{LOG4J_PATH}",
            "kafka.tools.StorageTool",
            "format",
            "-t",
            _cluster_id(layout.data),
            "-c",
            str(layout.config),
            "--ignore-formatted",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise StackError(f"kafka StorageTool format failed for {layout.data}:\n{result.stdout}{result.stderr}")
    return layout


def broker_command(settings: StackSettings, layout: BrokerLayout) -> list[str]:
    heap = f"{settings.stack.kafka_heap_mb}m"
    return [
        _java(settings),
        f"-Xmx{heap}",
        f"-Xms{min(settings.stack.kafka_heap_mb, 256)}m",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-Djava.awt.headless=true",
        f"-Dlog4j.configuration=file:{LOG4J_PATH}",
        f"-Dkafka.logs.dir={layout.root / 'logs'}",
        "-cp",
        _classpath(settings.paths.kafka_libs_dir),
        "kafka.Kafka",
        str(layout.config),
    ]
