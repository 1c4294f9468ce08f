"""Prequential (test-then-learn) quality: a frozen model against the online trainer (any ``--dataset``).

Protocol (``--dataset``: a ``streamrec.datasets.description.load_dataset`` spec, default ml-100k):

1. Order all interactions by time; every event moves its user's features, the trainer's
   ``positive_kinds`` are the examples (all of them by default), weighted by ``kind_weights``.
   The first ``--bootstrap-fraction`` (30 %) of the examples trains the bootstrap model
   (point-in-time features from ``examples_from_interactions``: declared user attributes, recent
   items, counts), and seeds the replay buffer, as ``streamrec train`` does.
2. The rest is cut into intervals of ``--chunk-size`` consecutive events. For each interval,
   *before* either model has seen it, its events are tested (all of them, or a seeded sample of
   ``--test-per-chunk``): is the true item in the model's top 10 over the whole catalog, for the
   user's features as of just before the event, with the items the user learned from earlier
   excluded (ml-100k users rate a movie once)?
3. Then the online model learns the interval with the trainer's own code and settings
   (``TrainerSettings().trainer``, so ``STREAMREC_TRAINER__*`` variables change both):
   :func:`online_trainer.finetune.plan_interval` (hold-out, the previous interval's deferred
   hold-out, replay sample) and :func:`online_trainer.finetune.finetune` (a clone of the current
   weights and Adam state, fine-tuned), then the gate's in-memory check
   (:func:`online_trainer.gate.check_model`, ``gate_k``/``gate_margin``/``gate_alpha``): a candidate replaces the
   online model only if it passes, as in ``streamrec trainer``. The export checks of the gate are
   skipped (they check the artifact, not the quality). The frozen model never changes.

Figures: hit@10 of each model over all tested events (``prequential.hit_at_10_frozen`` /
``prequential.hit_at_10_online``), their ratio, and a 95 % interval of the ratio from a bootstrap
over intervals (intervals resampled with replacement; paired: both models on the same events).
Beside them, the "most popular so far" baseline on the same events (``hit_at_10_popularity``:
items ranked by how often they were learned from before the interval, the user's earlier items
excluded): a model that loses to it is not ready to serve, so both models' ratios to it are
recorded with a target of at least 1.

``--serve-lag N`` tests each interval on the online model as it was N intervals earlier: what
serving an older version costs (the loop's ``stable`` is as old as its last promotion).

Run: ``.venv/bin/python -m bench.prequential`` (``--help``; ``--no-write`` to try it without
touching bench/results).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import deque

import numpy as np
import pandas as pd
from tqdm import tqdm

from bench.common import write_result
from online_trainer.buffer import ReplayBuffer
from online_trainer.catalog import ItemCatalog
from online_trainer.examples import empty_examples, examples_from_interactions, positive_examples
from online_trainer.finetune import finetune, plan_interval
from online_trainer.gate import GateResult, check_model
from online_trainer.inference import recommend
from online_trainer.model import TwoTowerModel, build_model
from online_trainer.model_config import ModelConfig
from online_trainer.model_state import clone_for_finetune
from online_trainer.settings import TrainerSettings, TrainerTuning
from online_trainer.training import train
from streamrec.datasets.description import Dataset, load_dataset

K = 10


def seen_before(examples: pd.DataFrame) -> list[list[str]]:
    """For each example (time order), every item its user interacted with earlier."""
    history: dict[str, list[str]] = {}
    seen: list[list[str]] = []
    for user, item in zip(examples["user_id"], examples["item_id"], strict=True):
        items = history.setdefault(user, [])
        seen.append(list(items))
        items.append(item)
    return seen


def hits(model: TwoTowerModel, tested: pd.DataFrame, exclude: list[list[str]]) -> np.ndarray:
    ids, _ = recommend(model, tested, k=K, exclude=exclude)
    return np.asarray([truth in row for truth, row in zip(tested["item_id"], ids, strict=True)], dtype=bool)


class PopularitySoFar:
    """The "most popular so far" baseline: items ranked by how often they were learned from until now."""

    def __init__(self, catalog: ItemCatalog) -> None:
        self._index = catalog.index
        self._counts = np.zeros(len(catalog), dtype=np.int64)
        self._ids = np.asarray(catalog.item_ids, dtype=object)

    def learn(self, examples: pd.DataFrame) -> None:
        rows = [self._index[item] for item in examples["item_id"] if item in self._index]
        np.add.at(self._counts, np.asarray(rows, dtype=np.int64), 1)

    def hits(self, tested: pd.DataFrame, exclude: list[list[str]]) -> np.ndarray:
        """Top ``K`` by count (ties by catalog order) minus the user's earlier items; is the truth in it?"""
        ranked = self._ids[np.argsort(-self._counts, kind="stable")[: K + max(map(len, exclude), default=0)]]
        found = []
        for truth, seen in zip(tested["item_id"], exclude, strict=True):
            excluded = set(seen)
            top = [item for item in ranked if item not in excluded][:K]
            found.append(truth in top)
        return np.asarray(found, dtype=bool)


