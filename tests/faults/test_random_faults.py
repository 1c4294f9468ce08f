"""Fault 9: a seeded random schedule of faults 1-5 during one replay.

One replay runs against a three-node cluster while two feature workers, the API under Recommend
load and a model server (a child process) run beside it. A ``random.Random(seed)`` schedule
picks, at random moments, faults from: SIGKILL the leader of a partition (restarted 5 s later),
stop a broker for 10 s, SIGKILL a feature worker (restarted), SIGKILL Redis (supervisord brings
it back from its append-only file), SIGKILL the model server (restarted). The same seed gives
the same schedule (``STREAMREC_FAULT_SEED`` chooses another; the schedule is printed). At the
end the invariants of every single-fault test hold together: 0 failed deliveries, features equal
to the reference, 0 failed Recommend calls, no offset gap left open, every process up. A worker
its watchdog exits (a stalled producer, a revoke stuck past its fence) is started again, as the
stack's supervisord does.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

from serving.model_client import ModelServerClient
from serving.settings import ModelServerSection, ServingSettings
from streamrec.core.settings import CommonSettings, PathSettings
from streamrec.datasets import movielens
from streamrec.ops.stack.local_stack import LocalStack
from streamrec.ops.stack.ports import free_port_block, free_ports
from streams.settings import StreamsSettings, StreamsTuning
from tests.faults.test_model_server_restart import ModelServerProcess
from tests.integration.test_api_server import MODEL_ITEMS
from tests.integration.test_streams_worker import assert_features_match, prepare
from tests.support.cluster import cluster_settings
from tests.support.paced_replay import PacedReplay
from tests.support.recommend_load import RecommendLoad, start_api_on_cluster
from tests.support.tiny_model import write_tiny_model
from tests.support.worker_process import WorkerProcess

FAULTS = ("kill_leader", "stop_broker", "kill_worker", "kill_redis", "kill_model_server")
SEED = int(os.environ.get("STREAMREC_FAULT_SEED", "21"))


def schedule(seed: int, count: int = 4, span_s: float = 16.0) -> list[tuple[float, str]]:
    """``count`` faults at random moments of the first ``span_s`` seconds, each kind at most once."""
    rng = random.Random(seed)  # noqa: S311 -- a reproducible test schedule, not a secret
    kinds = rng.sample(FAULTS, count)
    moments = sorted(rng.uniform(1.0, span_s) for _ in kinds)
    return list(zip(moments, kinds, strict=True))


def test_the_same_seed_gives_the_same_schedule() -> None:
    assert schedule(SEED) == schedule(SEED)
    assert schedule(SEED) != schedule(SEED + 1)


def test_a_seeded_random_schedule_of_faults_during_one_replay(cluster: LocalStack, tmp_path: Path) -> None:
    plan = schedule(SEED)
    print(f"fault schedule for seed {SEED}: {plan}")
    run_schedule(cluster, tmp_path, plan)


def run_schedule(stack: LocalStack, tmp_path: Path, plan: list[tuple[float, str]]) -> None:
    base = cluster_settings(stack)
    prefix = base.topics.interactions.split(".")[0]
    metrics_base = free_port_block(2)
    streams = StreamsSettings(
        **{name: getattr(base, name) for name in CommonSettings.model_fields if name != "paths"},
        paths=PathSettings(state_dir=tmp_path / "workers"),
        features={"project": prefix},
        streams=StreamsTuning(app_id=prefix, metrics_port=metrics_base, session_timeout_s=6.0, commit_interval_s=2.0),
    )
    prepare(streams)

    def worker_settings(index: int) -> StreamsSettings:
        return streams.model_copy(update={"streams": streams.streams.model_copy(update={"worker_index": index})})

    workers = [WorkerProcess(worker_settings(index), tmp_path / f"worker-{index}.log") for index in (0, 1)]
    models_state = tmp_path / "models-state"
    serving = ServingSettings(
        paths=PathSettings(state_dir=models_state), model_server=ModelServerSection(port=free_ports(1)[0])
    )
    write_tiny_model(serving.model_base_path, 1, item_ids=MODEL_ITEMS)
    model_server = ModelServerProcess(models_state, serving.model_server.port, tmp_path / "model-server.log")
    model_server.start()
    with ModelServerClient.from_settings(serving) as admin:
        admin.publish_stable(1)
    api = start_api_on_cluster(stack, base, tmp_path / "api", serving.model_server.target)
    api_port = api.port
    frame = movielens.load_interactions().iloc[:5000]
    paced = PacedReplay(frame, streams, rate=250.0)

    def restart_worker_later(index: int) -> None:
        workers[index].kill()
        time.sleep(3)
        workers[index] = WorkerProcess(worker_settings(index), tmp_path / f"worker-{index}-again.log")
        workers[index].start()

    def kill_redis() -> None:
        # restart_crashed is off in this stack, so the test brings Redis back itself
        stack.kill("redis")
        time.sleep(2)
        stack.start("redis")

    def kill_model_server() -> None:
        model_server.kill()
        time.sleep(3)
        model_server.start()

    def bounce(program: str, down_s: float, stop: Callable[[str], object]) -> None:
        stop(program)
        time.sleep(down_s)
        stack.start(program)

    actions: dict[str, Callable[[], None]] = {
        "kill_leader": lambda: bounce(stack.partition_leader_program(streams.topics.interactions, 0), 5, stack.kill),
        "stop_broker": lambda: bounce(stack.partition_leader_program(streams.topics.interactions, 1), 10, stack.stop),
        "kill_worker": lambda: restart_worker_later(1),
        "kill_redis": kill_redis,
        "kill_model_server": kill_model_server,
    }
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.wait_serving(90)
        with RecommendLoad(api_port, threads=2) as load:
            started = time.monotonic()
            paced.start()
            threads = []
            for moment, kind in plan:
                time.sleep(max(0.0, started + moment - time.monotonic()))
                print(f"{time.monotonic() - started:5.1f}s fault: {kind}")
                thread = threading.Thread(target=actions[kind], name=kind)
                thread.start()
                threads.append(thread)
            for thread in threads:
                thread.join(timeout=120)
            paced.assert_all_delivered(timeout_s=240)
        try:
            assert_features_match(
                streams,
                frame,
                timeout_s=180,
                while_waiting=lambda: [worker.restart_after_watchdog_exit() for worker in workers],
            )
        except BaseException:
            for worker in workers:  # each live worker logs its asyncio tasks (what waits, on what)
                worker.dump_state()
            raise
        assert load.errors == [], load.errors[:5]
        assert load.unmarked_fallbacks == 0
        for worker in workers:
            assert worker.alive(), worker.log_tail(60)
            gaps = worker.metric("streams_offset_gaps_open") + worker.metric("streams_offset_gaps_abandoned_total")
            assert gaps == 0, worker.log_tail(80)
    finally:
        for worker in workers:
            if worker.process is not None:
                worker.stop()
        api.stop(0)
        model_server.stop()
