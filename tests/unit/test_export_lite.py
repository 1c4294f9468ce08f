"""``export-lite``: each ``.tflite`` variant, run in the TF Lite interpreter, answers like the SavedModel.

A small version is trained on users who each favour one of four item groups, exported as
``streamrec train`` would, converted, and every variant's top 10 is compared with the
SavedModel's ``recommend`` for the same cold-start contexts (no user id, the recent items
excluded). The device inputs are built here from ``items.txt`` and ``inputs.json`` alone, as an
app would, so the files beside the models are checked too.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
import typer

from online_trainer import export
from online_trainer.catalog import ItemCatalog
from online_trainer.examples import examples_from_interactions, user_arrays
from online_trainer.export_lite import LiteOptions, export_lite, run_tflite, version_dir
from online_trainer.model import build_model
from online_trainer.model_config import ModelConfig
from online_trainer.ranking_metrics import overlap_at_k
from online_trainer.training import train
from streamrec.core import contracts
from streamrec.core.attributes import Attribute, AttributeSchema
from streamrec.core.errors import DatasetError, SettingsError, StreamrecError

pytestmark = pytest.mark.unit

SCHEMA = AttributeSchema(
    user=(
        Attribute(name="segment", type="categorical"),
        Attribute(name="age", type="numeric", boundaries=(18.0, 30.0, 50.0)),
        Attribute(name="languages", type="multi_categorical", max_tokens=2),
    ),
    item=(Attribute(name="genre", type="categorical"),),
)
ITEMS = 80
K = 10
# int8 scores in steps of about 1/256 of their calibrated range, so items whose scores differ by
# less than a step tie and can swap across the 10th place: a correct int8 model keeps most, not all,
# of the ten. A broken one lands far lower: wrong rows or a lost scale give about chance (10 of the
# ~70 items left, 0.15), and a float exclusion mask quantized with a zero point its empty cells
# cannot hold excludes everything (0.0).
INT8_FLOOR = 0.8


def _item(n: int) -> str:
    return f"item-{n:03d}"


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    """A published version trained for two epochs, and its examples (the history's contexts)."""
    rng = np.random.default_rng(3)
    users = 48
    favourite = rng.integers(0, 4, users)
    user_of_event = rng.integers(0, users, 1500)
    group_item = rng.integers(0, ITEMS // 4, 1500) * 4 + favourite[user_of_event]
    noise = rng.random(1500) < 0.15
    events = pd.DataFrame(
        {
            "event_id": [f"e{n}" for n in range(1500)],
            "user_id": [f"user-{n:02d}" for n in user_of_event],
            "item_id": [_item(n) for n in np.where(noise, rng.integers(0, ITEMS, 1500), group_item)],
            "event_time": pd.to_datetime(np.sort(rng.integers(0, 10**6, 1500)), unit="s", utc=True),
        }
    )
    profiles = pd.DataFrame(
        {
            "user_id": [f"user-{n:02d}" for n in range(users)],
            "segment": [("a", "b", "c", "")[n % 4] for n in range(users)],
            "age": [float(15 + n) if n % 5 else np.nan for n in range(users)],
            "languages": [[("en", "fr", "de")[n % 3]] + (["es"] if n % 2 else []) for n in range(users)],
        }
    )
    items = pd.DataFrame({"item_id": [_item(n) for n in range(ITEMS)], "genre": [f"g{n % 4}" for n in range(ITEMS)]})
    examples = examples_from_interactions(events, profiles, SCHEMA)
    config = dataclasses.replace(
        ModelConfig(attributes=SCHEMA),
        embedding_dim=16,
        item_id_buckets=1024,
        user_id_buckets=256,
        attribute_buckets=64,
        batch_size=128,
    )
    model = build_model(ItemCatalog.from_frame(items, SCHEMA), config)
    train(model, examples, epochs=2, progress=False)
    base = tmp_path_factory.mktemp("models")
    path = export.export_version(model, base, 1, lineage={}, warmup_users=examples.head(3))
    return path, examples


@pytest.fixture(scope="module")
def lite(version: tuple[Path, pd.DataFrame], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    path, examples = version
    out = tmp_path_factory.mktemp("lite") / "1"
    options = LiteOptions(k=K, representative_samples=100, parity_contexts=200)
    return out, export_lite(path, out, examples, options)


def _device_inputs(frame: pd.DataFrame, items: list[str], spec: dict[str, Any]) -> dict[str, np.ndarray]:
    """What an app would pass: rows of items.txt and of inputs.json's vocabularies, -1 unknown."""
    row = {item: n for n, item in enumerate(items)}
    recent = np.full((len(frame), contracts.RECENT_ITEMS_MAX), -1, np.int32)
    for b, history in enumerate(frame["recent_items"]):
        for slot, item in enumerate(list(history)[: contracts.RECENT_ITEMS_MAX]):
            recent[b, slot] = row.get(item, -1)
    inputs: dict[str, np.ndarray] = {"recent_items": recent, "exclude_items": recent}
    for name in ("count_1h", "count_24h"):
        inputs[name] = frame[name].to_numpy(np.float32)
    vocabulary = spec["vocabularies"]
    inputs["age"] = frame["age"].to_numpy(np.float32)
    inputs["segment"] = np.array([vocabulary["segment"].index(v) if v else -1 for v in frame["segment"]], np.int32)
    languages = np.full((len(frame), 2), -1, np.int32)
    for b, tokens in enumerate(frame["languages"]):
        for slot, token in enumerate(list(tokens)[:2]):
            languages[b, slot] = vocabulary["languages"].index(token)
    inputs["languages"] = languages
    assert set(inputs) == set(spec["inputs"])
    return inputs


def _saved_model_top(path: Path, frame: pd.DataFrame) -> list[list[str]]:
    """The SavedModel's top K for the same users without their ids, recent items excluded."""
    arrays = user_arrays(frame.assign(user_id=""), SCHEMA)
    served = tf.saved_model.load(str(path)).signatures["recommend"](
        **{name: tf.constant(values) for name, values in arrays.items()},
        exclude_items=tf.constant(arrays["recent_items"]),
    )
    return [list(row[:K]) for row in served["item_ids"].numpy().astype(str)]


def test_every_variant_ranks_like_the_saved_model(
    version: tuple[Path, pd.DataFrame], lite: tuple[Path, dict[str, Any]]
) -> None:
    path, examples = version
    out, report = lite
    items = (out / "items.txt").read_text().splitlines()
    spec = json.loads((out / "inputs.json").read_text())
    assert len(items) == ITEMS and spec["top_k"] == K
    users = examples[examples["recent_items"].map(len) > 0].sample(120, random_state=1)
    expected = _saved_model_top(path, users)
    overlaps = {}
    for variant in ("fp32", "fp16", "int8"):
        rows = run_tflite((out / f"streamrec-v1-{variant}.tflite").read_bytes(), _device_inputs(users, items, spec))
        answered = [[items[n] for n in row if n >= 0] for row in rows]
        recent = [set(history) for history in users["recent_items"]]
        assert all(not set(row) & seen for row, seen in zip(answered, recent, strict=True))
        overlaps[variant] = float(overlap_at_k(expected, answered).mean())
        assert report["variants"][variant]["bytes"] == (out / f"streamrec-v1-{variant}.tflite").stat().st_size
    assert overlaps["fp32"] >= 0.99
    assert overlaps["fp16"] >= 0.9
    assert overlaps["int8"] >= INT8_FLOOR
    sizes = {variant: report["variants"][variant]["bytes"] for variant in overlaps}
    assert sizes["fp16"] < sizes["fp32"] and sizes["int8"] < sizes["fp32"]  # int8 vs fp16: tables too small here
    assert report["variants"]["fp16"][f"mean_overlap_at_{K}"] >= 0.9 and report["tower_max_abs_error"] < 1e-4


def test_a_version_that_is_not_published_names_the_published_ones(version: tuple[Path, pd.DataFrame]) -> None:
    path, _ = version
    with pytest.raises(SettingsError, match=r"version 7 is not under .* \(published: 1\); pass one of those"):
        version_dir(path.parent, 7)
    assert version_dir(path.parent, None) == path
    with pytest.raises(StreamrecError, match="run `streamrec train"):
        version_dir(path.parent / "nothing-here", None)


def test_an_existing_output_is_kept_unless_overwrite(
    version: tuple[Path, pd.DataFrame], lite: tuple[Path, dict[str, Any]]
) -> None:
    path, examples = version
    out, _ = lite
    with pytest.raises(SettingsError, match="already exists; remove it, pass another --output-dir, or --overwrite"):
        export_lite(path, out, examples)
    with pytest.raises(StreamrecError, match="no user contexts"):
        export_lite(path, out.parent / "empty", examples.iloc[:0])


def test_the_command_draws_contexts_from_the_trainer_checkpoint(
    version: tuple[Path, pd.DataFrame], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from online_trainer import checkpoint
    from online_trainer.buffer import ReplayBuffer
    from online_trainer.cli_lite import export_lite_command
    from online_trainer.history import UserHistories

    path, examples = version
    monkeypatch.setenv("STREAMREC_MODEL_SERVER__MODEL_BASE_PATH", str(path.parent))
    monkeypatch.setenv("STREAMREC_PATHS__STATE_DIR", str(tmp_path))
    app = typer.Typer()
    app.command()(export_lite_command)
    arguments = ["--variants", "fp16", "--top-k", "5", "--samples", "20", "--parity-users", "30"]
    missing = CliRunner().invoke(app, arguments)
    assert isinstance(missing.exception, DatasetError) and "pass --dataset" in str(missing.exception)

    replay = ReplayBuffer(len(examples), examples)
    checkpoint.save(tmp_path / "trainer", 1, checkpoint.Checkpoint(UserHistories(), replay, meta={}))
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "lite" / "1" / "report.json").read_text())
    assert set(report["variants"]) == {"fp16"} and report["top_k"] == 5
    assert "from the trainer checkpoint of version 1" in result.output and "mean overlap@5" in result.output
    refused = CliRunner().invoke(app, ["--variants", "fp8"]).exception
    assert isinstance(refused, SettingsError) and "pick one or more of fp32, fp16, int8" in str(refused)
