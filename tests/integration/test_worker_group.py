"""``streamrec streams worker --workers 2``: two worker processes of one group on one host.

The command runs supervisord in the foreground with two numbered copies of the worker; each serves
its metrics on its own port, the group splits the partitions between them, the features are the
reference, and SIGTERM stops both cleanly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from streamrec.core.settings import PROJECT_ROOT
from streamrec.datasets import movielens
from streamrec.ops.settings import StackSettings
from streamrec.ops.stack.ports import free_port_block
from tests.integration.test_streams_worker import FeatureWorker, assert_features_match, prepare, streams_settings
from tests.support.worker_process import worker_environment


def metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:  # noqa: S310
            text = response.read().decode()
    except OSError:
        return None
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " ")
    )


def test_two_workers_on_one_host_split_the_partitions_and_stop_on_sigterm(
    local_stack: object, stack_settings: StackSettings, tmp_path: Path
) -> None:
    metrics_base = free_port_block(2)
    settings = streams_settings(stack_settings, tmp_path)
    settings = settings.model_copy(
        update={"streams": settings.streams.model_copy(update={"metrics_port": metrics_base})}
    )
    prepare(settings)
    streamrec = str(Path(sys.executable).with_name("streamrec"))
    log_path = tmp_path / "group.log"
    with log_path.open("wb") as log:
        group = subprocess.Popen(  # noqa: S603 -- our own command
            [streamrec, "streams", "worker", "--workers", "2"],
            cwd=PROJECT_ROOT,
            env=worker_environment(settings, os.environ),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # supervisord and its workers: one process group to kill
        )
    try:
        deadline = time.monotonic() + 120
        while any(metric(metrics_base + index, "streams_events_in_total") is None for index in (0, 1)):
            assert group.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        frame = movielens.load_interactions().iloc[:3000]
        FeatureWorker(settings, None).replay(frame)  # type: ignore[arg-type]  # only its replay is used
        assert_features_match(settings, frame, timeout_s=120)
        counts = [metric(metrics_base + index, "streams_events_in_total") or 0 for index in (0, 1)]
        assert all(count > 0 for count in counts), counts  # both hold partitions of the interactions topic
        group.send_signal(signal.SIGTERM)
        assert group.wait(timeout=90) == 0, log_path.read_text()[-3000:]
        assert all(metric(metrics_base + index, "streams_events_in_total") is None for index in (0, 1))
    finally:
        # SIGKILL to supervisord alone would leave its two workers running (they then spin on
        # logging to the closed pipe): kill the whole group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group.pid, signal.SIGKILL)
        group.wait(10)
