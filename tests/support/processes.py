"""Start project processes as real subprocesses in tests, with settings passed as STREAMREC_* env."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from streamrec.core.settings import CommonSettings
from tests.support.worker_process import settings_environment


def settings_env(settings: CommonSettings, **extra: str) -> dict[str, str]:
    """This environment without STREAMREC_*, plus the variables that rebuild ``settings`` in a child."""
    env = {key: value for key, value in os.environ.items() if not key.upper().startswith("STREAMREC_")}
    env.update(settings_environment(settings))
    env.update(extra)
    return env


@contextmanager
def faust_worker(app_module: str, env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``faust -A <module> worker`` until the block ends (SIGTERM, then SIGKILL after 30 s)."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            # Faust's CLI starts a web server on 6066 unless told not to; workers here need none.
            [sys.executable, "-m", "faust", "-A", app_module, "worker", "-l", "info", "--without-web"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
