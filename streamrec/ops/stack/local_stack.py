"""The local stack: real Kafka and Redis, and the project's own processes
(``streamrec.ops.stack.programs``), run under supervisord.

Why supervisord: it is the well-kept process runner that already does what a stack needs:
daemonize, restart policy, per-program logs, ordered start and clean SIGTERM stop, and an
XML-RPC API we query for state and logs. This module only renders its config from settings
and checks health on top of it. See docs/design/ops.md#the-local-stack.

The same :class:`LocalStack` serves ``streamrec stack up/status/logs/down`` and the pytest
session fixtures (which point it at free ports and a temporary state folder), so the tests
exercise exactly what a user runs. With ``stack.brokers`` 3 Kafka is a three-node cluster
(``kafka_broker``) and the stack's clients replicate their topics three times
(:meth:`LocalStack.topic_settings`); :meth:`LocalStack.kill`, :meth:`LocalStack.start` and
:meth:`LocalStack.partition_leader_program` are what fault tests need on top.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import time
import xmlrpc.client
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from supervisor.xmlrpc import SupervisorTransport
from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from streamrec.core.errors import StackError
from streamrec.core.settings import (
    ENV_NESTED_DELIMITER,
    ENV_PREFIX,
    CommonSettings,
    GrpcSecurity,
    KafkaSettings,
    PathSettings,
    TopicSettings,
)
from streamrec.ops.settings import StackSettings, StackTuning
from streamrec.ops.stack import kafka_access, kafka_broker, observability, redis_server, supervisor_config
from streamrec.ops.stack.certs import write_private
from streamrec.ops.stack.identities import IDENTITIES, StackSecrets, service_environment
from streamrec.ops.stack.programs import Program, project_health_checks, project_programs


class LocalStack:
    """Render, start, inspect and stop the local stack for one ``StackSettings``."""

    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self.root = settings.paths.state_dir
        self.log_dir = self.root / "logs"
        self.config_path = self.root / "supervisord.conf"
        self.socket_path = self.root / "supervisor.sock"
        self.pid_path = self.root / "supervisord.pid"
        self.secrets_dir = self.root / "secrets"
        # the environment the stack's programs were started with (ports, paths; secrets only as
        # file paths), so `streamrec status` from a plain shell reaches a stack the demo started
        self.environment_path = self.root / "stack-environment.json"
        self.prometheus_config_path = self.root / "prometheus" / "prometheus.yml"
        # present while a secure stack runs here, so `stack status` etc. attach to it as one
        self.secure_marker = self.root / "secure"

    @classmethod
    def find(cls, settings: StackSettings) -> LocalStack:
        """The running stack in the settings' state folder or, when none runs there and the state
        folder is the default, the one ``streamrec demo --keep-running`` left (``.state/demo``);
        attached (:meth:`attach`). As configured when neither runs."""
        stack = cls.attach(settings)
        default = PathSettings().state_dir
        if stack.is_running() or settings.paths.state_dir != default:
            return stack
        demo = cls.attach(settings.model_copy(update={"paths": PathSettings(state_dir=default / "demo")}))
        return demo if demo.is_running() else stack

    @classmethod
    def attach(cls, settings: StackSettings) -> LocalStack:
        """The stack running in the settings' state folder, as it was started: the settings its
        programs got (ports, brokers, security; recorded at ``up``) and as many Kafka nodes as it
        runs (read from supervisord); as configured if none runs."""
        stack = cls(settings)
        if not stack.is_running():
            return stack
        recorded = stack.recorded_environment()
        if recorded is not None:
            settings = under_environment(recorded, StackSettings)
            stack = cls(settings)
        brokers = len(stack.running_kafka_programs()) or settings.stack.brokers
        secure = stack.secure_marker.is_file()
        if (brokers, secure) == (settings.stack.brokers, settings.stack.secure):
            return stack
        tuning = StackTuning(**{**settings.stack.model_dump(), "brokers": brokers, "secure": secure})
        return cls(settings.model_copy(update={"stack": tuning}))

    # -- the programs -------------------------------------------------------------------
    def bootstrap_servers(self) -> str:
        """Every Kafka node's address, comma-separated."""
        return kafka_broker.bootstrap_servers(self.settings)

    def topic_settings(self) -> TopicSettings:
        """The topic layout of this stack's clients (replicated on a cluster; see
        ``kafka_broker.client_topics``)."""
        return kafka_broker.client_topics(self.settings)

    def client_settings(self, identity: str = "admin") -> CommonSettings:
        """The shared settings of a client of this stack: its brokers and its topic layout (on a
        secure stack, Kafka as ``identity``)."""
        kafka = KafkaSettings(
            **{
                **self.settings.kafka.model_dump(),
                **kafka_broker.client_security(self.secrets, identity),
                "bootstrap_servers": self.bootstrap_servers(),
            }
        )
        return CommonSettings(
            **{
                **{name: getattr(self.settings, name) for name in CommonSettings.model_fields},
                "kafka": kafka,
                "topics": self.topic_settings(),
            }
        )

    def client_environment(self) -> dict[str, str]:
        """What other processes need in their environment to reach this stack: every
        ``STREAMREC_*`` variable of this process (already checked for typos), with the brokers,
        topic replication, Redis and state folder of this stack on top."""
        inherited = {key: value for key, value in os.environ.items() if key.upper().startswith(ENV_PREFIX)}
        topics = self.topic_settings()
        return {
            **inherited,
            f"{ENV_PREFIX}KAFKA{ENV_NESTED_DELIMITER}BOOTSTRAP_SERVERS": self.bootstrap_servers(),
            **(
                {
                    f"{ENV_PREFIX}STACK{ENV_NESTED_DELIMITER}BROKERS": str(self.settings.stack.brokers),
                    f"{ENV_PREFIX}TOPICS{ENV_NESTED_DELIMITER}REPLICATION_FACTOR": str(topics.replication_factor),
                    f"{ENV_PREFIX}TOPICS{ENV_NESTED_DELIMITER}MIN_INSYNC_REPLICAS": str(topics.min_insync_replicas),
                }
                if self.settings.stack.brokers > 1
                else {}
            ),
            f"{ENV_PREFIX}REDIS{ENV_NESTED_DELIMITER}HOST": self.settings.redis.host,
            f"{ENV_PREFIX}REDIS{ENV_NESTED_DELIMITER}PORT": str(self.settings.redis.port),
            f"{ENV_PREFIX}REDIS{ENV_NESTED_DELIMITER}CLUSTER": str(self.settings.redis.cluster).lower(),
            f"{ENV_PREFIX}PATHS{ENV_NESTED_DELIMITER}STATE_DIR": str(self.settings.paths.state_dir),
            f"{ENV_PREFIX}PATHS{ENV_NESTED_DELIMITER}CACHE_DIR": str(self.settings.paths.cache_dir),
            **(
                {f"{ENV_PREFIX}STACK{ENV_NESTED_DELIMITER}SECURE": "true", **service_environment(self.secrets, "admin")}
                if self.secrets is not None
                else {}
            ),
        }

    def recorded_environment(self) -> dict[str, str] | None:
        """The ``STREAMREC_*`` environment the running stack was started with; None before ``up``."""
        if not self.environment_path.is_file():
            return None
        recorded: dict[str, str] = json.loads(self.environment_path.read_text())
        return recorded

    def _tuning_environment(self) -> dict[str, str]:
        """This stack's ``stack`` section as variables, so :meth:`attach` rebuilds it exactly."""
        prefix = f"{ENV_PREFIX}STACK{ENV_NESTED_DELIMITER}"
        return {
            f"{prefix}{name.upper()}": value if isinstance(value, str) else json.dumps(value)
            for name, value in self.settings.stack.model_dump(mode="json").items()
        }

    def stack_environment(self) -> dict[str, str]:
        """The environment the stack's programs see: as recorded at ``up`` while it runs, else the
        one this process would give them now."""
        recorded = self.recorded_environment() if self.is_running() else None
        return recorded if recorded is not None else self.client_environment()

    def metrics_targets(self) -> dict[str, str]:
        """Job name -> ``host:port`` of every ``/metrics`` endpoint of the stack (Prometheus' targets)."""
        return observability.scrape_targets(self.settings, self.stack_environment())

    def prometheus_url(self) -> str:
        return observability.prometheus_url(self.settings)

    @functools.cached_property
    def secrets(self) -> StackSecrets | None:
        """The CA and the services' identities of a secure stack (created on first use); None
        without ``stack.secure``."""
        return StackSecrets.ensure(self.secrets_dir) if self.settings.stack.secure else None

    def program_environment(self, program: str) -> dict[str, str]:
        """:meth:`client_environment`, plus, on a secure stack, the credentials (file paths) of the
        program's own identity: the project's processes each connect as themselves."""
        environment = self.client_environment()
        if program in observability.METRICS_PROGRAMS:
            variable = observability.metrics_variable(program)
            if variable is not None:
                environment[variable] = str(observability.metrics_port(self.settings, program, environment))
        if self.secrets is not None and program in IDENTITIES:
            environment.update(service_environment(self.secrets, program))
        return environment

    def kafka_programs(self) -> list[str]:
        """The Kafka nodes' program names, in node id order."""
        return [node.program for node in kafka_broker.nodes(self.settings)]

    def programs(self) -> list[Program]:
        cluster = kafka_broker.prepare(self.settings, self.secrets)
        checks = self.health_checks()
        return [
            *(
                Program(
                    node.program, kafka_broker.broker_command(self.settings, node), checks[node.program], 60, (0, 143)
                )
                for node in cluster
            ),
            *redis_server.redis_programs(self.settings, self.secrets),
            *project_programs(self.settings, self.root, self.stack_environment()),
        ]

    def health_checks(self) -> dict[str, Callable[[], bool] | None]:
        """One readiness probe per program, by program name. A Kafka node is ready once it is
        registered in the cluster's metadata, so the stack is up when every node is."""
        return {
            **{
                node.program: functools.partial(
                    kafka_broker.node_registered, node, kafka_broker.client_security(self.secrets)
                )
                for node in kafka_broker.nodes(self.settings)
            },
            **{program.name: program.healthy for program in redis_server.redis_programs(self.settings, self.secrets)},
            # a secure stack's probes check the servers against its CA (health needs no identity)
            **project_health_checks(
                self.settings,
                self.stack_environment(),
                GrpcSecurity(tls=True, ca_file=self.secrets.ca_file) if self.secrets is not None else None,
            ),
        }

    # -- supervisord --------------------------------------------------------------------
    def _render(self, programs: list[Program]) -> None:
        text = supervisor_config.render(
            programs,
            {program.name: self.program_environment(program.name) for program in programs},
            root=self.root,
            log_dir=self.log_dir,
            socket_path=self.socket_path,
            pid_path=self.pid_path,
            restart_crashed=self.settings.stack.restart_crashed,
        )
        write_private(self.config_path, text.encode())  # environments name secret files

    @contextmanager
    def _rpc(self) -> Iterator[Any]:
        """supervisord's XML-RPC API over its unix socket; the connection is closed after use."""
        transport = SupervisorTransport(None, None, f"unix://{self.socket_path}")
        try:
            yield xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor
        finally:
            transport.close()

    def is_running(self) -> bool:
        if not self.socket_path.exists():
            return False
        try:
            with self._rpc() as rpc:
                rpc.getState()
        except (OSError, xmlrpc.client.Fault):
            return False
        return True

    def up(self, timeout_s: float | None = None) -> None:
        """Start every program and wait until each is healthy, or raise naming its log."""
        if self.is_running():
            running, wanted = self.running_kafka_programs(), self.kafka_programs()
            if running != wanted:
                raise StackError(
                    f"the stack in {self.root} runs Kafka as {', '.join(running)}, not {', '.join(wanted)}; "
                    "`streamrec stack down` first to change stack.brokers"
                )
            self.wait_healthy(timeout_s)
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.settings.stack.secure:
            self.secure_marker.touch()
        else:
            self.secure_marker.unlink(missing_ok=True)
        programs = self.programs()
        self._render(programs)
        recorded = {**self.client_environment(), **self._tuning_environment()}
        write_private(self.environment_path, json.dumps(recorded, indent=1, sort_keys=True).encode())
        self.prometheus_config_path.parent.mkdir(parents=True, exist_ok=True)
        self.prometheus_config_path.write_text(observability.prometheus_config(self.settings, self.root))
        for program in observability.METRICS_PROGRAMS:
            observability.remove_target(self.root, program)  # none runs yet
        started = supervisor_config.start_supervisord(self.config_path)
        if not started:
            raise StackError(f"supervisord did not start; see {self.log_dir / 'supervisord.log'}")
        self.wait_healthy(timeout_s)
        redis_server.finish_start(self.settings, self.secrets)
        if self.secrets is not None:
            kafka_access.apply(self.client_settings(), self.secrets)

    def wait_healthy(self, timeout_s: float | None = None, names: list[str] | None = None) -> None:
        deadline = timeout_s or self.settings.stack.kafka_start_timeout_s
        wanted = (
            set(names)
            if names is not None
            else {info["name"] for info in self.status() if info["statename"] != "STOPPED"}
        )
        pending = {name: check for name, check in self.health_checks().items() if name in wanted}
        try:
            for attempt in Retrying(
                stop=stop_after_delay(deadline), wait=wait_fixed(0.5), retry=retry_if_exception_type(_NotYet)
            ):
                with attempt:
                    self._raise_if_dead(wanted)
                    running = {info["name"] for info in self.status() if info["statename"] == "RUNNING"}
                    for name in [name for name, check in pending.items() if _ready(name, check, running)]:
                        del pending[name]
                    if pending:
                        raise _NotYet(", ".join(pending))
        except RetryError as exc:
            logs = ", ".join(str(self.log_dir / f"{name}.log") for name in pending)
            raise StackError(f"{', '.join(pending)} not healthy after {deadline:.0f}s; see {logs}") from exc

    def _raise_if_dead(self, names: set[str]) -> None:
        for info in self.status():
            if info["name"] in names and info["statename"] in {"FATAL", "EXITED", "BACKOFF"}:
                name = info["name"]
                tail = self.logs(name, 4000)
                raise StackError(f"{name} is {info['statename']}; see {self.log_dir / f'{name}.log'}:\n{tail}")

    def start(self, name: str, timeout_s: float | None = None) -> None:
        """Start one program (a project process, or one that was stopped or killed) and wait
        until it is healthy."""
        with self._rpc() as rpc:
            info = rpc.getProcessInfo(name)
            if info["statename"] not in {"RUNNING", "STARTING"}:
                rpc.startProcess(name, True)
        target = self.metrics_targets().get(name)
        if target is not None:
            observability.add_target(self.root, name, target)
        self.wait_healthy(timeout_s, [name])

    def stop(self, name: str) -> None:
        observability.remove_target(self.root, name)
        with self._rpc() as rpc:
            if rpc.getProcessInfo(name)["statename"] in {"RUNNING", "STARTING"}:
                rpc.stopProcess(name, True)

    def kill(self, name: str, timeout_s: float = 10.0) -> int:
        """SIGKILL one running program (no shutdown hook runs) and return its pid once supervisord
        has seen it die. With ``stack.restart_crashed`` supervisord starts it again at once;
        without, it stays down until :meth:`start`."""
        with self._rpc() as rpc:
            info = rpc.getProcessInfo(name)
        if info["statename"] != "RUNNING" or not info["pid"]:
            raise StackError(f"{name} is {info['statename']}, not running; nothing to kill")
        pid = int(info["pid"])
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + timeout_s
        while True:
            with self._rpc() as rpc:
                info = rpc.getProcessInfo(name)
            if info["pid"] != pid:
                return pid
            if time.monotonic() > deadline:
                raise StackError(f"supervisord still reports {name} as pid {pid} {timeout_s:.0f}s after SIGKILL")
            time.sleep(0.05)

    def running_kafka_programs(self) -> list[str]:
        """The Kafka programs the running supervisord knows, in node id order."""
        names = [info["name"] for info in self.status() if _KAFKA_PROGRAM.fullmatch(info["name"])]
        return sorted(names, key=lambda name: int(name.partition("-")[2] or 1))

    def partition_leader_program(self, topic: str, partition: int, timeout_s: float = 15.0) -> str:
        """The program of the Kafka node that leads ``topic``'s ``partition`` now; waits up to
        ``timeout_s`` while the partition is not in the metadata yet (a new topic) or has no live
        leader (a failover under way)."""
        by_node_id = {node.node_id: node.program for node in kafka_broker.nodes(self.settings)}
        admin = kafka_broker.admin_client(self.bootstrap_servers(), kafka_broker.client_security(self.secrets))
        deadline = time.monotonic() + timeout_s
        while True:
            described = admin.list_topics(topic, timeout=timeout_s).topics.get(topic)
            if described is not None and described.error is None and partition in described.partitions:
                leader = described.partitions[partition].leader
                if leader in by_node_id:
                    return by_node_id[leader]
                problem = f"leader id {leader}"
            else:
                problem = str(described.error) if described is not None else "unknown topic"
            if time.monotonic() > deadline:
                raise StackError(f"{topic}[{partition}] has no live leader after {timeout_s:.0f}s ({problem})")
            time.sleep(0.2)

    def status(self) -> list[dict[str, Any]]:
        with self._rpc() as rpc:
            infos: list[dict[str, Any]] = rpc.getAllProcessInfo()
        return infos

    def health(self) -> dict[str, bool]:
        states = {info["name"]: info["statename"] for info in self.status()}
        running = {name for name, state in states.items() if state == "RUNNING"}
        return {name: _ready(name, check, running) for name, check in self.health_checks().items() if name in running}

    def logs(self, name: str, length: int = 8000, *, from_start: bool = False) -> str:
        """The last ``length`` characters of a program's log, or its first ones with ``from_start``."""
        with self._rpc() as rpc:
            if from_start:
                head: str = rpc.readProcessStdoutLog(name, 0, length)
                return head
            text: str = rpc.tailProcessStdoutLog(name, 0, length)[0]
        return text

    def down(self, timeout_s: float = 90.0) -> None:
        """Stop every program (SIGTERM, in reverse order) and supervisord itself."""
        if not self.is_running():
            return
        pid = int(self.pid_path.read_text().strip()) if self.pid_path.exists() else None
        with self._rpc() as rpc:
            rpc.stopAllProcesses(True)
            rpc.shutdown()
        deadline = time.monotonic() + timeout_s
        while pid is not None and _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)
            raise StackError(f"supervisord (pid {pid}) did not stop in {timeout_s:.0f}s and was killed")


T = TypeVar("T")


def under_environment(environment: Mapping[str, str], make: Callable[[], T]) -> T:
    """``make()`` as a process with exactly ``environment`` would run it: settings classes it
    builds see a running stack's recorded variables, from a shell that has none of them."""
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(environment)
        return make()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _ready(name: str, check: Callable[[], bool] | None, running: set[str]) -> bool:
    return name in running and (check is None or check())


class _NotYet(Exception):
    pass


# "kafka" (one node) or "kafka-<n>" (node n of a cluster).
_KAFKA_PROGRAM = re.compile(r"kafka(-[0-9]+)?")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
