"""The interval plan: every new example is learned exactly once (its hold-out one interval late),
the hold-out is never trained on, replay draws only older rows, and a restart keeps the deferred rows."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from online_trainer import checkpoint, training
from online_trainer.buffer import ReplayBuffer
from online_trainer.catalog import ItemCatalog
from online_trainer.checkpoint import Checkpoint
from online_trainer.examples import empty_examples, examples_from_interactions
from online_trainer.finetune import finetune, plan_interval, training_pair
from online_trainer.history import UserHistories
from online_trainer.inference import recommend
from online_trainer.losses import full_catalog_loss
from online_trainer.model import build_model
from online_trainer.model_config import ModelConfig
from online_trainer.model_state import optimizer_state, weights_by_path
from online_trainer.settings import TrainerTuning
from online_trainer.training import gradient_norm, train
from streamrec.core.attributes import Attribute, AttributeSchema

SCHEMA = AttributeSchema(item=(Attribute(name="genre", type="categorical"),))
TINY = ModelConfig(
    attributes=SCHEMA,
    embedding_dim=8,
    item_id_buckets=512,
    user_id_buckets=128,
    attribute_buckets=16,
    batch_size=32,
    finetune_batch_size=16,
)


def _catalog(n: int) -> ItemCatalog:
    return ItemCatalog(tuple(str(i) for i in range(n)), SCHEMA.item, {"genre": ("drama",) * n})


def _examples(n: int, *, first: int) -> pd.DataFrame:
    """``n`` examples in time order whose item ids are their global positions (to follow rows)."""
    rng = np.random.default_rng(first)
    interactions = pd.DataFrame(
        {
            "event_id": [f"e{first + i}" for i in range(n)],
            "user_id": rng.integers(0, 6, size=n).astype(str),
            "item_id": [str(first + i) for i in range(n)],
            "event_time": pd.to_datetime(1_000_000 + (first + np.arange(n)) * 60, unit="s", utc=True),
        }
    )
    return examples_from_interactions(interactions, None, SCHEMA)


def _ids(frame: pd.DataFrame) -> list[int]:
    return sorted(int(item) for item in frame["item_id"])


def test_every_new_example_is_learned_once_and_the_holdout_one_interval_late() -> None:
    tuning = TrainerTuning(holdout_size=10, replay_fraction=0.5)
    replay = ReplayBuffer(1_000)
    replay.add(_examples(100, first=0))  # the bootstrap's rows
    deferred = empty_examples(SCHEMA)
    learned: list[int] = []
    for step, first in enumerate(range(100, 400, 100)):
        interval = _examples(100, first=first)
        plan = plan_interval(interval, deferred=deferred, replay=replay, tuning=tuning, seed=step)
        # the gate's rows are the 10 newest of this interval, and nothing trained on them
        assert _ids(plan.holdout) == list(range(first + 90, first + 100))
        assert not set(_ids(plan.holdout)) & set(_ids(plan.mix))
        # replay: as many older rows as new ones (replay_fraction 0.5), none of this interval
        assert len(plan.replayed) == len(plan.fresh) and max(_ids(plan.replayed)) < first
        learned += _ids(plan.fresh)
        replay.add(interval)
        deferred = plan.deferred
    # 100..389 learned as new rows exactly once; 390..399 wait for the next interval
    assert sorted(learned) == list(range(100, 390))
    assert _ids(deferred) == list(range(390, 400))


def test_a_tiny_interval_keeps_a_holdout_from_the_replay_buffer() -> None:
    tuning = TrainerTuning(holdout_size=10)
    replay = ReplayBuffer(1_000)
    replay.add(_examples(50, first=0))
    plan = plan_interval(_examples(3, first=50), deferred=empty_examples(SCHEMA), replay=replay, tuning=tuning, seed=0)
    assert _ids(plan.fresh) == [50, 51, 52] and plan.deferred.empty
    assert _ids(plan.holdout) == list(range(40, 50))  # the newest replayed rows


def test_finetune_trains_a_copy_on_the_mix(tmp_path: Path) -> None:
    items = [str(i) for i in range(60)]
    catalog = _catalog(50)
    model = build_model(catalog, dataclasses.replace(TINY, full_catalog=False))  # an in-batch bootstrap
    tuning = TrainerTuning(holdout_size=5, finetune_epochs=2)
    replay = ReplayBuffer(100)
    replay.add(_examples(50, first=0))
    plan = plan_interval(_examples(10, first=50), deferred=empty_examples(SCHEMA), replay=replay, tuning=tuning, seed=0)
    before = recommend(model, plan.holdout, k=5)[1]
    grown = catalog.with_new_items(items[50:], [{"genre": "comedy"}] * 10)
    candidate, stats = finetune(model, plan, tuning, catalog=grown)
    assert candidate is not model and len(candidate.catalog) == 60 and len(model.catalog) == 50
    assert candidate.config.full_catalog and not model.config.full_catalog  # trainer.finetune_loss default
    assert np.isfinite(stats["loss"]) and int(candidate.optimizer.iterations) > int(model.optimizer.iterations)
    np.testing.assert_array_equal(recommend(model, plan.holdout, k=5)[1], before)  # the serving model is untouched

    # the next interval trains a spare object in place when it has the fine-tune config ...
    next_plan = plan_interval(_examples(10, first=60), deferred=plan.deferred, replay=replay, tuning=tuning, seed=1)
    again, _ = finetune(candidate, next_plan, tuning, reuse=model)
    assert again is not model and again is not candidate  # the bootstrap's config is not the fine-tune one
    reused, _ = finetune(again, next_plan, tuning, reuse=candidate)
    assert reused is candidate and len(reused.catalog) == 60  # ... weights and catalog copied from ``again``

    # a restart finds the deferred rows in the checkpoint, with list-valued recent items
    saved = Checkpoint(UserHistories(), replay, {"offsets": {}}, plan.deferred)
    checkpoint.save(tmp_path, 1, saved)
    loaded = checkpoint.load_latest(tmp_path, 1, 100)
    assert loaded is not None and _ids(loaded.deferred) == _ids(plan.deferred) == list(range(58, 60))
    assert loaded.deferred["recent_items"].tolist() == plan.deferred["recent_items"].tolist()


def test_training_pair_traces_both_objects_before_the_first_interval() -> None:
    catalog = _catalog(60)
    loaded = build_model(catalog, dataclasses.replace(TINY, full_catalog=False))  # as load_for_finetune gives it
    tuning = TrainerTuning(holdout_size=5)
    replay = ReplayBuffer(100)
    replay.add(_examples(50, first=0))
    serving, spare = training_pair(loaded, tuning, replay.sample(TINY.finetune_batch_size + 1, seed=0))
    assert serving is not spare and serving.config == spare.config and serving.config.full_catalog
    # the warm-up changed nothing: same weights and Adam state as the model loaded from disk
    for model in (serving, spare):
        assert model._compiled_train_step.experimental_get_tracing_count() == 1  # any batch size
        assert int(model.optimizer.iterations) == int(loaded.optimizer.iterations)
        for name, value in weights_by_path(loaded).items():
            np.testing.assert_array_equal(weights_by_path(model)[name], value)
        for saved, now in zip(optimizer_state(loaded), optimizer_state(model), strict=True):
            np.testing.assert_array_equal(saved, now)
    # three intervals, alternating as the trainer does, the last two with new items in the catalog:
    # both objects are reused and neither traces again
    plan = plan_interval(_examples(30, first=50), deferred=empty_examples(SCHEMA), replay=replay, tuning=tuning, seed=0)
    first, _ = finetune(serving, plan, tuning, reuse=spare)
    grown = catalog.with_new_items([str(i) for i in range(60, 80)], [{"genre": "comedy"}] * 20)
    second, _ = finetune(first, plan, tuning, reuse=serving, catalog=grown)
    third, _ = finetune(second, plan, tuning, reuse=spare, catalog=grown.with_new_items(["80"], [{"genre": "noir"}]))
    assert first is spare and second is serving and third is spare and len(third.catalog) == 81
    assert [m._compiled_train_step.experimental_get_tracing_count() for m in (serving, spare)] == [1, 1]


def test_full_catalog_loss_matches_hand_computation() -> None:
    query = tf.constant([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    catalog = tf.constant([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])  # logits of query 0: [1, 0, 0]; query 1: [0, 2, 0]
    loss = full_catalog_loss(query, catalog, tf.constant([0, 1, -1], dtype=tf.int64), temperature=1.0)
    # row 0: -log(e / (e + 2)); row 1: -log(e^2 / (e^2 + 2)); row 2 (not in the catalog) is left out
    expected = (math.log1p(2 * math.exp(-1)) + math.log1p(2 * math.exp(-2))) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_full_catalog_loss_weights_each_row() -> None:
    query = tf.constant([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    catalog = tf.constant([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    rows = tf.constant([0, 1, -1], dtype=tf.int64)
    weights = tf.constant([3.0, 0.0, 5.0])  # the row not in the catalog stays out, whatever its weight
    loss = full_catalog_loss(query, catalog, rows, temperature=1.0, weights=weights)
    assert float(loss) == pytest.approx(3 * math.log1p(2 * math.exp(-1)) / 2, rel=1e-6)


def test_kind_weights_scale_the_loss_and_a_zero_weight_teaches_nothing() -> None:
    examples = _examples(40, first=0).assign(kind="purchase")
    config = dataclasses.replace(TINY, batch_size=64)  # one step: the loss is the one before any update
    plain, weighted = build_model(_catalog(40), config), build_model(_catalog(40), config)
    once = train(plain, examples, epochs=1, progress=False)["loss"]
    twice = train(weighted, examples, epochs=1, progress=False, kind_weights={"purchase": 2.0, "view": 9.0})["loss"]
    assert twice == pytest.approx(2 * once, rel=1e-5)
    ignored = build_model(_catalog(40), config)
    before = weights_by_path(ignored)
    train(ignored, examples, epochs=2, progress=False, kind_weights={"purchase": 0.0})
    for name, value in weights_by_path(ignored).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


def test_gradient_norm_sums_embedding_rows_of_the_same_index_like_the_dense_gradient() -> None:
    slices = tf.IndexedSlices(
        values=tf.constant([[1.0, 2.0], [3.0, 4.0]]), indices=tf.constant([0, 0]), dense_shape=tf.constant([3, 2])
    )
    # dense: row 0 = (4, 6), plus (1, 2): 16 + 36 + 1 + 4 (tf.linalg.global_norm would say 1+4+9+16+1+4)
    assert float(gradient_norm([slices, tf.constant([[1.0], [2.0]]), None])) == pytest.approx(math.sqrt(57))


def test_train_reports_the_gradient_norm_of_its_steps_and_nan_when_it_diverges() -> None:
    model = build_model(_catalog(40), TINY)
    examples = _examples(20, first=0).assign(item_id=[str(i % 40) for i in range(20)])  # one batch of 32
    batch = {name: tf.constant(values) for name, values in training._training_arrays(model, examples, None).items()}
    with tf.GradientTape() as tape:
        loss = training._batch_loss(model, batch, training._catalog_argument(model), None)
    gradients = tape.gradient(loss, model.trainable_variables)
    assert any(isinstance(gradient, tf.IndexedSlices) for gradient in gradients)  # the embedding path is exercised
    dense = math.sqrt(sum(float(tf.reduce_sum(tf.convert_to_tensor(g) ** 2)) for g in gradients if g is not None))
    stats = train(model, examples, epochs=1, progress=False)  # the first step starts from the same weights
    assert stats["gradient_norm_mean"] == stats["gradient_norm_max"] == pytest.approx(dense, rel=1e-4)
    assert stats["loss"] == pytest.approx(float(loss), rel=1e-5)
    two = train(model, examples.iloc[:12], epochs=2, progress=False)
    assert 0 < two["gradient_norm_mean"] <= two["gradient_norm_max"]
    model.set_weights([np.full_like(weight, np.nan) for weight in model.get_weights()])
    diverged = train(model, examples, epochs=1, progress=False)
    assert all(math.isnan(diverged[name]) for name in ("loss", "gradient_norm_mean", "gradient_norm_max"))
