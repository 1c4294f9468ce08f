"""Training and evaluating a :class:`~online_trainer.ranker_model.RankerModel` on labeled examples.

The joiner's ``LabeledExample``\\ s (one shown item, clicked or not, at a position) become one
(user, item) pair each (:func:`ranker_examples`, ``N = 1``). The loss is the binary cross-entropy
of ``logit + position_bias(position)`` against the click (:func:`ranker_loss`): the position term
exists only here, so the served logit is relevance at the top position. As in
:mod:`online_trainer.training`, the optimizer and the traced step live on the model, so calling
:func:`train_ranker` again (an epoch, the next interval's fine-tune) continues the same Adam run.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf
from scipy.stats import rankdata

from online_trainer.examples import user_arrays
from online_trainer.ranker_model import RankerModel
from streamrec.core.attributes import AttributeSchema
from streamrec.core.errors import DatasetError

REQUIRED_COLUMNS = ("user_id", "item_id", "position", "clicked")


@dataclass(frozen=True)
class RankerBatch:
    """Rows of (user, item) pairs as arrays: ``users`` [B] / [B, ...] by input name, the rest [B, 1]."""

    users: dict[str, np.ndarray]
    item_ids: np.ndarray  # object [B, 1]
    retrieval_scores: np.ndarray  # float32 [B, 1]
    positions: np.ndarray  # int64 [B, 1], 0 = top
    clicked: np.ndarray  # float32 [B, 1], 1.0 clicked
    weights: np.ndarray  # float32 [B, 1], each row's loss weight

    def __len__(self) -> int:
        return len(self.item_ids)

    def subset(self, rows: np.ndarray) -> RankerBatch:
        """The rows at ``rows`` (indices or a boolean mask), e.g. a hold-out split."""
        return RankerBatch(
            users={name: values[rows] for name, values in self.users.items()},
            item_ids=self.item_ids[rows],
            retrieval_scores=self.retrieval_scores[rows],
            positions=self.positions[rows],
            clicked=self.clicked[rows],
            weights=self.weights[rows],
        )

    def arrays(self) -> dict[str, Any]:
        """The nested dict :func:`ranker_loss` and the traced step take."""
        return {
            "users": dict(self.users),
            "item_ids": self.item_ids,
            "retrieval_scores": self.retrieval_scores,
            "positions": self.positions,
            "clicked": self.clicked,
            "weights": self.weights,
        }


def _logged_user_inputs(labeled: pd.DataFrame) -> pd.DataFrame:
    """The user-input frame: each row's logged ``features`` dict, or the frame's own columns."""
    if "features" not in labeled.columns:
        return labeled
    records = [dict(value) if isinstance(value, Mapping) else {} for value in labeled["features"]]
    users = pd.DataFrame.from_records(records, index=labeled.index) if records else pd.DataFrame(index=labeled.index)
    users["user_id"] = labeled["user_id"].to_numpy()
    if "recent_items" in users.columns:  # a row that logged none holds NaN after from_records
        logged = [value if isinstance(value, list | tuple | np.ndarray) else [] for value in users["recent_items"]]
        users["recent_items"] = pd.Series(logged, index=users.index, dtype=object)
    return users


def ranker_examples(labeled: pd.DataFrame, schema: AttributeSchema) -> RankerBatch:
    """One (user, item) pair per labeled row.

    Columns: ``user_id``, ``item_id``, ``position`` (0 = top), ``clicked``; optional
    ``retrieval_score`` (missing or NaN -> 0) and ``weight`` (missing -> 1); the user inputs either
    as a ``features`` column (the logged input dict of ``LabeledExample.features``) or as columns
    named by ``user_model_inputs(schema)`` (missing ones unknown, as ``examples.user_arrays`` reads them).
    """
    missing = [column for column in REQUIRED_COLUMNS if column not in labeled.columns]
    if missing:
        raise DatasetError(
            f"ranker_examples: missing column(s) {missing}; pass the joiner's labeled examples "
            f"(one row per shown item with {list(REQUIRED_COLUMNS)})"
        )
    labeled = labeled.reset_index(drop=True)
    item_ids = labeled["item_id"].fillna("").astype(str).to_numpy(dtype=object)
    if np.any(item_ids == ""):
        raise DatasetError("ranker_examples: some rows have an empty item_id; drop them before training")
    positions = pd.to_numeric(labeled["position"], errors="coerce")
    if positions.isna().any() or (positions < 0).any():
        raise DatasetError("ranker_examples: `position` must be a shown position >= 0 (0 = top) on every row")
    size = len(labeled)
    if labeled["clicked"].isna().any():
        raise DatasetError("ranker_examples: `clicked` is missing on some rows; label them (True/False) or drop them")
    weights = (
        pd.to_numeric(labeled["weight"], errors="coerce")
        if "weight" in labeled.columns
        else pd.Series(1.0, index=labeled.index)
    )
    if weights.isna().any() or (weights < 0).any():
        raise DatasetError("ranker_examples: `weight` must be a number >= 0 on every row (or leave the column out)")
    scores = labeled["retrieval_score"] if "retrieval_score" in labeled.columns else pd.Series(0.0, index=labeled.index)
    return RankerBatch(
        users=user_arrays(_logged_user_inputs(labeled), schema),
        item_ids=item_ids.reshape(size, 1),
        retrieval_scores=pd.to_numeric(scores).fillna(0.0).to_numpy(dtype=np.float32).reshape(size, 1),
        positions=positions.to_numpy(dtype=np.int64).reshape(size, 1),
        clicked=labeled["clicked"].astype(bool).to_numpy(dtype=np.float32).reshape(size, 1),
        weights=weights.to_numpy(dtype=np.float32).reshape(size, 1),
    )


def _as_batch(batch: RankerBatch | Mapping[str, Any]) -> Mapping[str, Any]:
    return batch.arrays() if isinstance(batch, RankerBatch) else batch


def ranker_loss(model: RankerModel, batch: RankerBatch | Mapping[str, Any], training: bool = True) -> tf.Tensor:
    """Weighted mean binary cross-entropy of the click, sum(w * bce) / sum(w).

    ``training``: the logit plus the shown position's bias (the training objective); False: the
    served logit alone (as if every row had been shown at the top).
    """
    batch = _as_batch(batch)
    logits = model.logits(batch["users"], batch["item_ids"], batch["retrieval_scores"])
    if training:
        logits = logits + model.position_bias(batch["positions"])
    labels = tf.cast(batch["clicked"], tf.float32)
    per_row = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
    weights = tf.cast(batch["weights"], tf.float32) if "weights" in batch else tf.ones_like(per_row)
    return tf.reduce_sum(per_row * weights) / tf.maximum(tf.reduce_sum(weights), 1e-12)


def _train_step(model: RankerModel) -> Any:
    """The traced step, kept on the model: the next call (epoch, fine-tune) does not trace again."""
    step = getattr(model, "_compiled_ranker_step", None)
    if step is not None:
        return step

    @tf.function(reduce_retracing=True)  # type: ignore[untyped-decorator]  # tf.function has no type hints
    def train_step(batch: dict[str, Any]) -> tf.Tensor:
        with tf.GradientTape() as tape:
            loss = ranker_loss(model, batch)
        variables = model.trainable_variables
        gradients = tape.gradient(loss, variables)
        model.optimizer.apply_gradients(zip(gradients, variables, strict=True))
        return loss

    object.__setattr__(model, "_compiled_ranker_step", train_step)
    return train_step


def train_ranker(
    model: RankerModel, examples: RankerBatch, *, epochs: int = 1, batch_size: int = 256, seed: int = 0
) -> dict[str, float]:
    """Fit on ``examples``; returns the last epoch's mean ``loss``, ``examples`` seen, ``examples_per_s``, ``seconds``.

    Each epoch takes a new order, drawn from ``seed`` and the optimizer's step count (reproducible
    across restarts of a fine-tuned model).
    """
    if len(examples) == 0:
        raise ValueError("train_ranker: no labeled examples; nothing to learn from")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"train_ranker: epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    step = _train_step(model)
    order = np.random.default_rng([seed, int(model.optimizer.iterations.value.numpy())])
    n = len(examples)
    losses: list[float] = []
    started = time.perf_counter()
    for _ in range(epochs):
        shuffled = examples.subset(order.permutation(n)).arrays()
        epoch_loss, steps = tf.constant(0.0), 0
        for batch in tf.data.Dataset.from_tensor_slices(shuffled).batch(batch_size):
            epoch_loss += step(batch)
            steps += 1
        losses.append(float(epoch_loss) / steps)
    elapsed = time.perf_counter() - started
    return {
        "loss": losses[-1],
        "examples": float(n * epochs),
        "examples_per_s": n * epochs / elapsed if elapsed > 0 else 0.0,
        "seconds": elapsed,
    }


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by ranks (ties averaged, the Mann-Whitney U); NaN with one class only."""
    labels = np.asarray(labels, dtype=bool).reshape(-1)
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(np.asarray(scores, dtype=np.float64).reshape(-1))
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _predict(model: RankerModel, examples: RankerBatch, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(served logits, position biases), each [B], in batches."""
    logits, biases = [], []
    for start in range(0, len(examples), batch_size):
        part = examples.subset(np.arange(start, min(start + batch_size, len(examples))))
        users = {name: tf.constant(values) for name, values in part.users.items()}
        logits.append(np.asarray(model.logits(users, tf.constant(part.item_ids), tf.constant(part.retrieval_scores))))
        biases.append(np.asarray(model.position_bias(tf.constant(part.positions))))
    return np.concatenate(logits).reshape(-1), np.concatenate(biases).reshape(-1)


def served_logits(model: RankerModel, examples: RankerBatch, *, batch_size: int = 4_096) -> np.ndarray:
    """[B] served logits (no position term): the order the ranking model would serve."""
    logits, _ = _predict(model, examples, batch_size)
    return logits


def within_request_auc(request_ids: np.ndarray, clicked: np.ndarray, scores: np.ndarray) -> tuple[float, int]:
    """(share of (clicked, not clicked) pairs of the same request that ``scores`` order right, ties
    half; the number of such pairs). NaN with no pair. How well an order serves each user, which a
    pooled AUC or the log loss can hide: scores may separate clicks across users yet scramble the
    order within one user's list."""
    frame = pd.DataFrame({"request": request_ids, "clicked": clicked.astype(bool), "score": scores})
    right, pairs = 0.0, 0
    for _, group in frame.groupby("request", sort=False):
        hit, miss = group.loc[group["clicked"], "score"].to_numpy(), group.loc[~group["clicked"], "score"].to_numpy()
        if len(hit) and len(miss):
            difference = hit[:, None] - miss[None, :]
            right += float((difference > 0).sum() + 0.5 * (difference == 0).sum())
            pairs += difference.size
    return (right / pairs if pairs else float("nan")), pairs


def per_row_logloss(model: RankerModel, examples: RankerBatch, *, batch_size: int = 4_096) -> np.ndarray:
    """[B] cross-entropy of each row's ``logit + position_bias`` against its click (paired gate comparisons)."""
    logits, biases = _predict(model, examples, batch_size)
    shown = (logits + biases).astype(np.float64)
    clicked = examples.clicked.reshape(-1).astype(np.float64)
    return np.asarray(np.logaddexp(0.0, shown) - clicked * shown)


def ranker_metrics(model: RankerModel, examples: RankerBatch, *, batch_size: int = 4_096) -> dict[str, float]:
    """Held-out figures a gate compares between a candidate and the serving ranker.

    ``logloss`` and ``auc``: of ``logit + position_bias`` against the logged clicks (how well the
    model predicts what was clicked where it was shown); ``auc_served``: of the served logit alone
    (how well the order the ranker would serve separates clicks); ``examples``, ``click_rate``.
    """
    if len(examples) == 0:
        raise ValueError("ranker_metrics: no held-out examples")
    logits, biases = _predict(model, examples, batch_size)
    clicked = examples.clicked.reshape(-1)
    shown = (logits + biases).astype(np.float64)
    # log(1 + e^z) - y z: the cross-entropy with logits, stable for large |z|
    logloss = float(np.mean(np.logaddexp(0.0, shown) - clicked * shown))
    return {
        "logloss": logloss,
        "auc": roc_auc(clicked, shown),
        "auc_served": roc_auc(clicked, logits),
        "examples": float(len(examples)),
        "click_rate": float(clicked.mean()),
    }
