"""Load any interaction log a user brings (CSV or Parquet) into an interaction frame.

A :class:`ColumnMapping` names the user, item and time columns and, optionally, a rating, an
event-kind and an event-id column. Timestamps may be epoch seconds or milliseconds, or ISO-8601
strings; CSV files may use LF or CRLF line endings (pandas' C parser takes both, and the
stripping below removes a stray ``\\r`` from the last column if a file mixes them).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

from streamrec.core.errors import DatasetError
from streamrec.datasets.frames import as_interaction_frame

TimeUnit = Literal["s", "ms", "iso"]


@dataclass(frozen=True)
class ColumnMapping:
    user: str = "user_id"
    item: str = "item_id"
    timestamp: str = "timestamp"
    rating: str | None = "rating"
    kind: str | None = None
    event_id: str | None = None
    time_unit: TimeUnit | None = None  # None: epoch seconds if numeric, else ISO-8601
    default_kind: str = "view"

    @classmethod
    def parse(cls, spec: str) -> ColumnMapping:
        """Parse ``user=uid,item=iid,timestamp=ts,rating=,kind=action`` (empty = no column)."""
        fields: dict[str, str | None] = {}
        for part in filter(None, (chunk.strip() for chunk in spec.split(","))):
            name, sep, column = part.partition("=")
            if not sep or name not in cls.__dataclass_fields__:
                raise DatasetError(
                    f"column mapping entry {part!r} is not NAME=COLUMN with NAME in {sorted(cls.__dataclass_fields__)}"
                )
            fields[name] = column or None
        return cls(**fields)  # type: ignore[arg-type]


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DatasetError(f"{path} does not exist")
    suffix = path.suffix.lower()
    if suffix in {".parquet", ".pq"}:
        return pd.read_parquet(path)
    if suffix in {".csv", ".tsv", ".txt"}:
        frame = pd.read_csv(path, sep=None if suffix != ".csv" else ",", engine="python" if suffix != ".csv" else "c")
        frame.columns = [str(column).strip() for column in frame.columns]
        for column in frame.columns:
            if frame[column].dtype == object:
                frame[column] = frame[column].astype(str).str.rstrip("\r")
        return frame
    raise DatasetError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv or .parquet")


def _event_times(values: pd.Series, unit: TimeUnit | None, source: str) -> pd.Series:
    try:
        if unit == "iso" or (unit is None and not pd.api.types.is_numeric_dtype(values)):
            return pd.to_datetime(values, utc=True, format="ISO8601")
        return pd.to_datetime(pd.to_numeric(values), unit=unit or "s", utc=True)
    except (ValueError, TypeError) as exc:
        raise DatasetError(f"{source}: cannot parse timestamps ({exc}); set time_unit to s, ms or iso") from exc


def load_interaction_log(path: Path, mapping: ColumnMapping | None = None) -> pd.DataFrame:
    mapping = mapping or ColumnMapping()
    raw = _read_table(path)
    wanted = [mapping.user, mapping.item, mapping.timestamp, mapping.rating, mapping.kind, mapping.event_id]
    missing = [column for column in wanted if column is not None and column not in raw.columns]
    if missing:
        raise DatasetError(f"{path}: column(s) {missing} not found; the file has {list(raw.columns)}")
    frame = pd.DataFrame(
        {
            "user_id": raw[mapping.user].astype(str).str.strip(),
            "item_id": raw[mapping.item].astype(str).str.strip(),
            "kind": raw[mapping.kind].astype(str).str.strip() if mapping.kind else mapping.default_kind,
            "rating": pd.to_numeric(raw[mapping.rating], errors="coerce") if mapping.rating else float("nan"),
            "event_time": _event_times(raw[mapping.timestamp], mapping.time_unit, str(path)),
        }
    )
    if mapping.event_id:
        frame["event_id"] = raw[mapping.event_id].astype(str)
    else:
        # Deterministic ids (file, row, content) make a second replay of the same file dedupe.
        prefix = hashlib.sha1(path.name.encode(), usedforsecurity=False).hexdigest()[:8]
        frame["event_id"] = (
            prefix
            + ":"
            + pd.Series(range(len(frame)), dtype="int64").astype(str)
            + ":"
            + frame["user_id"]
            + ":"
            + frame["item_id"]
        )
    return as_interaction_frame(frame, source=str(path))
