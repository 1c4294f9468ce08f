"""A bounded hyperparameter search for the bootstrap model (``online_trainer.tuning``), as a benchmark.

The search ``streamrec tune --until T`` runs, on the dataset's own frames instead of a feature
repo (no Redis needed; these are the rows Feast's join returns before any stream push was
logged, the bootstrap's fallback): the examples up to ``--until``, the newest
``trainer.holdout_size`` held out in time order, every trial a bootstrap of ``--epochs`` epochs
scored by the gate's hit@10 on that hold-out. Trial 1 is ModelConfig's own values, the baseline.

Writes ``bench/results/tuning-<dataset>.json`` in the layout of the other results (figures
``tuning.*``) with every trial under ``trials`` and as a table in ``notes``; it does not rebuild
BENCHMARKS.md (``--render`` does, through ``bench.common.render_benchmarks_md``).

Run: ``.venv/bin/python -m bench.tuning_search --max-trials 8 --epochs 2`` (``--no-write`` to try it).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

from bench.common import write_result
from online_trainer import tuning
from online_trainer.cli import parse_until
from online_trainer.settings import SEARCHED, HyperparameterSearch, TrainerTuning
from streamrec.datasets.description import load_dataset


def trials_table(result: tuning.SearchResult) -> str:
    """The trials as a markdown table, best marked."""
    best = result.best.trial
    lines = [
        f"| trial | {' | '.join(SEARCHED)} | hit@{result.k} | ndcg@{result.k} | loss | seconds |",
        "|---" * (len(SEARCHED) + 5) + "|",
    ]
    for record in result.trials:
        values = " | ".join(f"{record.values[name]:g}" for name in SEARCHED)
        if record.metric is None:
            lines.append(f"| {record.trial} | {values} | failed | | | {record.seconds:.1f} |")
            continue
        mark = " (best)" if record.trial == best else ""
        loss = "n/a" if record.loss is None else f"{record.loss:.3f}"
        lines.append(
            f"| {record.trial}{mark} | {values} | {record.metric:.4f} | {record.ndcg or 0.0:.4f} | {loss} "
            f"| {record.seconds:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="ml-100k", help="preset or path (streamrec.datasets.description)")
    parser.add_argument("--until", default="1998-01-02T00:00:00Z", help="the bootstrap's cut-off (README's)")
    parser.add_argument("--max-trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trial")
    parser.add_argument("--sample-users", type=int, default=None, help="search on this many users (default all)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print the trials, do not write bench/results")
    parser.add_argument("--render", action="store_true", help="also rebuild BENCHMARKS.md from bench/results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    search = HyperparameterSearch(max_trials=args.max_trials, epochs=args.epochs, seed=args.seed)
    tuning_settings = TrainerTuning(search=search)
    dataset = load_dataset(args.dataset)
    print(dataset.summary())
    until = parse_until(args.until)
    data = tuning.data_from_frames(dataset, until.to_pydatetime(), tuning_settings, users=args.sample_users)
    print(f"tuning on {data.description}")
    k = tuning_settings.gate_k
    started = time.perf_counter()
    result = tuning.run_search(
        data,
        search,
        k=k,
        directory=Path("/tmp") / "streamrec-bench-tuning",  # noqa: S108  # keras-tuner's scratch state
        kind_weights=tuning_settings.kind_weights,
        on_trial=lambda record: print(tuning.trial_line(record, search.max_trials, f"hit@{k}"), flush=True),
    )
    elapsed = time.perf_counter() - started
    table = trials_table(result)
    print(table)
    done = [record for record in result.trials if record.metric is not None]
    best, baseline = result.best, result.trials[0]
    metrics: dict[str, float] = {
        f"tuning.best_hit_at_{k}": float(best.metric or 0.0),
        f"tuning.best_ndcg_at_{k}": float(best.ndcg or 0.0),
        "tuning.trials": float(len(result.trials)),
        "tuning.search_s": elapsed,
        "tuning.trial_s_median": statistics.median(record.seconds for record in done),
    }
    if baseline.metric is not None:
        metrics[f"tuning.default_hit_at_{k}"] = baseline.metric
    units = {name: "s" if name.endswith("_s") or "_s_" in name else "" for name in metrics}
    units["tuning.trials"] = "trials"
    notes = (
        f"Random search (keras-tuner RandomSearch, seed {search.seed}) of {len(result.trials)} trials, "
        f"{search.epochs} epoch(s) each, on {data.description} up to {until.isoformat()}; metric: the gate's "
        f"hit@{k} on the time-ordered hold-out (NDCG@{k} beside it). Trial 1 is ModelConfig's values "
        f"(tuning.default_hit_at_{k}); `streamrec train` trains ModelConfig.epochs epochs, so these figures "
        f"compare configurations at an equal, short budget rather than predict the published model's.\n\n{table}"
    )
    if args.no_write:
        return
    name = "tuning-ml100k" if dataset.name == "ml-100k" else f"tuning-{dataset.name}"
    path = write_result(
        name,
        metrics,
        units,
        targets={},
        command=" ".join(["python -m bench.tuning_search", *sys.argv[1:]]),
        notes=notes,
        extra={"trials": result.to_json()["trials"], "best_values": best.values},
        render=args.render,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
