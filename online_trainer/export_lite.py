"""``.tflite`` cold-start models for devices, converted from a published version.

A device has no Feast and no model server, but it knows what its user just did. The device model
is the version's user tower for a user without an id, plus the catalog's item-tower vectors bundled
as a constant table; it scores every catalog item and returns the top K:

* **Inputs are integers and floats only.** The server model hashes raw strings inside the graph
  (``HashedBagEmbedding``), which TF Lite's builtin ops cannot do (``SELECT_TF_OPS`` would add
  megabytes of TensorFlow runtime to every app). So the hashing is done here, at export: every
  catalog item's id-embedding rows and every known value of a categorical user attribute are
  looked up once and baked into tables, and the device passes *rows* of those tables:
  ``recent_items`` int32 [B, RECENT_ITEMS_MAX] (rows of ``items.txt``, newest first, -1 padding),
  ``exclude_items`` int32 [B, E] (rows never returned, -1 padding), each count of
  ``user_model_inputs`` as float32 [B], and each user attribute as the row of its value in
  ``inputs.json``'s vocabulary (int32, -1 unknown) or, numeric, float32 (NaN unknown).
  Outputs: ``item_rows`` int32 [B, K] (-1 where fewer than K items remain) and ``scores`` float32.
* **Cold start, same answers.** The user-id part of the tower is dropped: the server's tower gives
  an empty user id a zero vector, so the device model ranks exactly as ``recommend`` does for
  a request without a user id. Recent items outside the catalog and attribute values outside the
  vocabulary (values seen in the history) are unknown on the device.
* **Variants**: ``fp32`` (the reference), ``fp16`` (weights stored as float16) and ``int8``
  (post-training quantization calibrated on real users' contexts from the history the version
  was trained on; ops without int8 kernels stay float). Each is run in the TF Lite interpreter
  against the Keras model's exact top K for held-out contexts (overlap@K, in ``report.json``).

The catalog is scored exhaustively (no IVF index), so the file grows with catalog size x dim.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import tensorflow as tf

from online_trainer import export
from online_trainer.examples import count_columns
from online_trainer.inference import catalog_vectors, recommend, user_vectors
from online_trainer.lite_inputs import (
    ITEMS_FILE,
    cold_start_frame,
    device_arrays,
    device_inputs,
    user_attributes,
    vocabularies,
)
from online_trainer.model import TwoTowerModel
from online_trainer.ranking_metrics import overlap_at_k
from streamrec.core.errors import DatasetError, SettingsError

Variant = Literal["fp32", "fp16", "int8"]
VARIANTS: tuple[Variant, ...] = ("fp32", "fp16", "int8")
INPUTS_FILE = "inputs.json"
REPORT_FILE = "report.json"
TOWER_TOLERANCE = 1e-4  # the float device tower must reproduce the Keras user tower this closely
Progress = Callable[[str], None]


def version_dir(base_path: Path, version: int | None) -> Path:
    """``<base_path>/<version>``, the latest one when ``version`` is None; errors name the fix."""
    published = export.list_versions(base_path)
    if not published:
        raise SettingsError(f"no model version under {base_path}; run `streamrec train --until ...` first")
    chosen = published[-1] if version is None else version
    if chosen not in published:
        raise SettingsError(
            f"version {chosen} is not under {base_path} (published: {', '.join(map(str, published))}); "
            "pass one of those with --version, or omit it for the latest"
        )
    return Path(base_path) / str(chosen)


def load_version(path: Path) -> TwoTowerModel:
    """The Keras model of a published version, or a DatasetError naming why it cannot be rebuilt."""
    try:
        return export.load_for_finetune(path)
    except FileNotFoundError as exc:
        raise DatasetError(f"{exc}; export-lite rebuilds the model from it, pick a version the trainer wrote") from exc


class DeviceTower(tf.Module):  # type: ignore[misc]  # tensorflow ships no type hints
    """The cold-start user tower and the catalog as constants; ``recommend`` is what is converted.

    Mirrors ``TwoTowerModel.user_tower`` part by part on looked-up rows instead of hashed strings;
    :func:`export_lite` checks the two agree before converting.
    """

    def __init__(self, model: TwoTowerModel, vocabulary: dict[str, list[str]], k: int) -> None:
        super().__init__(name="streamrec_lite")
        cfg = model.config
        object.__setattr__(self, "_model", model)
        ids = tf.constant(np.asarray(model.catalog.item_ids, dtype=object).astype(bytes))
        self.k = min(k, len(model.catalog))
        self.inverse_temperature = 1.0 / cfg.temperature
        self.item_vectors = tf.constant(catalog_vectors(model))
        self.recent_rows = None
        if cfg.use_recent_items or cfg.use_last_item:
            self.recent_rows = tf.constant(np.asarray(model.item_ids_embedding.rows(ids)))
        self.position_logits = None
        if cfg.use_recent_items and cfg.use_position_weights:
            self.position_logits = tf.constant(np.asarray(model.recent_position_logits.embeddings).reshape(1, -1))
        self.attribute_tables: dict[str, tf.Tensor] = {}
        for layer in model.user_attribute_embeddings if user_attributes(model) else []:
            attribute = layer.attribute
            if attribute.type == "numeric":
                table = np.asarray(layer.table.embeddings)
            else:  # one row per vocabulary value, as the hashed table gives it
                values = tf.constant([value.encode() for value in vocabulary.get(attribute.name, [])] or [b""])
                table = np.asarray(layer.table.rows(values))
            self.attribute_tables[attribute.name] = tf.constant(table)
        kernel = np.asarray(model.user_projection.kernel)
        self.kernel = kernel[cfg.embedding_dim :] if cfg.use_user_id else kernel  # without the user-id rows
        self.bias = tf.constant(np.asarray(model.user_projection.bias))
        specs = {spec.name: spec.spec() for spec in device_inputs(model)}
        self.recommend = tf.function(self._recommend, input_signature=[specs], autograph=False)
        self.user_vectors = tf.function(self._user_vectors, input_signature=[specs], autograph=False)

    @staticmethod
    def _bag_mean(vectors: tf.Tensor, rows: tf.Tensor, slot_weights: tf.Tensor | None = None) -> tf.Tensor:
        """The mean of [B, L, d] ``vectors`` over the present entries (row >= 0) of [B, L] ``rows``,
        weighted by ``slot_weights`` [B, L] when given (as ``TwoTowerModel._recent_items``), else
        plain (as ``HashedBagEmbedding``); zeros when none is present."""
        present = tf.cast(rows >= 0, tf.float32)
        weights = present if slot_weights is None else slot_weights * present
        weighted = vectors * tf.expand_dims(weights, -1)  # not [..., newaxis]: no TF Lite op for it
        # The sum of weights, or 1 when nothing is present: the towers' max(sum, floor) without a
        # tiny floor, which float16 rounds to 0.
        nothing = tf.cast(tf.equal(tf.reduce_sum(present, axis=1, keepdims=True), 0.0), tf.float32)
        return tf.reduce_sum(weighted, axis=1) / (tf.reduce_sum(weights, axis=1, keepdims=True) + nothing)

    def _user_vectors(self, inputs: dict[str, tf.Tensor]) -> tf.Tensor:
        model: TwoTowerModel = self._model
        cfg = model.config
        parts = []
        for attribute in user_attributes(model):
            table, values = self.attribute_tables[attribute.name], inputs[attribute.name]
            if attribute.type == "numeric":
                # Bucketize as comparisons (TF Lite has no builtin for it); NaN compares unequal to itself.
                bucket = tf.ones_like(values, tf.int32)
                if attribute.boundaries:
                    edges = tf.constant([list(attribute.boundaries)], tf.float32)
                    bucket += tf.reduce_sum(tf.cast(tf.expand_dims(values, 1) >= edges, tf.int32), axis=1)
                bucket = tf.where(tf.not_equal(values, values), tf.zeros_like(bucket), bucket)
                parts.append(tf.gather(table, bucket))
            else:
                rows = tf.reshape(values, [tf.shape(values)[0], -1])
                parts.append(self._bag_mean(tf.gather(table, tf.maximum(rows, 0)), rows))
        recent = inputs["recent_items"]
        if self.recent_rows is not None:  # gathered once for both parts: one table in the file, not two
            recent_vectors = tf.gather(self.recent_rows, tf.maximum(recent, 0))
        if cfg.use_recent_items:
            weights = None
            if self.position_logits is not None:
                weights = tf.exp(self.position_logits - tf.reduce_max(self.position_logits))
                weights = tf.broadcast_to(weights, tf.shape(recent))
            parts.append(self._bag_mean(recent_vectors, recent, weights))
        if cfg.use_last_item:
            last = cfg.last_items
            parts.append(self._bag_mean(recent_vectors[:, :last], recent[:, :last]))
        if model.uses_counts():
            counts = [tf.math.log(1.0 + inputs[name]) for name in count_columns(model.schema)]
            parts.append(tf.stack(counts, axis=-1))
        # One product per part, not one over their concatenation: int8 then gives each part a
        # scale of its own, where a shared one would let the counts' range drown the embeddings.
        projected, offset = self.bias, 0
        for part in parts:
            width = int(part.shape[-1])
            projected += tf.matmul(part, self.kernel[offset : offset + width])
            offset += width
        return tf.math.l2_normalize(projected, axis=-1)

    def _recommend(self, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        users = self._user_vectors(inputs)
        scores = tf.matmul(users, self.item_vectors, transpose_b=True) * self.inverse_temperature
        excluded = _row_hits(inputs["exclude_items"], int(self.item_vectors.shape[0]))
        # Excluded items go just below the row's lowest score, not to -inf: an int8 scale
        # calibrated on these scores keeps its resolution, which a far-off constant would wipe out.
        floor = tf.reduce_min(scores, axis=1, keepdims=True) - 1.0
        top_scores, top_rows = tf.math.top_k(tf.where(excluded, floor, scores), k=self.k)
        remaining = tf.reduce_sum(1 - tf.cast(excluded, tf.int32), axis=1, keepdims=True)
        valid = tf.expand_dims(tf.range(self.k), 0) < remaining  # integers: exact in every variant
        return {"item_rows": tf.where(valid, top_rows, -1), "scores": top_scores}


def _row_hits(rows: tf.Tensor, count: int) -> tf.Tensor:
    """[B, E] rows (-1 padding) -> bool [B, count], True at every listed row (SCATTER_ND, no one-hot)."""
    batch, width = tf.shape(rows)[0], tf.shape(rows)[1]
    known = (rows >= 0) & (rows < count)
    target = tf.where(known, rows, count)  # padding lands in a spare column, dropped below
    users = tf.broadcast_to(tf.expand_dims(tf.range(batch), 1), tf.shape(rows))
    pairs = tf.reshape(tf.stack([users, target], axis=-1), [-1, 2])
    # int32, not float: int8 conversion would quantize a float scatter, whose empty cells read 0.5.
    hits = tf.scatter_nd(pairs, tf.ones([batch * width], tf.int32), tf.stack([batch, count + 1]))
    return hits[:, :count] > 0


def _batches(arrays: dict[str, np.ndarray], size: int) -> Iterable[dict[str, np.ndarray]]:
    rows = len(next(iter(arrays.values())))
    for start in range(0, rows, size):
        yield {name: values[start : start + size] for name, values in arrays.items()}


# -- conversion and parity ----------------------------------------------------------------------


def convert(tower: DeviceTower, variant: Variant, representative: dict[str, np.ndarray]) -> bytes:
    """The ``.tflite`` bytes of ``tower.recommend``; ``int8`` calibrates on ``representative`` rows."""
    converter = tf.lite.TFLiteConverter.from_concrete_functions([tower.recommend.get_concrete_function()], tower)
    if variant != "fp32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    elif variant == "int8":
        converter.representative_dataset = lambda: _batches(representative, 1)
    with _without_interpreter_warning():  # int8 calibration runs the interpreter
        return bytes(converter.convert())


@contextmanager
def _without_interpreter_warning() -> Iterator[None]:
    """Silence ``tf.lite.Interpreter``'s notice that it moves to the ai-edge-litert package: the
    bundled interpreter runs the same kernels, and the converter's int8 calibration uses it too."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*tf\.lite\.Interpreter is deprecated", category=UserWarning)
        yield


