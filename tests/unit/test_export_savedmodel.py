"""SavedModel export: signatures equal to the in-memory model, warm-up records, atomic versions."""

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

from online_trainer import export
from online_trainer.catalog import ItemCatalog, examples_from_interactions, user_arrays
from online_trainer.inference import recommend, score
from online_trainer.model import TwoTowerModel, build_model
from online_trainer.model_config import ModelConfig
from online_trainer.training import train
from streamrec.core import contracts

GENRES = ("Action", "Comedy", "Drama", "Horror")


@pytest.fixture(scope="module")
def tiny() -> tuple[TwoTowerModel, pd.DataFrame]:
    rng = np.random.default_rng(7)
    catalog = ItemCatalog(
        tuple(f"m{n}" for n in range(150)),
        tuple((GENRES[n % 4],) if n % 5 else () for n in range(150)),
        tuple(1950 + n % 50 if n % 7 else -1 for n in range(150)),
    )
    events = pd.DataFrame(
        {
            "event_id": [f"e{n}" for n in range(600)],
            "user_id": [f"u{n}" for n in rng.integers(0, 40, 600)],
            "item_id": [f"m{n}" for n in rng.zipf(1.3, 600) % 150],
            "event_time": pd.to_datetime(np.sort(rng.integers(0, 10**6, 600)), unit="s", utc=True),
        }
    )
    users = pd.DataFrame(
        {
            "user_id": [f"u{n}" for n in range(40)],
            "age_bucket": ["25-34"] * 40,
            "gender": ["M", "F"] * 20,
            "occupation": ["student"] * 40,
            "zip_prefix": ["021"] * 40,
        }
    )
    examples = examples_from_interactions(events, users)
    config = dataclasses.replace(
        ModelConfig(), embedding_dim=8, item_id_buckets=2048, user_id_buckets=512, batch_size=64
    )
    model = build_model(catalog, config)
    train(model, examples, epochs=2, progress=False)
    return model, examples


