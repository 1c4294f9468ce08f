"""The training-example frame the model learns from, and the user inputs it takes.

One row per interaction: the user inputs of the ``recommend`` signature as they were *before* the
interaction (point-in-time, the way Feast's ``get_historical_features`` returns them), the
positive ``item_id``, its event ``kind`` and ``event_time``. Which user inputs depends on the
dataset's schema (``streamrec.core.attributes.user_model_inputs``): :func:`example_columns` names
them. :func:`examples_from_interactions` computes the frame with pandas from an interaction frame
and a normalized users frame (benchmarks, the bootstrap's fallback, tests); the trainer's Feast
builder (``dataset.py``) and its online state (``loop.py``) produce the same columns.

Event kinds: every event moves the user's state (recent items, counts), but only the trainer's
``positive_kinds`` are learned (:func:`positive_examples`), each weighted by ``kind_weights``
(:func:`example_weights`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from online_trainer.attribute_values import as_array, frame_column
from streamrec.core import contracts
from streamrec.core.attributes import (
    COUNTED_WINDOWS,
    AttributeSchema,
    kind_count_feature,
    kind_count_features,
    user_model_inputs,
)
from streamrec.core.errors import DatasetError

LABEL_COLUMNS = ("item_id", "kind", "event_time")


def user_input_columns(schema: AttributeSchema) -> tuple[str, ...]:
    """The user inputs of the model's signatures, in order (``user_model_inputs``)."""
    return tuple(user_model_inputs(schema))


def count_columns(schema: AttributeSchema) -> tuple[str, ...]:
    """``count_1h``, ``count_24h`` and the counted kinds' window counts."""
    return (*COUNTED_WINDOWS, *kind_count_features(schema))


def example_columns(schema: AttributeSchema) -> tuple[str, ...]:
    """Columns of the example frame for ``schema``: the user inputs, then ``item_id, kind, event_time``."""
    return (*user_input_columns(schema), *LABEL_COLUMNS)


def empty_examples(schema: AttributeSchema) -> pd.DataFrame:
    """An example frame with no rows (object columns), e.g. an empty replay buffer."""
    return pd.DataFrame({column: pd.Series(dtype=object) for column in example_columns(schema)})


def interaction_kinds(interactions: pd.DataFrame, schema: AttributeSchema) -> np.ndarray:
    """The ``kind`` column; a frame without one is all the dataset's single kind (if it counts none)."""
    if "kind" in interactions.columns:
        return interactions["kind"].astype(str).to_numpy(dtype=object)
    if schema.counted_kinds:
        raise DatasetError(
            f"the interactions have no `kind` column, but the schema counts kinds {list(schema.counted_kinds)}"
        )
    default = schema.event_kinds[0] if schema.event_kinds else ""
    return np.full(len(interactions), default, dtype=object)


def examples_from_interactions(
    interactions: pd.DataFrame, users: pd.DataFrame | None = None, schema: AttributeSchema | None = None
) -> pd.DataFrame:
    """Point-in-time examples for every interaction (``streamrec.datasets.frames`` layout), all kinds.

    For each interaction the user inputs are those the stream would have written after the
    user's *previous* event (the latest row a point-in-time join may see without leaking the
    label): ``recent_items`` are the distinct items of earlier events, newest first, at most
    ``RECENT_ITEMS_MAX``; ``count_W`` counts the earlier events in ``(t_prev - W, t_prev]``
    (contracts' window semantics, anchored at the previous event's time ``t_prev``), and
    ``<kind>_count_W`` the earlier events of that kind in the same window. A user's first event
    has no recent items and zero counts.

    ``users``: a normalized users frame (``user_id`` + one column per user attribute of
    ``schema``), or None (attributes unknown).
    """
    schema = schema or AttributeSchema()
    missing = [column for column in ("event_id", "user_id", "item_id", "event_time") if column not in interactions]
    if missing:
        raise DatasetError(f"examples_from_interactions: missing column(s) {missing}")
    events = interactions.sort_values("event_time", kind="stable").reset_index(drop=True)
    user_ids = events["user_id"].astype(str).to_numpy()
    item_ids = events["item_id"].astype(str).to_numpy()
    kinds = interaction_kinds(events, schema)
    seconds = events["event_time"].astype("datetime64[ns, UTC]").astype("int64").to_numpy() // 1_000_000_000
    n = len(events)
    recent: list[list[str]] = [[] for _ in range(n)]
    counts = {name: np.zeros(n, dtype=np.int64) for name in count_columns(schema)}
    for rows in pd.Series(np.arange(n)).groupby(user_ids, sort=False).indices.values():
        _fill_user_history(np.asarray(rows), item_ids, kinds, seconds, recent, counts, schema.counted_kinds)
    frame = pd.DataFrame({"user_id": user_ids})
    frame = _with_user_attributes(frame, users, schema)
    frame["recent_items"] = recent
    for name, values in counts.items():
        frame[name] = values
    frame["item_id"] = item_ids
    frame["kind"] = kinds
    frame["event_time"] = pd.to_datetime(events["event_time"].to_numpy(), utc=True)
    return frame[list(example_columns(schema))]


