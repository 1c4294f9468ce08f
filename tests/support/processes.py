"""Start project processes as real subprocesses in tests, with settings passed as STREAMREC_* env."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from streamrec.settings import CommonSettings


def settings_env(settings: CommonSettings, **extra: str) -> dict[str, str]:
    """The environment that makes a child process build the same shared sections."""
    env = {key: value for key, value in os.environ.items() if not key.upper().startswith("STREAMREC_")}
    env.update(
        {
            "STREAMREC_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
            "STREAMREC_REDIS__HOST": settings.redis.host,
            "STREAMREC_REDIS__PORT": str(settings.redis.port),
            "STREAMREC_PATHS__STATE_DIR": str(settings.paths.state_dir),
            "STREAMREC_PATHS__CACHE_DIR": str(settings.paths.cache_dir),
            "STREAMREC_TOPICS__PARTITIONS": str(settings.topics.partitions),
        }
    )
    for name in ("interactions", "impressions", "clicks", "labeled", "deadletter"):
        env[f"STREAMREC_TOPICS__{name.upper()}"] = getattr(settings.topics, name)
    env.update(extra)
    return env


@contextmanager
def faust_worker(app_module: str, env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``faust -A <module> worker`` until the block ends (SIGTERM, then SIGKILL after 30 s)."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "faust", "-A", app_module, "worker", "-l", "info"],
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
