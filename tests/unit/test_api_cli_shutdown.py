"""``streamrec api serve``'s stop is bounded: a stop that hangs dumps every thread's stack and exits 1."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# The real CLI with a server whose stop never returns (a blocked flush, a stuck thread).
CHILD = textwrap.dedent(
    """
    import os, signal, sys, threading, time, types

    class HangingServer:
        def __init__(self, settings):
            pass

        def start(self):
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
            return 1

        def stop(self):
            while True:
                time.sleep(0.2)  # hung_in_stop

    server_module = types.ModuleType("serving.api.server")
    server_module.ApiServer = HangingServer
    sys.modules["serving.api.server"] = server_module
    from serving.api.cli import main
    main()
    """
)


def test_a_stop_that_hangs_dumps_the_stacks_and_exits_within_the_bound(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.upper().startswith("STREAMREC_")}
    env.update({"STREAMREC_API__GRACE_PERIOD_S": "0", "STREAMREC_API__SHUTDOWN_TIMEOUT_S": "1"})
    result = subprocess.run(
        [sys.executable, "-c", CHILD], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "SIGTERM received" in result.stderr
    assert "Timeout" in result.stderr and "in stop" in result.stderr, result.stderr[-3000:]
