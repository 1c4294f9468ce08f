"""The retrieval losses: softmax with temperature over L2-normalized vectors.

Against every catalog item (:func:`full_catalog_loss`, the default: exact, and ``B x N`` logits
per step is cheap for catalogs of thousands of items), or against the batch's own items
(:func:`in_batch_softmax_loss`) with the logQ correction (subtract the log sampling probability of
each in-batch candidate, Yi et al. 2019) and accidental hits (the same item twice in a batch)
removed from the negatives, for catalogs too large to score per step.

Both take per-example ``weights`` (the trainer's ``kind_weights``, e.g. a purchase counting four
times a view): each example's loss term is multiplied by its weight, and the sum is divided by the
number of examples (Keras' ``sum_over_batch_size``), so weights of 1.0 give the plain mean.

Under ``tf.distribute`` a worker's batch is its shard of the global batch: ``denominator`` is then
the global batch's count, so the workers' losses (and gradients) sum to the one-worker ones.
"""

from __future__ import annotations

import tensorflow as tf


def in_batch_softmax_loss(
    query: tf.Tensor,
    candidates: tf.Tensor,
    *,
    temperature: float,
    candidate_log_q: tf.Tensor | None = None,
    candidate_ids: tf.Tensor | None = None,
    weights: tf.Tensor | None = None,
    denominator: tf.Tensor | None = None,
) -> tf.Tensor:
    """Mean softmax cross-entropy of each query against all in-batch candidates (its own is the label).

    ``candidate_log_q`` [B]: log sampling probability of each candidate, subtracted from its logit
    column so popular items are not over-penalized as negatives. ``candidate_ids`` [B]: when given,
    a candidate equal to the row's positive (other than the diagonal) is removed from that row.
    ``weights`` [B]: each row's loss weight; ``denominator``: divide the sum by it instead of B (module
    docstring). A shard's candidates are its own rows, so under several workers the negatives are
    the worker's batch, not the global one.
    """
    logits = tf.matmul(query, candidates, transpose_b=True) / temperature
    if candidate_log_q is not None:
        logits = logits - tf.cast(candidate_log_q, logits.dtype)[tf.newaxis, :]
    batch = tf.shape(logits)[0]
    labels = tf.eye(batch, dtype=logits.dtype)
    if candidate_ids is not None:
        same = tf.equal(candidate_ids[:, tf.newaxis], candidate_ids[tf.newaxis, :])
        accidental = tf.logical_and(same, tf.logical_not(tf.cast(labels, tf.bool)))
        logits = tf.where(accidental, tf.cast(-1e9, logits.dtype), logits)
    losses = tf.nn.softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    if weights is not None:
        losses = losses * tf.cast(weights, losses.dtype)
    if denominator is not None:
        return tf.reduce_sum(losses) / tf.cast(denominator, losses.dtype)
    return tf.reduce_mean(losses)


def full_catalog_loss(
    query: tf.Tensor,
    catalog: tf.Tensor,
    rows: tf.Tensor,
    *,
    temperature: float,
    weights: tf.Tensor | None = None,
    denominator: tf.Tensor | None = None,
) -> tf.Tensor:
    """Mean softmax cross-entropy of each query [B, d] against every catalog item [N, d]; ``rows`` [B]
    holds the positive's catalog row (-1: not in the catalog, left out of the mean); ``weights`` [B]
    each row's loss weight; ``denominator``: the global batch's rows in the catalog, for a shard
    (module docstring).

    Exact where the in-batch loss is sampled: no logQ estimate, and every item is a negative in every
    step, which is what top-k over the catalog ranks against. The cost is ``B x N`` logits per step.
    """
    logits = tf.matmul(query, catalog, transpose_b=True) / temperature
    known = rows >= 0
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.maximum(rows, 0), logits=logits)
    present = tf.cast(known, losses.dtype)
    weighted = losses * present if weights is None else losses * present * tf.cast(weights, losses.dtype)
    count = tf.reduce_sum(present) if denominator is None else tf.cast(denominator, losses.dtype)
    return tf.reduce_sum(weighted) / tf.maximum(count, 1.0)
