"""The ranking model: hand-computed loss, a planted preference, position debiasing, export round trip."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from online_trainer.examples import user_arrays
from online_trainer.ranker_export import (
    export_ranker,
    load_ranker_for_finetune,
    ranker_signature_problems,
    ranker_signature_spec,
)
from online_trainer.ranker_export import serving_module as ranker_serving_module
from online_trainer.ranker_model import RankerConfig, RankerModel, build_ranker
from online_trainer.ranker_training import (
    RankerBatch,
    ranker_examples,
    ranker_loss,
    ranker_metrics,
    roc_auc,
    train_ranker,
)
from online_trainer.signatures import tensor_specs, user_spec
from streamrec.core import contracts
from streamrec.core.attributes import Attribute, AttributeSchema
from streamrec.core.errors import DatasetError

pytestmark = pytest.mark.unit

NO_ATTRIBUTES = AttributeSchema()
SMALL = RankerConfig(user_id_buckets=1024, item_id_buckets=1024, embedding_dim=8, hidden_units=(32, 16), max_position=8)
PAD = np.finfo(np.float32).min


def _bce(logits: np.ndarray, clicked: np.ndarray) -> np.ndarray:
    probability = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    return -(clicked * np.log(probability) + (1.0 - clicked) * np.log(1.0 - probability))


def _served_logits(model: RankerModel, batch: RankerBatch) -> np.ndarray:
    users = {name: tf.constant(values) for name, values in batch.users.items()}
    logits = model.logits(users, tf.constant(batch.item_ids), tf.constant(batch.retrieval_scores))
    return np.asarray(logits).reshape(-1)


def test_loss_equals_the_hand_computed_cross_entropy_with_the_position_bias() -> None:
    model = build_ranker(NO_ATTRIBUTES, SMALL)
    table = np.linspace(0.0, -1.4, SMALL.max_position, dtype=np.float32)
    table[0] = 5.0  # never read: the top position's bias is fixed at 0
    model.position_table.embeddings.assign(table.reshape(-1, 1))
    labeled = pd.DataFrame(
        {
            "user_id": ["u1", "u2", "u3", "u1"],
            "item_id": ["a", "b", "c", "d"],
            "position": [0, 2, 5, 40],  # 40 is beyond max_position: clipped to its last row
            "clicked": [True, False, True, False],
            "retrieval_score": [3.0, np.nan, -2.0, 10.0],
            "features": [{"recent_items": ["b"], "count_1h": 2}, {"count_24h": 7}, {}, None],
            "weight": [1.0, 2.0, 0.5, 1.0],
        }
    )
    batch = ranker_examples(labeled, NO_ATTRIBUTES)
    assert batch.retrieval_scores.reshape(-1).tolist() == [3.0, 0.0, -2.0, 10.0]
    assert batch.users["count_1h"].tolist() == [2, 0, 0, 0] and batch.users["count_24h"].tolist() == [0, 7, 0, 0]
    logits = _served_logits(model, batch)
    bias = SMALL.position_bias_scale * np.array([0.0, table[2], table[5], table[SMALL.max_position - 1]])
    clicked = np.array([1.0, 0.0, 1.0, 0.0])

    expected = _bce(logits + bias, clicked)
    np.testing.assert_allclose(
        float(ranker_loss(model, batch)), np.average(expected, weights=[1, 2, 0.5, 1]), rtol=1e-5
    )
    unweighted = dataclasses.replace(batch, weights=np.ones_like(batch.weights))
    np.testing.assert_allclose(float(ranker_loss(model, unweighted)), expected.mean(), rtol=1e-5)
    np.testing.assert_allclose(
        float(ranker_loss(model, unweighted, training=False)), _bce(logits, clicked).mean(), rtol=1e-5
    )


def _planted(n: int, seed: int) -> pd.DataFrame:
    """Users click items of their own hidden group (id parity) far more; retrieval scores and positions are noise."""
    rng = np.random.default_rng(seed)
    users, items = rng.integers(0, 60, n), rng.integers(0, 40, n)
    clicked = rng.random(n) < np.where(users % 2 == items % 2, 0.6, 0.05)
    return pd.DataFrame(
        {
            "user_id": [f"u{u}" for u in users],
            "item_id": [f"i{i}" for i in items],
            "position": rng.integers(0, 10, n),
            "clicked": clicked,
            "retrieval_score": rng.normal(0.0, 5.0, n),
        }
    )


def test_a_planted_preference_is_learned_and_reorders_a_reversed_candidate_list() -> None:
    examples = ranker_examples(_planted(5_000, seed=1), NO_ATTRIBUTES)
    train, holdout = examples.subset(np.arange(4_000)), examples.subset(np.arange(4_000, 5_000))
    model = build_ranker(NO_ATTRIBUTES, SMALL)
    before = ranker_metrics(model, holdout)
    stats = train_ranker(model, train, epochs=4, batch_size=256, seed=0)
    after = ranker_metrics(model, holdout)
    assert stats["examples"] == 16_000 and np.isfinite(stats["loss"])
    assert after["auc"] > 0.75 > before["auc"]
    assert after["logloss"] < before["logloss"] - 0.1

    # Per user: 5 non-preferred items first (highest retrieval scores), then 5 preferred ones.
    user_ids = [f"u{u}" for u in range(20)]
    candidates = np.array(
        [[f"i{2 * k + 1 - u % 2}" for k in range(5)] + [f"i{2 * k + u % 2}" for k in range(5)] for u in range(20)],
        dtype=object,
    )
    retrieval = np.tile(np.linspace(10.0, 1.0, 10, dtype=np.float32), (20, 1))
    users = {name: tf.constant(values) for name, values in _user_inputs(user_ids, NO_ATTRIBUTES).items()}
    scores = np.asarray(model.logits(users, tf.constant(candidates), tf.constant(retrieval)))
    ranks = np.argsort(np.argsort(-scores, axis=1), axis=1)  # 0 = first after re-ranking
    assert ranks[:, 5:].mean() < 3.0  # 7.0 in the given order, 2.0 when all preferred lead


def _user_inputs(user_ids: list[str], schema: AttributeSchema, **columns: object) -> dict[str, np.ndarray]:
    """Rank-request user inputs (no recent items, zero counts unless given)."""
    return user_arrays(pd.DataFrame({"user_id": user_ids, **columns}), schema)


def _position_only(n: int, seed: int, *, log_positions: bool = True) -> pd.DataFrame:
    """Clicks depend on the position only, but even items were mostly shown higher (positions 0-3)
    than odd ones (1-4), as a retrieval model's order would: a model blind to positions credits the items."""
    rng = np.random.default_rng(seed)
    items = rng.integers(0, 30, n)
    positions = np.where(items % 2 == 0, rng.integers(0, 4, n), rng.integers(1, 5, n))
    click_rate = np.array([0.8, 0.5, 0.3, 0.15, 0.07])[positions]
    return pd.DataFrame(
        {
            "user_id": [f"u{u}" for u in rng.integers(0, 50, n)],
            "item_id": [f"i{i}" for i in items],
            "position": positions if log_positions else np.zeros(n, dtype=np.int64),
            "clicked": rng.random(n) < click_rate,
        }
    )


