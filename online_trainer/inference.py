"""Scoring with a :class:`~online_trainer.model.TwoTowerModel` in memory: top-k, pair scores, similar items.

:func:`rank` is shared with the export's ``recommend`` and ``similar`` signatures, so the in-memory
and exported answers are the same computation (same exclusion, same padding with :data:`PAD_SCORE`)
up to ``ModelConfig.exact_topk_max_items`` items. Above that the export searches an IVF index
(:mod:`online_trainer.retrieval_index`, same contract, approximate); in memory it stays exact here,
the reference the gate and the benchmarks measure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
import pandas as pd
import tensorflow as tf

from online_trainer.catalog import catalog_arrays, item_arrays
from online_trainer.examples import user_arrays
from online_trainer.model import TwoTowerModel

PAD_SCORE = float(np.finfo(np.float32).min)  # score of an empty ("") slot in a top-K answer


def user_vectors(model: TwoTowerModel, user_inputs: pd.DataFrame, *, batch_size: int = 4_096) -> np.ndarray:
    """The user tower's [B, d] unit vectors for ``user_inputs`` (``examples.user_input_columns``), in batches."""
    arrays = user_arrays(user_inputs, model.schema)
    chunks = [
        model.user_tower({name: tf.constant(values[start : start + batch_size]) for name, values in arrays.items()})
        for start in range(0, len(user_inputs), batch_size)
    ]
    return np.concatenate([np.asarray(chunk) for chunk in chunks]) if chunks else np.zeros((0, 1), np.float32)


def catalog_vectors(model: TwoTowerModel) -> np.ndarray:
    """The item tower's [N, d] unit vectors for the model's catalog, in catalog order."""
    return item_vectors(model, *catalog_arrays(model.catalog))


def item_vectors(model: TwoTowerModel, ids: np.ndarray, values: dict[str, np.ndarray]) -> np.ndarray:
    """The item tower's [N, d] unit vectors for ids and their attribute arrays (``catalog.item_arrays``)."""
    tensors = {name: tf.constant(column) for name, column in values.items()}
    return np.asarray(model.item_tower(tf.constant(ids), tensors))


