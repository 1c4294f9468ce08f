"""The towers read declared attributes: hand-computed numeric buckets and multi-token means, and a
dataset that declares none (ids and stream features only) trains and exports."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from online_trainer import export
from online_trainer.catalog import ItemCatalog
from online_trainer.examples import examples_from_interactions
from online_trainer.gate import signature_problems
from online_trainer.inference import recommend, similar
from online_trainer.model import AttributeEmbedding, build_model
from online_trainer.model_config import ModelConfig
from online_trainer.model_state import weights_by_path
from online_trainer.training import train
from streamrec.core import contracts
from streamrec.core.attributes import Attribute, AttributeSchema

AGE = Attribute(name="age", type="numeric", boundaries=(18.0, 25.0, 35.0))
TAGS = Attribute(name="tags", type="multi_categorical", max_tokens=2)


def _numeric_layer() -> AttributeEmbedding:
    layer = AttributeEmbedding(AGE, buckets=64, dim=2, stddev=0.1, seed=0)
    layer.build()
    # row r = (r, 10 r): the output names the bucket it came from
    layer.table.set_weights([np.array([[r, 10 * r] for r in range(5)], dtype=np.float32)])
    return layer


def test_numeric_attributes_are_bucketized_with_their_boundaries() -> None:
    layer = _numeric_layer()
    values = tf.constant([np.nan, -3.0, 17.9, 18.0, 24.99, 25.0, 35.0, 1e9], dtype=tf.float32)
    # row 0: unknown (NaN); row 1: below 18; row 2: [18, 25); row 3: [25, 35); row 4: 35 and above
    assert layer.bucket(values).numpy().tolist() == [0, 1, 1, 2, 2, 3, 4, 4]
    np.testing.assert_array_equal(layer(values).numpy()[:, 0], [0, 1, 1, 2, 2, 3, 4, 4])
    assert len(layer.table.get_weights()[0]) == len(AGE.boundaries) + 2


def _token_rows(layer: AttributeEmbedding, vectors: dict[str, tuple[float, float]]) -> None:
    """Set the hashed table so that each token's two rows sum to its vector."""
    bag = layer.table
    table = np.zeros_like(bag.table.get_weights()[0])
    for token, vector in vectors.items():
        buckets = {int(h(tf.constant([token]))[0]) for h in bag.hashes}
        assert len(buckets) == 2, "the two hashes collided; pick another token"
        for bucket in buckets:
            table[bucket] = np.asarray(vector) / 2
    bag.table.set_weights([table])


def test_multi_categorical_attributes_average_their_first_max_tokens() -> None:
    layer = AttributeEmbedding(TAGS, buckets=4096, dim=2, stddev=0.1, seed=0)
    layer.build()
    _token_rows(layer, {"red": (1.0, 0.0), "wool": (0.0, 3.0), "cheap": (100.0, 100.0)})
    values = tf.constant([["red", "wool", "cheap"], ["wool", "", ""], ["", "", ""], ["red", "red", ""]])
    # "cheap" is the third token of a two-token attribute: never read
    np.testing.assert_allclose(layer(values).numpy(), [[0.5, 1.5], [0.0, 3.0], [0.0, 0.0], [1.0, 0.0]], atol=1e-6)


def test_the_user_tower_reads_an_attribute_by_its_name() -> None:
    """Only the numeric attribute, identity projection: the user vector is its bucket's row, normalized."""
    schema = AttributeSchema(user=(AGE,))
    config = dataclasses.replace(
        ModelConfig(attributes=schema),
        embedding_dim=2,
        profile_dim=2,
        use_user_id=False,
        use_recent_items=False,
        use_last_item=False,
        use_counts=False,
        item_id_buckets=64,
    )
    model = build_model(ItemCatalog(("a",)), config)
    (layer,) = model.user_attribute_embeddings
    layer.table.set_weights([np.array([[1, 0], [0, 1], [3, 4], [1, 1], [-1, 0]], dtype=np.float32)])
    model.user_projection.set_weights([np.eye(2, dtype=np.float32), np.zeros(2, dtype=np.float32)])
    users = model.user_tower({"age": tf.constant([np.nan, 20.0, 40.0], dtype=tf.float32)})
    np.testing.assert_allclose(users.numpy(), [[1, 0], [0.6, 0.8], [-1, 0]], atol=1e-6)


def test_a_dataset_without_attributes_trains_and_exports(tmp_path: Path) -> None:
    schema = AttributeSchema()
    rng = np.random.default_rng(3)
    events = pd.DataFrame(
        {
            "event_id": [f"e{n}" for n in range(400)],
            "user_id": [f"visitor-{n}" for n in rng.integers(0, 30, 400)],
            "item_id": [f"p{n}" for n in rng.integers(0, 50, 400)],
            "event_time": pd.to_datetime(np.sort(rng.integers(0, 10**6, 400)), unit="s", utc=True),
        }
    )
    examples = examples_from_interactions(events, None, schema)
    assert list(examples.columns) == [
        "user_id",
        "recent_items",
        "count_1h",
        "count_24h",
        "item_id",
        "kind",
        "event_time",
    ]
    catalog = ItemCatalog.for_dataset(None, events["item_id"], schema)
    config = dataclasses.replace(
        ModelConfig(attributes=schema), embedding_dim=8, item_id_buckets=512, user_id_buckets=128, batch_size=64
    )
    model = build_model(catalog, config)
    stats = train(model, examples, epochs=2, progress=False)
    assert np.isfinite(stats["loss"])
    version = export.export_version(model, tmp_path, 1, lineage={}, warmup_users=examples.head(3))
    loaded = tf.saved_model.load(str(version))
    assert signature_problems(loaded, schema) == []
    inputs = loaded.signatures["recommend"].structured_input_signature[1]
    assert set(inputs) == {"user_id", "recent_items", "count_1h", "count_24h", "exclude_items"}
    users = examples.tail(2)
    served = loaded.signatures["recommend"](
        user_id=tf.constant(users["user_id"].to_numpy(dtype=object)),
        recent_items=tf.constant([(row + [""] * 20)[:20] for row in users["recent_items"]]),
        count_1h=tf.constant(users["count_1h"].to_numpy(dtype=np.int64)),
        count_24h=tf.constant(users["count_24h"].to_numpy(dtype=np.int64)),
        exclude_items=tf.constant([[""], [""]]),
    )
    ids, scores = recommend(model, users, k=contracts.TOP_K_EXPORTED)
    assert (served["item_ids"].numpy().astype(str) == ids).all()
    np.testing.assert_allclose(served["scores"].numpy(), scores, rtol=1e-5, atol=1e-5)
    nearest, _ = similar(model, ["p1"], k=5)
    assert "p1" not in nearest[0] and (nearest != "").all()
    resumed = export.load_for_finetune(version)
    assert resumed.schema == schema and resumed.catalog == catalog


def test_use_profile_off_ignores_the_declared_attributes() -> None:
    schema = AttributeSchema(user=(AGE,), item=(TAGS,))
    catalog = ItemCatalog(("a", "b"), schema.item, {"tags": (("x",), ())})
    off = build_model(catalog, ModelConfig(attributes=schema, use_profile=False, use_item_content=False))
    assert not any("attr" in name for name in weights_by_path(off))
    on = build_model(catalog, ModelConfig(attributes=schema))
    assert {name.split("/")[0] for name in weights_by_path(on) if "attr" in name} == {"user_attr_age", "item_attr_tags"}
    with pytest.raises(KeyError, match="age"):
        on.user_tower({"user_id": tf.constant(["u"]), "recent_items": tf.constant([[""]])})