def _group_gap(model: RankerModel) -> float:
    """Mean served logit of even items minus odd items, over a grid of users."""
    user_ids = [f"u{u}" for u in range(50)]
    candidates = np.tile(np.array([f"i{i}" for i in range(30)], dtype=object), (50, 1))
    users = {name: tf.constant(values) for name, values in _user_inputs(user_ids, NO_ATTRIBUTES).items()}
    logits = np.asarray(model.logits(users, tf.constant(candidates), tf.zeros([50, 30])))
    return float(logits[:, 0::2].mean() - logits[:, 1::2].mean())


def test_the_position_bias_takes_the_position_effect_and_leaves_the_items_alone() -> None:
    debiased = build_ranker(NO_ATTRIBUTES, SMALL)
    train_ranker(debiased, ranker_examples(_position_only(6_000, seed=2), NO_ATTRIBUTES), epochs=4, batch_size=256)
    bias = np.asarray(debiased.position_bias(tf.range(5)))
    assert bias[0] == 0.0 and np.all(np.diff(bias) < 0), bias
    spread = float(bias[0] - bias[4])
    assert spread > 2.0, bias  # the true logits: 1.39, 0, -0.85, -1.73, -2.59

    # The same logs without positions: the items absorb the effect, which the bias term prevents.
    naive = build_ranker(NO_ATTRIBUTES, SMALL)
    train_ranker(naive, ranker_examples(_position_only(6_000, seed=2, log_positions=False), NO_ATTRIBUTES), epochs=4)
    naive_gap, debiased_gap = _group_gap(naive), _group_gap(debiased)
    assert naive_gap > 0.6  # the logit gap of the two groups' click rates is ~0.8
    assert abs(debiased_gap) < 0.5 * naive_gap and abs(debiased_gap) < 0.15 * spread, (debiased_gap, naive_gap)


