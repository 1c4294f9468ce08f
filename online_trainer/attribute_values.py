"""Declared attribute values, as the catalog holds them and as the model takes them.

One value per attribute type (``streamrec.core.attributes``), the normalized form the dataset
loader and Feast produce: ``categorical`` -> ``str`` ("" unknown), ``multi_categorical`` -> a
tuple of ``str`` (empty unknown), ``numeric`` -> ``float`` (NaN unknown). :func:`normalize`
accepts what a frame or a Feast read may hold instead (None, NaN, numpy arrays, a separated
string) so every path into the model agrees on one form; :func:`as_array` turns a column of them
into the model's input array (string [N], string [N, max_tokens] "" padded, float32 [N]).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, cast

import numpy as np
import pandas as pd

from streamrec.core.attributes import Attribute

Value = str | tuple[str, ...] | float


def _missing(value: Any) -> bool:
    if value is None or value is pd.NA:
        return True
    return isinstance(value, float | np.floating) and math.isnan(value)


def normalize(attribute: Attribute, value: Any) -> Value:
    """One raw value -> the attribute type's normalized form (unknown when missing or unparsable)."""
    if attribute.type == "numeric":
        if _missing(value) or (isinstance(value, str) and not value.strip()):
            return math.nan
        try:
            return float(value)
        except (TypeError, ValueError):
            return math.nan
    if attribute.type == "categorical":
        return "" if _missing(value) else str(value)
    if _missing(value):
        return ()
    if isinstance(value, str):
        return tuple(token.strip() for token in value.split(attribute.separator) if token.strip())
    return tuple(str(token) for token in value if token is not None and str(token))


def frame_column(attribute: Attribute, values: Iterable[Any]) -> list[Any]:
    """Normalized values as an example-frame column holds them (multi-categorical as lists)."""
    normalized = [normalize(attribute, value) for value in values]
    return [list(value) if isinstance(value, tuple) else value for value in normalized]


def unknown(attribute: Attribute) -> Value:
    """The value the model reads as "unknown" for this attribute."""
    return normalize(attribute, None)


def same_values(attribute: Attribute, left: tuple[Value, ...], right: tuple[Value, ...]) -> bool:
    """Column equality where two unknown numerics (NaN) are equal."""
    if attribute.type != "numeric":
        return left == right
    return np.array_equal(np.asarray(left, np.float64), np.asarray(right, np.float64), equal_nan=True)


def as_array(attribute: Attribute, values: Iterable[Any]) -> np.ndarray:
    """A column of (raw or normalized) values -> the model's input array for this attribute.

    ``multi_categorical`` keeps the first ``max_tokens`` tokens (the model reads no more).
    """
    normalized = [normalize(attribute, value) for value in values]
    if attribute.type == "numeric":
        return np.asarray(normalized, dtype=np.float32).reshape(len(normalized))
    if attribute.type == "categorical":
        return np.asarray(normalized, dtype=object).reshape(len(normalized))
    padded = np.full((len(normalized), attribute.max_tokens), "", dtype=object)
    for row, tokens in enumerate(normalized):
        kept = list(cast(tuple[str, ...], tokens))[: attribute.max_tokens]
        padded[row, : len(kept)] = kept
    return padded


def to_json_value(attribute: Attribute, value: Value) -> Any:
    """JSON form of a normalized value (NaN -> null, tuples -> lists)."""
    if attribute.type == "numeric":
        number = float(cast(float, value))
        return None if math.isnan(number) else number
    return list(cast(tuple[str, ...], value)) if attribute.type == "multi_categorical" else value
