"""The device model's inputs: what they are, and real users' contexts turned into them.

The ``.tflite`` models of :mod:`online_trainer.export_lite` take integer rows instead of strings:
``recent_items`` and ``exclude_items`` are rows of ``items.txt`` (the catalog's order), a
categorical user attribute is the row of its value in a vocabulary of the values the history
holds. :func:`cold_start_frame` restricts a context to what those inputs can say (no user id,
unknown items and values made unknown in place), so the server model can be asked the very same
question for the parity figures; :func:`device_arrays` writes it as the device inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from online_trainer.examples import count_columns
from streamrec.core import contracts
from streamrec.core.attributes import Attribute

if TYPE_CHECKING:
    import tensorflow as tf

    from online_trainer.model import TwoTowerModel

ITEMS_FILE = "items.txt"
MAX_VOCABULARY = 10_000  # values kept per categorical user attribute, most frequent first


@dataclass(frozen=True)
class DeviceInput:
    name: str
    dtype: Literal["int32", "float32"]
    shape: tuple[int | None, ...]
    meaning: str

    def spec(self) -> tf.TensorSpec:
        import tensorflow as tf

        return tf.TensorSpec(list(self.shape), tf.as_dtype(self.dtype), name=self.name)


def user_attributes(model: TwoTowerModel) -> tuple[Attribute, ...]:
    """The user attributes the tower reads (none when ``use_profile`` is off)."""
    return model.schema.user if model.uses_user_attributes() else ()


def device_inputs(model: TwoTowerModel) -> list[DeviceInput]:
    """The device model's inputs, in order (module docstring)."""
    inputs = [
        DeviceInput(
            "recent_items", "int32", (None, contracts.RECENT_ITEMS_MAX), f"rows of {ITEMS_FILE}, newest first, -1 pad"
        ),
        DeviceInput("exclude_items", "int32", (None, None), f"rows of {ITEMS_FILE} never returned, -1 pad"),
    ]
    if model.uses_counts():
        inputs += [
            DeviceInput(name, "float32", (None,), "the user's event count") for name in count_columns(model.schema)
        ]
    for attribute in user_attributes(model):
        if attribute.type == "numeric":
            inputs.append(DeviceInput(attribute.name, "float32", (None,), "value, NaN unknown"))
        elif attribute.type == "categorical":
            inputs.append(DeviceInput(attribute.name, "int32", (None,), "row in vocabularies, -1 unknown"))
        else:
            shape = (None, attribute.max_tokens)
            inputs.append(DeviceInput(attribute.name, "int32", shape, "rows in vocabularies, -1 pad"))
    return inputs


def vocabularies(contexts: pd.DataFrame, model: TwoTowerModel) -> dict[str, list[str]]:
    """Each categorical user attribute's values in ``contexts``, most frequent first (capped)."""
    found: dict[str, list[str]] = {}
    for attribute in user_attributes(model):
        if attribute.type == "numeric":
            continue
        if attribute.name not in contexts:
            found[attribute.name] = []
            continue
        values = contexts[attribute.name]
        tokens = values.explode() if attribute.type == "multi_categorical" else values
        counts = tokens.dropna().astype(str).loc[lambda column: column != ""].value_counts()
        ranked = sorted(counts.items(), key=lambda pair: (-pair[1], pair[0]))
        found[attribute.name] = [str(value) for value, _ in ranked[:MAX_VOCABULARY]]
    return found


def trained_contexts(state_path: Path, version: int) -> pd.DataFrame | None:
    """The examples the version learned from (its trainer checkpoint's replay buffer), or None."""
    from online_trainer.checkpoint import load_latest

    checkpoint = load_latest(state_path, version, replay_capacity=2**62)
    return None if checkpoint is None else checkpoint.replay.frame


def dataset_contexts(
    interactions: pd.DataFrame, users: pd.DataFrame | None, model: TwoTowerModel, lineage: dict[str, Any]
) -> pd.DataFrame:
    """Point-in-time examples of ``interactions`` up to the end of the version's training data."""
    from online_trainer.examples import examples_from_interactions

    until = training_end(lineage)
    if until is not None:
        interactions = interactions[interactions["event_time"] <= until]
    return examples_from_interactions(interactions, users, model.schema)


def training_end(lineage: dict[str, Any]) -> pd.Timestamp | None:
    """The end of a version's training data (its lineage's ``data.end``, else ``bootstrap_until``), UTC."""
    until = (lineage.get("data") or {}).get("end") or lineage.get("bootstrap_until")
    if until is None:
        return None
    stamp = pd.Timestamp(until)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def cold_start_frame(contexts: pd.DataFrame, model: TwoTowerModel, vocabulary: dict[str, list[str]]) -> pd.DataFrame:
    """``contexts`` as the device can express them: no user id, recent items outside the catalog
    and attribute values outside ``vocabulary`` made unknown in place (slots keep their position)."""
    index = model.catalog.index
    frame = contexts.reset_index(drop=True).copy()
    frame["user_id"] = ""
    recent = frame["recent_items"] if "recent_items" in frame else pd.Series([[]] * len(frame))
    frame["recent_items"] = [
        [item if item in index else "" for item in map(str, _listed(items)[: contracts.RECENT_ITEMS_MAX])]
        for items in recent
    ]
    for attribute in user_attributes(model):
        if attribute.name not in frame:
            continue
        if attribute.type == "categorical":
            known = set(vocabulary[attribute.name])
            frame[attribute.name] = [value if value in known else "" for value in frame[attribute.name].astype(str)]
        elif attribute.type == "multi_categorical":
            known = set(vocabulary[attribute.name])
            frame[attribute.name] = [
                [token if token in known else "" for token in map(str, _listed(tokens)[: attribute.max_tokens])]
                for tokens in frame[attribute.name]
            ]
    return frame


def device_arrays(frame: pd.DataFrame, model: TwoTowerModel, vocabulary: dict[str, list[str]]) -> dict[str, Any]:
    """A :func:`cold_start_frame` as the device model's inputs; its recent items are excluded."""
    from online_trainer.examples import pad_recent_items, user_arrays

    index = model.catalog.index
    strings = user_arrays(frame, model.schema)
    arrays: dict[str, np.ndarray] = {"recent_items": _rows(index, pad_recent_items(frame["recent_items"]))}
    arrays["exclude_items"] = arrays["recent_items"]
    for spec in device_inputs(model)[2:]:
        values = strings[spec.name]
        if spec.dtype == "float32":
            arrays[spec.name] = values.astype(np.float32)
        else:
            arrays[spec.name] = _rows({value: row for row, value in enumerate(vocabulary[spec.name])}, values)
    return arrays


def _listed(value: Any) -> list[Any]:
    """A list cell of a frame (list, tuple or array; None or NaN when missing) as a list."""
    return list(value) if isinstance(value, list | tuple | np.ndarray) else []


def _rows(place: Mapping[str, int], values: np.ndarray) -> np.ndarray:
    """Strings -> their int32 rows in ``place``, -1 for "" and anything else it lacks."""
    rows: np.ndarray = np.vectorize(place.get, otypes=[np.int32])(values, -1)
    return rows