def run_tflite(content: bytes, arrays: dict[str, np.ndarray], *, batch_size: int = 256) -> np.ndarray:
    """``item_rows`` [B, K] of a converted model for ``arrays``, through the TF Lite interpreter."""
    with _without_interpreter_warning():
        interpreter = tf.lite.Interpreter(model_content=content, num_threads=os.cpu_count() or 1)
    runner = interpreter.get_signature_runner()
    chunks = [runner(**batch)["item_rows"] for batch in _batches(arrays, batch_size)]
    return np.concatenate(chunks).astype(np.int64)


def _tower_error(tower: DeviceTower, model: TwoTowerModel, frame: pd.DataFrame, arrays: dict[str, Any]) -> float:
    device = np.asarray(tower.user_vectors({name: tf.constant(values) for name, values in arrays.items()}))
    return float(np.abs(device - user_vectors(model, frame)).max()) if len(frame) else 0.0


def _tree_bytes(path: Path) -> int:
    return sum(file.stat().st_size for file in Path(path).rglob("*") if file.is_file())


@dataclass(frozen=True)
class LiteOptions:
    """What :func:`export_lite` writes: which variants, how many items each answer holds (K),
    how many contexts calibrate int8 and how many held-out ones measure parity."""

    variants: tuple[Variant, ...] = VARIANTS
    k: int = 20
    representative_samples: int = 200
    parity_contexts: int = 256
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        unknown = [name for name in self.variants if name not in VARIANTS]
        if unknown or not self.variants:
            raise SettingsError(f"variants {list(self.variants)}: pick one or more of {', '.join(VARIANTS)}")
        if min(self.k, self.representative_samples, self.parity_contexts) < 1:
            raise SettingsError("K (--top-k), --samples and --parity-users must each be at least 1")


