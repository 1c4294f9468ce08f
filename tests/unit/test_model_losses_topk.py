"""Hand-computed values of the retrieval loss and of top-K, as TensorFlow Recommenders tests do."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from online_trainer.catalog import ItemCatalog
from online_trainer.inference import PAD_SCORE, rank, recommend, score
from online_trainer.losses import in_batch_softmax_loss
from online_trainer.model import TwoTowerModel, build_model
from online_trainer.model_config import ModelConfig

QUERY = tf.constant([[1.0, 0.0], [0.0, 1.0]])
CANDIDATES = tf.constant([[1.0, 0.0], [0.0, 2.0]])  # logits at temperature 1: [[1, 0], [0, 2]]


def test_in_batch_softmax_loss_matches_hand_computation() -> None:
    loss = in_batch_softmax_loss(QUERY, CANDIDATES, temperature=1.0)
    # row 0: -log(e^1 / (e^1 + e^0)) = log(1 + e^-1); row 1: log(1 + e^-2)
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.exp(-2))) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_temperature_scales_the_logits() -> None:
    loss = in_batch_softmax_loss(QUERY, CANDIDATES, temperature=0.5)
    expected = (math.log1p(math.exp(-2)) + math.log1p(math.exp(-4))) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_logq_correction_subtracts_log_sampling_probability_per_candidate() -> None:
    log_q = tf.constant([math.log(0.5), math.log(0.25)])
    loss = in_batch_softmax_loss(QUERY, CANDIDATES, temperature=1.0, candidate_log_q=log_q)
    # corrected logits [[1 + ln2, 0 + ln4], [0 + ln2, 2 + ln4]]:
    # row 0: log(1 + e^(ln4 - 1 - ln2)) = log(1 + 2/e); row 1: log(1 + e^(ln2 - 2 - ln4)) = log(1 + e^-2 / 2)
    expected = (math.log1p(2 / math.e) + math.log1p(math.exp(-2) / 2)) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_weights_multiply_each_loss_term_over_the_batch_size() -> None:
    weights = tf.constant([4.0, 0.5])
    row_0, row_1 = math.log1p(math.exp(-1)), math.log1p(math.exp(-2))
    loss = in_batch_softmax_loss(QUERY, CANDIDATES, temperature=1.0, weights=weights)
    assert float(loss) == pytest.approx((4.0 * row_0 + 0.5 * row_1) / 2, rel=1e-6)
    ones = in_batch_softmax_loss(QUERY, CANDIDATES, temperature=1.0, weights=tf.ones([2]))
    assert float(ones) == pytest.approx(float(in_batch_softmax_loss(QUERY, CANDIDATES, temperature=1.0)))


def test_accidental_hits_are_not_negatives() -> None:
    same_item = tf.constant(["a", "a"])
    loss = in_batch_softmax_loss(QUERY, CANDIDATES, temperature=1.0, candidate_ids=same_item)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    distinct = in_batch_softmax_loss(QUERY, CANDIDATES, temperature=1.0, candidate_ids=tf.constant(["a", "b"]))
    assert float(distinct) == pytest.approx(float(in_batch_softmax_loss(QUERY, CANDIDATES, temperature=1.0)))


def test_rank_orders_excludes_and_pads() -> None:
    users = tf.constant([[1.0, 0.0], [0.0, 1.0]])
    items = tf.constant([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    ids = tf.constant(["a", "b", "c"])
    exclude = tf.constant([[-1, -1], [2, -1]], dtype=tf.int64)  # user 1 has seen "c"
    top_ids, top_scores = rank(users, items, ids, exclude, k=4, temperature=0.5)
    assert top_ids.numpy().astype(str).tolist() == [["a", "b", "c", ""], ["b", "a", "", ""]]
    np.testing.assert_allclose(top_scores.numpy(), [[2.0, 1.2, 0.0, PAD_SCORE], [1.6, 0.0, PAD_SCORE, PAD_SCORE]])


def _fixed_model() -> TwoTowerModel:
    """Id-only towers, identity projections, id embeddings set so a, b, c get known vectors."""
    catalog = ItemCatalog(("a", "b", "c"))
    config = dataclasses.replace(
        ModelConfig(),
        embedding_dim=2,
        item_id_buckets=4096,
        user_id_buckets=4096,
        use_profile=False,
        use_recent_items=False,
        use_last_item=False,
        use_counts=False,
        use_item_content=False,
        temperature=0.5,
    )
    model = build_model(catalog, config)
    for projection in (model.user_projection, model.item_projection):
        projection.set_weights([np.eye(2, dtype=np.float32), np.zeros(2, dtype=np.float32)])
    for bag, vectors in (
        (model.item_ids_embedding, {"a": (1.0, 0.0), "b": (0.6, 0.8), "c": (0.0, 1.0)}),
        (model.user_ids_embedding, {"u": (1.0, 0.0)}),
    ):
        table = np.zeros_like(bag.table.get_weights()[0])
        for key, vector in vectors.items():
            buckets = {int(h(tf.constant([key]))[0]) for h in bag.hashes}
            assert len(buckets) == 2, "the two hashes collided; pick another key"
            for bucket in buckets:
                table[bucket] = np.asarray(vector) / 2  # the two rows are summed
        bag.table.set_weights([table])
    return model


def test_top_k_of_a_tiny_model_with_fixed_weights() -> None:
    model = _fixed_model()
    user = pd.DataFrame({"user_id": ["u"]})
    ids, scores = recommend(model, user, k=2)
    assert ids.tolist() == [["a", "b"]]
    np.testing.assert_allclose(scores, [[2.0, 1.2]], rtol=1e-6)
    ids, scores = recommend(model, user, k=3, exclude=[["a", "not-in-catalog"]])
    assert ids.tolist() == [["b", "c", ""]]
    np.testing.assert_allclose(score(model, user, [["c", "a"]]), [[0.0, 2.0]], atol=1e-6)
