"""Versioned SavedModel export: the signatures TF Serving serves, written atomically.

Layout of ``<base_path>/<version>/`` (what TF Serving's file-system source loads):

* ``saved_model.pb`` + ``variables/``: signatures ``recommend`` (= ``serving_default``), ``score``
  and ``similar``, typed exactly as ``streamrec.core.contracts`` documents, the user inputs being
  ``streamrec.core.attributes.user_model_inputs`` of the model's schema (:mod:`online_trainer.signatures`).
  The catalog (ids, attribute values and the item-tower vectors computed at export) is held as
  variables, so ``recommend`` and ``similar`` rank the catalog inside the graph and drop
  ``exclude_items`` there too: exactly up to ``ModelConfig.exact_topk_max_items`` items, through
  an IVF index built here above that (:mod:`online_trainer.retrieval_index`).
* ``assets.extra/tf_serving_warmup_requests``: TFRecord of ``PredictionLog`` records (recommend,
  score and similar requests) that TF Serving replays before it marks the version available.
* ``assets.extra/attribute_schema.json``: the schema the signatures were built from.
* ``assets.extra/lineage.json``: the caller's lineage (data range, offsets, feature service,
  metrics, parent version) plus the model config, catalog size and retrieval method.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import tensorflow as tf
from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

from online_trainer.catalog import ItemCatalog, catalog_arrays
from online_trainer.examples import user_arrays
from online_trainer.inference import catalog_vectors, rank, similar_rank
from online_trainer.model import TwoTowerModel, build_model
from online_trainer.model_config import ModelConfig
from online_trainer.model_state import assign_optimizer_state, assign_weights, optimizer_state, weights_by_path
from online_trainer.quantize import serving_copy, serving_variables
from online_trainer.retrieval_index import IvfSearch, index_for_config
from online_trainer.settings import TableDtype
from online_trainer.signatures import recommend_specs, score_specs, similar_specs
from streamrec.core import contracts
from streamrec.core.attributes import SCHEMA_FILE, AttributeSchema

TEMP_PREFIX = ".tmp-"
EXTRA_DIR = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
LINEAGE_FILE = "lineage.json"
WEIGHTS_FILE = "weights.npz"
OPTIMIZER_FILE = "optimizer.npz"
CONFIG_FILE = "model_config.json"
CATALOG_FILE = "catalog.json"
MAX_WARMUP_REQUESTS = 32
_Module = TypeVar("_Module", bound=tf.Module)


class _ServingModule(tf.Module):  # type: ignore[misc]  # tensorflow ships no type hints
    """Tracks the model's variables and the catalog; its tf.functions are the signatures.

    One per model object (:func:`serving_module`): the signatures read the model's variables and
    the catalog variables, never copies of their values, so a later export of the same model
    object assigns the new catalog values and saves again without tracing anything again.
    """

    def __init__(self, model: TwoTowerModel, ids: np.ndarray, values: dict[str, np.ndarray]) -> None:
        super().__init__(name="streamrec")
        # Not an attribute TF tracks: only the variables below are saved, not the Keras object graph.
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_ids", ids)
        # tracked, so they are saved and restored: a serving copy's quantized tables instead of
        # the float32 ones they replace (online_trainer.quantize)
        self.model_variables, self.quantized_tables = serving_variables(model)
        self.catalog_ids = tf.Variable(ids.astype(bytes), trainable=False, name="catalog_ids")
        self.catalog_values = {
            name: tf.Variable(_tensor_ready(column), trainable=False, name=f"catalog_{name}")
            for name, column in values.items()
        }
        vectors = catalog_vectors(model)
        # None: brute force over catalog_vectors; a large catalog is searched through an IVF index.
        self.ivf = _ivf_search(vectors, model.config)
        if self.ivf is None:
            self.catalog_vectors = tf.Variable(vectors, trainable=False, name="catalog_vectors")
        self.catalog_rows = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(ids.astype(bytes)), tf.range(len(ids), dtype=tf.int64)),
            default_value=-1,
        )
        schema = model.schema
        self.recommend = tf.function(self._recommend, input_signature=[recommend_specs(schema)], autograph=False)
        self.score = tf.function(self._score, input_signature=[score_specs(schema)], autograph=False)
        self.similar = tf.function(self._similar, input_signature=[similar_specs()], autograph=False)

    def refresh(self, ids: np.ndarray, values: dict[str, np.ndarray]) -> bool:
        """Take ``model``'s current catalog values and vectors; False (nothing changed) when this
        module cannot serve them without a new trace: another catalog (new items), or an IVF
        index (built from the vectors into constants)."""
        if self.ivf is not None or not np.array_equal(ids, self._ids):
            return False
        for name, column in values.items():
            self.catalog_values[name].assign(_tensor_ready(column))
        self.catalog_vectors.assign(catalog_vectors(self._model))
        return True

    def _recommend(self, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        users = self._model.user_tower(inputs)
        exclude = self.catalog_rows.lookup(inputs["exclude_items"])
        temperature = self._model.config.temperature
        if self.ivf is not None:
            ids, scores = self.ivf.rank(
                users, self.catalog_ids, exclude, k=contracts.TOP_K_EXPORTED, temperature=temperature
            )
        else:
            ids, scores = rank(
                users,
                self.catalog_vectors,
                self.catalog_ids,
                exclude,
                k=contracts.TOP_K_EXPORTED,
                temperature=temperature,
            )
        return {"item_ids": ids, "scores": scores}

    def _score(self, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        users = self._model.user_tower(inputs)
        item_ids = inputs["item_ids"]
        flat = tf.reshape(item_ids, [-1])
        rows = self.catalog_rows.lookup(flat)
        known = rows >= 0
        safe = tf.maximum(rows, 0)
        values = {}
        for attribute in self._model.schema.item:
            column = tf.gather(self.catalog_values[attribute.name], safe)
            if attribute.type == "numeric":
                values[attribute.name] = tf.where(known, column, float("nan"))
            elif attribute.type == "categorical":
                values[attribute.name] = tf.where(known, column, "")
            else:
                values[attribute.name] = tf.where(known[:, None], column, "")
        items = self._model.item_tower(flat, values)
        items = tf.reshape(items, tf.concat([tf.shape(item_ids), [-1]], axis=0))
        scores = tf.einsum("bd,bnd->bn", users, items) / self._model.config.temperature
        return {"scores": scores}

    def _similar(self, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        query = self.catalog_rows.lookup(inputs["item_id"])
        exclude = self.catalog_rows.lookup(inputs["exclude_items"])
        temperature = self._model.config.temperature
        if self.ivf is not None:
            ids, scores = self.ivf.similar_rank(
                self.catalog_ids, query, exclude, k=contracts.TOP_K_EXPORTED, temperature=temperature
            )
        else:
            ids, scores = similar_rank(
                self.catalog_vectors,
                self.catalog_ids,
                query,
                exclude,
                k=contracts.TOP_K_EXPORTED,
                temperature=temperature,
            )
        return {"item_ids": ids, "scores": scores}


def kept_module(
    model: object, kind: type[_Module], build: Callable[[], _Module], reusable: Callable[[_Module], bool]
) -> _Module:
    """The serving module kept on ``model`` when it is a ``kind`` and ``reusable`` says it can serve
    the model as it is now, else a new one from ``build``, kept for the next export. Its signatures
    read the model's variables, so a module is traced once per model object (the trainer
    alternates two objects per model line) and a later export writes the graph and variables only."""
    cached = getattr(model, "_serving_module", None)
    if isinstance(cached, kind) and reusable(cached):
        return cached
    module = build()
    object.__setattr__(model, "_serving_module", module)  # not a tracked attribute of the Keras model
    return module


def serving_module(model: TwoTowerModel) -> _ServingModule:
    """``model``'s serving module with its current weights and catalog (:func:`kept_module`; a new
    one when the catalog changed or is searched through an IVF index)."""
    ids, values = catalog_arrays(model.catalog)
    return kept_module(
        model, _ServingModule, lambda: _ServingModule(model, ids, values), lambda cached: cached.refresh(ids, values)
    )


def _ivf_search(vectors: np.ndarray, config: ModelConfig) -> IvfSearch | None:
    """The IVF index of a catalog above ``config.exact_topk_max_items`` items, else None (exact)."""
    if len(vectors) <= config.exact_topk_max_items:
        return None
    return IvfSearch(
        index_for_config(vectors, config), vectors, n_probe=config.ivf_n_probe, min_candidates=contracts.TOP_K_EXPORTED
    )


def _retrieval(module: _ServingModule) -> dict[str, Any]:
    """How the version ranks its catalog, for the lineage record."""
    if module.ivf is None:
        return {"method": "exact"}
    return {
        "method": "ivf",
        "lists": int(module.ivf.members.shape[0]),
        "list_size": module.ivf.list_size,
        "n_probe": module.ivf.n_probe,
    }


def _tensor_ready(column: np.ndarray) -> np.ndarray:
    return column.astype(bytes) if column.dtype == object else column


def _signatures(module: _ServingModule, schema: AttributeSchema) -> dict[str, Any]:
    """Concrete functions whose inputs carry the contract's names (keyword arguments only)."""
    recommend = module.recommend.get_concrete_function(recommend_specs(schema))
    return {
        contracts.RECOMMEND_SIGNATURE: recommend,
        "serving_default": recommend,
        contracts.SCORE_SIGNATURE: module.score.get_concrete_function(score_specs(schema)),
        contracts.SIMILAR_SIGNATURE: module.similar.get_concrete_function(similar_specs()),
    }