def prepare(dataset: Dataset, tuning: TrainerTuning) -> tuple[ItemCatalog, pd.DataFrame]:
    """The catalog (item file, else the items seen) and the learned examples in time order."""
    interactions = dataset.interactions
    catalog = ItemCatalog.for_dataset(dataset.items, interactions["item_id"].astype(str), dataset.schema)
    every_kind = examples_from_interactions(interactions, dataset.users, dataset.schema)
    return catalog, positive_examples(every_kind, tuning.positive_kinds)


def ratio_interval(frozen_hits: list[np.ndarray], online_hits: list[np.ndarray], seed: int) -> tuple[float, float]:
    """95 % bootstrap interval of online/frozen hit rate, resampling whole intervals (2,000 draws)."""
    frozen = np.array([h.sum() for h in frozen_hits], dtype=np.float64)
    online = np.array([h.sum() for h in online_hits], dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, len(frozen), size=(2_000, len(frozen)))
    ratios = online[draws].sum(axis=1) / np.maximum(frozen[draws].sum(axis=1), 1.0)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k", help="preset or path (streamrec.datasets.description)")
    parser.add_argument("--bootstrap-fraction", type=float, default=0.3)
    parser.add_argument("--bootstrap-epochs", type=int, default=6)
    parser.add_argument("--chunk-size", type=int, default=1_000, help="events per trainer interval")
    parser.add_argument("--test-per-chunk", type=int, default=0, help="events tested per interval (0: all)")
    parser.add_argument("--max-chunks", type=int, default=0, help="stop after this many intervals (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--serve-lag",
        type=int,
        default=0,
        help="test each interval on the online model as it was this many intervals earlier (what model age costs)",
    )
    parser.add_argument(
        "--bootstrap-loss",
        choices=("in_batch", "full_catalog"),
        default="full_catalog" if ModelConfig().full_catalog else "in_batch",
        help="loss of the frozen model (default: ModelConfig's)",
    )
    parser.add_argument(
        "--result-name", default=None, help="bench/results/<name>.json (default: prequential[-<dataset>])"
    )
    parser.add_argument("--no-write", action="store_true", help="print the figures, do not write bench/results")
    args = parser.parse_args()
    if args.serve_lag < 0:
        parser.error(f"--serve-lag must be 0 or more intervals, got {args.serve_lag}")

    tuning = TrainerSettings().trainer
    dataset = load_dataset(args.dataset)
    print(dataset.summary())
    result_name = args.result_name or ("prequential" if dataset.name == "ml-100k" else f"prequential-{dataset.name}")
    catalog, examples = prepare(dataset, tuning)
    seen = seen_before(examples)
    split = int(len(examples) * args.bootstrap_fraction)
    config = dataclasses.replace(
        ModelConfig(attributes=dataset.schema), seed=args.seed, full_catalog=args.bootstrap_loss == "full_catalog"
    )
    started = time.perf_counter()
    frozen = build_model(catalog, config)
    train(frozen, examples.iloc[:split], epochs=args.bootstrap_epochs, kind_weights=tuning.kind_weights)
    online: TwoTowerModel = clone_for_finetune(frozen)  # what load_for_finetune gives the trainer
    replay = ReplayBuffer(tuning.replay_buffer_size)
    replay.add(examples.iloc[:split])
    popularity = PopularitySoFar(catalog)
    popularity.learn(examples.iloc[:split])
    popularity_hits: list[np.ndarray] = []
    deferred = empty_examples(dataset.schema)
    rng = np.random.default_rng(args.seed)

    starts = list(range(split, len(examples), args.chunk_size))
    if args.max_chunks:
        starts = starts[: args.max_chunks]
    # The online models of the last --serve-lag + 1 intervals, newest last; the oldest is tested.
    recent_models: deque[TwoTowerModel] = deque(maxlen=args.serve_lag + 1)
    frozen_hits: list[np.ndarray] = []
    online_hits: list[np.ndarray] = []
    update_seconds: list[float] = []
    trained_per_update: list[int] = []
    rejected = 0
    with tqdm(starts, desc="intervals", unit="interval") as chunks:
        for step, start in enumerate(chunks):
            chunk = examples.iloc[start : start + args.chunk_size].reset_index(drop=True)
            tested_rows = np.arange(len(chunk))
            if 0 < args.test_per_chunk < len(chunk):
                tested_rows = np.sort(rng.choice(len(chunk), size=args.test_per_chunk, replace=False))
            tested = chunk.iloc[tested_rows]
            exclude = [seen[start + row] for row in tested_rows]
            frozen_hits.append(hits(frozen, tested, exclude))
            recent_models.append(online)
            online_hits.append(hits(recent_models[0], tested, exclude))
            popularity_hits.append(popularity.hits(tested, exclude))
            popularity.learn(chunk)

            update_started = time.perf_counter()
            plan = plan_interval(chunk, deferred=deferred, replay=replay, tuning=tuning, seed=step)
            candidate, _ = finetune(online, plan, tuning)
            replay.add(chunk)
            deferred = plan.deferred
            gate = GateResult()
            check_model(
                gate,
                candidate,
                plan.holdout,
                serving=online,
                k=tuning.gate_k,
                margin=tuning.gate_margin,
                alpha=tuning.gate_alpha,
            )
            if gate.passed:
                online = candidate
            else:
                rejected += 1
            update_seconds.append(time.perf_counter() - update_started)
            trained_per_update.append(len(plan.mix))
            chunks.set_postfix(
                frozen=f"{np.concatenate(frozen_hits).mean():.4f}", online=f"{np.concatenate(online_hits).mean():.4f}"
            )

    frozen_rate = float(np.concatenate(frozen_hits).mean())
    online_rate = float(np.concatenate(online_hits).mean())
    low, high = ratio_interval(frozen_hits, online_hits, args.seed)
    tested_events = int(sum(len(h) for h in frozen_hits))
    popularity_rate = float(np.concatenate(popularity_hits).mean())
    metrics = {
        "prequential.hit_at_10_frozen": frozen_rate,
        "prequential.hit_at_10_online": online_rate,
        "prequential.hit_at_10_popularity": popularity_rate,
        "prequential.frozen_over_popularity": frozen_rate / popularity_rate if popularity_rate else float("nan"),
        "prequential.online_over_popularity": online_rate / popularity_rate if popularity_rate else float("nan"),
        "prequential.online_over_frozen": online_rate / frozen_rate if frozen_rate else float("nan"),
        "prequential.online_over_frozen_ci95_low": low,
        "prequential.online_over_frozen_ci95_high": high,
        "prequential.update_s_median": float(np.median(update_seconds)),
        "prequential.gate_rejections": float(rejected),
    }
    for name, value in metrics.items():
        print(f"{name:42s} {value:.4f}")
    print(f"tested events: {tested_events} in {len(starts)} intervals; total {time.perf_counter() - started:.0f} s")
    if args.no_write:
        return
    lag_note = f" by the online model of {args.serve_lag} intervals earlier" if args.serve_lag else ""
    write_result(
        result_name,
        metrics,
        {
            "prequential.hit_at_10_frozen": "fraction",
            "prequential.hit_at_10_online": "fraction",
            "prequential.hit_at_10_popularity": "fraction",
            "prequential.frozen_over_popularity": "ratio",
            "prequential.online_over_popularity": "ratio",
            "prequential.online_over_frozen": "ratio",
            "prequential.online_over_frozen_ci95_low": "ratio",
            "prequential.online_over_frozen_ci95_high": "ratio",
            "prequential.update_s_median": "s",
            "prequential.gate_rejections": "count",
        },
        targets={
            "prequential.online_over_frozen": ">= 1.2",
            "prequential.frozen_over_popularity": ">= 1",
            "prequential.online_over_popularity": ">= 1",
        },
        command=" ".join([".venv/bin/python -m bench.prequential", *sys.argv[1:]]),
        notes=(
            f"{dataset.name} by time: bootstrap on the first {args.bootstrap_fraction:.0%} ({split} events, "
            f"{args.bootstrap_epochs} epochs), then {len(starts)} trainer intervals of {args.chunk_size} events, "
            f"{tested_events} events tested before learning{lag_note} (top 10 over {len(catalog)} items, "
            f"earlier items of the user excluded; learned kinds {tuning.positive_kinds or 'all'}, kind weights "
            f"{tuning.kind_weights or 'none'}); 95% interval of the ratio from a bootstrap over intervals. "
            f"Online updates use "
            f"online_trainer.finetune with the trainer settings (finetune_loss={tuning.finetune_loss}, "
            f"finetune_epochs={tuning.finetune_epochs}, "
            f"replay_fraction={tuning.replay_fraction}, holdout_size={tuning.holdout_size}, "
            f"finetune lr {config.finetune_learning_rate}, batch {config.finetune_batch_size}; "
            f"median {int(np.median(trained_per_update))} examples per update) and the in-memory gate "
            f"(k={tuning.gate_k}, margin={tuning.gate_margin}, sign test alpha={tuning.gate_alpha}; "
            f"{rejected} rejected)."
        ),
    )


if __name__ == "__main__":
    main()
