"""Retrieval alone against retrieval + ranking model on ml-100k, under ``bench.offline_quality``'s protocol.

Same split, masks and metrics as ``bench.offline_quality`` (RecBole RS 80/10/10 by user, full
ranking, seen items masked, Recall/NDCG/Hit@10 of ``online_trainer.ranking_metrics``), per seed:

1. The two-tower model trains on the train split as there (same config, best epoch on validation
   NDCG@10 with early stopping; no sequential features, user and item attributes on).
2. The ranker's rows come from the validation split: each user's top ``--candidates`` retrieved
   items (train masked) with their served scores (cosine / temperature), labeled 1 if the item is
   among the user's validation items, ``position`` = retrieval rank (0 = top), the user's declared
   attributes as columns (recent items empty, counts 0). A seeded ``--holdout-share`` of the users
   is held out to choose the ranker's epoch count (0 = retrieval order) by their re-ranked
   validation NDCG@10; a fresh ranker then trains on every user for that many epochs.
3. Test (train + validation masked): retrieval alone is its own top 10; two-stage is the same top
   ``--candidates`` re-ordered by the ranker's served logits, top 10. Both come from one model in
   one run (paired); retrieval's Recall@``--candidates`` is the ceiling of any re-ordering.

Retrieval alone never sees the validation interactions while the ranker learns from them, so the
retrieval model retrained on train + validation (same epoch count) is reported beside it.
``--score-input centered`` and ``--position top`` are the alternatives to the served inputs that
``ranker_input`` explains; results and the runs behind them: BENCHMARKS.md (ranker-quality).

Run: ``.venv/bin/python -m bench.ranker_quality`` (``--help`` for settings; ``--no-write`` to try
it without touching bench/results).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import tensorflow as tf
from tqdm import tqdm

from bench.common import write_result
from bench.offline_quality import Evaluator, K, Setup, id_profile_examples, prepare
from online_trainer.examples import user_arrays
from online_trainer.model import TwoTowerModel, build_model
from online_trainer.model_config import ModelConfig
from online_trainer.ranker_model import RankerConfig, RankerModel, build_ranker
from online_trainer.ranker_training import RankerBatch, ranker_examples, train_ranker
from online_trainer.ranking_metrics import RankingMetrics, ranking_metrics, top_k_masked
from online_trainer.training import train
from streamrec.datasets.description import load_dataset

PREFIX = "ranker_quality."
BPR_TARGETS = {"recall_at_10": ">= 0.2466", "ndcg_at_10": ">= 0.2928"}  # RecBole 1.2.1 BPR, same protocol


@dataclass(frozen=True)
class Candidates:
    """Each user's retrieved items, best first: catalog ids [U, N] and served scores (cos / temperature) [U, N]."""

    item_ids: np.ndarray
    scores: np.ndarray


def retrieve(evaluator: Evaluator, cosines: np.ndarray, temperature: float, depth: int) -> Candidates:
    """The top ``depth`` unmasked items of each of ``evaluator``'s users."""
    rows = top_k_masked(cosines, evaluator.mask, depth)
    scores = np.take_along_axis(cosines, rows, axis=1) / temperature
    return Candidates(evaluator.item_ids[rows], scores.astype(np.float32))


def ranker_input(candidates: Candidates, score_input: str) -> Candidates:
    """The scores the ranker sees: served (``raw``), or minus the user's top score (``centered``).

    Why centered: across users the score level anti-correlates with how many candidates are
    relevant (heavy users get lower cosines), so a pointwise ranker fed raw scores learns a
    negative slope that reverses the order within each user. Serving passes raw scores.
    """
    if score_input == "raw":
        return candidates
    return Candidates(candidates.item_ids, candidates.scores - candidates.scores[:, :1])


def retrieval_config(setup: Setup, seed: int) -> ModelConfig:
    """``bench.offline_quality``'s defaults: id + attributes in both towers, no sequential features."""
    return dataclasses.replace(
        ModelConfig(attributes=setup.schema), use_recent_items=False, use_last_item=False, use_counts=False, seed=seed
    )


def train_retrieval(
    setup: Setup, validation: Evaluator, seed: int, max_epochs: int, patience: int
) -> tuple[TwoTowerModel, int]:
    """The retrieval model at its best validation-NDCG@10 epoch: offline_quality's loop, which lives in its main()."""
    model = build_model(setup.catalog, retrieval_config(setup, seed))
    best_ndcg, best_epoch, best_weights = -1.0, 0, model.get_weights()
    with tqdm(range(1, max_epochs + 1), desc=f"retrieval epochs (seed {seed})", unit="epoch", leave=False) as epochs:
        for epoch in epochs:
            stats = train(model, setup.examples, epochs=1, progress=False)
            ndcg = validation.evaluate(validation.model_scores(model)).ndcg
            if ndcg > best_ndcg:
                best_ndcg, best_epoch, best_weights = ndcg, epoch, model.get_weights()
            epochs.set_postfix(loss=f"{stats['loss']:.3f}", valid_ndcg=f"{ndcg:.4f}", best=best_epoch)
            if epoch - best_epoch >= patience:
                break
    model.set_weights(best_weights)
    return model, best_epoch


