"""Faults 1 and 2: a broker of a three-node cluster dies (SIGKILL) or stops for 20 s mid-stream.

Topics are replicated three times with ``min.insync.replicas`` 2 and every producer uses
``acks=all`` with idempotence, so losing one node loses nothing acknowledged: the paced replay
reports 0 failed deliveries, the feature worker (a real process, its tables' changelogs
replicated too) ends with exactly the reference features, and the API, which logs every
impression to the cluster while answering Recommend calls, fails none of them. Nothing is
restarted by hand except the broker itself; a worker that its watchdog exits (its producer
stalled: it holds a record unconfirmed for ``producer_stall_s``, which a broker restart can
cause) is started again, as the stack's supervisord does, and must still end with exactly the
reference features.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from streamrec.core.settings import CommonSettings, PathSettings
from streamrec.datasets import movielens
from streamrec.ops.stack.local_stack import LocalStack
from streamrec.ops.stack.ports import free_ports
from streams.settings import StreamsSettings, StreamsTuning
from tests.integration.test_api_server import start_model_server
from tests.integration.test_streams_worker import assert_features_match, prepare
from tests.support.cluster import cluster_settings
from tests.support.paced_replay import PacedReplay
from tests.support.recommend_load import RecommendLoad, start_api_on_cluster
from tests.support.worker_process import WorkerProcess


def run_with_a_broker_fault(stack: LocalStack, tmp_path: Path, fault: Callable[[str], None]) -> None:
    """Replay + worker + Recommend load; ``fault(program)`` hits the leader of interactions[0]."""
    base = cluster_settings(stack)
    prefix = base.topics.interactions.split(".")[0]
    (metrics_port,) = free_ports(1)
    settings = StreamsSettings(
        **{name: getattr(base, name) for name in CommonSettings.model_fields if name != "paths"},
        paths=PathSettings(state_dir=tmp_path / "worker"),
        features={"project": prefix},
        streams=StreamsTuning(app_id=prefix, metrics_port=metrics_port, session_timeout_s=6.0, producer_stall_s=30.0),
    )
    prepare(settings)
    models = start_model_server(tmp_path / "models" / "streamrec", {1: 0.0})
    api = start_api_on_cluster(stack, base, tmp_path / "api", models.target)
    api_port = api.port
    frame = movielens.load_interactions().iloc[:4000]
    paced = PacedReplay(frame, settings, rate=250.0)
    worker = WorkerProcess(settings, tmp_path / "worker.log")
    try:
        worker.start()
        worker.wait_serving(90)
        try:
            with RecommendLoad(api_port, threads=2) as load:
                paced.start()
                worker.wait_for_metric("streams_events_in_total", 500, timeout_s=60)
                fault(stack.partition_leader_program(settings.topics.interactions, 0))
                paced.assert_all_delivered(timeout_s=180)
            assert_features_match(settings, frame, timeout_s=120, while_waiting=worker.restart_after_watchdog_exit)
        except BaseException:
            worker.dump_state()
            raise
        assert worker.alive(), worker.log_tail(60)
        assert load.errors == [], load.errors[:5]
        assert load.unmarked_fallbacks == 0
        assert sum(load.answers.values()) > 0
    finally:
        worker.stop()
        api.stop(0)
        models.server.stop(0)


def test_the_partition_leader_killed_mid_stream_loses_nothing(cluster: LocalStack, tmp_path: Path) -> None:
    def kill_then_restart(program: str) -> None:
        cluster.kill(program)
        time.sleep(8)
        cluster.start(program)

    run_with_a_broker_fault(cluster, tmp_path, kill_then_restart)


def test_a_broker_stopped_for_20_s_loses_nothing(cluster: LocalStack, tmp_path: Path) -> None:
    def stop_for_20_s(program: str) -> None:
        cluster.stop(program)
        time.sleep(20)
        cluster.start(program)

    run_with_a_broker_fault(cluster, tmp_path, stop_for_20_s)