@pytest.fixture(scope="module")
def exported(tiny: tuple[TwoTowerModel, pd.DataFrame], tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, examples = tiny
    base = tmp_path_factory.mktemp("models")
    lineage = {"data_range": ["a", "b"], "parent_version": None, "feature_service": contracts.USER_FEATURE_SERVICE}
    return export.export_version(model, base, 1, lineage=lineage, warmup_users=examples.head(5))


def _inputs(frame: pd.DataFrame) -> dict[str, tf.Tensor]:
    return {name: tf.constant(values) for name, values in user_arrays(frame).items()}


def test_signatures_match_the_in_memory_model(tiny: tuple[TwoTowerModel, pd.DataFrame], exported: Path) -> None:
    model, examples = tiny
    users = examples.tail(6)
    exclude = [list(items[:3]) for items in users["recent_items"]]
    padded = np.array([row + [""] * (3 - len(row)) for row in exclude], dtype=object)
    loaded = tf.saved_model.load(str(exported))
    assert set(loaded.signatures) == {"recommend", "score", "serving_default"}
    served = loaded.signatures["recommend"](**_inputs(users), exclude_items=tf.constant(padded))
    ids, scores = recommend(model, users, k=contracts.TOP_K_EXPORTED, exclude=exclude)
    assert served["item_ids"].shape == (6, contracts.TOP_K_EXPORTED)
    assert (served["item_ids"].numpy().astype(str) == ids).all()
    np.testing.assert_allclose(served["scores"].numpy(), scores, rtol=1e-5, atol=1e-5)
    default = loaded.signatures["serving_default"](**_inputs(users), exclude_items=tf.constant(padded))
    assert (default["item_ids"].numpy() == served["item_ids"].numpy()).all()

    pairs = np.array([["m1", "m2", "m3"]] * 6, dtype=object)
    scored = loaded.signatures["score"](**_inputs(users), item_ids=tf.constant(pairs))["scores"].numpy()
    np.testing.assert_allclose(scored, score(model, users, pairs), rtol=1e-5, atol=1e-5)
    top_scored = loaded.signatures["score"](**_inputs(users), item_ids=tf.constant(ids[:, :5]))["scores"]
    np.testing.assert_allclose(top_scored.numpy(), scores[:, :5], rtol=1e-4, atol=1e-4)


def test_excluded_ids_are_never_returned(exported: Path, tiny: tuple[TwoTowerModel, pd.DataFrame]) -> None:
    _, examples = tiny
    users = examples.head(2)
    loaded = tf.saved_model.load(str(exported))
    everything_but_three = np.array([[f"m{n}" for n in range(147)] + ["", "unknown"]] * 2, dtype=object)
    out = loaded.signatures["recommend"](**_inputs(users), exclude_items=tf.constant(everything_but_three))
    ids = out["item_ids"].numpy().astype(str)
    assert sorted(ids[0][:3]) == ["m147", "m148", "m149"] and (ids[:, 3:] == "").all()
    assert not set(ids.ravel()) & set(everything_but_three.ravel()) - {""}


def test_new_user_and_new_item_are_served(exported: Path, tiny: tuple[TwoTowerModel, pd.DataFrame]) -> None:
    model, _ = tiny
    stranger = pd.DataFrame(
        {
            "user_id": ["never-seen"],
            "age_bucket": [""],
            "gender": [""],
            "occupation": [""],
            "zip_prefix": [""],
            "recent_items": [["m3", "brand-new"]],
            "count_1h": [1],
            "count_24h": [2],
        }
    )
    loaded = tf.saved_model.load(str(exported))
    out = loaded.signatures["score"](**_inputs(stranger), item_ids=tf.constant([["brand-new", "m1"]]))
    assert np.isfinite(out["scores"].numpy()).all()
    ids = loaded.signatures["recommend"](**_inputs(stranger), exclude_items=tf.constant([[""]]))["item_ids"]
    assert (ids.numpy() != b"").all()
    # a new item added to the catalog is ranked from its content at once
    model.catalog = model.catalog.with_new_items(["brand-new"], [["Drama"]], [1990])
    try:
        ids, scores = recommend(model, stranger, k=len(model.catalog))
        assert "brand-new" in ids[0] and np.isfinite(scores).all()
    finally:
        model.catalog = ItemCatalog(
            model.catalog.item_ids[:-1], model.catalog.genres[:-1], model.catalog.release_year[:-1]
        )


def test_saved_model_cli_lists_typed_signatures(exported: Path) -> None:
    cli = Path(sys.executable).parent / "saved_model_cli"
    shown = subprocess.run(
        [str(cli), "show", "--all", "--dir", str(exported)], capture_output=True, text=True, check=True
    )
    text = shown.stdout
    for signature in ("'recommend'", "'score'", "'serving_default'"):
        assert f"signature_def[{signature}]" in text
    assert "inputs['exclude_items'] tensor_info:\n        dtype: DT_STRING\n        shape: (-1, -1)" in text
    assert "inputs['recent_items'] tensor_info:\n        dtype: DT_STRING\n        shape: (-1, 20)" in text
    assert "inputs['count_1h'] tensor_info:\n        dtype: DT_INT64\n        shape: (-1)" in text
    assert "outputs['item_ids'] tensor_info:\n        dtype: DT_STRING\n        shape: (-1, 100)" in text


def test_warmup_requests_are_prediction_logs(exported: Path) -> None:
    path = exported / "assets.extra" / "tf_serving_warmup_requests"
    records = list(tf.data.TFRecordDataset(str(path)).as_numpy_iterator())
    assert records
    for raw in records:
        log = prediction_log_pb2.PredictionLog.FromString(raw)
        request = log.predict_log.request
        assert request.model_spec.name == contracts.MODEL_NAME
        assert request.model_spec.signature_name == contracts.RECOMMEND_SIGNATURE
        expected = {*contracts.USER_STRING_INPUTS, *contracts.USER_COUNT_INPUTS, "recent_items", "exclude_items"}
        assert set(request.inputs) == expected
        assert tf.make_ndarray(request.inputs["recent_items"]).shape[1] == contracts.RECENT_ITEMS_MAX


def test_lineage_and_resume(exported: Path, tiny: tuple[TwoTowerModel, pd.DataFrame]) -> None:
    model, examples = tiny
    lineage = export.read_lineage(exported)
    assert lineage["version"] == 1 and lineage["feature_service"] == contracts.USER_FEATURE_SERVICE
    assert lineage["catalog_size"] == 150
    resumed = export.load_for_finetune(exported)
    assert resumed.catalog == model.catalog and resumed.config == model.config
    np.testing.assert_allclose(
        recommend(resumed, examples.head(3), k=10)[1], recommend(model, examples.head(3), k=10)[1]
    )


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