ATTRIBUTES = AttributeSchema(
    user=(
        Attribute(name="tier", type="categorical"),
        Attribute(name="languages", type="multi_categorical", max_tokens=3),
        Attribute(name="spend", type="numeric", boundaries=(10.0, 100.0)),
    ),
    event_kinds=("click", "purchase"),
)


def _request(schema: AttributeSchema) -> dict[str, np.ndarray]:
    arrays = _user_inputs(
        ["u1", "u2", "new-user"],
        schema,
        recent_items=[["i3", "i9"], [], ["i1"]],
        count_1h=[1, 0, 4],
        count_24h=[9, 2, 4],
        click_count_24h=[3, 0, 1],
        tier=["gold", "", "free"],
        languages=[["en", "de"], [], ["fr"]],
        spend=[50.0, np.nan, 500.0],
    )
    arrays["item_ids"] = np.array([["i3", "i4", "", ""], ["i1", "i2", "i7", "i8"], ["i5", "", "", ""]], dtype=object)
    arrays["retrieval_scores"] = np.array(
        [[9.0, 8.0, PAD, PAD], [7.0, 6.0, 5.0, 4.0], [3.0, 0.0, 0.0, 0.0]], np.float32
    )
    return arrays


def test_export_serves_the_in_memory_logits_and_resumes_for_fine_tuning(tmp_path: Path) -> None:
    model = build_ranker(ATTRIBUTES, SMALL)
    labeled = _planted(600, seed=3).assign(tier="gold", count_1h=2)
    train_ranker(model, ranker_examples(labeled, ATTRIBUTES), epochs=1, batch_size=128)
    version = export_ranker(model, tmp_path / "ranker" / "1", ATTRIBUTES, lineage={"parent": None, "rows": 600})

    loaded = tf.saved_model.load(str(version))
    assert ranker_signature_problems(loaded, ATTRIBUTES) == []
    arrays = _request(ATTRIBUTES)
    request = {name: tf.constant(values) for name, values in arrays.items()}
    served = loaded.signatures[contracts.RANK_SIGNATURE](**request)["scores"].numpy()
    default = loaded.signatures["serving_default"](**request)["scores"].numpy()
    users = {name: request[name] for name in user_spec(ATTRIBUTES)}
    in_memory = np.asarray(model.logits(users, request["item_ids"], request["retrieval_scores"]))
    padding = arrays["item_ids"] == ""
    assert served.shape == (3, 4) and served.dtype == np.float32
    np.testing.assert_allclose(served[~padding], in_memory[~padding], rtol=1e-5, atol=1e-6)
    assert np.all(served[padding] == PAD) and np.array_equal(served, default)
    lineage = json.loads((version / contracts.LINEAGE_PATH).read_text())
    assert lineage["rows"] == 600 and lineage["model"] == contracts.RANKER_MODEL_NAME

    resumed = load_ranker_for_finetune(version)
    np.testing.assert_allclose(
        np.asarray(resumed.logits(users, request["item_ids"], request["retrieval_scores"])),
        in_memory,
        rtol=1e-5,
        atol=1e-6,
    )
    assert int(resumed.optimizer.iterations.numpy()) == int(model.optimizer.iterations.numpy()) > 0
    mismatched = {**request, "retrieval_scores": request["retrieval_scores"][:, :2]}
    with pytest.raises(tf.errors.InvalidArgumentError, match="retrieval_scores must have the shape of item_ids"):
        loaded.signatures[contracts.RANK_SIGNATURE](**mismatched)
    with pytest.raises(FileExistsError):
        export_ranker(model, version, ATTRIBUTES)


