"""The interaction frame: the one tabular shape every dataset loader returns.

Columns (dtypes enforced by :func:`as_interaction_frame`):

=============  ======================  =====================================================
column         dtype                   meaning
=============  ======================  =====================================================
event_id       str                     unique and deterministic, so a replay dedupes
user_id        str                     the Kafka key
item_id        str
kind           str                     one of ``streamrec.core.events.InteractionKind``
rating         float64 (NaN if none)
event_time     datetime64[ns, UTC]
=============  ======================  =====================================================

Rows are sorted by ``event_time`` (stable, so ties keep file order), which is the order a
replay produces them in.
"""

from __future__ import annotations

import pandas as pd

from streamrec.core.errors import DatasetError

INTERACTION_COLUMNS = ["event_id", "user_id", "item_id", "kind", "rating", "event_time"]


def as_interaction_frame(frame: pd.DataFrame, *, source: str) -> pd.DataFrame:
    """Check columns and dtypes, drop nothing silently, and sort by event time."""
    missing = [column for column in INTERACTION_COLUMNS if column not in frame.columns]
    if missing:
        raise DatasetError(f"{source}: missing column(s) {missing}; expected {INTERACTION_COLUMNS}")
    result = frame[INTERACTION_COLUMNS].copy()
    for column in ("event_id", "user_id", "item_id", "kind"):
        result[column] = result[column].astype(str)
    result["rating"] = pd.to_numeric(result["rating"], errors="raise").astype("float64")
    if not isinstance(result["event_time"].dtype, pd.DatetimeTZDtype):
        raise DatasetError(f"{source}: event_time must be timezone-aware (UTC)")
    result["event_time"] = result["event_time"].dt.tz_convert("UTC").astype("datetime64[ns, UTC]")
    empty_ids = (result["user_id"] == "") | (result["item_id"] == "")
    if empty_ids.any():
        first = int(empty_ids.to_numpy().nonzero()[0][0])
        raise DatasetError(
            f"{source}: {int(empty_ids.sum())} row(s) with an empty user or item id (first: row {first})"
        )
    duplicated = result["event_id"].duplicated()
    if duplicated.any():
        raise DatasetError(
            f"{source}: {int(duplicated.sum())} duplicate event_id(s), e.g. "
            f"{result.loc[duplicated, 'event_id'].iloc[0]!r}; event ids must be unique"
        )
    return result.sort_values("event_time", kind="stable").reset_index(drop=True)