def _fill_user_history(
    rows: np.ndarray,
    item_ids: np.ndarray,
    kinds: np.ndarray,
    seconds: np.ndarray,
    recent: list[list[str]],
    counts: dict[str, np.ndarray],
    counted_kinds: Sequence[str],
) -> None:
    """One user's rows (in event order): recent items and window counts as of the previous event."""
    history: list[str] = []  # distinct items, newest first
    for position in range(1, len(rows)):
        previous_item = str(item_ids[rows[position - 1]])
        if previous_item in history:
            history.remove(previous_item)
        history.insert(0, previous_item)
        del history[contracts.RECENT_ITEMS_MAX :]
        recent[rows[position]] = list(history)
    user_seconds = seconds[rows]
    user_kinds = kinds[rows]
    previous = np.arange(len(rows)) - 1  # index of the previous event, -1 for the first
    for window_name, window in contracts.WINDOWS_S.items():
        anchor = user_seconds[np.maximum(previous, 0)]
        first_in_window = np.searchsorted(user_seconds, anchor - window, side="right")
        values = np.where(previous >= 0, previous - first_in_window + 1, 0)
        counts[window_name][rows] = np.maximum(values, 0)
        for kind in counted_kinds:
            # events of this kind among rows [0, i]: prefix sums, read at both ends of the window
            of_kind = np.concatenate([[0], np.cumsum(user_kinds == kind)])
            in_window = of_kind[previous + 1] - of_kind[np.minimum(first_in_window, previous + 1)]
            counts[kind_count_feature(kind, window_name)][rows] = np.where(previous >= 0, in_window, 0)


def _with_user_attributes(frame: pd.DataFrame, users: pd.DataFrame | None, schema: AttributeSchema) -> pd.DataFrame:
    names = [attribute.name for attribute in schema.user]
    if users is not None and names:
        missing = [name for name in ("user_id", *names) if name not in users.columns]
        if missing:
            raise DatasetError(
                f"the users frame lacks column(s) {missing} the schema declares; it has {list(users.columns)}"
            )
        profiles = users[["user_id", *names]].copy()
        profiles["user_id"] = profiles["user_id"].astype(str)
        frame = frame.merge(profiles.drop_duplicates("user_id", keep="last"), on="user_id", how="left")
    for attribute in schema.user:
        column = frame[attribute.name] if attribute.name in frame else pd.Series([None] * len(frame))
        frame[attribute.name] = frame_column(attribute, column)
    return frame


# -- event kinds in training -------------------------------------------------------------------


def positive_examples(examples: pd.DataFrame, positive_kinds: Iterable[str] | None) -> pd.DataFrame:
    """The rows whose ``kind`` is learned (None: every kind)."""
    if positive_kinds is None or "kind" not in examples.columns:
        return examples
    keep = examples["kind"].astype(str).isin(list(positive_kinds)).to_numpy()
    return examples if keep.all() else examples.loc[keep].reset_index(drop=True)


def example_weights(examples: pd.DataFrame, kind_weights: Mapping[str, float] | None) -> np.ndarray:
    """Each example's loss weight: ``kind_weights[kind]``, 1.0 for a kind it does not name."""
    if not kind_weights or "kind" not in examples.columns:
        return np.ones(len(examples), dtype=np.float32)
    weights = examples["kind"].astype(str).map(lambda kind: kind_weights.get(kind, 1.0))
    return weights.to_numpy(dtype=np.float32)


# -- frames -> the model's input arrays -------------------------------------------------------


def pad_recent_items(recent_items: Iterable[Sequence[str]], width: int = contracts.RECENT_ITEMS_MAX) -> np.ndarray:
    """Lists of ids -> a [B, width] object array padded with "" (the recommend signature's layout)."""
    rows = list(recent_items)
    padded = np.full((len(rows), width), "", dtype=object)
    for row, items in enumerate(rows):
        clipped = [str(item) for item in (list(items) if items is not None else [])[:width]]
        padded[row, : len(clipped)] = clipped
    return padded


def user_arrays(user_inputs: pd.DataFrame, schema: AttributeSchema) -> dict[str, np.ndarray]:
    """The user columns of a frame as the signatures' arrays, named by ``user_model_inputs(schema)``.

    ``user_id`` is required; a missing count is 0, missing recent items are none and a missing
    attribute is unknown (a frame from before any event, e.g. a new user's request).
    """
    if "user_id" not in user_inputs.columns:
        raise ValueError(f"user inputs lack 'user_id'; expected columns {list(user_input_columns(schema))}")
    size = len(user_inputs)
    arrays: dict[str, np.ndarray] = {"user_id": user_inputs["user_id"].fillna("").astype(str).to_numpy(dtype=object)}
    recent: Any = user_inputs["recent_items"] if "recent_items" in user_inputs else [[]] * size
    arrays["recent_items"] = pad_recent_items(recent)
    for name in count_columns(schema):
        values = user_inputs[name] if name in user_inputs else pd.Series(0, index=user_inputs.index)
        arrays[name] = pd.to_numeric(values).fillna(0).to_numpy(dtype=np.int64)
    for attribute in schema.user:
        column = user_inputs[attribute.name] if attribute.name in user_inputs else [None] * size
        arrays[attribute.name] = as_array(attribute, column)
    return arrays
