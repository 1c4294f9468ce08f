"""Versioned SavedModel export: the signatures TF Serving serves, written atomically.

Layout of ``<base_path>/<version>/`` (what TF Serving's file-system source loads):

* ``saved_model.pb`` + ``variables/``: signatures ``recommend`` (= ``serving_default``) and
  ``score``, typed exactly as ``streamrec.core.contracts`` documents. The catalog (ids, content and
  the item-tower vectors computed at export) is held as variables, so ``recommend`` ranks the
  whole catalog inside the graph and drops ``exclude_items`` there too.
* ``assets.extra/tf_serving_warmup_requests``: TFRecord of ``PredictionLog`` records (recommend
  requests) that TF Serving replays before it marks the version available.
* ``assets.extra/lineage.json``: the caller's lineage (data range, offsets, feature service,
  metrics, parent version) plus the model config and catalog size.
* ``assets.extra/weights.npz`` + ``optimizer.npz`` + ``model_config.json`` + ``catalog.json``: enough to
  rebuild the Keras model and resume fine-tuning after a restart (:func:`load_for_finetune`).

Atomicity: everything is written under ``<base_path>/.tmp-<version>-<uuid>`` (TF Serving only
loads all-digit names), fsynced, then ``os.rename``d to ``<version>``. A crash before the rename
leaves only the temp dir, which :func:`list_versions` ignores and :func:`remove_temp_dirs` clears.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

from online_trainer.catalog import ItemCatalog, catalog_arrays, user_arrays
from online_trainer.inference import catalog_vectors, rank
from online_trainer.model import TwoTowerModel, build_model
from online_trainer.model_config import ModelConfig
from online_trainer.model_state import assign_optimizer_state, assign_weights, optimizer_state, weights_by_path
from streamrec.core import contracts

TEMP_PREFIX = ".tmp-"
EXTRA_DIR = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
LINEAGE_FILE = "lineage.json"
WEIGHTS_FILE = "weights.npz"
OPTIMIZER_FILE = "optimizer.npz"
CONFIG_FILE = "model_config.json"
CATALOG_FILE = "catalog.json"
MAX_WARMUP_REQUESTS = 32


def _user_specs() -> dict[str, tf.TensorSpec]:
    specs = {name: tf.TensorSpec([None], tf.string, name=name) for name in contracts.USER_STRING_INPUTS}
    specs["recent_items"] = tf.TensorSpec([None, contracts.RECENT_ITEMS_MAX], tf.string, name="recent_items")
    for name in contracts.USER_COUNT_INPUTS:
        specs[name] = tf.TensorSpec([None], tf.int64, name=name)
    return specs


class _ServingModule(tf.Module):  # type: ignore[misc]  # tensorflow ships no type hints
    """Tracks the model's variables and the catalog; its two tf.functions are the signatures."""

    def __init__(self, model: TwoTowerModel) -> None:
        super().__init__(name="streamrec")
        # Not an attribute TF tracks: only the variables below are saved, not the Keras object graph.
        object.__setattr__(self, "_model", model)
        self.model_variables = list(model.variables)  # tracked, so they are saved and restored
        ids, genres, years = catalog_arrays(model.catalog, model.config.max_genres)
        self.catalog_ids = tf.Variable(ids.astype(bytes), trainable=False, name="catalog_ids")
        self.catalog_genres = tf.Variable(genres.astype(bytes), trainable=False, name="catalog_genres")
        self.catalog_years = tf.Variable(years, trainable=False, name="catalog_release_year")
        self.catalog_vectors = tf.Variable(catalog_vectors(model), trainable=False, name="catalog_vectors")
        self.catalog_rows = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(ids.astype(bytes)), tf.range(len(ids), dtype=tf.int64)),
            default_value=-1,
        )
        user_specs = _user_specs()
        exclude = {"exclude_items": tf.TensorSpec([None, None], tf.string, name="exclude_items")}
        items = {"item_ids": tf.TensorSpec([None, None], tf.string, name="item_ids")}
        self.recommend = tf.function(self._recommend, input_signature=[{**user_specs, **exclude}], autograph=False)
        self.score = tf.function(self._score, input_signature=[{**user_specs, **items}], autograph=False)

    def _recommend(self, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        users = self._model.user_tower(inputs)
        ids, scores = rank(
            users,
            self.catalog_vectors,
            self.catalog_ids,
            self.catalog_rows.lookup(inputs["exclude_items"]),
            k=contracts.TOP_K_EXPORTED,
            temperature=self._model.config.temperature,
        )
        return {"item_ids": ids, "scores": scores}

    def _score(self, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        users = self._model.user_tower(inputs)
        item_ids = inputs["item_ids"]
        flat = tf.reshape(item_ids, [-1])
        rows = self.catalog_rows.lookup(flat)
        known = rows >= 0
        safe = tf.maximum(rows, 0)
        genres = tf.where(known[:, None], tf.gather(self.catalog_genres, safe), "")
        years = tf.where(known, tf.gather(self.catalog_years, safe), tf.constant(-1, tf.int64))
        items = self._model.item_tower(flat, genres, years)
        items = tf.reshape(items, tf.concat([tf.shape(item_ids), [-1]], axis=0))
        scores = tf.einsum("bd,bnd->bn", users, items) / self._model.config.temperature
        return {"scores": scores}


def _signature_function(module: _ServingModule, name: str) -> Any:
    """Keyword-argument wrapper so the signature's inputs carry the contract's names."""
    specs = _user_specs()
    if name == contracts.RECOMMEND_SIGNATURE:
        specs["exclude_items"] = tf.TensorSpec([None, None], tf.string, name="exclude_items")
        return module.recommend.get_concrete_function(specs)
    specs["item_ids"] = tf.TensorSpec([None, None], tf.string, name="item_ids")
    return module.score.get_concrete_function(specs)


def warmup_requests(
    warmup_users: pd.DataFrame, *, limit: int = MAX_WARMUP_REQUESTS
) -> list[prediction_log_pb2.PredictionLog]:
    """PredictionLogs for the recommend signature: one batched request, then single-user ones."""
    if warmup_users.empty:
        raise ValueError("export: warmup_users is empty; pass at least one user row to warm TF Serving up")
    frames = [warmup_users.head(limit)] + [warmup_users.iloc[[row]] for row in range(min(len(warmup_users), limit - 1))]
    logs = []
    for frame in frames:
        arrays = user_arrays(frame)
        arrays["exclude_items"] = arrays["recent_items"][:, :1]
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=contracts.MODEL_NAME, signature_name=contracts.RECOMMEND_SIGNATURE)
        )
        for name, values in arrays.items():
            if values.dtype == object:
                values = np.vectorize(lambda text: str(text).encode(), otypes=[object])(values)
            request.inputs[name].CopyFrom(tf.make_tensor_proto(values))
        logs.append(prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request)))
    return logs


