"""Quality of the bootstrap trained by two workers under ``tf.distribute`` against one worker.

``streamrec train --workers N`` (``online_trainer/distributed.py``) keeps the one-worker global
batch and epochs and splits each batch between the workers, so it should learn the same model. This
measures that on ``bench/offline_quality.py``'s protocol (RecBole's RS 80/10/10 split by user, full
ranking, seen items masked; the model without sequential features) with a fixed number of epochs
(``--epochs``, default the bootstrap's ``ModelConfig.epochs``): for each seed, one run in one
process and one run of two local worker processes under ``MultiWorkerMirroredStrategy`` (gRPC
collectives on localhost), the same seed and data. Reported: test Recall/NDCG/Hit@10 of each, their
difference (two workers minus one) against the seed-to-seed spread of one worker (the noise), and
the largest difference between the two runs' weights.

Every run is a child process (``--task-index`` is how a child knows it is one); the timings say
nothing about speed-up on a shared 2-core machine, where two workers split the same two cores.

Run: ``.venv/bin/python -m bench.distributed_training`` (``--help``; ``--no-write`` to try it).
The result goes to ``bench/results/distributed-training.json`` (``distributed-training-<name>.json``
for another ``--dataset``); BENCHMARKS.md is not rebuilt here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from statistics import mean, pstdev
from typing import Any

import numpy as np
import pandas as pd

from bench.common import RESULTS_DIR, commit, machine
from bench.offline_quality import Evaluator, K, prepare
from online_trainer.distributed import WorkerCluster, free_local_hosts, start
from online_trainer.model import build_model
from online_trainer.model_config import ModelConfig
from online_trainer.model_state import copy_model, weights_by_path
from online_trainer.training import train
from streamrec.datasets.description import load_dataset

WORKER_COUNTS = (1, 2)
FIGURES = ("recall_at_10", "ndcg_at_10", "hit_at_10")


def run_one(args: argparse.Namespace) -> None:
    """One worker of one run (a child process): train, and on the chief evaluate and write ``--output``."""
    hosts = [host for host in args.worker_hosts.split(",") if host]
    cluster = WorkerCluster.from_hosts(hosts, args.task_index) if hosts else None
    distribution = start(cluster) if cluster is not None else None  # before any TensorFlow op
    setup = prepare(load_dataset(args.dataset), args.seed)
    config = dataclasses.replace(  # bench/offline_quality.py's model: ids and attributes, no sequence
        ModelConfig(attributes=setup.schema),
        use_recent_items=False,
        use_last_item=False,
        use_counts=False,
        seed=args.seed,
    )
    strategy = distribution.strategy if distribution is not None else None
    with strategy.scope() if strategy is not None else nullcontext():
        model = build_model(setup.catalog, config)
    stats = train(model, setup.examples, epochs=args.epochs, progress=False, strategy=strategy)
    if distribution is not None:
        model = copy_model(model)
        if not distribution.cluster.is_chief:
            distribution.agree(0)
            return
    test = Evaluator(setup.catalog, setup.users, pd.concat([setup.train_rows, setup.valid_rows]), setup.test_rows)
    result = test.evaluate(test.model_scores(model))
    output = Path(args.output)
    weights: dict[str, Any] = {name.replace("/", "|"): value for name, value in weights_by_path(model).items()}
    np.savez(output.with_suffix(".npz"), **weights)
    payload = {**result.as_dict(K), "loss": stats["loss"], "examples_per_s": stats["examples_per_s"]}
    output.write_text(json.dumps(payload))
    if distribution is not None:
        distribution.agree(1)


def run(dataset: str, seed: int, epochs: int, workers: int, scratch: Path) -> tuple[dict[str, float], Path]:
    """One run of ``workers`` child processes; the chief's figures and its weights file."""
    output = scratch / f"seed{seed}-w{workers}.json"
    hosts = ",".join(free_local_hosts(workers)) if workers > 1 else ""
    children = [
        subprocess.Popen(  # noqa: S603  # this module, our arguments
            [sys.executable, "-m", "bench.distributed_training", "--dataset", dataset, "--seed", str(seed)]
            + ["--epochs", str(epochs), "--worker-hosts", hosts, "--task-index", str(index), "--output", str(output)]
        )
        for index in range(workers)
    ]
    statuses = [child.wait() for child in children]
    if any(statuses):
        raise SystemExit(f"seed {seed}, {workers} worker(s): the workers exited with {statuses}")
    return json.loads(output.read_text()), output.with_suffix(".npz")


