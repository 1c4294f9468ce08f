"""The ranker's SavedModel: the ``rank`` signature TF Serving serves, written atomically.

Layout of a version directory (``RANKER_MODEL_NAME``'s own version line, same conventions as
:mod:`online_trainer.export`):

* ``saved_model.pb`` + ``variables/``: ``rank`` (= ``serving_default``), typed as
  ``streamrec.core.contracts`` documents (:func:`ranker_signature_spec`); padding ("" item ids)
  is scored ``PAD_SCORE`` (float32 min) inside the graph.
* ``assets.extra/lineage.json`` (``contracts.LINEAGE_PATH``): the caller's lineage, when given.
* ``assets.extra/attribute_schema.json``, ``ranker_config.json``, ``weights.npz``,
  ``optimizer.npz``: enough to rebuild the Keras model and keep fine-tuning it
  (:func:`load_ranker_for_finetune`).

Everything is written under a hidden ``.tmp-`` sibling, fsynced, then renamed into place.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from online_trainer.export import (
    EXTRA_DIR,
    OPTIMIZER_FILE,
    TEMP_PREFIX,
    WEIGHTS_FILE,
    _fsync_dir,
    _fsync_tree,
    kept_module,
)
from online_trainer.inference import PAD_SCORE
from online_trainer.model_state import assign_optimizer_state, assign_weights, optimizer_state, weights_by_path
from online_trainer.ranker_model import RankerConfig, RankerModel, build_ranker
from online_trainer.signatures import Spec, signatures_problems, tensor_specs, user_spec
from streamrec.core import contracts
from streamrec.core.attributes import SCHEMA_FILE, AttributeSchema
from streamrec.core.errors import DatasetError

RANKER_CONFIG_FILE = "ranker_config.json"
RANKER_SIGNATURES = (contracts.RANK_SIGNATURE, "serving_default")
_PAIRS = (None, None)  # [B, N]


def ranker_signature_spec(schema: AttributeSchema) -> tuple[Spec, Spec]:
    """(inputs, outputs) of ``rank`` for ``schema``, in :mod:`online_trainer.signatures`' Spec format."""
    inputs: Spec = {**user_spec(schema), "item_ids": ("string", _PAIRS), "retrieval_scores": ("float32", _PAIRS)}
    return inputs, {"scores": ("float32", _PAIRS)}


class _RankerServing(tf.Module):  # type: ignore[misc]  # tensorflow ships no type hints
    """Tracks the ranker's variables; its ``rank`` tf.function is the signature."""

    def __init__(self, model: RankerModel) -> None:
        super().__init__(name=contracts.RANKER_MODEL_NAME)
        # Not an attribute TF tracks: only the variables below are saved, not the Keras object graph.
        object.__setattr__(self, "_model", model)
        self.model_variables = list(model.variables)
        inputs, _ = ranker_signature_spec(model.schema)
        self.user_inputs = tuple(user_spec(model.schema))
        self.rank = tf.function(self._rank, input_signature=[tensor_specs(inputs)], autograph=False)

    def _rank(self, inputs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        item_ids, retrieval_scores = inputs["item_ids"], inputs["retrieval_scores"]
        check = tf.debugging.assert_equal(
            tf.shape(item_ids),
            tf.shape(retrieval_scores),
            message="rank: retrieval_scores must have the shape of item_ids ([B, N], one score per candidate)",
        )
        with tf.control_dependencies([check]):
            users = {name: inputs[name] for name in self.user_inputs}
            logits = self._model.logits(users, item_ids, retrieval_scores)
        padding = tf.equal(item_ids, "")
        return {"scores": tf.where(padding, tf.constant(PAD_SCORE, tf.float32), logits)}


def serving_module(model: RankerModel) -> _RankerServing:
    """``model``'s serving module, traced once per model object (``export.kept_module``): the
    ranker line assigns new weights into its two model objects in turn."""
    return kept_module(model, _RankerServing, lambda: _RankerServing(model), lambda _: True)


def export_ranker(
    model: RankerModel, export_dir: Path, schema: AttributeSchema, *, lineage: dict[str, Any] | None = None
) -> Path:
    """Write the ranker's SavedModel at ``export_dir`` (e.g. ``<base>/<version>``) atomically; return it.

    ``schema``: the attribute schema the caller serves with; it must be the model's. Refuses to
    overwrite an existing directory (versions are immutable).
    """
    if schema != model.schema:
        raise DatasetError(
            "export_ranker: the schema differs from the one the ranker was built with; "
            "build the ranker with the serving schema (build_ranker(schema, config)) and retrain it"
        )
    export_dir = Path(export_dir)
    if export_dir.exists():
        raise FileExistsError(f"export_ranker: {export_dir} already exists; versions are immutable, export a new one")
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    temp = export_dir.parent / f"{TEMP_PREFIX}{export_dir.name}-{uuid.uuid4().hex}"
    module = serving_module(model)
    rank = module.rank.get_concrete_function(tensor_specs(ranker_signature_spec(schema)[0]))
    tf.saved_model.save(module, str(temp), signatures=dict.fromkeys(RANKER_SIGNATURES, rank))
    extra = temp / EXTRA_DIR
    extra.mkdir(exist_ok=True)
    (extra / SCHEMA_FILE).write_text(schema.to_json())
    (extra / RANKER_CONFIG_FILE).write_text(json.dumps(model.config.to_json(), indent=2) + "\n")
    savez: Any = np.savez  # numpy's stub types **kwds as its own bool flag
    savez(extra / WEIGHTS_FILE, **weights_by_path(model))
    savez(extra / OPTIMIZER_FILE, *optimizer_state(model))
    if lineage is not None:
        record = {
            **lineage,
            "model": contracts.RANKER_MODEL_NAME,
            "exported_at": time.time(),
            "ranker_config": model.config.to_json(),
        }
        lineage_path = temp / contracts.LINEAGE_PATH
        lineage_path.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    _fsync_tree(temp)
    os.rename(temp, export_dir)
    _fsync_dir(export_dir.parent)
    return export_dir


def ranker_signature_problems(loaded: Any, schema: AttributeSchema) -> list[str]:
    """Every difference between a loaded SavedModel's ``rank`` / ``serving_default`` and the contract."""
    spec = ranker_signature_spec(schema)
    return signatures_problems(loaded, dict.fromkeys(RANKER_SIGNATURES, spec))


def load_ranker_for_finetune(version_dir: Path) -> RankerModel:
    """Rebuild the Keras ranker of an exported version (config, schema, weights, Adam state) to keep training it."""
    extra = Path(version_dir) / EXTRA_DIR
    for name in (SCHEMA_FILE, RANKER_CONFIG_FILE, WEIGHTS_FILE):
        if not (extra / name).is_file():
            raise FileNotFoundError(
                f"{extra / name} is missing; {version_dir} is not a ranker export and cannot be resumed, "
                "train a ranker from the labeled examples instead"
            )
    schema = AttributeSchema.from_json((extra / SCHEMA_FILE).read_text(), source=str(extra / SCHEMA_FILE))
    model = build_ranker(schema, RankerConfig.from_json(json.loads((extra / RANKER_CONFIG_FILE).read_text())))
    with np.load(extra / WEIGHTS_FILE) as saved:
        assign_weights(model, {name: saved[name] for name in saved.files})
    if (extra / OPTIMIZER_FILE).is_file():  # continue Adam where the exported run left it
        with np.load(extra / OPTIMIZER_FILE) as saved:
            assign_optimizer_state(model, [saved[f"arr_{n}"] for n in range(len(saved.files))])
    return model