def export_version(
    model: TwoTowerModel,
    base_path: Path,
    version: int,
    *,
    lineage: dict[str, Any],
    warmup_users: pd.DataFrame,
) -> Path:
    """Write ``<base_path>/<version>/`` atomically and return it; refuse to overwrite a version."""
    if version <= 0:
        raise ValueError(f"export: version must be a positive integer (TF Serving's version dirs); got {version}")
    base_path = Path(base_path)
    base_path.mkdir(parents=True, exist_ok=True)
    final = base_path / str(version)
    if final.exists():
        raise FileExistsError(f"export: {final} already exists; versions are immutable, publish {version + 1}")
    temp = base_path / f"{TEMP_PREFIX}{version}-{uuid.uuid4().hex}"
    module = _ServingModule(model)
    signatures = {
        contracts.RECOMMEND_SIGNATURE: _signature_function(module, contracts.RECOMMEND_SIGNATURE),
        contracts.SCORE_SIGNATURE: _signature_function(module, contracts.SCORE_SIGNATURE),
    }
    signatures["serving_default"] = signatures[contracts.RECOMMEND_SIGNATURE]
    tf.saved_model.save(module, str(temp), signatures=signatures)
    extra = temp / EXTRA_DIR
    extra.mkdir(exist_ok=True)
    with tf.io.TFRecordWriter(str(extra / WARMUP_FILE)) as writer:
        for log in warmup_requests(warmup_users):
            writer.write(log.SerializeToString())
    record = {
        **lineage,
        "version": version,
        "exported_at": time.time(),
        "catalog_size": len(model.catalog),
        "model_config": model.config.to_json(),
    }
    (extra / LINEAGE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    savez: Any = np.savez  # numpy's stub types **kwds as its own bool flag
    savez(extra / WEIGHTS_FILE, **weights_by_path(model))
    savez(extra / OPTIMIZER_FILE, *optimizer_state(model))
    (extra / CONFIG_FILE).write_text(json.dumps(model.config.to_json(), indent=2) + "\n")
    (extra / CATALOG_FILE).write_text(json.dumps(model.catalog.to_json()) + "\n")
    _fsync_tree(temp)
    os.rename(temp, final)
    _fsync_dir(base_path)
    return final


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` so the rename never exposes unwritten data."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(Path(folder) / name, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(folder))


def list_versions(base_path: Path) -> list[int]:
    """The published versions (all-digit directory names), ascending; temp and archive dirs ignored."""
    base_path = Path(base_path)
    if not base_path.is_dir():
        return []
    return sorted(int(child.name) for child in base_path.iterdir() if child.is_dir() and child.name.isdigit())


def latest_version(base_path: Path) -> int | None:
    versions = list_versions(base_path)
    return versions[-1] if versions else None


def prune_versions(base_path: Path, keep: int, protect: set[int], *, archive_dir: Path | None = None) -> list[int]:
    """Remove (or move into ``archive_dir``) all but the newest ``keep`` versions and the ``protect``ed ones.

    Protect the versions a label points at (``stable``, ``canary``): TF Serving must never lose them.
    """
    if keep < 1:
        raise ValueError(f"prune_versions: keep must be >= 1 (got {keep}); the newest version is always kept")
    versions = list_versions(base_path)
    doomed = [v for v in versions[:-keep] if v not in protect]
    for version in doomed:
        source = Path(base_path) / str(version)
        if archive_dir is not None:
            Path(archive_dir).mkdir(parents=True, exist_ok=True)
            shutil.move(str(source), str(Path(archive_dir) / str(version)))
        else:
            # Rename first so a half-deleted dir is never a visible version.
            doomed_path = Path(base_path) / f"{TEMP_PREFIX}delete-{version}-{uuid.uuid4().hex}"
            os.rename(source, doomed_path)
            shutil.rmtree(doomed_path)
    return doomed


def remove_temp_dirs(base_path: Path) -> list[Path]:
    """Delete leftovers of interrupted exports (call at trainer start; there is one writer per base path)."""
    base_path = Path(base_path)
    if not base_path.is_dir():
        return []
    leftovers = [child for child in base_path.iterdir() if child.name.startswith(TEMP_PREFIX)]
    for child in leftovers:
        shutil.rmtree(child, ignore_errors=True)
    return leftovers


def read_lineage(path: Path) -> dict[str, Any]:
    """The lineage record of a version dir (``<base>/<version>``)."""
    lineage_path = Path(path) / EXTRA_DIR / LINEAGE_FILE
    if not lineage_path.is_file():
        raise FileNotFoundError(f"{lineage_path} is missing; was {path} written by online_trainer.export?")
    payload: dict[str, Any] = json.loads(lineage_path.read_text())
    return payload


def load_for_finetune(version_dir: Path) -> TwoTowerModel:
    """Rebuild the Keras model of a published version (weights, config, catalog) to keep training it."""
    extra = Path(version_dir) / EXTRA_DIR
    for name in (WEIGHTS_FILE, CONFIG_FILE, CATALOG_FILE):
        if not (extra / name).is_file():
            raise FileNotFoundError(f"{extra / name} is missing; {version_dir} cannot be resumed, retrain from history")
    config = ModelConfig.from_json(json.loads((extra / CONFIG_FILE).read_text()))
    catalog = ItemCatalog.from_json(json.loads((extra / CATALOG_FILE).read_text()))
    model = build_model(catalog, config)
    with np.load(extra / WEIGHTS_FILE) as saved:
        assign_weights(model, {name: saved[name] for name in saved.files})
    if (extra / OPTIMIZER_FILE).is_file():  # continue Adam where the published run left it
        with np.load(extra / OPTIMIZER_FILE) as saved:
            assign_optimizer_state(model, [saved[f"arr_{n}"] for n in range(len(saved.files))])
    return model
