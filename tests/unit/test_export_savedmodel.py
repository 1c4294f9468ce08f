"""SavedModel export: signatures equal to the in-memory model, warm-up records, atomic versions,
and quantized serving tables (float16, int8) that answer as the float32 version does.

The model is built from a schema that is not MovieLens': string ids, a categorical, a numeric
and a multi-categorical attribute on each side, and three event kinds counted on their own.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from online_trainer import export, quantize
from online_trainer.catalog import ItemCatalog
from online_trainer.examples import examples_from_interactions, user_arrays
from online_trainer.inference import PAD_SCORE, recommend, score, similar
from online_trainer.model import TwoTowerModel, build_model
from online_trainer.model_config import ModelConfig
from online_trainer.model_state import weights_by_path
from online_trainer.ranking_metrics import overlap_at_k
from online_trainer.training import train
from streamrec.core import contracts
from streamrec.core.attributes import Attribute, AttributeSchema, user_model_inputs
from streamrec.core.errors import DatasetError

SCHEMA = AttributeSchema(
    user=(
        Attribute(name="tier", type="categorical"),
        Attribute(name="lifetime_spend", type="numeric", boundaries=(10.0, 100.0, 1000.0)),
        Attribute(name="languages", type="multi_categorical", max_tokens=3),
    ),
    item=(
        Attribute(name="category", type="categorical"),
        Attribute(name="price", type="numeric", boundaries=(5.0, 20.0, 80.0)),
        Attribute(name="tags", type="multi_categorical", max_tokens=4),
    ),
    event_kinds=("add_to_cart", "purchase", "view"),
)
CATEGORIES = ("shoes", "hats", "bags", "socks")
LINEAGE = {"data_range": ["a", "b"], "parent_version": None, "feature_service": contracts.USER_FEATURE_SERVICE}


def sku(n: int) -> str:
    return f"sku-{n:04d}"


@pytest.fixture(scope="module")
def tiny() -> tuple[TwoTowerModel, pd.DataFrame]:
    rng = np.random.default_rng(7)
    items = pd.DataFrame(
        {
            "item_id": [sku(n) for n in range(150)],
            "category": [CATEGORIES[n % 4] if n % 5 else "" for n in range(150)],
            "price": [float(n % 90) if n % 7 else np.nan for n in range(150)],
            "tags": [[f"t{n % 3}", f"t{n % 5}"] if n % 2 else [] for n in range(150)],
        }
    )
    events = pd.DataFrame(
        {
            "event_id": [f"e{n}" for n in range(600)],
            "user_id": [f"user-{n:03d}" for n in rng.integers(0, 40, 600)],
            "item_id": [sku(n) for n in rng.zipf(1.3, 600) % 150],
            "kind": rng.choice(SCHEMA.event_kinds, 600),
            "event_time": pd.to_datetime(np.sort(rng.integers(0, 10**6, 600)), unit="s", utc=True),
        }
    )
    users = pd.DataFrame(
        {
            "user_id": [f"user-{n:03d}" for n in range(40)],
            "tier": ["gold", "silver", ""] * 13 + ["gold"],
            "lifetime_spend": [float(n * 37) if n % 6 else np.nan for n in range(40)],
            "languages": [["en"], ["en", "fr"], []] * 13 + [["de"]],
        }
    )
    examples = examples_from_interactions(events, users, SCHEMA)
    config = dataclasses.replace(
        ModelConfig(attributes=SCHEMA),
        embedding_dim=8,
        item_id_buckets=2048,
        user_id_buckets=512,
        attribute_buckets=64,
        batch_size=64,
    )
    model = build_model(ItemCatalog.from_frame(items, SCHEMA), config)
    train(model, examples, epochs=2, progress=False, kind_weights={"purchase": 4.0})
    return model, examples


@pytest.fixture(scope="module")
def exported(tiny: tuple[TwoTowerModel, pd.DataFrame], tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, examples = tiny
    base = tmp_path_factory.mktemp("models")
    return export.export_version(model, base, 1, lineage=LINEAGE, warmup_users=examples.head(5))


def _inputs(frame: pd.DataFrame) -> dict[str, tf.Tensor]:
    return {name: tf.constant(values) for name, values in user_arrays(frame, SCHEMA).items()}


def test_signatures_match_the_in_memory_model(tiny: tuple[TwoTowerModel, pd.DataFrame], exported: Path) -> None:
    model, examples = tiny
    users = examples.tail(6)
    exclude = [list(items[:3]) for items in users["recent_items"]]
    padded = np.array([row + [""] * (3 - len(row)) for row in exclude], dtype=object)
    loaded = tf.saved_model.load(str(exported))
    assert set(loaded.signatures) == {"recommend", "score", "similar", "serving_default"}
    served = loaded.signatures["recommend"](**_inputs(users), exclude_items=tf.constant(padded))
    ids, scores = recommend(model, users, k=contracts.TOP_K_EXPORTED, exclude=exclude)
    assert served["item_ids"].shape == (6, contracts.TOP_K_EXPORTED)
    assert (served["item_ids"].numpy().astype(str) == ids).all()
    np.testing.assert_allclose(served["scores"].numpy(), scores, rtol=1e-5, atol=1e-5)
    default = loaded.signatures["serving_default"](**_inputs(users), exclude_items=tf.constant(padded))
    assert (default["item_ids"].numpy() == served["item_ids"].numpy()).all()

    pairs = np.array([[sku(1), sku(2), "never-seen"]] * 6, dtype=object)
    scored = loaded.signatures["score"](**_inputs(users), item_ids=tf.constant(pairs))["scores"].numpy()
    np.testing.assert_allclose(scored, score(model, users, pairs), rtol=1e-5, atol=1e-5)
    top_scored = loaded.signatures["score"](**_inputs(users), item_ids=tf.constant(ids[:, :5]))["scores"]
    np.testing.assert_allclose(top_scored.numpy(), scores[:, :5], rtol=1e-4, atol=1e-4)


def test_excluded_ids_are_never_returned(exported: Path, tiny: tuple[TwoTowerModel, pd.DataFrame]) -> None:
    _, examples = tiny
    users = examples.head(2)
    loaded = tf.saved_model.load(str(exported))
    everything_but_three = np.array([[sku(n) for n in range(147)] + ["", "unknown"]] * 2, dtype=object)
    out = loaded.signatures["recommend"](**_inputs(users), exclude_items=tf.constant(everything_but_three))
    ids = out["item_ids"].numpy().astype(str)
    assert sorted(ids[0][:3]) == [sku(147), sku(148), sku(149)] and (ids[:, 3:] == "").all()
    assert not set(ids.ravel()) & set(everything_but_three.ravel()) - {""}


def test_similar_matches_memory_and_never_returns_the_item_or_an_excluded_one(
    exported: Path, tiny: tuple[TwoTowerModel, pd.DataFrame]
) -> None:
    model, _ = tiny
    loaded = tf.saved_model.load(str(exported))
    queries = [sku(3), sku(40), "not-in-the-catalog"]
    exclude = [[sku(5), sku(6)], [""], [sku(3)]]
    served = loaded.signatures["similar"](
        item_id=tf.constant(queries), exclude_items=tf.constant([row + [""] * (2 - len(row)) for row in exclude])
    )
    ids, scores = served["item_ids"].numpy().astype(str), served["scores"].numpy()
    assert ids.shape == scores.shape == (3, contracts.TOP_K_EXPORTED) and scores.dtype == np.float32
    memory_ids, memory_scores = similar(model, queries, k=contracts.TOP_K_EXPORTED, exclude=exclude)
    assert (ids == memory_ids).all()
    np.testing.assert_allclose(scores, memory_scores, rtol=1e-5, atol=1e-5)
    assert sku(3) not in ids[0] and not {sku(5), sku(6)} & set(ids[0]) and sku(40) not in ids[1]
    assert (ids[:2] != "").all() and np.all(np.diff(scores[:2], axis=1) <= 1e-6)  # full and best first
    assert (ids[2] == "").all() and (scores[2] == PAD_SCORE).all()  # an unknown item: padding only
    # the scores are the cosine of item-tower vectors over the temperature
    from online_trainer.inference import catalog_vectors

    vectors = catalog_vectors(model)
    row = model.catalog.index
    expected = vectors[row[sku(3)]] @ vectors[row[ids[0][0]]] / model.config.temperature
    assert scores[0][0] == pytest.approx(expected, rel=1e-4)


def test_new_user_and_new_item_are_served(exported: Path, tiny: tuple[TwoTowerModel, pd.DataFrame]) -> None:
    model, _ = tiny
    stranger = pd.DataFrame(
        {
            "user_id": ["never-seen"],
            "tier": [""],
            "lifetime_spend": [np.nan],
            "languages": [[]],
            "recent_items": [[sku(3), "brand-new"]],
            "count_1h": [1],
            "count_24h": [2],
            "purchase_count_24h": [1],
        }
    )
    loaded = tf.saved_model.load(str(exported))
    out = loaded.signatures["score"](**_inputs(stranger), item_ids=tf.constant([["brand-new", sku(1)]]))
    assert np.isfinite(out["scores"].numpy()).all()
    ids = loaded.signatures["recommend"](**_inputs(stranger), exclude_items=tf.constant([[""]]))["item_ids"]
    assert (ids.numpy() != b"").all()
    # a new item added to the catalog is ranked from its attributes at once
    original = model.catalog
    model.catalog = original.with_new_items(["brand-new"], [{"category": "hats", "price": 12.0, "tags": ["t1"]}])
    try:
        assert model.catalog.attribute_row("brand-new") == {"category": "hats", "price": 12.0, "tags": ("t1",)}
        ids, scores = recommend(model, stranger, k=len(model.catalog))
        assert "brand-new" in ids[0] and np.isfinite(scores).all()
    finally:
        model.catalog = original


def test_a_catalog_of_another_schema_is_refused(tiny: tuple[TwoTowerModel, pd.DataFrame]) -> None:
    model, _ = tiny
    with pytest.raises(DatasetError, match="item attributes"):
        build_model(ItemCatalog.from_items_seen(["a", "b"], AttributeSchema()), model.config)


def test_saved_model_cli_lists_typed_signatures(exported: Path) -> None:
    cli = Path(sys.executable).parent / "saved_model_cli"
    shown = subprocess.run(
        [str(cli), "show", "--all", "--dir", str(exported)], capture_output=True, text=True, check=True
    )
    text = shown.stdout
    for signature in ("'recommend'", "'score'", "'similar'", "'serving_default'"):
        assert f"signature_def[{signature}]" in text
    assert "inputs['exclude_items'] tensor_info:\n        dtype: DT_STRING\n        shape: (-1, -1)" in text
    assert "inputs['recent_items'] tensor_info:\n        dtype: DT_STRING\n        shape: (-1, 20)" in text
    assert "inputs['count_1h'] tensor_info:\n        dtype: DT_INT64\n        shape: (-1)" in text
    assert "inputs['purchase_count_24h'] tensor_info:\n        dtype: DT_INT64\n        shape: (-1)" in text
    assert "inputs['tier'] tensor_info:\n        dtype: DT_STRING\n        shape: (-1)" in text
    assert "inputs['lifetime_spend'] tensor_info:\n        dtype: DT_FLOAT\n        shape: (-1)" in text
    assert "inputs['languages'] tensor_info:\n        dtype: DT_STRING\n        shape: (-1, -1)" in text
    assert "inputs['item_id'] tensor_info:\n        dtype: DT_STRING\n        shape: (-1)" in text
    assert "outputs['item_ids'] tensor_info:\n        dtype: DT_STRING\n        shape: (-1, 100)" in text


def test_warmup_requests_are_prediction_logs(exported: Path) -> None:
    path = exported / "assets.extra" / "tf_serving_warmup_requests"
    raw_records = tf.data.TFRecordDataset(str(path)).as_numpy_iterator()
    records = [prediction_log_pb2.PredictionLog.FromString(raw) for raw in raw_records]
    by_signature: dict[str, int] = {}
    users = set(user_model_inputs(SCHEMA))
    expected = {
        contracts.RECOMMEND_SIGNATURE: {*users, "exclude_items"},
        contracts.SCORE_SIGNATURE: {*users, "item_ids"},
        contracts.SIMILAR_SIGNATURE: {"item_id", "exclude_items"},
    }
    for log in records:
        request = log.predict_log.request
        assert request.model_spec.name == contracts.MODEL_NAME
        signature = request.model_spec.signature_name
        by_signature[signature] = by_signature.get(signature, 0) + 1
        assert set(request.inputs) == expected[signature]
        if "recent_items" in request.inputs:
            assert tf.make_ndarray(request.inputs["recent_items"]).shape[1] == contracts.RECENT_ITEMS_MAX
            assert tf.make_ndarray(request.inputs["lifetime_spend"]).dtype == np.float32
    assert by_signature == {"recommend": 6, "score": 1, "similar": 1}  # one batch of 5, 5 single users
    # the schema the signatures were built from travels with the version
    saved = AttributeSchema.from_json((exported / "assets.extra" / "attribute_schema.json").read_text())
    assert saved == SCHEMA


def test_lineage_and_resume(exported: Path, tiny: tuple[TwoTowerModel, pd.DataFrame]) -> None:
    model, examples = tiny
    lineage = export.read_lineage(exported)
    assert lineage["version"] == 1 and lineage["feature_service"] == contracts.USER_FEATURE_SERVICE
    assert lineage["catalog_size"] == 150
    assert lineage["model_config"]["attributes"]["event_kinds"] == list(SCHEMA.event_kinds)
    resumed = export.load_for_finetune(exported)
    assert resumed.catalog == model.catalog and resumed.config == model.config and resumed.schema == SCHEMA
    assert np.isnan(resumed.catalog.values["price"][0]) and resumed.catalog.values["tags"][1] == ("t1", "t1")
    np.testing.assert_allclose(
        recommend(resumed, examples.head(3), k=10)[1], recommend(model, examples.head(3), k=10)[1]
    )
    assert ItemCatalog.from_json(json.loads(json.dumps(model.catalog.to_json()))) == model.catalog


def test_a_version_from_before_declared_attributes_names_the_fix(exported: Path, tmp_path: Path) -> None:
    import shutil

    old = tmp_path / "1"
    shutil.copytree(exported, old)
    config_path = old / "assets.extra" / "model_config.json"
    config = json.loads(config_path.read_text())
    del config["attributes"]
    config.update(profile_buckets=1024, genre_buckets=128, max_genres=8)  # what issue 19 wrote
    config_path.write_text(json.dumps(config))
    with pytest.raises(DatasetError, match="retrain with `streamrec train"):
        export.load_for_finetune(old)


def test_crash_before_rename_leaves_no_visible_version(
    tiny: tuple[TwoTowerModel, pd.DataFrame], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, examples = tiny

    def crash(root: Path) -> None:
        raise RuntimeError("simulated crash after writing, before the rename")

    monkeypatch.setattr(export, "_fsync_tree", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        export.export_version(model, tmp_path, 3, lineage={}, warmup_users=examples.head(2))
    leftovers = list(tmp_path.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".tmp-3-")
    assert (leftovers[0] / "saved_model.pb").is_file()
    assert export.list_versions(tmp_path) == [] and export.latest_version(tmp_path) is None
    assert export.remove_temp_dirs(tmp_path) == leftovers and not list(tmp_path.iterdir())


def test_versions_are_immutable(exported: Path, tiny: tuple[TwoTowerModel, pd.DataFrame]) -> None:
    model, examples = tiny
    with pytest.raises(FileExistsError, match="publish 2"):
        export.export_version(model, exported.parent, 1, lineage={}, warmup_users=examples.head(1))


def test_prune_keeps_newest_and_protected(tmp_path: Path) -> None:
    for version in (1, 2, 3, 4, 5):
        (tmp_path / str(version)).mkdir()
        (tmp_path / str(version) / "saved_model.pb").write_bytes(b"x")
    (tmp_path / ".tmp-6-abc").mkdir()
    assert export.prune_versions(tmp_path, keep=2, protect={1}) == [2, 3]
    assert export.list_versions(tmp_path) == [1, 4, 5]
    archive = tmp_path.parent / "archive"
    assert export.prune_versions(tmp_path, keep=1, protect=set(), archive_dir=archive) == [1, 4]
    assert export.list_versions(tmp_path) == [5] and export.list_versions(archive) == [1, 4]
    assert json.loads(json.dumps(export.list_versions(tmp_path))) == [5]


def test_a_second_export_of_one_model_object_reuses_its_trace_and_serves_its_new_weights(
    tiny: tuple[TwoTowerModel, pd.DataFrame], tmp_path: Path
) -> None:
    """``export.serving_module``: one traced module per model object. Exported again after more
    training, the version answers as the model now does; a grown catalog gets a new module."""
    trained, examples = tiny
    model = build_model(trained.catalog, trained.config)  # its own object: the fixture stays as it is
    model.set_weights(trained.get_weights())
    users = examples.tail(4)
    no_exclusions = tf.constant(np.array([[""]] * 4, dtype=object))

    def served(version_dir: Path) -> tuple[np.ndarray, np.ndarray]:
        answer = tf.saved_model.load(str(version_dir)).signatures["recommend"](
            **_inputs(users), exclude_items=no_exclusions
        )
        return answer["item_ids"].numpy().astype(str), answer["scores"].numpy()

    first_dir = export.export_version(model, tmp_path, 1, lineage={}, warmup_users=examples.head(2))
    module = export.serving_module(model)
    traced = module.recommend.experimental_get_tracing_count()
    before = served(first_dir)
    train(model, examples, epochs=1, progress=False)
    second_dir = export.export_version(model, tmp_path, 2, lineage={}, warmup_users=examples.head(2))
    assert export.serving_module(model) is module and module.recommend.experimental_get_tracing_count() == traced
    ids, scores = recommend(model, users, k=contracts.TOP_K_EXPORTED, exclude=[[] for _ in range(4)])
    after = served(second_dir)
    assert (after[0] == ids).all()
    np.testing.assert_allclose(after[1], scores, rtol=1e-5, atol=1e-5)
    assert not np.allclose(after[1], before[1])  # the new weights, not the first export's

    model.catalog = model.catalog.with_new_items(["sku-new"])
    assert export.serving_module(model) is not module
    grown_dir = export.export_version(model, tmp_path, 3, lineage={}, warmup_users=examples.head(2))
    excluded_all = np.array([[sku(n) for n in range(150)]] * 4, dtype=object)
    answer = tf.saved_model.load(str(grown_dir)).signatures["recommend"](
        **_inputs(users), exclude_items=tf.constant(excluded_all)
    )
    assert (answer["item_ids"].numpy()[:, 0].astype(str) == "sku-new").all()


# -- quantized serving tables (online_trainer.quantize) --


def _top10(version: Path, users: pd.DataFrame) -> np.ndarray:
    loaded = tf.saved_model.load(str(version))
    exclude = tf.constant(np.full((len(users), 1), "", dtype=object))
    ids = loaded.signatures["recommend"](**_inputs(users), exclude_items=exclude)["item_ids"].numpy()
    return np.asarray(ids[:, :10].astype(str))


@pytest.fixture(scope="module")
def versions(
    tiny: tuple[TwoTowerModel, pd.DataFrame],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    model, examples = tiny
    base = tmp_path_factory.mktemp("quantized")
    return {
        dtype: export.export_version(
            model, base, number, lineage=LINEAGE, warmup_users=examples.head(5), table_dtype=dtype
        )
        for number, dtype in enumerate(quantize.TABLE_DTYPES, start=1)
    }


def test_quantized_versions_answer_as_the_float32_one_and_are_smaller(
    versions: dict[str, Path],
    tiny: tuple[TwoTowerModel, pd.DataFrame],
) -> None:
    _, examples = tiny
    users = examples.tail(40)
    reference = _top10(versions["float32"], users)
    assert overlap_at_k(reference, _top10(versions["float16"], users)).mean() >= 0.95
    assert overlap_at_k(reference, _top10(versions["int8"], users)).mean() >= 0.8
    # variables only: the tiny model's graph (saved_model.pb) outweighs its tables
    sizes = {
        dtype: sum(path.stat().st_size for path in (version / "variables").iterdir())
        for dtype, version in versions.items()
    }
    # the tiny model's hashed tables are most of its variables (2,048 + 512 + attribute rows x 8);
    # at dim 8 an int8 row with its float32 scale is 12 bytes against 32 (at dim 64: 68 against 256)
    assert sizes["int8"] < sizes["float16"] < 0.65 * sizes["float32"]
    assert sizes["int8"] < 0.5 * sizes["float32"]
    for dtype, path in versions.items():
        assert export.read_lineage(path)["table_dtype"] == dtype


def test_the_resume_files_keep_the_float32_weights(
    versions: dict[str, Path],
    tiny: tuple[TwoTowerModel, pd.DataFrame],
) -> None:
    model, _ = tiny
    resumed = export.load_for_finetune(versions["int8"])
    for name, values in weights_by_path(model).items():
        np.testing.assert_array_equal(weights_by_path(resumed)[name], values)
    assert all(layer.serving_table is None for layer in model.hashed_embeddings())  # training unaffected


def test_int8_rows_are_within_half_a_step_of_the_float32_ones() -> None:
    rng = np.random.default_rng(3)
    table = rng.normal(0, 0.05, (100, 16)).astype(np.float32)
    table[7] = 0.0  # an all-zero row (never looked up) keeps a usable scale
    stored, scales = quantize.quantize(table, "int8")
    assert stored.dtype == np.int8 and scales is not None
    restored = stored.astype(np.float32) * scales[:, None]
    assert np.all(np.abs(restored - table) <= scales[:, None] / 2 + 1e-9)
    assert np.all(restored[7] == 0.0)
    with pytest.raises(ValueError, match="use one of"):
        quantize.quantize(table, "float32")


def test_a_second_quantized_export_of_one_model_object_serves_its_new_weights(
    tiny: tuple[TwoTowerModel, pd.DataFrame],
    tmp_path: Path,
) -> None:
    model, examples = tiny
    copy = export.load_for_finetune(
        export.export_version(model, tmp_path / "first", 1, lineage=LINEAGE, warmup_users=examples.head(5))
    )
    first = export.export_version(copy, tmp_path, 1, lineage=LINEAGE, warmup_users=examples.head(5), table_dtype="int8")
    kept = copy._serving_copies["int8"]
    train(copy, examples, epochs=2, progress=False)
    second = export.export_version(
        copy, tmp_path, 2, lineage=LINEAGE, warmup_users=examples.head(5), table_dtype="int8"
    )
    assert copy._serving_copies["int8"] is kept  # updated in place: one trace per model object
    users = examples.tail(40)
    fresh = export.export_version(
        export.load_for_finetune(second), tmp_path / "fresh", 1, lineage=LINEAGE, warmup_users=examples.head(5),
        table_dtype="int8",
    )  # fmt: skip
    assert (_top10(second, users) == _top10(fresh, users)).all()
    assert not (_top10(first, users) == _top10(second, users)).all()