def largest_weight_difference(one: Path, other: Path) -> float:
    first, second = np.load(one), np.load(other)
    return max(float(np.abs(first[name] - second[name]).max()) for name in first.files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k", help="preset or path (streamrec.datasets.description)")
    parser.add_argument("--seeds", default="2020,2021,2022", help="comma-separated; one pair of runs per seed")
    parser.add_argument("--epochs", type=int, default=4, help="fixed epochs (the bootstrap's ModelConfig.epochs)")
    parser.add_argument("--no-write", action="store_true", help="print the figures, do not write bench/results")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # a child's own run
    parser.add_argument("--worker-hosts", default="", help=argparse.SUPPRESS)
    parser.add_argument("--task-index", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.task_index is not None:
        run_one(args)
        return

    seeds = [int(seed) for seed in args.seeds.split(",")]
    started = time.perf_counter()
    runs: dict[int, list[dict[str, float]]] = {workers: [] for workers in WORKER_COUNTS}
    weight_differences: list[float] = []
    with tempfile.TemporaryDirectory(prefix="distributed-bench-") as scratch:
        for seed in seeds:
            weights: dict[int, Path] = {}
            for workers in WORKER_COUNTS:
                figures, weights[workers] = run(args.dataset, seed, args.epochs, workers, Path(scratch))
                runs[workers].append(figures)
                print(f"seed {seed}, {workers} worker(s): " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()))
            weight_differences.append(largest_weight_difference(weights[1], weights[2]))

    metrics: dict[str, float] = {}
    for figure in FIGURES:
        one, two = ([run[figure] for run in runs[workers]] for workers in WORKER_COUNTS)
        differences = [b - a for a, b in zip(one, two, strict=True)]
        metrics[f"distributed.{figure}_1w"] = mean(one)
        metrics[f"distributed.{figure}_2w"] = mean(two)
        metrics[f"distributed.{figure}_diff"] = mean(differences)
        metrics[f"distributed.{figure}_max_abs_diff"] = max(abs(d) for d in differences)
        metrics[f"distributed.{figure}_seed_std_1w"] = pstdev(one)
    metrics["distributed.max_weight_diff"] = max(weight_differences)
    for workers in WORKER_COUNTS:
        metrics[f"distributed.examples_per_s_{workers}w"] = mean(run["examples_per_s"] for run in runs[workers])
    units = {
        name: "examples/s" if "examples_per_s" in name else "abs" if name.endswith("weight_diff") else "fraction"
        for name in metrics
    }
    notes = (
        f"{args.dataset}, bench/offline_quality.py's protocol (RecBole RS 80/10/10 by user, full ranking, seen items "
        f"masked), model without sequential features, full-catalog softmax, global batch "
        f"{ModelConfig.batch_size}, {args.epochs} epochs fixed; seeds {seeds}. 1w: one process; 2w: two local worker "
        "processes under MultiWorkerMirroredStrategy (gRPC collectives on localhost), each training on half of "
        "every global batch, the same seed and data. _diff = 2w - 1w (mean over seeds), against _seed_std_1w, the "
        "spread of one worker over the seeds (the noise). max_weight_diff: the largest weight difference of the two "
        "runs of one seed. examples/s on a shared 2-core machine, two workers on the same two cores: not a "
        f"speed-up figure. {time.perf_counter() - started:.0f} s in all."
    )
    for name, value in metrics.items():
        print(f"{name:44s} {value:>12,.4g} {units[name]}")
    if args.no_write:
        return
    name = "distributed-training" if args.dataset == "ml-100k" else f"distributed-training-{args.dataset.split(':')[0]}"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload: dict[str, Any] = {
        "benchmark": name,
        "commit": commit(),
        "machine": machine(),
        "metrics": metrics,
        "units": units,
        "targets": {"distributed.ndcg_at_10_max_abs_diff": "<= 0.005"},
        "command": " ".join([".venv/bin/python -m bench.distributed_training", *sys.argv[1:]]),
        "notes": notes,
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
