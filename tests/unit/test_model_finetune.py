"""Fine-tuning a copy leaves the serving model untouched and continues the optimizer's run."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from online_trainer.catalog import ItemCatalog
from online_trainer.inference import recommend
from online_trainer.model import build_model
from online_trainer.model_config import ModelConfig
from online_trainer.model_state import clone_for_finetune, copy_into, optimizer_state, weights_by_path
from online_trainer.training import train
from streamrec.core.attributes import Attribute, AttributeSchema

SCHEMA = AttributeSchema(
    user=(Attribute(name="region", type="categorical"),), item=(Attribute(name="genre", type="categorical"),)
)
CATALOG = ItemCatalog(tuple(f"i{n}" for n in range(20)), SCHEMA.item, {"genre": ("drama",) * 20})
CONFIG = dataclasses.replace(
    ModelConfig(attributes=SCHEMA),
    embedding_dim=4,
    item_id_buckets=256,
    user_id_buckets=64,
    attribute_buckets=16,
    batch_size=8,
)


def _examples(seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "user_id": [f"u{n}" for n in rng.integers(0, 5, 64)],
            "region": "",
            "recent_items": [[f"i{n}"] for n in rng.integers(0, 20, 64)],
            "count_1h": np.int64(1),
            "count_24h": np.int64(2),
            "item_id": [f"i{n}" for n in rng.integers(0, 20, 64)],
        }
    )


def test_clone_trains_without_touching_the_original() -> None:
    catalog, config = CATALOG, CONFIG
    model = build_model(catalog, config)
    examples = _examples(3)
    stats = train(model, examples, epochs=1, progress=False)
    assert np.isfinite(stats["loss"]) and stats["examples_per_s"] > 0
    before_ids, before_scores = recommend(model, examples.head(4), k=5)

    clone = clone_for_finetune(model)
    assert clone.config.learning_rate == config.finetune_learning_rate
    assert clone.config.batch_size == config.finetune_batch_size
    for ours, theirs in zip(optimizer_state(clone), optimizer_state(model), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_allclose(recommend(clone, examples.head(4), k=5)[1], before_scores, rtol=1e-6)

    train(clone, examples, epochs=3, progress=False)
    after_ids, after_scores = recommend(model, examples.head(4), k=5)
    assert (after_ids == before_ids).all()
    np.testing.assert_array_equal(after_scores, before_scores)
    assert not np.allclose(recommend(clone, examples.head(4), k=5)[1], before_scores)


def test_a_reused_candidate_trains_exactly_like_a_fresh_clone() -> None:
    """``copy_into`` (the trainer's reuse of a spare candidate) leaves nothing of the old run behind."""
    model = build_model(CATALOG, CONFIG)
    train(model, _examples(3), epochs=1, progress=False)
    spare = clone_for_finetune(model, full_catalog=True)
    train(spare, _examples(4), epochs=2, progress=False)  # an earlier interval's candidate
    train(model, _examples(5), epochs=1, progress=False)  # the serving model moved on meanwhile

    reused = copy_into(spare, model)
    fresh = clone_for_finetune(model, full_catalog=True)
    assert reused is spare
    for (name, ours), theirs in zip(weights_by_path(reused).items(), weights_by_path(fresh).values(), strict=True):
        np.testing.assert_array_equal(ours, theirs, err_msg=name)
    for model_copy in (reused, fresh):
        train(model_copy, _examples(6), epochs=2, progress=False)
    for (name, ours), theirs in zip(weights_by_path(reused).items(), weights_by_path(fresh).values(), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7, err_msg=name)
    for ours, theirs in zip(optimizer_state(reused), optimizer_state(fresh), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-7)
