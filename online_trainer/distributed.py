"""``streamrec train --workers N``: the bootstrap's training under ``tf.distribute``.

Synchronous data parallelism with ``tf.distribute.MultiWorkerMirroredStrategy``: every worker holds
a copy of the model, steps through its shard of each global batch and the gradients are summed
across the workers (gRPC collective ops, RING on CPU) before each update, so all copies stay equal.

* **The cluster** (:class:`WorkerCluster`): every worker's ``host:port``, the chief (worker 0) first,
  and this process's index; the TF_CONFIG TensorFlow documents is :meth:`WorkerCluster.tf_config`.
  It comes from ``trainer.worker_hosts`` + ``trainer.task_index`` (``--worker-hosts``/``--task-index``,
  one command per machine), else from a ``TF_CONFIG`` variable read by TensorFlow's own resolver
  (:func:`cluster_from_tf_config`), else ``trainer.workers`` > 1 starts that many local worker
  processes on free localhost ports (:func:`run_local_workers`).
* **The data**: each worker builds the same example frame (the same Feast join over the same
  feature repo), then :func:`shard_steps` gives it its contiguous share of each global batch of
  ``ModelConfig.batch_size`` rows. Every worker draws the same permutation, so the global batches,
  the epochs and the loss (divided by the global batch's count, ``losses``' ``denominator``) are the
  one-worker run's: only the order of floating-point sums differs.
* **The result**: training ends on every worker with the same weights. Only the chief stages, gates,
  checkpoints and publishes, from a plain copy of the model built outside the strategy
  (``model_state.copy_model``): the SavedModel is the one-worker graph, and no save needs the other
  workers, so they write nothing (TF's "non-chief workers save to temporary directories" applies to
  saving distributed variables, which this never does). :meth:`Distribution.agree` then tells every
  worker the chief's outcome, so all exit together and with the same status.
* **Failures**: TensorFlow's coordination service (hosted by the chief) watches every worker's
  heartbeat; when one dies the others' collective ops fail within seconds (UnavailableError), on
  one machine or several. :func:`run_local_workers` also stops the local workers when one exits.

With one worker nothing here runs: ``streamrec train`` trains exactly as before.
See docs/design/trainer.md#distributed-bootstrap.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from online_trainer.settings import TrainerTuning, worker_address
from streamrec.core.errors import SettingsError, StreamrecError

log = logging.getLogger(__name__)
JOB = "worker"
TF_CONFIG_CHIEF = "chief"  # a TF_CONFIG may name its chief as a job of its own


def parse_host(text: str) -> str:
    """``host:port`` (a port 1-65535), stripped (``settings.worker_address``); SettingsError otherwise."""
    try:
        return worker_address(text)
    except ValueError as exc:
        raise SettingsError(str(exc)) from exc


@dataclass(frozen=True)
class WorkerCluster:
    """The workers of one distributed ``streamrec train`` run and this process's place among them."""

    hosts: tuple[str, ...]  # every worker's host:port, the chief first; the same list on every worker
    task_index: int

    def __post_init__(self) -> None:
        if len(self.hosts) < 2:
            raise SettingsError(f"a worker cluster needs at least two workers, got {list(self.hosts)}")
        if len(set(self.hosts)) != len(self.hosts):
            raise SettingsError(f"worker addresses must differ, got {list(self.hosts)}")
        if not 0 <= self.task_index < len(self.hosts):
            raise SettingsError(
                f"--task-index {self.task_index} is not one of the {len(self.hosts)} workers (0..{len(self.hosts) - 1})"
            )

    @classmethod
    def from_hosts(cls, hosts: Sequence[str], task_index: int) -> WorkerCluster:
        return cls(tuple(parse_host(host) for host in hosts), task_index)

    @property
    def workers(self) -> int:
        return len(self.hosts)

    @property
    def is_chief(self) -> bool:
        return self.task_index == 0

    def tf_config(self) -> dict[str, Any]:
        """TensorFlow's TF_CONFIG for this worker (what the strategy is built from)."""
        return {"cluster": {JOB: list(self.hosts)}, "task": {"type": JOB, "index": self.task_index}}

    @classmethod
    def from_tf_config(cls, tf_config: Mapping[str, Any]) -> WorkerCluster:
        """A TF_CONFIG's cluster: its ``chief`` job (if any) first, then its ``worker`` job."""
        cluster, task = tf_config.get("cluster") or {}, tf_config.get("task") or {}
        unknown = sorted(set(cluster) - {TF_CONFIG_CHIEF, JOB})
        if unknown:
            raise SettingsError(
                f"TF_CONFIG names jobs {unknown}; streamrec train runs only 'chief' and 'worker' tasks "
                "(no parameter servers, no evaluator)"
            )
        chiefs, workers = list(cluster.get(TF_CONFIG_CHIEF, [])), list(cluster.get(JOB, []))
        kind, index = task.get("type"), task.get("index", 0)
        if kind not in (TF_CONFIG_CHIEF, JOB) or not isinstance(index, int):
            raise SettingsError(f"TF_CONFIG task {task!r} is not {{'type': 'chief' or 'worker', 'index': N}}")
        return cls.from_hosts([*chiefs, *workers], index if kind == TF_CONFIG_CHIEF else len(chiefs) + index)


def cluster_from_tf_config() -> WorkerCluster | None:
    """The cluster of a ``TF_CONFIG`` variable, read by TensorFlow's resolver (None when unset or one task)."""
    import tensorflow as tf

    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    spec = resolver.cluster_spec().as_dict()
    if sum(len(tasks) for tasks in spec.values()) < 2:
        return None
    spec = {job: list(tasks.values()) if isinstance(tasks, dict) else list(tasks) for job, tasks in spec.items()}
    task = {"type": resolver.task_type, "index": resolver.task_id}
    return WorkerCluster.from_tf_config({"cluster": spec, "task": task})


