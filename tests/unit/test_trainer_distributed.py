"""The pieces of ``streamrec train --workers N`` that need no cluster: the worker cluster and its
TF_CONFIG, the settings and flags that name it, how a global batch is cut into shards, the loss of a
shard, and the local launcher's failure handling. Two real workers training together are
``tests/integration/test_trainer_distributed.py``."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from online_trainer.cli import trainer_settings
from online_trainer.distributed import (
    WorkerCluster,
    cluster_from_tf_config,
    configured_cluster,
    run_local_workers,
    shard_steps,
)
from online_trainer.losses import full_catalog_loss, in_batch_softmax_loss
from online_trainer.publish import stop_at
from online_trainer.settings import TrainerTuning
from streamrec.core.errors import SettingsError

# -- the cluster and its TF_CONFIG -------------------------------------------------------------


def test_tf_config_names_every_worker_and_this_ones_index() -> None:
    cluster = WorkerCluster.from_hosts(["trainer-0.internal:2222", " trainer-1.internal:2222 "], 1)
    assert cluster.tf_config() == {
        "cluster": {"worker": ["trainer-0.internal:2222", "trainer-1.internal:2222"]},
        "task": {"type": "worker", "index": 1},
    }
    assert cluster.workers == 2 and not cluster.is_chief
    assert WorkerCluster.from_tf_config(cluster.tf_config()) == cluster


def test_a_tf_config_chief_job_becomes_worker_zero() -> None:
    tf_config = {
        "cluster": {"chief": ["a:1"], "worker": ["b:2", "c:3"]},
        "task": {"type": "worker", "index": 1},
    }
    cluster = WorkerCluster.from_tf_config(tf_config)
    assert cluster.hosts == ("a:1", "b:2", "c:3") and cluster.task_index == 2
    chief = WorkerCluster.from_tf_config({**tf_config, "task": {"type": "chief", "index": 0}})
    assert chief.task_index == 0 and chief.is_chief


@pytest.mark.parametrize(
    ("tf_config", "message"),
    [
        ({"cluster": {"worker": ["a:1", "b:2"], "ps": ["c:3"]}, "task": {"type": "worker", "index": 0}}, "'ps'"),
        ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "evaluator", "index": 0}}, "evaluator"),
        ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}, "--task-index 2"),
        ({"cluster": {"worker": ["a:1", "a:1"]}, "task": {"type": "worker", "index": 0}}, "must differ"),
        ({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}, "at least two"),
        ({"cluster": {"worker": ["a", "b:2"]}, "task": {"type": "worker", "index": 0}}, "not host:port"),
    ],
)
def test_a_bad_cluster_is_refused_naming_the_problem(tf_config: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        WorkerCluster.from_tf_config(tf_config)


def test_the_tf_config_variable_is_read_by_tensorflows_resolver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert configured_cluster(TrainerTuning()) is None  # the default: one worker, no tf.distribute
    config = '{"cluster": {"worker": ["w0:2222", "w1:2222"]}, "task": {"type": "worker", "index": 1}}'
    monkeypatch.setenv("TF_CONFIG", config)
    assert cluster_from_tf_config() == WorkerCluster(("w0:2222", "w1:2222"), 1)
    assert configured_cluster(TrainerTuning()) == WorkerCluster(("w0:2222", "w1:2222"), 1)
    # the settings win over TF_CONFIG
    assert configured_cluster(TrainerTuning(worker_hosts="a:1,b:2")) == WorkerCluster(("a:1", "b:2"), 0)
    monkeypatch.setenv("TF_CONFIG", '{"cluster": {"worker": ["w0:2222"]}, "task": {"type": "worker", "index": 0}}')
    assert cluster_from_tf_config() is None  # one task is no cluster


# -- settings and flags ------------------------------------------------------------------------


def test_worker_hosts_are_normalized_and_checked_against_the_task_index() -> None:
    tuning = TrainerTuning(worker_hosts=" h0:2222, h1:02222 ,", task_index=1)
    assert tuning.worker_hosts == "h0:2222,h1:2222" and tuning.worker_host_list == ("h0:2222", "h1:2222")
    assert TrainerTuning().worker_host_list == ()
    with pytest.raises(ValueError, match="task_index 2 is not one of the 2"):
        TrainerTuning(worker_hosts="h0:1,h1:2", task_index=2)
    with pytest.raises(ValueError, match="names one worker"):
        TrainerTuning(worker_hosts="h0:1")
    with pytest.raises(ValueError, match="workers = 3 but worker_hosts names 2"):
        TrainerTuning(worker_hosts="h0:1,h1:2", workers=3)
    with pytest.raises(ValueError, match="not host:port"):
        TrainerTuning(worker_hosts="h0:1,h1:99999")


def test_a_bad_flag_is_a_settings_error_naming_the_option(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingsError, match="worker_hosts.*not host:port"):
        trainer_settings(worker_hosts="h0,h1:2")
    with pytest.raises(SettingsError, match="workers: Input should be greater than or equal to 1"):
        trainer_settings(workers=0)


# -- shards of a global batch ------------------------------------------------------------------


def test_each_global_batch_is_cut_into_contiguous_shards_in_the_same_number_of_steps() -> None:
    permutation = np.array([7, 2, 9, 0, 4, 1, 8, 3, 6, 5])
    steps = {task: list(shard_steps(permutation, 4, 3, task)) for task in range(3)}
    assert [shard.tolist() for shard, _ in steps[0]] == [[7, 2], [4, 1], [6]]
    assert [shard.tolist() for shard, _ in steps[1]] == [[9], [8], [5]]
    assert [shard.tolist() for shard, _ in steps[2]] == [[0], [3], []]  # the short last batch leaves one empty
    assert [rows.tolist() for _, rows in steps[2]] == [[7, 2, 9, 0], [4, 1, 8, 3], [6, 5]]
    learned = np.concatenate([shard for task in range(3) for shard, _ in steps[task]])
    assert sorted(learned.tolist()) == list(range(10))  # every row once per epoch


def test_shard_losses_with_the_global_denominator_sum_to_the_global_batch_loss() -> None:
    rng = np.random.default_rng(0)
    query = tf.constant(rng.normal(size=(6, 4)), dtype=tf.float32)
    catalog = tf.constant(rng.normal(size=(5, 4)), dtype=tf.float32)
    rows = tf.constant([0, 3, -1, 1, 4, 2], dtype=tf.int64)  # one positive not in the catalog
    weights = tf.constant([1.0, 2.0, 1.0, 0.5, 1.0, 1.0])
    whole = full_catalog_loss(query, catalog, rows, temperature=0.5, weights=weights)
    halves = [
        full_catalog_loss(query[s], catalog, rows[s], temperature=0.5, weights=weights[s], denominator=tf.constant(5.0))
        for s in (slice(0, 3), slice(3, 6))
    ]
    assert float(sum(halves)) == pytest.approx(float(whole), rel=1e-6)
    empty = full_catalog_loss(query[:0], catalog, rows[:0], temperature=0.5, denominator=tf.constant(5.0))
    assert float(empty) == 0.0  # a worker with no rows in the last batch adds nothing
    # in-batch: each shard's rows against its own candidates, summed over the global batch's size
    shard = in_batch_softmax_loss(query[:3], query[:3], temperature=1.0, denominator=tf.constant(6.0))
    assert float(shard) == pytest.approx(float(in_batch_softmax_loss(query[:3], query[:3], temperature=1.0)) / 2)


# -- the local launcher and the fault hook -----------------------------------------------------


def test_a_failing_worker_fails_the_run_and_none_is_left_running() -> None:
    # --epochs 0 is refused by each worker's settings before it joins the cluster
    assert run_local_workers(["--until", "0", "--epochs", "0"], 2, poll_s=0.1) == 2


def test_stop_at_accepts_only_publish_steps() -> None:
    with pytest.raises(ValueError, match="unknown publish step 'renamed'"):
        stop_at("renamed")
    stop_at("revealed")("staged")  # another step: nothing happens
