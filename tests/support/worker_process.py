"""Running the worker as a child process: its command line and the environment that configures it.

The integration tests and the ingest benchmark start ``faust -A streams.app worker`` exactly as
an operator (or the local stack's supervisord) does, and pass settings the only way a process
receives them: ``STREAMREC_*`` variables. :func:`settings_environment` turns a settings object
into those variables, so a test builds typed settings once and the child sees the same.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import IO

from pydantic import BaseModel, SecretStr

from streamrec.core.settings import ENV_NESTED_DELIMITER, ENV_PREFIX, PROJECT_ROOT, CommonSettings
from streams import watchdog
from streams.settings import StreamsSettings


def _env_value(value: object) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, BaseModel):  # a nested section (e.g. trainer.ope_gate): JSON, as below
        return value.model_dump_json()
    if isinstance(value, tuple | list | dict):
        return json.dumps(value)  # pydantic-settings reads complex values from the environment as JSON
    return str(value)


def settings_environment(settings: CommonSettings) -> dict[str, str]:
    """``STREAMREC_<SECTION>__<FIELD>`` for every set field of every section of ``settings``."""
    env: dict[str, str] = {}
    for section_name in type(settings).model_fields:
        section = getattr(settings, section_name)
        if not isinstance(section, BaseModel):
            continue
        for field_name in type(section).model_fields:
            value = getattr(section, field_name)
            if value is not None:
                env[f"{ENV_PREFIX}{section_name}{ENV_NESTED_DELIMITER}{field_name}".upper()] = _env_value(value)
    return env


def worker_command(web_port: int = 0, loglevel: str = "info", event_loop: str = "uvloop") -> list[str]:
    """``faust -L <loop> -A streams.app worker -l <level>`` with the faust script of this interpreter.

    ``-L`` chooses the event loop (``streams.event_loop``; Faust calls the default one ``aio``):
    Faust reads it from the command line when it is imported, before any loop exists.

    Faust's CLI decides about its web server itself (``--with-web`` is its default, on port
    6066, whatever the app's configuration says), so the flag is passed here: off for
    ``streams.web_port = 0``, so two workers on one host do not fight over 6066.
    """
    faust_script = Path(sys.executable).with_name("faust")
    web = ["--without-web"] if web_port == 0 else ["--web-port", str(web_port), "--web-bind", "127.0.0.1"]
    loop = "aio" if event_loop == "asyncio" else event_loop
    return [str(faust_script), "-L", loop, "-A", "streams.app", "worker", "-l", loglevel, *web]


_PROMETHEUS_MULTIPROCESS_VARIABLES = (
    "PROMETHEUS_MULTIPROC_DIR",
    "PROMETHEUS_MULTIPROCESS_DIR",
    "prometheus_multiproc_dir",
)


def worker_environment(settings: StreamsSettings, parent: Mapping[str, str]) -> dict[str, str]:
    """The child's environment: ``parent`` without its ``STREAMREC_*`` and Prometheus variables, plus ``settings``.

    A parent that imported Feast carries ``PROMETHEUS_MULTIPROC_DIR`` (Feast sets it on import,
    for gunicorn workers). Inherited, it switches the worker's prometheus_client to multiprocess
    mode: every counter increment and histogram observation becomes a locked write to an mmapped
    file. The worker is one process serving its own ``/metrics``, so it does not need that.
    """
    env = {
        key: value
        for key, value in parent.items()
        if not key.upper().startswith(ENV_PREFIX) and key not in _PROMETHEUS_MULTIPROCESS_VARIABLES
    }
    env.update(settings_environment(settings))
    # The repository root on the path: ``-A streams.app`` must import from this checkout.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    return env


class WorkerProcess:
    """One ``faust -A streams.app worker`` child in its own process group, logging to a file."""

    def __init__(self, settings: StreamsSettings, log_path: Path) -> None:
        self.settings = settings
        self.log_path = log_path
        self.metrics_port = settings.streams.resolved_metrics_port or None
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        env = worker_environment(self.settings, os.environ)
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(  # noqa: S603 -- our own worker command line
            worker_command(
                self.settings.streams.web_port, self.settings.streams.log_level, self.settings.streams.event_loop
            ),
            cwd=PROJECT_ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("the worker was not started")
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def metrics_text(self) -> str | None:
        """The worker's /metrics page, or None while it does not answer."""
        if self.metrics_port is None:
            raise RuntimeError("this worker was started without a metrics port")
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 -- loopback http
                return str(response.read().decode())
        except OSError:
            return None

    def wait_serving(self, timeout_s: float) -> None:
        """Wait until the worker's app has started (its metrics task answers)."""
        deadline = time.monotonic() + timeout_s
        while self.metrics_text() is None:
            if not self.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start within {timeout_s}s; see {self.log_path}")
            time.sleep(0.1)

    def metric(self, name: str) -> float:
        """Sum of a Prometheus sample (all label sets) from the worker's /metrics; 0 if absent."""
        text = self.metrics_text()
        if text is None:
            return 0.0
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def wait_for_metric(self, name: str, at_least: float, timeout_s: float) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(
                    f"the worker exited (code {self.process and self.process.returncode}); see {self.log_path}"
                )
            value = self.metric(name)
            if value >= at_least:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"{name} did not reach {at_least} within {timeout_s}s; see {self.log_path}")

    def dump_state(self) -> None:
        """For a failing test: the worker logs its asyncio tasks (SIGUSR2: what waits, on what),
        and its /metrics go to ``<log>.metrics`` beside its log."""
        if not self.alive() or self.process is None:
            return
        text = self.metrics_text()
        if text is not None:
            self.log_path.with_suffix(".metrics").write_text(text)
        os.kill(self.process.pid, signal.SIGUSR2)
        time.sleep(2)

    def kill(self) -> None:
        """SIGKILL the whole process group: no shutdown hooks, no final commit."""
        if self.process is not None and self.alive():
            os.killpg(self.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self._close_log()

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM (Faust shuts down cleanly, committing offsets), SIGKILL if it does not exit."""
        if self.process is not None and self.alive():
            os.killpg(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_log()

    def restart_after_watchdog_exit(self) -> bool:
        """As the stack's supervisord does (``autorestart = unexpected``): start the worker again
        if it exited with the watchdog's code (``streams.watchdog.EXIT_CODE``). True if it did."""
        if self.process is None or self.process.poll() != watchdog.EXIT_CODE:
            return False
        self._close_log()
        self.start()
        return True

    def log_tail(self, lines: int = 60) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
