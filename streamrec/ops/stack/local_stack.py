"""The local stack: real Kafka and Redis, and the project's own processes
(``streamrec.ops.stack.programs``), run under supervisord.

Why supervisord: it is the well-kept process runner that already does what a stack needs:
daemonize, restart policy, per-program logs, ordered start and clean SIGTERM stop, and an
XML-RPC API we query for state and logs. This module only renders its config from settings
and checks health on top of it. See docs/design/ops.md#the-local-stack.

The same :class:`LocalStack` serves ``streamrec stack up/status/logs/down`` and the pytest
session fixtures (which point it at free ports and a temporary state folder), so the tests
exercise exactly what a user runs.
"""

from __future__ import annotations

import configparser
import os
import shlex
import signal
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient
from supervisor.xmlrpc import SupervisorTransport
from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from streamrec.core.errors import StackError
from streamrec.core.settings import ENV_NESTED_DELIMITER, ENV_PREFIX
from streamrec.ops.settings import StackSettings
from streamrec.ops.stack import kafka_broker, redis_server
from streamrec.ops.stack.programs import Program, project_health_checks, project_programs


def kafka_healthy(bootstrap: str) -> bool:
    """The broker answers a metadata request with at least one broker."""
    try:
        metadata = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 2000, "log_level": 0}).list_topics(
            timeout=2
        )
    except Exception:  # noqa: BLE001 -- any failure means "not yet"
        return False
    return len(metadata.brokers) > 0


class LocalStack:
    """Render, start, inspect and stop the local stack for one ``StackSettings``."""

    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self.root = settings.paths.state_dir
        self.log_dir = self.root / "logs"
        self.config_path = self.root / "supervisord.conf"
        self.socket_path = self.root / "supervisor.sock"
        self.pid_path = self.root / "supervisord.pid"

    # -- the programs -------------------------------------------------------------------
    def bootstrap_servers(self) -> str:
        return f"{self.settings.stack.kafka_host}:{self.settings.stack.kafka_port}"

    def client_environment(self) -> dict[str, str]:
        """What other processes need in their environment to reach this stack: every
        ``STREAMREC_*`` variable of this process (already checked for typos), with the broker,
        Redis and state folder of this stack on top."""
        inherited = {key: value for key, value in os.environ.items() if key.upper().startswith(ENV_PREFIX)}
        return {
            **inherited,
            f"{ENV_PREFIX}KAFKA{ENV_NESTED_DELIMITER}BOOTSTRAP_SERVERS": self.bootstrap_servers(),
            f"{ENV_PREFIX}REDIS{ENV_NESTED_DELIMITER}HOST": self.settings.redis.host,
            f"{ENV_PREFIX}REDIS{ENV_NESTED_DELIMITER}PORT": str(self.settings.redis.port),
            f"{ENV_PREFIX}PATHS{ENV_NESTED_DELIMITER}STATE_DIR": str(self.settings.paths.state_dir),
            f"{ENV_PREFIX}PATHS{ENV_NESTED_DELIMITER}CACHE_DIR": str(self.settings.paths.cache_dir),
        }

    def programs(self) -> list[Program]:
        layout = kafka_broker.prepare(self.settings)
        checks = self.health_checks()
        return [
            Program("kafka", kafka_broker.broker_command(self.settings, layout), checks["kafka"], 60, (0, 143)),
            *redis_server.redis_programs(self.settings),
            *project_programs(self.settings),
        ]

    def health_checks(self) -> dict[str, Callable[[], bool] | None]:
        """One readiness probe per program, by program name."""
        bootstrap = self.bootstrap_servers()
        return {
            "kafka": lambda: kafka_healthy(bootstrap),
            **{program.name: program.healthy for program in redis_server.redis_programs(self.settings)},
            **project_health_checks(),
        }

    # -- supervisord --------------------------------------------------------------------
    def _render(self, programs: list[Program]) -> None:
        config = configparser.RawConfigParser()
        config["unix_http_server"] = {"file": str(self.socket_path), "chmod": "0700"}
        config["supervisord"] = {
            "logfile": str(self.log_dir / "supervisord.log"),
            "pidfile": str(self.pid_path),
            "childlogdir": str(self.log_dir),
            "nodaemon": "false",
            "silent": "true",
            "directory": str(self.root),
        }
        config["rpcinterface:supervisor"] = {
            "supervisor.rpcinterface_factory": "supervisor.rpcinterface:make_main_rpcinterface"
        }
        config["supervisorctl"] = {"serverurl": f"unix://{self.socket_path}"}
        for program in programs:
            environment = self.client_environment()
            config[f"program:{program.name}"] = {
                "command": shlex.join(program.command).replace("%", "%%"),
                "autostart": str(program.autostart).lower(),
                "autorestart": "unexpected",
                "startsecs": "2",
                "stopsignal": "TERM",
                "stopwaitsecs": str(program.stop_wait_s),
                "exitcodes": ",".join(str(code) for code in program.exit_codes),
                "stopasgroup": "true",
                "killasgroup": "true",
                "redirect_stderr": "true",
                "stdout_logfile": str(self.log_dir / f"{program.name}.log"),
                "stdout_logfile_maxbytes": "20MB",
                "environment": ",".join(f'{key}="{_supervisor_quote(value)}"' for key, value in environment.items()),
            }
        with self.config_path.open("w") as handle:
            config.write(handle)

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
            self.wait_healthy(timeout_s)
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        programs = self.programs()
        self._render(programs)
        started = _run_supervisord(self.config_path)
        if not started:
            raise StackError(f"supervisord did not start; see {self.log_dir / 'supervisord.log'}")
        self.wait_healthy(timeout_s)
        redis_server.finish_start(self.settings)

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
                    self._raise_if_dead()
                    running = {info["name"] for info in self.status() if info["statename"] == "RUNNING"}
                    for name in [name for name, check in pending.items() if _ready(name, check, running)]:
                        del pending[name]
                    if pending:
                        raise _NotYet(", ".join(pending))
        except RetryError as exc:
            logs = ", ".join(str(self.log_dir / f"{name}.log") for name in pending)
            raise StackError(f"{', '.join(pending)} not healthy after {deadline:.0f}s; see {logs}") from exc

    def _raise_if_dead(self) -> None:
        for info in self.status():
            if info["statename"] in {"FATAL", "EXITED", "BACKOFF"}:
                name = info["name"]
                tail = self.logs(name, 4000)
                raise StackError(f"{name} is {info['statename']}; see {self.log_dir / f'{name}.log'}:\n{tail}")

    def start(self, name: str, timeout_s: float | None = None) -> None:
        """Start one program (a project process) and wait until it is healthy."""
        with self._rpc() as rpc:
            info = rpc.getProcessInfo(name)
            if info["statename"] not in {"RUNNING", "STARTING"}:
                rpc.startProcess(name, True)
        self.wait_healthy(timeout_s, [name])

    def stop(self, name: str) -> None:
        with self._rpc() as rpc:
            if rpc.getProcessInfo(name)["statename"] in {"RUNNING", "STARTING"}:
                rpc.stopProcess(name, True)

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


def _ready(name: str, check: Callable[[], bool] | None, running: set[str]) -> bool:
    return name in running and (check is None or check())


def _supervisor_quote(value: str) -> str:
    # supervisord expands %(ENV_X)s in its config and splits environment= on unquoted commas.
    return value.replace("%", "%%").replace('"', '\\"')


class _NotYet(Exception):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _run_supervisord(config_path: Path) -> bool:
    result = subprocess.run(
        [sys.executable, "-m", "supervisor.supervisord", "-c", str(config_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.returncode == 0
