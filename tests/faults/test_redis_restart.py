"""Fault 4: Redis is SIGKILLed mid-replay and comes back (supervisord restarts it from its
append-only file).

Redis acknowledges a write before it fsyncs it (once a second), so the restarted Redis may lack
rows whose events the worker has already committed; while it is down, pushes fail and are
retried with their events held. The worker notices the new Redis run and pushes every state it
owns again (``FeaturePipeline.check_feature_store``). Pass: features equal the reference.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from streamrec.datasets import movielens
from streamrec.ops.settings import StackSettings
from streamrec.ops.stack.local_stack import LocalStack
from tests.integration.test_streams_worker import assert_features_match, prepare, streams_settings
from tests.support.paced_replay import PacedReplay
from tests.support.worker_process import WorkerProcess


def redis_pid(stack: LocalStack) -> int:
    return int(next(info["pid"] for info in stack.status() if info["name"] == "redis"))


def test_redis_killed_mid_replay_then_restarted_ends_with_the_reference_features(
    local_stack: LocalStack, stack_settings: StackSettings, tmp_path: Path
) -> None:
    settings = streams_settings(stack_settings, tmp_path)
    prepare(settings)
    frame = movielens.load_interactions().iloc[:5000]
    paced = PacedReplay(frame, settings, rate=500.0)
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        worker.start()
        worker.wait_serving(60)
        paced.start()
        # Some features written before the kill; counted in rows, not pushes: a worker whose first
        # pushes are slow (Feast's first registry read) pushes the same rows in fewer, larger batches.
        worker.wait_for_metric("streams_pushed_rows_total", 500, timeout_s=90)
        killed = redis_pid(local_stack)
        os.kill(killed, signal.SIGKILL)
        deadline = time.monotonic() + 30  # supervisord starts it again; it replays its append-only file
        while redis_pid(local_stack) in (0, killed):
            assert time.monotonic() < deadline, local_stack.status()
            time.sleep(0.2)
        local_stack.wait_healthy(30, ["redis"])
        paced.assert_all_delivered(timeout_s=120)
        assert_features_match(settings, frame, timeout_s=90)
        assert worker.metric("streams_feature_store_restarts_total") >= 1, worker.log_tail(40)
        assert worker.alive()
    finally:
        worker.stop()