def rank(
    user_vecs: tf.Tensor,
    item_vecs: tf.Tensor,
    item_ids: tf.Tensor,
    exclude_rows: tf.Tensor,
    *,
    k: int,
    temperature: float,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Top-k catalog items per user, excluded rows removed; shared by ``recommend`` and the export.

    ``exclude_rows`` [B, E] int64: catalog rows to drop, -1 for padding/unknown. When fewer than
    ``k`` items remain, trailing slots hold id "" and score :data:`PAD_SCORE`.
    """
    scores = tf.matmul(user_vecs, item_vecs, transpose_b=True) / temperature
    batch_rows = tf.broadcast_to(
        tf.range(tf.shape(exclude_rows, out_type=tf.int64)[0])[:, None], tf.shape(exclude_rows, out_type=tf.int64)
    )
    pairs = tf.stack([batch_rows, exclude_rows], axis=-1)
    pairs = tf.boolean_mask(pairs, exclude_rows >= 0)
    scores = tf.tensor_scatter_nd_update(scores, pairs, tf.fill(tf.shape(pairs)[:1], float("-inf")))
    depth = min(k, int(item_vecs.shape[0]))
    top_scores, top_rows = tf.math.top_k(scores, k=depth)
    return padded_answer(tf.gather(item_ids, top_rows), top_scores, k)


def padded_answer(top_ids: tf.Tensor, top_scores: tf.Tensor, k: int) -> tuple[tf.Tensor, tf.Tensor]:
    """A top-k answer [B, k]: slots scored -inf (excluded, padding) and missing ones as "" / :data:`PAD_SCORE`.

    ``top_ids`` and ``top_scores`` are [B, depth] with depth <= k, best first.
    """
    depth = int(top_scores.shape[1])
    valid = tf.math.is_finite(top_scores)
    top_ids = tf.where(valid, top_ids, "")
    top_scores = tf.where(valid, top_scores, PAD_SCORE)
    if depth < k:
        pad = [[0, 0], [0, k - depth]]
        top_ids = tf.pad(top_ids, pad, constant_values="")
        top_scores = tf.pad(top_scores, pad, constant_values=PAD_SCORE)
    return top_ids, top_scores


def similar_rank(
    item_vecs: tf.Tensor,
    item_ids: tf.Tensor,
    query_rows: tf.Tensor,
    exclude_rows: tf.Tensor,
    *,
    k: int,
    temperature: float,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Top-k catalog items nearest each query row [B] (int64, -1: not in the catalog); shared with the export.

    The query item itself and ``exclude_rows`` [B, E] are never returned; a query not in the
    catalog gets all ids "" and scores :data:`PAD_SCORE`.
    """
    known = query_rows >= 0
    # Gather from one whole read, not from the variable: a gather on a TF variable puts it in
    # copy-on-read mode, after which every whole read (``recommend``'s matmul) copies the catalog.
    item_vecs = tf.convert_to_tensor(item_vecs)
    queries = tf.gather(item_vecs, tf.maximum(query_rows, 0))
    excluded = tf.concat([query_rows[:, tf.newaxis], exclude_rows], axis=1)
    ids, scores = rank(queries, item_vecs, item_ids, excluded, k=k, temperature=temperature)
    ids = tf.where(known[:, tf.newaxis], ids, "")
    scores = tf.where(known[:, tf.newaxis], scores, PAD_SCORE)
    return ids, scores


def _rows(model: TwoTowerModel, items: Sequence[str]) -> list[int]:
    index = model.catalog.index
    return [index.get(str(item), -1) for item in items]


def _exclude_rows(model: TwoTowerModel, exclude: Sequence[Sequence[str]] | None, batch: int) -> np.ndarray:
    if exclude is None:
        return np.full((batch, 1), -1, dtype=np.int64)
    if len(exclude) != batch:
        raise ValueError(f"exclude has {len(exclude)} rows for {batch} users; pass one list per user")
    width = max(1, max((len(row) for row in exclude), default=1))
    rows = np.full((batch, width), -1, dtype=np.int64)
    for b, items in enumerate(exclude):
        rows[b, : len(items)] = _rows(model, items)
    return rows


def recommend(
    model: TwoTowerModel,
    user_inputs: pd.DataFrame,
    *,
    k: int,
    exclude: Sequence[Sequence[str]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k item ids [B, k] (str) and scores [B, k] over the model's catalog, excluded ids removed."""
    users = user_vectors(model, user_inputs)
    items = catalog_vectors(model)
    rows = _exclude_rows(model, exclude, len(user_inputs))
    ids, scores = rank(
        tf.constant(users),
        tf.constant(items),
        tf.constant(np.asarray(model.catalog.item_ids, dtype=object)),
        tf.constant(rows),
        k=k,
        temperature=model.config.temperature,
    )
    return np.asarray(ids.numpy()).astype(str), np.asarray(scores.numpy())


def score(
    model: TwoTowerModel, user_inputs: pd.DataFrame, item_ids: Sequence[Sequence[str]] | np.ndarray
) -> np.ndarray:
    """Scores [B, N] of the given items for each user; an item not in the catalog is scored by its id alone."""
    grid = np.asarray(item_ids, dtype=object)
    if grid.ndim != 2 or grid.shape[0] != len(user_inputs):
        raise ValueError(f"item_ids must be [B, N] with B = {len(user_inputs)} users; got shape {grid.shape}")
    users = user_vectors(model, user_inputs)
    items = item_vectors(model, *item_arrays(model.catalog, grid.reshape(-1)))
    items = items.reshape(grid.shape[0], grid.shape[1], -1)
    return cast(np.ndarray, np.einsum("bd,bnd->bn", users, items) / model.config.temperature).astype(np.float32)


def similar(
    model: TwoTowerModel,
    item_ids: Sequence[str],
    *,
    k: int,
    exclude: Sequence[Sequence[str]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k catalog items nearest each of ``item_ids`` [B, k] (str) and their scores (``similar_rank``)."""
    ids, scores = similar_rank(
        tf.constant(catalog_vectors(model)),
        tf.constant(np.asarray(model.catalog.item_ids, dtype=object)),
        tf.constant(np.asarray(_rows(model, item_ids), dtype=np.int64)),
        tf.constant(_exclude_rows(model, exclude, len(item_ids))),
        k=k,
        temperature=model.config.temperature,
    )
    return np.asarray(ids.numpy()).astype(str), np.asarray(scores.numpy())