def test_a_second_export_of_one_ranker_object_reuses_its_trace_and_serves_its_new_weights(tmp_path: Path) -> None:
    """The ranker line trains two model objects in turn: the export of an object traced before
    writes its new weights without tracing ``rank`` again, and the version serves those weights."""
    model = build_ranker(ATTRIBUTES, SMALL)
    labeled = _planted(600, seed=3).assign(tier="gold", count_1h=2)
    train_ranker(model, ranker_examples(labeled, ATTRIBUTES), epochs=1, batch_size=128)
    export_ranker(model, tmp_path / "ranker" / "1", ATTRIBUTES)
    module = ranker_serving_module(model)
    traced = module.rank.experimental_get_tracing_count()
    train_ranker(model, ranker_examples(_planted(600, seed=4).assign(tier="gold", count_1h=2), ATTRIBUTES), epochs=2)
    second = export_ranker(model, tmp_path / "ranker" / "2", ATTRIBUTES)
    assert ranker_serving_module(model) is module and module.rank.experimental_get_tracing_count() == traced

    arrays = _request(ATTRIBUTES)
    request = {name: tf.constant(values) for name, values in arrays.items()}
    served = tf.saved_model.load(str(second)).signatures[contracts.RANK_SIGNATURE](**request)["scores"].numpy()
    users = {name: request[name] for name in user_spec(ATTRIBUTES)}
    in_memory = np.asarray(model.logits(users, request["item_ids"], request["retrieval_scores"]))
    padding = arrays["item_ids"] == ""
    np.testing.assert_allclose(served[~padding], in_memory[~padding], rtol=1e-5, atol=1e-6)
    first = tf.saved_model.load(str(tmp_path / "ranker" / "1")).signatures[contracts.RANK_SIGNATURE](**request)
    assert not np.allclose(first["scores"].numpy()[~padding], served[~padding])  # the new weights, not the old
    assert ranker_serving_module(build_ranker(ATTRIBUTES, SMALL)) is not module  # another object: its own trace


def test_signature_problems_name_a_missing_input_and_a_wrong_dtype(tmp_path: Path) -> None:
    inputs, _ = ranker_signature_spec(NO_ATTRIBUTES)
    wrong = {name: spec for name, spec in inputs.items() if name != "retrieval_scores"}
    wrong["count_1h"] = ("float32", (None,))

    def rank(features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return {"scores": tf.zeros(tf.shape(features["item_ids"]), tf.float32)}

    module = tf.Module()
    module.rank = tf.function(rank, input_signature=[tensor_specs(wrong)])
    concrete = module.rank.get_concrete_function()
    tf.saved_model.save(module, str(tmp_path / "wrong"), signatures={contracts.RANK_SIGNATURE: concrete})
    problems = ranker_signature_problems(tf.saved_model.load(str(tmp_path / "wrong")), NO_ATTRIBUTES)
    assert any("serving_default" in problem and "missing" in problem for problem in problems)
    assert any("'retrieval_scores'" in problem for problem in problems)
    assert any("'count_1h' has dtype float32" in problem for problem in problems)


def test_auc_by_ranks_matches_the_pairwise_definition() -> None:
    rng = np.random.default_rng(4)
    labels, scores = rng.random(200) < 0.3, rng.integers(0, 5, 200).astype(float)  # many ties
    pairs = scores[labels][:, None] - scores[~labels][None, :]
    assert roc_auc(labels, scores) == pytest.approx(np.mean((pairs > 0) + 0.5 * (pairs == 0)))
    assert np.isnan(roc_auc(np.ones(3, bool), np.arange(3.0)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"position": [0, None]}, "position"),
        ({"clicked": [True, None]}, "clicked"),
        ({"item_id": ["a", ""]}, "empty item_id"),
        ({"weight": [1.0, -1.0]}, "weight"),
    ],
)
def test_malformed_labeled_rows_are_refused_with_the_column_named(change: dict[str, list[Any]], message: str) -> None:
    labeled = pd.DataFrame(
        {"user_id": ["u1", "u2"], "item_id": ["a", "b"], "position": [0, 1], "clicked": [True, False]}
    )
    with pytest.raises(DatasetError, match=message):
        ranker_examples(labeled.assign(**change), NO_ATTRIBUTES)
    with pytest.raises(DatasetError, match="missing column"):
        ranker_examples(labeled.drop(columns="position"), NO_ATTRIBUTES)


def test_a_new_ranker_serves_the_retrieval_order() -> None:
    """Untrained, the ranking model keeps the retrieval model's order (its network's output starts
    at zero), so turning the ranking stage on changes nothing until it has learned."""
    model = build_ranker(AttributeSchema())
    users = _user_inputs(["u1", "u2"], AttributeSchema())
    retrieval = np.array([[9.0, 3.0, 5.0, -2.0], [0.5, 0.4, 0.3, 0.2]], dtype=np.float32)
    items = np.array([["a", "b", "c", "d"], ["e", "f", "g", "h"]], dtype=object)
    logits = model.logits({k: tf.constant(v) for k, v in users.items()}, tf.constant(items), tf.constant(retrieval))
    assert (np.argsort(-logits.numpy(), axis=1) == np.argsort(-retrieval, axis=1)).all()