def _request(signature: str, arrays: dict[str, np.ndarray]) -> prediction_log_pb2.PredictionLog:
    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name=contracts.MODEL_NAME, signature_name=signature)
    )
    for name, values in arrays.items():
        if values.dtype == object:
            values = np.vectorize(lambda text: str(text).encode(), otypes=[object])(values)
        request.inputs[name].CopyFrom(tf.make_tensor_proto(values))
    return prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))


def warmup_requests(
    warmup_users: pd.DataFrame, schema: AttributeSchema, catalog: ItemCatalog, *, limit: int = MAX_WARMUP_REQUESTS
) -> list[prediction_log_pb2.PredictionLog]:
    """PredictionLogs for every signature: one batched recommend request, single-user ones, then
    one score and one similar request; the user inputs are ``user_model_inputs(schema)``."""
    if warmup_users.empty:
        raise ValueError("export: warmup_users is empty; pass at least one user row to warm TF Serving up")
    singles = min(len(warmup_users), limit - 3)
    frames = [warmup_users.head(limit)] + [warmup_users.iloc[[row]] for row in range(singles)]
    logs = []
    for frame in frames:
        arrays = user_arrays(frame, schema)
        arrays["exclude_items"] = arrays["recent_items"][:, :1]
        logs.append(_request(contracts.RECOMMEND_SIGNATURE, arrays))
    items = np.asarray(catalog.item_ids[:3], dtype=object)
    scored = user_arrays(warmup_users.head(1), schema)
    scored["item_ids"] = items[np.newaxis, :]
    logs.append(_request(contracts.SCORE_SIGNATURE, scored))
    similar = {"item_id": items[:1], "exclude_items": items[np.newaxis, 1:2]}
    logs.append(_request(contracts.SIMILAR_SIGNATURE, similar))
    return logs