def ranker_rows(
    setup: Setup, users: pd.DataFrame, candidates: Candidates, relevant: list[set[str]], settings: argparse.Namespace
) -> RankerBatch:
    """One labeled row per (user, candidate): the user's attribute columns, item, rank, label, score, weight."""
    depth = candidates.item_ids.shape[1]
    frame = users.iloc[np.repeat(np.arange(len(users)), depth)].reset_index(drop=True)
    frame["item_id"] = candidates.item_ids.reshape(-1)
    ranks = np.tile(np.arange(depth), len(users))
    frame["position"] = ranks if settings.position == "rank" else 0
    labels = [item in relevant[row // depth] for row, item in enumerate(frame["item_id"])]
    frame["clicked"] = labels
    frame["retrieval_score"] = candidates.scores.reshape(-1)
    frame["weight"] = np.where(labels, settings.positive_weight, 1.0)
    return ranker_examples(frame, setup.schema)


def rerank(ranker: RankerModel, setup: Setup, users: pd.DataFrame, candidates: Candidates) -> np.ndarray:
    """[U, N] candidate ids re-ordered by the ranker's served logits (no position term), best first."""
    inputs = user_arrays(users, setup.schema)
    logits = []
    for start in range(0, len(users), 256):
        part = slice(start, start + 256)
        batch = {name: tf.constant(values[part]) for name, values in inputs.items()}
        item_ids, scores = tf.constant(candidates.item_ids[part]), tf.constant(candidates.scores[part])
        logits.append(np.asarray(ranker.logits(batch, item_ids, scores)))
    order = np.argsort(-np.concatenate(logits), axis=1, kind="stable")
    return np.take_along_axis(candidates.item_ids, order, axis=1)


def per_user(lists: np.ndarray, relevant: list[set[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Each user's Recall@10 and NDCG@10 (NaN without a relevant item), for paired differences."""
    figures = [
        ranking_metrics([items], [truth], K) if truth else RankingMetrics(np.nan, np.nan, np.nan, 0)
        for items, truth in zip(lists, relevant, strict=True)
    ]
    return np.array([f.recall for f in figures]), np.array([f.ndcg for f in figures])


@dataclass(frozen=True)
class RankerFit:
    """The ranker trained on every validation user, and how its epoch count was chosen."""

    model: RankerModel
    epochs: int
    holdout_retrieval_ndcg: float
    holdout_ranked_ndcg: float
    best_trained_epoch: int  # the best epoch >= 1 on the held-out users, even if it loses to the retrieval order
    best_trained_ndcg: float
    rows: int
    positive_share: float


def fit_ranker(
    setup: Setup,
    users: pd.DataFrame,
    candidates: Candidates,
    relevant: list[set[str]],
    seed: int,
    args: argparse.Namespace,
) -> RankerFit:
    """Choose the epoch count on held-out validation users (0 keeps the retrieval order), then train on all."""
    config = RankerConfig(
        learning_rate=args.ranker_learning_rate, retrieval_score_scale=args.retrieval_score_scale, seed=seed
    )
    held = np.zeros(len(users), dtype=bool)
    held[np.random.default_rng(seed).permutation(len(users))[: int(args.holdout_share * len(users))]] = True

    def part(rows: np.ndarray) -> tuple[pd.DataFrame, Candidates, list[set[str]]]:
        chosen = Candidates(candidates.item_ids[rows], candidates.scores[rows])
        return users[rows].reset_index(drop=True), chosen, [r for r, keep in zip(relevant, rows, strict=True) if keep]

    fit_users, fit_candidates, fit_relevant = part(~held)
    held_users, held_candidates, held_relevant = part(held)
    fit_rows = ranker_rows(setup, fit_users, fit_candidates, fit_relevant, args)
    retrieval_ndcg = ranking_metrics(held_candidates.item_ids, held_relevant, K).ndcg
    best_epochs, best_ndcg, best_trained = 0, retrieval_ndcg, (0, -1.0)
    ranker = build_ranker(setup.schema, config)
    with tqdm(range(1, args.ranker_epochs + 1), desc=f"ranker epochs (seed {seed})", unit="epoch", leave=False) as bar:
        for epoch in bar:
            stats = train_ranker(ranker, fit_rows, epochs=1, batch_size=args.ranker_batch_size, seed=seed)
            ndcg = ranking_metrics(rerank(ranker, setup, held_users, held_candidates), held_relevant, K).ndcg
            if ndcg > best_ndcg:
                best_epochs, best_ndcg = epoch, ndcg
            if ndcg > best_trained[1]:
                best_trained = (epoch, ndcg)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", holdout_ndcg=f"{ndcg:.4f}", best=best_epochs)
    all_rows = ranker_rows(setup, users, candidates, relevant, args)
    final = build_ranker(setup.schema, config)
    if best_epochs:
        train_ranker(final, all_rows, epochs=best_epochs, batch_size=args.ranker_batch_size, seed=seed)
    share = float(all_rows.clicked.mean())
    return RankerFit(final, best_epochs, retrieval_ndcg, best_ndcg, *best_trained, len(all_rows), share)


def run_seed(setup: Setup, seed: int, args: argparse.Namespace) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """One seed's figures (names without the prefix) and each test user's two-stage minus retrieval Recall, NDCG."""
    users = setup.users.reset_index(drop=True)
    validation = Evaluator(setup.catalog, users, setup.train_rows, setup.valid_rows)
    test = Evaluator(setup.catalog, users, pd.concat([setup.train_rows, setup.valid_rows]), setup.test_rows)
    model, best_epoch = train_retrieval(setup, validation, seed, args.max_epochs, args.patience)
    temperature = model.config.temperature
    valid_candidates = retrieve(validation, validation.model_scores(model), temperature, args.candidates)
    fit = fit_ranker(setup, users, ranker_input(valid_candidates, args.score_input), validation.relevant, seed, args)

    test_candidates = retrieve(test, test.model_scores(model), temperature, args.candidates)
    reranked = rerank(fit.model, setup, users, ranker_input(test_candidates, args.score_input))
    retrieval = ranking_metrics(test_candidates.item_ids, test.relevant, K)
    two_stage = ranking_metrics(reranked, test.relevant, K)
    ceiling = ranking_metrics(test_candidates.item_ids, test.relevant, args.candidates).recall

    both = pd.concat([setup.train_rows, setup.valid_rows])
    retrained = build_model(setup.catalog, retrieval_config(setup, seed))
    train(retrained, id_profile_examples(both, users), epochs=best_epoch, progress=False)
    retrained_test = test.evaluate(test.model_scores(retrained))

    recall_alone, ndcg_alone = per_user(test_candidates.item_ids, test.relevant)
    recall_ranked, ndcg_ranked = per_user(reranked, test.relevant)
    figures = {
        **two_stage.as_dict(K),
        **retrieval.as_dict(K, "retrieval_"),
        f"retrieval_recall_at_{args.candidates}": ceiling,
        "recall_at_10_gain": two_stage.recall - retrieval.recall,
        "ndcg_at_10_gain": two_stage.ndcg - retrieval.ndcg,
        **retrained_test.as_dict(K, "retrieval_train_valid_"),
        "holdout_retrieval_ndcg_at_10": fit.holdout_retrieval_ndcg,
        "holdout_ranked_ndcg_at_10": fit.holdout_ranked_ndcg,
        "holdout_best_trained_ndcg_at_10": fit.best_trained_ndcg,
        "holdout_best_trained_epoch": float(fit.best_trained_epoch),
        "retrieval_best_epoch": float(best_epoch),
        "ranker_epochs": float(fit.epochs),
        "ranker_rows": float(fit.rows),
        "ranker_positive_share": fit.positive_share,
    }
    return figures, recall_ranked - recall_alone, ndcg_ranked - ndcg_alone


def ci95(differences: np.ndarray) -> float:
    """Half-width of the normal 95 % interval of the mean of per-user paired differences."""
    values = differences[~np.isnan(differences)]
    return float(1.96 * values.std(ddof=1) / np.sqrt(len(values)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k", help="preset or path (streamrec.datasets.description)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[2020], help="split and model seeds; figures are means")
    parser.add_argument("--max-epochs", type=int, default=60, help="retrieval epochs at most (offline_quality's)")
    parser.add_argument("--patience", type=int, default=6, help="retrieval epochs without a better validation NDCG@10")
    parser.add_argument("--candidates", type=int, default=100, help="retrieved items the ranker re-orders")
    parser.add_argument("--ranker-epochs", type=int, default=8, help="ranker epochs at most; chosen on held-out users")
    parser.add_argument("--ranker-batch-size", type=int, default=256)
    parser.add_argument("--ranker-learning-rate", type=float, default=RankerConfig.learning_rate)
    parser.add_argument("--holdout-share", type=float, default=0.2, help="validation users that choose the epochs")
    parser.add_argument("--positive-weight", type=float, default=1.0, help="loss weight of a relevant candidate's row")
    parser.add_argument(
        "--position", choices=("rank", "top"), default="rank", help="a row's position: its retrieval rank, or 0 for all"
    )
    parser.add_argument(
        "--score-input", choices=("raw", "centered"), default="raw", help="served scores, or minus the user's top one"
    )
    parser.add_argument(
        "--retrieval-score-scale", type=float, default=RankerConfig.retrieval_score_scale, help="RankerConfig's"
    )
    parser.add_argument("--no-write", action="store_true", help="print the figures, do not write bench/results")
    args = parser.parse_args()

    dataset = load_dataset(args.dataset)
    print(dataset.summary())
    started = time.perf_counter()
    runs, recall_gains, ndcg_gains = [], [], []
    for seed in tqdm(args.seeds, desc="seeds", unit="seed"):
        figures, recall_gain, ndcg_gain = run_seed(prepare(dataset, seed), seed, args)
        runs.append(figures)
        recall_gains.append(recall_gain)
        ndcg_gains.append(ndcg_gain)
    metrics = {PREFIX + name: float(np.mean([run[name] for run in runs])) for name in runs[0]}
    # per user, the mean over seeds: users are the unit of the interval
    metrics[PREFIX + "recall_at_10_gain_ci95"] = ci95(np.nanmean(np.stack(recall_gains), axis=0))
    metrics[PREFIX + "ndcg_at_10_gain_ci95"] = ci95(np.nanmean(np.stack(ndcg_gains), axis=0))
    for name, value in metrics.items():
        print(f"{name:52s} {value:.4f}")
    if args.no_write:
        return
    units = {name: "fraction" for name in metrics}
    epochs = ("retrieval_best_epoch", "ranker_epochs", "holdout_best_trained_epoch")
    units.update({PREFIX + name: "epochs" for name in epochs})
    units[PREFIX + "ranker_rows"] = "rows"
    per_seed = "; ".join(
        f"seed {seed}: two-stage {run['recall_at_10']:.4f} / {run['ndcg_at_10']:.4f}, retrieval "
        f"{run['retrieval_recall_at_10']:.4f} / {run['retrieval_ndcg_at_10']:.4f}"
        for seed, run in zip(args.seeds, runs, strict=True)
    )
    write_result(
        "ranker-quality" if dataset.name == "ml-100k" else f"ranker-quality-{dataset.name}",
        metrics,
        units,
        targets={PREFIX + name: target for name, target in BPR_TARGETS.items()},
        command=" ".join([".venv/bin/python -m bench.ranker_quality", *sys.argv[1:]]),
        notes=notes(dataset.name, args, per_seed, time.perf_counter() - started),
    )


def notes(dataset: str, args: argparse.Namespace, per_seed: str, seconds: float) -> str:
    """The protocol and its caveats, as the result file states them."""
    n = args.candidates
    return (
        f"{dataset}, bench.offline_quality's protocol (RecBole RS 80/10/10 by user, full ranking, seen items masked), "
        f"seeds {args.seeds} (figures are their means; {per_seed}). Retrieval: offline_quality's two-tower config, "
        "best epoch on validation NDCG@10. Ranker (online_trainer.ranker_model defaults, lr "
        f"{args.ranker_learning_rate}, batch {args.ranker_batch_size}): trained on the validation split, each user's "
        f"top {n} retrieved items (train masked) labeled 1 if among the user's validation items, position = "
        f"{'retrieval rank' if args.position == 'rank' else '0 for every row'}, "
        f"positive weight {args.positive_weight}, {args.score_input} retrieval scores scaled by "
        f"{args.retrieval_score_scale}; "
        f"epoch count (0-{args.ranker_epochs}, 0 = retrieval order) chosen on {args.holdout_share:.0%} of the users "
        "held out (holdout_* figures; holdout_best_trained_*: the best epoch >= 1), then a fresh ranker "
        "trained on all users for that count. Test (train + "
        f"validation masked): two-stage = the same top {n} re-ordered by the ranker, retrieval = its own top 10, from "
        f"one model (paired; *_gain_ci95: normal 95 % half-width over users). retrieval_recall_at_{n} is the ceiling "
        "of any re-ordering. Caveat: the ranker learned from the validation interactions, retrieval alone did not; "
        "retrieval_train_valid_* is the retrieval model retrained on train + validation for the same epoch count. "
        "Targets: RecBole 1.2.1 BPR on this protocol as the project states its goal (offline_quality's docstring "
        f"cites 0.237 / 0.277). {seconds:.0f} s total."
    )


if __name__ == "__main__":
    main()