def strategy_for(cluster: WorkerCluster) -> Any:
    """``MultiWorkerMirroredStrategy`` over ``cluster``; call it before any other TensorFlow op runs.

    TensorFlow configures collective ops when its context starts, so a strategy made after the
    first tensor fails. It starts this worker's gRPC server and waits for the others to connect.
    """
    import tensorflow as tf

    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({JOB: list(cluster.hosts)}), task_type=JOB, task_id=cluster.task_index, rpc_layer="grpc"
    )
    options = tf.distribute.experimental.CommunicationOptions(
        implementation=tf.distribute.experimental.CommunicationImplementation.AUTO  # RING on CPU, NCCL on GPUs
    )
    return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver, communication_options=options)


CHIEF_FAILED = -1  # what the chief tells the others when publishing raised


class DistributedTrainingError(StreamrecError):
    """Another worker of a distributed run failed; its own log says why."""


@dataclass(frozen=True)
class Distribution:
    """This worker's cluster and the strategy over it (:func:`start`)."""

    cluster: WorkerCluster
    strategy: Any

    def agree(self, value: int) -> int:
        """The chief's ``value`` on every worker (a collective sum where the others add 0).

        Also a barrier: no worker leaves before the chief has published, so none tears the
        collective group down while the chief still needs it. A worker told :data:`CHIEF_FAILED`
        raises :class:`DistributedTrainingError`.
        """
        import tensorflow as tf

        mine = tf.constant(value if self.cluster.is_chief else 0, dtype=tf.int64)

        @tf.function  # type: ignore[untyped-decorator]  # tf.function has no type hints
        def everyone() -> Any:
            per_worker = self.strategy.run(lambda: tf.identity(mine))
            return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_worker, axis=None)

        agreed = int(everyone())
        if agreed == CHIEF_FAILED and not self.cluster.is_chief:
            raise DistributedTrainingError(f"the chief ({self.cluster.hosts[0]}) failed to publish; see its log")
        return agreed

    def lineage(self, global_batch: int) -> dict[str, Any]:
        """What a version's lineage records about the run that trained it."""
        return {
            "strategy": "MultiWorkerMirroredStrategy",
            "workers": self.cluster.workers,
            "hosts": list(self.cluster.hosts),
            "global_batch": global_batch,
        }


def start(cluster: WorkerCluster) -> Distribution:
    """Join ``cluster`` (:func:`strategy_for`); call it before any other TensorFlow op runs."""
    log.info("worker %d of %d joins %s", cluster.task_index, cluster.workers, ", ".join(cluster.hosts))
    return Distribution(cluster, strategy_for(cluster))


def configured_cluster(tuning: TrainerTuning) -> WorkerCluster | None:
    """This process's cluster: ``trainer.worker_hosts`` + ``task_index``, else a ``TF_CONFIG``'s; None: one worker.

    ``trainer.workers`` > 1 without hosts is not a cluster yet: :func:`run_local_workers` makes one.
    """
    if tuning.worker_hosts:
        return WorkerCluster.from_hosts(tuning.worker_host_list, tuning.task_index)
    return cluster_from_tf_config()


def shard_steps(
    permutation: np.ndarray, batch_size: int, workers: int, task_index: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Per global batch of ``batch_size`` rows of ``permutation``: (this worker's rows, the batch's rows).

    The batch is cut into ``workers`` contiguous parts as even as possible (``np.array_split``);
    every worker gets the same number of steps, even when the last, short batch leaves one empty.
    """
    for start in range(0, len(permutation), batch_size):
        rows = permutation[start : start + batch_size]
        yield np.array_split(rows, workers)[task_index], rows


# -- local workers ----------------------------------------------------------------------------


def free_local_hosts(count: int) -> list[str]:
    """``localhost:<port>`` for ``count`` ports free now (bound all at once, so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [f"localhost:{sock.getsockname()[1]}" for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def worker_command(train_args: Sequence[str], hosts: Sequence[str], task_index: int) -> list[str]:
    """The ``streamrec train`` command line of one worker of ``hosts`` (the module's own entry point)."""
    return [
        sys.executable,
        "-m",
        "online_trainer.cli",
        "train",
        *train_args,
        "--worker-hosts",
        ",".join(hosts),
        "--task-index",
        str(task_index),
    ]


def run_local_workers(train_args: Sequence[str], workers: int, *, poll_s: float = 0.5) -> int:
    """Run ``workers`` local processes of ``streamrec train <train_args>`` as one cluster; the chief's status.

    Every worker inherits this environment (its ``STREAMREC_*`` settings) and output. When one fails,
    the others are stopped: a worker whose peer died would otherwise wait in a collective op. SIGINT
    and SIGTERM stop all of them.
    """
    hosts = free_local_hosts(workers)
    log.info("starting %d local workers: %s (worker 0 is the chief)", workers, ", ".join(hosts))
    processes = [
        subprocess.Popen(worker_command(train_args, hosts, index))  # noqa: S603  # our own module, our arguments
        for index in range(workers)
    ]
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}

    def stop_all(*_: object) -> None:
        for process in processes:
            if process.poll() is None:
                process.terminate()

    for signum in previous:
        signal.signal(signum, stop_all)
    try:
        while any(process.poll() is None for process in processes):
            failed = [(index, process.returncode) for index, process in enumerate(processes) if process.returncode]
            if failed:
                log.error("worker %d exited with status %d; stopping the others", *failed[0])
                stop_all()
                break
            time.sleep(poll_s)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    statuses = [process.returncode for process in processes]
    log.info("workers exited with %s", statuses)
    return next((status for status in statuses if status != 0), 0)  # the chief's failure first