def export_version(
    model: TwoTowerModel,
    base_path: Path,
    version: int,
    *,
    lineage: dict[str, Any],
    warmup_users: pd.DataFrame,
    table_dtype: TableDtype = "float32",
) -> Path:
    """Write ``<base_path>/<version>/`` atomically and return it; refuse to overwrite a version.

    With ``table_dtype`` float16 or int8 the signatures read the hashed embedding tables stored
    that way (:mod:`online_trainer.quantize`); the resume files keep the float32 weights."""
    if version <= 0:
        raise ValueError(f"export: version must be a positive integer (TF Serving's version dirs); got {version}")
    base_path = Path(base_path)
    base_path.mkdir(parents=True, exist_ok=True)
    final = base_path / str(version)
    if final.exists():
        raise FileExistsError(f"export: {final} already exists; versions are immutable, publish {version + 1}")
    temp = base_path / f"{TEMP_PREFIX}{version}-{uuid.uuid4().hex}"
    module = serving_module(model if table_dtype == "float32" else serving_copy(model, table_dtype))
    tf.saved_model.save(module, str(temp), signatures=_signatures(module, model.schema))
    extra = temp / EXTRA_DIR
    extra.mkdir(exist_ok=True)
    with tf.io.TFRecordWriter(str(extra / WARMUP_FILE)) as writer:
        for log in warmup_requests(warmup_users, model.schema, model.catalog):
            writer.write(log.SerializeToString())
    (extra / SCHEMA_FILE).write_text(model.schema.to_json())
    record = {
        **lineage,
        "version": version,
        "exported_at": time.time(),
        "catalog_size": len(model.catalog),
        "retrieval": _retrieval(module),
        "table_dtype": table_dtype,
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


def serving_bytes(version_dir: Path) -> int:
    """The bytes a model server loads of a version: ``saved_model.pb`` and ``variables/`` (not the
    resume files and warm-up records under ``assets.extra``)."""
    files = [version_dir / "saved_model.pb", *(version_dir / "variables").rglob("*")]
    return sum(path.stat().st_size for path in files if path.is_file())


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
    """Rebuild the Keras model of a published version (weights, config, catalog) to keep training it.

    A version exported before issue 20 (no attribute schema in its config) raises ``DatasetError``
    naming the fix: retrain with ``streamrec train``.
    """
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
