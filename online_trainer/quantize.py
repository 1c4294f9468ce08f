"""Serving copies of a model whose hashed embedding tables are stored in float16 or int8.

The hashed id and attribute tables (:class:`~online_trainer.hash_embedding.HashedBagEmbedding`)
are most of a version's bytes (two tables of ``ModelConfig.item_id_buckets`` x dim float32 for the
ids alone). A serving copy stores them as ``float16``, or as ``int8`` with one float32 scale per
row (symmetric: the row's largest magnitude maps to 127), and turns only the rows a request looks
up back into float32. Everything else (dense layers, small tables, the catalog's item vectors)
stays float32, so a request costs what it did. The trainer keeps training the float32 model, and
a version's resume files hold its float32 weights: only the signatures TF Serving loads read the
smaller tables (``trainer.serving_table_dtype``; docs/design/trainer.md#quantized-serving-tables).
"""

from __future__ import annotations

from typing import get_args

import numpy as np
import tensorflow as tf

from online_trainer.model import TwoTowerModel
from online_trainer.model_state import copy_weights_into
from online_trainer.settings import TableDtype

TABLE_DTYPES: tuple[str, ...] = get_args(TableDtype)
_INT8_MAX = 127.0


def quantize(values: np.ndarray, dtype: TableDtype) -> tuple[np.ndarray, np.ndarray | None]:
    """``values`` [rows, dim] float32 as ``dtype``, with the per-row scales of int8 (else None)."""
    if dtype == "float16":
        return values.astype(np.float16), None
    if dtype == "int8":
        scales = np.abs(values).max(axis=1) / _INT8_MAX
        scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
        quantized = np.clip(np.rint(values / scales[:, None]), -_INT8_MAX, _INT8_MAX).astype(np.int8)
        return quantized, scales
    raise ValueError(f"no quantized table of dtype {dtype!r}; use one of {TABLE_DTYPES[1:]}")


class QuantizedTable(tf.Module):  # type: ignore[misc]  # tensorflow ships no type hints
    """A float32 table stored as ``dtype``; :meth:`lookup` gives float32 rows."""

    def __init__(self, values: np.ndarray, dtype: TableDtype, name: str) -> None:
        super().__init__(name=name)
        self._dtype = dtype
        stored, scales = quantize(values, dtype)
        self.values = tf.Variable(stored, trainable=False, name="values")
        self.scales = None if scales is None else tf.Variable(scales, trainable=False, name="scales")

    def assign(self, values: np.ndarray) -> None:
        stored, scales = quantize(values, self._dtype)
        self.values.assign(stored)
        if self.scales is not None:
            self.scales.assign(scales)

    def lookup(self, indices: tf.Tensor) -> tf.Tensor:
        rows = tf.cast(tf.gather(self.values, indices), tf.float32)
        if self.scales is None:
            return rows
        return rows * tf.gather(self.scales, indices)[..., tf.newaxis]


def serving_copy(model: TwoTowerModel, dtype: TableDtype) -> TwoTowerModel:
    """A copy of ``model`` with its current weights and catalog whose hashed tables are stored as
    ``dtype``. One copy per dtype is kept on ``model`` and updated in place at the next call, so
    its serving module (``export.serving_module``) is traced once, as the model's own is."""
    copies: dict[str, TwoTowerModel] | None = getattr(model, "_serving_copies", None)
    if copies is None:
        copies = {}
        object.__setattr__(model, "_serving_copies", copies)  # not a tracked attribute of the Keras model
    copy = copies.get(dtype)
    if copy is None:
        copy = TwoTowerModel(model.catalog, model.config)
        copy.build()
        copies[dtype] = copy
    copy_weights_into(copy, model)
    for layer in copy.hashed_embeddings():
        table = np.asarray(layer.table.embeddings)
        if layer.serving_table is None:
            object.__setattr__(layer, "serving_table", QuantizedTable(table, dtype, name=f"{layer.name}_{dtype}"))
        else:
            layer.serving_table.assign(table)
    return copy


def serving_variables(model: TwoTowerModel) -> tuple[list[object], list[QuantizedTable]]:
    """What a serving module of ``model`` saves: the model's variables but the float32 tables a
    quantized table replaces, and those quantized tables."""
    quantized = [layer for layer in model.hashed_embeddings() if layer.serving_table is not None]
    replaced = {id(layer.table.embeddings) for layer in quantized}
    variables = [variable for variable in model.variables if id(variable) not in replaced]
    return variables, [layer.serving_table for layer in quantized]
