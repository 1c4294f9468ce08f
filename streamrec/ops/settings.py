"""Settings of the ops layer's processes: the replay producer, the local stack, tail, the simulator."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from streamrec.core.events import InteractionKind
from streamrec.core.settings import CommonSettings, Section


class ReplayTuning(Section):
    """Producer knobs for ``streamrec replay``: batching trades latency for throughput."""

    linger_ms: int = Field(default=20, ge=0)
    batch_size_bytes: int = Field(default=1_000_000, ge=1)
    compression: Literal["none", "lz4", "zstd", "snappy", "gzip"] = "lz4"
    queue_max_messages: int = Field(default=500_000, ge=1000)
    delivery_timeout_ms: int = Field(default=120_000, ge=1000)


class ReplaySettings(CommonSettings):
    replay: ReplayTuning = ReplayTuning()


class StackTuning(Section):
    """Ports and sizes of the local stack (Kafka in KRaft mode and Redis)."""

    kafka_host: str = "127.0.0.1"
    # Kafka nodes (each a KRaft broker and controller). Node n (from 0) listens on kafka_port + n
    # and kafka_controller_port + n. One is the demo's default; three give replication factor 3.
    brokers: int = Field(default=1, ge=1, le=5)
    kafka_port: int = Field(default=9092, ge=1, le=65535)
    kafka_controller_port: int = Field(default=9192, ge=1, le=65535)
    # Heap of each Kafka node (a three-node cluster takes three of these).
    kafka_heap_mb: int = Field(default=512, ge=128, le=512)
    kafka_start_timeout_s: float = Field(default=90.0, gt=0)
    supervisor_port: int = Field(default=9001, ge=1, le=65535)
    java_bin: str = "java"
    redis_server_bin: str = "redis-server"
    # Redis keeps its data in an append-only file under <state>/redis: "everysec" fsyncs it once a
    # second (a crash loses at most the last second of writes, which the worker pushes again from
    # Kafka), "always" on every write (slower), "no" leaves it to the OS.
    redis_appendfsync: Literal["always", "everysec", "no"] = "everysec"
    # supervisord restarts a program that dies unexpectedly (a crash, SIGKILL). Fault tests turn it
    # off to choose when a killed broker or worker comes back (``LocalStack.start``).
    restart_crashed: bool = True
    # With redis.cluster: node n (from 0) of the Redis Cluster serves on redis.port + n and talks to
    # the other nodes on redis_cluster_bus_port + n (Redis' default, port + 10000, can pass 65535).
    redis_cluster_nodes: int = Field(default=3, ge=3, le=9)
    # ``stack up --secure``: a local CA and one identity per service (streamrec.ops.stack.identities);
    # Kafka speaks SASL_SSL with ACLs, Redis TLS with ACL users, gRPC TLS with caller identities.
    secure: bool = False
    redis_cluster_bus_port: int = Field(default=16379, ge=1, le=65535)
    # Metrics: each project process serves /metrics on metrics_port_base + its place in
    # ``observability.METRICS_PROGRAMS`` (unless its own ``<section>.metrics_port`` is set); the
    # stack's Prometheus (``stack up --with prometheus``) listens on prometheus_port.
    metrics_port_base: int = Field(default=9101, ge=1, le=65_000)
    prometheus_port: int = Field(default=9090, ge=1, le=65535)
    prometheus_bin: str = "prometheus"
    prometheus_retention: str = Field(default="2d", pattern=r"^[0-9]+[smhdwy]$")
    scrape_interval_s: float = Field(default=5.0, ge=1.0, le=60.0)

    @model_validator(mode="after")
    def _port_ranges_apart(self) -> StackTuning:
        kafka = set(range(self.kafka_port, self.kafka_port + self.brokers))
        controllers = set(range(self.kafka_controller_port, self.kafka_controller_port + self.brokers))
        if kafka & controllers or self.supervisor_port in kafka | controllers:
            raise ValueError(
                f"Kafka ports {sorted(kafka)}, controller ports {sorted(controllers)} and the supervisor port "
                f"{self.supervisor_port} overlap; move stack.kafka_controller_port or stack.kafka_port"
            )
        return self


class StackSettings(CommonSettings):
    stack: StackTuning = StackTuning()

    @model_validator(mode="after")
    def _redis_cluster_ports_fit(self) -> StackSettings:
        if not self.redis.cluster:
            return self
        count = self.stack.redis_cluster_nodes
        nodes = range(self.redis.port, self.redis.port + count)
        buses = range(self.stack.redis_cluster_bus_port, self.stack.redis_cluster_bus_port + count)
        if nodes[-1] > 65535 or buses[-1] > 65535 or set(nodes) & set(buses):
            raise ValueError(
                f"the {count} Redis Cluster nodes need client ports {nodes[0]}-{nodes[-1]} and bus ports "
                f"{buses[0]}-{buses[-1]}, each at most 65535 and apart; move redis.port or stack.redis_cluster_bus_port"
            )
        return self


class TailSettings(CommonSettings):
    """``streamrec tail``: a consumer that validates and counts events, for the demo."""

    group_id: str = "streamrec-tail"


class SimulatorTuning(Section):
    """``streamrec simulate``: a dataset's held-out events replayed as visits to the API."""

    api_target: str = "127.0.0.1:50051"
    k: int = Field(default=10, ge=1, le=100)
    deadline_ms: int = Field(default=1000, ge=1)
    # Events before this fraction of the dataset (by time) are history (bootstrap); the rest is replayed.
    holdout_start_fraction: float = Field(default=0.5, gt=0, lt=1)
    # Kinds whose item, when shown, counts as a click (the evaluator's success); empty: every kind.
    # E.g. ["purchase"] for a shop whose goal is sales, ["add_to_cart", "purchase"] for intent.
    success_kinds: tuple[InteractionKind, ...] = ()
    # None: <paths.state_dir>/simulator
    output_dir: Path | None = None


class SimulatorSettings(CommonSettings):
    simulator: SimulatorTuning = SimulatorTuning()

    @property
    def simulator_dir(self) -> Path:
        return self.simulator.output_dir or self.paths.state_dir / "simulator"


SETTINGS_CLASSES: tuple[type[CommonSettings], ...] = (ReplaySettings, StackSettings, TailSettings, SimulatorSettings)