def export_lite(
    version_path: Path,
    output_dir: Path,
    contexts: pd.DataFrame,
    options: LiteOptions = LiteOptions(),
    *,
    model: TwoTowerModel | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write every variant, ``items.txt``, ``inputs.json`` and ``report.json`` into ``output_dir``
    (atomically, as a renamed temp dir) and return the report. ``contexts``: example-frame rows
    (user inputs) of real users, split into held-out parity contexts and int8 calibration ones;
    ``model``: the version's, when the caller has loaded it already."""
    say = progress or (lambda _: None)
    output_dir = Path(output_dir)
    if output_dir.exists() and not options.overwrite:
        raise SettingsError(f"{output_dir} already exists; remove it, pass another --output-dir, or --overwrite")
    if contexts.empty:
        raise DatasetError("no user contexts to calibrate int8 and measure parity on; pass --dataset")
    model = model or load_version(version_path)
    version = int(export.read_lineage(version_path)["version"])
    say(f"version {version}: {len(model.catalog):,} items, dim {model.config.embedding_dim}")
    order = np.random.default_rng(options.seed).permutation(len(contexts))
    held_out = min(options.parity_contexts, max(1, len(order) // 2))
    parity_rows = order[:held_out]
    calibration_rows = order[held_out : held_out + options.representative_samples]
    if calibration_rows.size == 0:
        calibration_rows = parity_rows[: options.representative_samples]
    vocabulary = vocabularies(contexts, model)
    parity = cold_start_frame(contexts.iloc[parity_rows], model, vocabulary)
    calibration = cold_start_frame(contexts.iloc[calibration_rows], model, vocabulary)
    parity_arrays = device_arrays(parity, model, vocabulary)
    calibration_arrays = device_arrays(calibration, model, vocabulary)
    tower = DeviceTower(model, vocabulary, options.k)
    error = _tower_error(tower, model, parity, parity_arrays)
    if not error <= TOWER_TOLERANCE:
        raise RuntimeError(
            f"the device tower differs from TwoTowerModel.user_tower by {error:.2e}; "
            "update DeviceTower in online_trainer/export_lite.py to the model's current user tower"
        )
    exclude = [[item for item in items if item] for items in parity["recent_items"]]
    reference, _ = recommend(model, parity, k=tower.k, exclude=exclude)
    item_ids = np.asarray([*model.catalog.item_ids, ""], dtype=object)  # row -1 -> ""
    staging = output_dir.parent / f".tmp-{output_dir.name}-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    try:
        report_variants: dict[str, Any] = {}
        for variant in options.variants:
            say(f"converting {variant} ...")
            content = convert(tower, variant, calibration_arrays)
            name = f"streamrec-v{version}-{variant}.tflite"
            (staging / name).write_bytes(content)
            overlap = overlap_at_k(reference, item_ids[run_tflite(content, parity_arrays)])
            report_variants[variant] = {
                "file": name,
                "bytes": len(content),
                f"mean_overlap_at_{tower.k}": round(float(overlap.mean()), 4),
                f"min_overlap_at_{tower.k}": round(float(overlap.min()), 4),
            }
            say(f"{variant}: {len(content):,} bytes, mean overlap@{tower.k} {overlap.mean():.3f}")
        (staging / ITEMS_FILE).write_text("".join(f"{item}\n" for item in model.catalog.item_ids))
        inputs = {
            "version": version,
            "top_k": tower.k,
            "items_file": ITEMS_FILE,
            "inputs": {
                spec.name: {"dtype": spec.dtype, "shape": spec.shape, "meaning": spec.meaning}
                for spec in device_inputs(model)
            },
            "outputs": {
                "item_rows": {"dtype": "int32", "shape": [None, tower.k], "meaning": f"rows of {ITEMS_FILE}, -1 pad"},
                "scores": {
                    "dtype": "float32",
                    "shape": [None, tower.k],
                    "meaning": "cosine / temperature, best first; meaningless where the row is -1",
                },
            },
            "vocabularies": vocabulary,
        }
        (staging / INPUTS_FILE).write_text(json.dumps(inputs, indent=2) + "\n")
        saved_model = export.serving_bytes(version_path)
        report = {
            "version": version,
            "source": str(version_path),
            "catalog_items": len(model.catalog),
            "embedding_dim": model.config.embedding_dim,
            "top_k": tower.k,
            "saved_model_bytes": saved_model,
            "version_dir_bytes": _tree_bytes(version_path),
            "contexts": {
                "parity": len(parity),
                "representative": len(calibration),
                "disjoint": bool(np.intersect1d(parity_rows, calibration_rows).size == 0),
            },
            "tower_max_abs_error": error,
            "reference": "the version's Keras model, exact top K, user id empty, recent items excluded",
            "variants": report_variants,
        }
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.rename(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report
