"""Offline quality under RecBole's published protocol, with a popularity baseline (any ``--dataset``).

Protocol (RecBole ``eval_args``: ``split: {RS: [0.8, 0.1, 0.1]}, group_by: user, order: RO, mode: full``):

* every rating is an implicit positive;
* interactions are shuffled (seeded), grouped by user, and each user's list is cut 80/10/10 with
  RecBole's ``split_by_ratio`` rounding (valid and test get ``int(0.1 n)`` each, the rest trains);
* full ranking over the whole catalog (ml-100k: 1,682 items); items the user has in earlier splits
  are masked (train for validation; train + validation for test), the split's own items are the
  relevant set;
* Recall@10, NDCG@10, Hit@10 with RecBole's definitions (``online_trainer.ranking_metrics``), averaged
  over users. The epoch count is chosen on validation NDCG@10 (best epoch, early stopping);
  test is reported for that epoch only.

Under a random split "recent items" have no time meaning, so the model here uses its id and
declared user attributes only (``recent_items`` empty, counts 0); the item attributes of the item
tower stay on. On ml-100k RecBole's BPR reaches 0.237 / 0.277 (Recall@10 / NDCG@10) on this protocol.

``--dataset`` is any ``streamrec.datasets.description.load_dataset`` spec (default ``ml-100k``; the
result file is ``quality.json`` for it, ``quality-<name>.json`` for another dataset).

Run: ``.venv/bin/python -m bench.offline_quality`` (``--help`` for settings; ``--no-write`` to try
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
from tqdm import tqdm

from bench.common import write_result
from online_trainer.catalog import ItemCatalog
from online_trainer.inference import catalog_vectors, user_vectors
from online_trainer.model import TwoTowerModel, build_model
from online_trainer.model_config import ModelConfig
from online_trainer.ranking_metrics import RankingMetrics, ranking_metrics, top_k_masked
from online_trainer.training import train
from streamrec.core.attributes import AttributeSchema
from streamrec.datasets.description import Dataset, load_dataset

K = 10


def recbole_split_sizes(total: int, ratios: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> list[int]:
    """RecBole's ``Dataset._calcu_split_ids`` counts for one user's ``total`` interactions."""
    counts = [int(ratio * total) for ratio in ratios]
    counts[0] = total - sum(counts[1:])
    for i in range(1, len(ratios)):
        if counts[0] <= 1:
            break
        if 0 < ratios[-i] * total < 1:
            counts[-i] += 1
            counts[0] -= 1
    return counts


def recbole_random_split(interactions: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Shuffle all interactions, group by user (first-appearance order kept), cut each user 80/10/10."""
    shuffled = interactions.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    parts: list[list[int]] = [[], [], []]
    for rows in shuffled.groupby("user_id", sort=False).indices.values():
        start = 0
        for part, size in zip(parts, recbole_split_sizes(len(rows)), strict=True):
            part.extend(rows[start : start + size])
            start += size
    train_rows, valid_rows, test_rows = (shuffled.iloc[sorted(part)] for part in parts)
    return train_rows, valid_rows, test_rows


def user_frame(dataset: Dataset) -> pd.DataFrame:
    """Every user of the interactions (first-seen order) with their declared attributes (NaN/None: unknown)."""
    users = pd.DataFrame({"user_id": dataset.interactions["user_id"].astype(str).drop_duplicates().to_numpy()})
    if dataset.users is None or not dataset.schema.user:
        return users
    attributes = dataset.users[["user_id", *(a.name for a in dataset.schema.user)]]
    return users.merge(attributes.assign(user_id=attributes["user_id"].astype(str)), on="user_id", how="left")


def id_profile_examples(interactions: pd.DataFrame, users: pd.DataFrame) -> pd.DataFrame:
    """Training rows: user id + declared attributes, no sequential features (see the module docstring)."""
    frame = interactions[["user_id", "item_id", "kind", "event_time"]].merge(users, on="user_id", how="left")
    frame["recent_items"] = [[] for _ in range(len(frame))]
    return frame  # the counts are absent: 0 (``examples.user_arrays``)


@dataclass(frozen=True)
class Setup:
    """What the protocol trains on and evaluates against, for one dataset and seed."""

    schema: AttributeSchema
    catalog: ItemCatalog
    users: pd.DataFrame
    train_rows: pd.DataFrame
    valid_rows: pd.DataFrame
    test_rows: pd.DataFrame
    examples: pd.DataFrame


def prepare(dataset: Dataset, seed: int) -> Setup:
    """The catalog (item file, else the items seen), the users and the RecBole split of ``dataset``."""
    interactions = dataset.interactions
    catalog = ItemCatalog.for_dataset(dataset.items, interactions["item_id"].astype(str), dataset.schema)
    users = user_frame(dataset)
    train_rows, valid_rows, test_rows = recbole_random_split(interactions, seed)
    examples = id_profile_examples(train_rows, users)
    return Setup(dataset.schema, catalog, users, train_rows, valid_rows, test_rows, examples)


