"""Prequential (test-then-learn) quality on MovieLens-100K: a frozen model against an online-updated one.

Protocol:

1. Order all ratings by time; the first ``--bootstrap-fraction`` (30 %) trains the bootstrap model
   (point-in-time features from ``examples_from_interactions``: profile, recent items, counts).
2. The rest is cut into chunks of ``--chunk-size`` consecutive events. For each chunk, *before* either
   model has seen it, a seeded sample of ``--test-per-chunk`` of its events is tested: is the true
   item in the model's top 10 over the whole catalog, for the user's features as of just before the
   event, with the items the user rated earlier excluded (ml-100k users rate a movie once)?
3. Then the online model learns the chunk the way the online trainer does when every candidate
   passes its gate: the current weights *and Adam state* (``clone_for_finetune`` once, then the
   same run continued) are fine-tuned at ``finetune_learning_rate`` / ``finetune_batch_size`` on the
   last ``--recent-chunks`` chunks (so each event is learned in that many successive updates, the way
   several epochs would, without overfitting one update to it) plus a uniform replay sample of older
   events (``--replay-ratio`` x chunk size).
   The frozen model never changes.

Chunked updates stand in for per-event learning (the trainer fine-tunes on an interval's events);
testing a sample of each chunk keeps the run to minutes. Figures: hit@10 of each model over all
tested events, ``prequential.hit_at_10_frozen`` / ``prequential.hit_at_10_online``, and their ratio.

Run: ``.venv/bin/python -m bench.prequential`` (``--help``; ``--no-write`` to try it without
touching bench/results).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import numpy as np
import pandas as pd
from tqdm import tqdm

from bench.common import write_result
from online_trainer.catalog import ItemCatalog, examples_from_interactions, user_profiles_from_movielens
from online_trainer.model import ModelConfig, TwoTowerModel, build_model, clone_for_finetune, recommend, train
from streamrec.data import movielens

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap-fraction", type=float, default=0.3)
    parser.add_argument("--bootstrap-epochs", type=int, default=6)
    parser.add_argument("--chunk-size", type=int, default=1_000)
    parser.add_argument("--test-per-chunk", type=int, default=50)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--finetune-learning-rate", type=float, default=ModelConfig.finetune_learning_rate)
    parser.add_argument(
        "--recent-chunks", type=int, default=1, help="each update learns the last N chunks (N = 1: the new one only)"
    )
    parser.add_argument("--replay-ratio", type=float, default=1.0, help="replayed older events per new event")
    parser.add_argument("--max-chunks", type=int, default=0, help="stop after this many chunks (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print the figures, do not write bench/results")
    args = parser.parse_args()

    data = movielens.load()
    catalog = ItemCatalog.from_frame(data.items)
    examples = examples_from_interactions(data.interactions, user_profiles_from_movielens(data.users))
    seen = seen_before(examples)
    split = int(len(examples) * args.bootstrap_fraction)
    config = dataclasses.replace(ModelConfig(), seed=args.seed)
    started = time.perf_counter()
    frozen = build_model(catalog, config)
    train(frozen, examples.iloc[:split], epochs=args.bootstrap_epochs)
    online = clone_for_finetune(frozen, learning_rate=args.finetune_learning_rate)
    rng = np.random.default_rng(args.seed)

    starts = list(range(split, len(examples), args.chunk_size))
    if args.max_chunks:
        starts = starts[: args.max_chunks]
    frozen_hits: list[np.ndarray] = []
    online_hits: list[np.ndarray] = []
    update_seconds: list[float] = []
    with tqdm(starts, desc="chunks", unit="chunk") as chunks:
        for start in chunks:
            chunk = examples.iloc[start : start + args.chunk_size]
            sample = np.sort(rng.choice(len(chunk), size=min(args.test_per_chunk, len(chunk)), replace=False))
            tested = chunk.iloc[sample]
            exclude = [seen[start + row] for row in sample]
            frozen_hits.append(hits(frozen, tested, exclude))
            online_hits.append(hits(online, tested, exclude))

            update_started = time.perf_counter()
            recent_start = max(split, start - (args.recent_chunks - 1) * args.chunk_size)
            recent = examples.iloc[recent_start : start + args.chunk_size]
            replay_size = min(recent_start, int(args.replay_ratio * len(chunk)))
            replay = examples.iloc[rng.choice(recent_start, size=replay_size, replace=False)]
            train(online, pd.concat([recent, replay]), epochs=args.finetune_epochs, progress=False)
            update_seconds.append(time.perf_counter() - update_started)
            chunks.set_postfix(
                frozen=f"{np.concatenate(frozen_hits).mean():.4f}", online=f"{np.concatenate(online_hits).mean():.4f}"
            )

    frozen_rate = float(np.concatenate(frozen_hits).mean())
    online_rate = float(np.concatenate(online_hits).mean())
    tested_events = int(sum(len(h) for h in frozen_hits))
    metrics = {
        "prequential.hit_at_10_frozen": frozen_rate,
        "prequential.hit_at_10_online": online_rate,
        "prequential.online_over_frozen": online_rate / frozen_rate if frozen_rate else float("nan"),
        "prequential.update_s_median": float(np.median(update_seconds)),
    }
    for name, value in metrics.items():
        print(f"{name:36s} {value:.4f}")
    print(f"tested events: {tested_events} in {len(starts)} chunks; total {time.perf_counter() - started:.0f} s")
    if args.no_write:
        return
    write_result(
        "prequential",
        metrics,
        {
            "prequential.hit_at_10_frozen": "fraction",
            "prequential.hit_at_10_online": "fraction",
            "prequential.online_over_frozen": "ratio",
            "prequential.update_s_median": "s",
        },
        targets={"prequential.online_over_frozen": ">= 1.2"},
        command=" ".join([".venv/bin/python -m bench.prequential", *sys.argv[1:]]),
        notes=(
            f"ml-100k by time: bootstrap on the first {args.bootstrap_fraction:.0%} ({split} events, "
            f"{args.bootstrap_epochs} epochs), then {len(starts)} chunks of {args.chunk_size} events: "
            f"{args.test_per_chunk} sampled events per chunk tested before learning ({tested_events} in all; "
            f"top 10 over {len(catalog)} items, earlier items of the user excluded), then the online model "
            f"fine-tunes {args.finetune_epochs} epoch(s) on the last {args.recent_chunks} chunk(s) + "
            f"{args.replay_ratio:g}x chunk-size uniform replay of older events."
        ),
    )


if __name__ == "__main__":
    main()
