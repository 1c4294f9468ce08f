"""Declared attribute columns -> the normalized frame the feature views and the catalog hold.

One row per id; ``<side>_id`` (str) then one column per attribute *name*: categorical -> str
("" unknown), multi_categorical -> list[str], numeric -> float (NaN unknown). A numeric attribute
declared without boundaries gets the deciles of its values here, so the schema that leaves the
loader is complete and the model bucketizes the same way at training and serving.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from streamrec.core.attributes import Attribute
from streamrec.core.errors import DatasetError

DEFAULT_QUANTILES = 10


def _tokens(value: Any, separator: str) -> list[str]:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, str):
        return [token.strip() for token in value.split(separator) if token.strip()]
    return [str(token).strip() for token in value if token is not None and str(token).strip()]


def _categorical(values: pd.Series, attribute: Attribute) -> pd.Series:
    text = values.astype("string").fillna("").str.strip()
    if attribute.truncate is not None:
        text = text.str[: attribute.truncate]
    return text.astype(object).where(text.notna(), "")


def data_boundaries(values: pd.Series, quantiles: int = DEFAULT_QUANTILES) -> tuple[float, ...]:
    """Distinct inner quantile edges of the finite values (empty when there are none)."""
    finite = values[np.isfinite(values)]
    if finite.empty:
        return ()
    edges = np.quantile(finite.to_numpy(dtype=np.float64), np.linspace(0, 1, quantiles + 1)[1:-1])
    return tuple(float(f"{edge:.6g}") for edge in np.unique(edges))


def _numeric(values: pd.Series, attribute: Attribute, source: str) -> tuple[pd.Series, Attribute]:
    numbers = pd.to_numeric(values, errors="coerce").astype("float64")
    unparsed = numbers.isna() & values.notna() & (values.astype("string").str.strip() != "")
    if unparsed.any():
        example = values[unparsed].iloc[0]
        raise DatasetError(
            f"{source}: {int(unparsed.sum())} value(s) of numeric attribute {attribute.name!r} "
            f"(column {attribute.source_column!r}) are not numbers, e.g. {example!r}; "
            "fix the file or declare the attribute categorical"
        )
    if not attribute.boundaries:
        attribute = attribute.model_copy(update={"boundaries": data_boundaries(numbers)})
    return numbers, attribute


def attribute_frame(
    raw: pd.DataFrame, *, id_column: str, id_name: str, attributes: Sequence[Attribute], source: str
) -> tuple[pd.DataFrame, tuple[Attribute, ...]]:
    """The normalized frame of ``raw`` and the attributes with numeric boundaries filled in.

    Stops with a message naming the fix on: no rows, a missing column, an empty id, a duplicate id.
    """
    if raw.empty:
        raise DatasetError(f"{source}: the file has no rows; remove it from the description or fill it")
    wanted = [id_column, *(attribute.source_column for attribute in attributes)]
    missing = [column for column in dict.fromkeys(wanted) if column not in raw.columns]
    if missing:
        raise DatasetError(
            f"{source}: column(s) {missing} not found; the file has {list(raw.columns)}; "
            "fix `id` or the attribute's `column` in the description"
        )
    ids = raw[id_column].astype("string").fillna("").str.strip().astype(object)
    empty = ids == ""
    if empty.any():
        raise DatasetError(
            f"{source}: {int(empty.sum())} row(s) with an empty {id_column!r} (first: row {int(np.argmax(empty))})"
        )
    duplicated = ids.duplicated(keep=False)
    if duplicated.any():
        example = ids[duplicated].iloc[0]
        raise DatasetError(
            f"{source}: {id_name} {example!r} appears {int((ids == example).sum())} times "
            f"({int(ids[duplicated].nunique())} duplicated id(s)); each id must have exactly one row"
        )
    frame = pd.DataFrame({id_name: ids.to_numpy()})
    resolved: list[Attribute] = []
    for attribute in attributes:
        column = raw[attribute.source_column].reset_index(drop=True)
        if attribute.type == "categorical":
            frame[attribute.name] = _categorical(column, attribute).to_numpy()
        elif attribute.type == "multi_categorical":
            frame[attribute.name] = [_tokens(value, attribute.separator) for value in column]
        else:
            numbers, attribute = _numeric(column, attribute, source)
            frame[attribute.name] = numbers.to_numpy()
        resolved.append(attribute)
    return frame, tuple(resolved)