class Evaluator:
    """Full-ranking evaluation of one split against a mask of earlier splits."""

    def __init__(self, catalog: ItemCatalog, users: pd.DataFrame, seen: pd.DataFrame, target: pd.DataFrame) -> None:
        self.users = users.reset_index(drop=True)
        self.item_ids = np.asarray(catalog.item_ids)
        row_of_item = catalog.index
        row_of_user = {user: row for row, user in enumerate(self.users["user_id"])}
        self.mask = np.zeros((len(self.users), len(catalog)), dtype=bool)
        self.mask[seen["user_id"].map(row_of_user).to_numpy(), seen["item_id"].map(row_of_item).to_numpy()] = True
        relevant = target.groupby("user_id")["item_id"].agg(set)
        self.relevant = [relevant.get(user, set()) for user in self.users["user_id"]]

    def evaluate(self, scores: np.ndarray) -> RankingMetrics:
        top = top_k_masked(scores, self.mask, K)
        return ranking_metrics(self.item_ids[top], self.relevant, K)

    def model_scores(self, model: TwoTowerModel) -> np.ndarray:
        scores: np.ndarray = user_vectors(model, self.users) @ catalog_vectors(model).T
        return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="ml-100k", help="preset or path (streamrec.datasets.description)")
    parser.add_argument("--seed", type=int, default=2020)
    parser.add_argument("--max-epochs", type=int, default=60)
    parser.add_argument("--patience", type=int, default=6, help="epochs without a better validation NDCG@10")
    parser.add_argument("--embedding-dim", type=int, default=ModelConfig.embedding_dim)
    parser.add_argument("--batch-size", type=int, default=ModelConfig.batch_size)
    parser.add_argument("--learning-rate", type=float, default=ModelConfig.learning_rate)
    parser.add_argument("--temperature", type=float, default=ModelConfig.temperature)
    parser.add_argument("--no-profile", action="store_true", help="user id only in the user tower (no attributes)")
    parser.add_argument("--no-content", action="store_true", help="item id only in the item tower (no attributes)")
    parser.add_argument("--no-write", action="store_true", help="print the figures, do not write bench/results")
    args = parser.parse_args()

    dataset = load_dataset(args.dataset)
    print(dataset.summary())
    setup = prepare(dataset, args.seed)
    catalog, train_rows, valid_rows = setup.catalog, setup.train_rows, setup.valid_rows
    examples = setup.examples
    validation = Evaluator(catalog, setup.users, train_rows, valid_rows)
    test = Evaluator(catalog, setup.users, pd.concat([train_rows, valid_rows]), setup.test_rows)

    counts = train_rows["item_id"].value_counts().reindex(list(catalog.item_ids), fill_value=0).to_numpy()
    popularity = test.evaluate(np.broadcast_to(counts.astype(np.float64), test.mask.shape))

    config = dataclasses.replace(
        ModelConfig(attributes=setup.schema),
        embedding_dim=args.embedding_dim,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        temperature=args.temperature,
        use_recent_items=False,
        use_last_item=False,
        use_counts=False,
        use_profile=not args.no_profile,
        use_item_content=not args.no_content,
        seed=args.seed,
    )
    model = build_model(catalog, config)
    best_ndcg, best_epoch, best_weights = -1.0, 0, model.get_weights()
    started = time.perf_counter()
    rates: list[float] = []
    with tqdm(range(1, args.max_epochs + 1), desc="epochs", unit="epoch") as epochs:
        for epoch in epochs:
            stats = train(model, examples, epochs=1, progress=False)
            rates.append(stats["examples_per_s"])
            valid = validation.evaluate(validation.model_scores(model))
            if valid.ndcg > best_ndcg:
                best_ndcg, best_epoch, best_weights = valid.ndcg, epoch, model.get_weights()
            epochs.set_postfix(loss=f"{stats['loss']:.3f}", valid_ndcg=f"{valid.ndcg:.4f}", best=best_epoch)
            if epoch - best_epoch >= args.patience:
                break
    model.set_weights(best_weights)
    result = test.evaluate(test.model_scores(model))
    metrics = {
        **{f"quality.{name}": value for name, value in result.as_dict(K).items()},
        **{f"quality.pop_{name}": value for name, value in popularity.as_dict(K).items()},
        "quality.valid_ndcg_at_10": best_ndcg,
        "quality.best_epoch": float(best_epoch),
    }
    for name, value in metrics.items():
        print(f"{name:32s} {value:.4f}")
    if args.no_write:
        return
    units = {name: ("epochs" if name.endswith("best_epoch") else "fraction") for name in metrics}
    write_result(
        "quality" if dataset.name == "ml-100k" else f"quality-{dataset.name}",
        metrics,
        units,
        targets={"quality.recall_at_10": ">= 0.22", "quality.ndcg_at_10": ">= 0.26"},
        command=" ".join([".venv/bin/python -m bench.offline_quality", *sys.argv[1:]]),
        notes=(
            f"{dataset.name}, RecBole protocol (RS 80/10/10 by user, full ranking over {len(catalog)} items, seen "
            f"items masked), {result.users} test users; two-tower, id + "
            f"{'user attributes' if config.use_profile else 'no attributes'} user tower, id + "
            f"{'item attributes' if config.use_item_content else 'no attributes'} item tower, no sequential "
            "features; "
            f"{'full-catalog softmax' if config.full_catalog else 'in-batch softmax with logQ'}, "
            f"dim {config.embedding_dim}, batch {config.batch_size}, "
            f"temperature {config.temperature}, lr {config.learning_rate}; best epoch {best_epoch} on validation "
            f"NDCG@10; training {np.median(rates):,.0f} examples/s median, {time.perf_counter() - started:.0f} s total."
        ),
    )


if __name__ == "__main__":
    main()
