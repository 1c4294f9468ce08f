"""Load any interaction log a user brings (CSV or Parquet) into an interaction frame.

A :class:`ColumnMapping` names the user, item and time columns and, optionally, a rating, an
event-kind and an event-id column. Timestamps may be epoch seconds or milliseconds, or ISO-8601
strings; CSV files may use LF or CRLF line endings (pandas' C parser takes both, and the
stripping below removes a stray ``\\r`` from the last column if a file mixes them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

from streamrec.core.errors import DatasetError
from streamrec.datasets.description_file import KNOWN_KINDS, FileFormat, file_format
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


def read_table(path: Path, declared: FileFormat | None = None) -> pd.DataFrame:
    """A CSV/TSV/Parquet/JSON-lines file as a frame (strings kept as read, header stripped)."""
    if not path.is_file():
        raise DatasetError(f"{path} does not exist; fix the path (relative paths start at the description file)")
    kind = file_format(path, declared)
    try:
        if kind == "parquet":
            return pd.read_parquet(path)
        if kind == "jsonl":
            return pd.read_json(path, lines=True, dtype=False)
        frame = pd.read_csv(path, sep="," if kind == "csv" else "\t", dtype=str, keep_default_na=False)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise DatasetError(f"{path}: cannot be read as {kind} ({exc}); check `format` and the file") from exc
    frame.columns = [str(column).strip() for column in frame.columns]
    for column in frame.columns:
        frame[column] = frame[column].str.rstrip("\r").replace("", None)
    return frame


def _event_times(values: pd.Series, unit: TimeUnit | None, source: str) -> pd.Series:
    times = _parse_times(values, unit, source)
    missing = times.isna()
    if missing.any():
        first = int(missing.to_numpy().nonzero()[0][0])
        raise DatasetError(
            f"{source}: {int(missing.sum())} row(s) without a timestamp (first: row {first}); "
            "every interaction needs one"
        )
    return times


def _parse_times(values: pd.Series, unit: TimeUnit | None, source: str) -> pd.Series:
    try:
        all_numeric = (pd.to_numeric(values, errors="coerce").notna() | values.isna()).all()
        if unit == "iso" or (unit is None and not all_numeric):
            return pd.to_datetime(values, utc=True, format="ISO8601")
        return pd.to_datetime(pd.to_numeric(values), unit=unit or "s", utc=True)
    except (ValueError, TypeError) as exc:
        raise DatasetError(f"{source}: cannot parse timestamps ({exc}); set time_unit to s, ms or iso") from exc


def map_kinds(raw_kinds: pd.Series, kinds: Mapping[str, str], source: str) -> pd.Series:
    """The file's kind values as streamrec kinds: mapped by ``kinds``, or already a known kind."""
    mapped = raw_kinds.map(lambda value: kinds.get(value, value if value in KNOWN_KINDS else None))
    unknown = sorted(set(raw_kinds[mapped.isna()]))
    if unknown:
        raise DatasetError(
            f"{source}: event kind(s) {unknown[:10]} are not streamrec kinds {list(KNOWN_KINDS)}; "
            'map them in the description\'s [kinds] table, e.g. addtocart = "add_to_cart"'
        )
    return mapped.astype(str)


def load_interaction_log(
    path: Path,
    mapping: ColumnMapping | None = None,
    *,
    kinds: Mapping[str, str] | None = None,
    declared_format: FileFormat | None = None,
) -> pd.DataFrame:
    """A log file as an interaction frame (see :func:`interaction_frame`)."""
    return interaction_frame(read_table(path, declared_format), mapping, kinds=kinds, source=str(path), name=path.name)


def interaction_frame(
    raw: pd.DataFrame,
    mapping: ColumnMapping | None = None,
    *,
    kinds: Mapping[str, str] | None = None,
    source: str,
    name: str,
) -> pd.DataFrame:
    """Map a raw log's columns to an interaction frame; every problem stops with one message naming the fix.

    Without an event id column, ids are derived from ``name``, the row and its content, so a second
    replay of the same file dedupes.
    """
    mapping = mapping or ColumnMapping()
    if raw.empty:
        raise DatasetError(f"{source}: the interaction log has no rows")
    wanted = [mapping.user, mapping.item, mapping.timestamp, mapping.rating, mapping.kind, mapping.event_id]
    missing = [column for column in wanted if column is not None and column not in raw.columns]
    if missing:
        raise DatasetError(
            f"{source}: column(s) {missing} not found; the file has {list(raw.columns)}; "
            "fix the column mapping ([interactions] in the description, or --columns)"
        )
    raw = raw.reset_index(drop=True)
    frame = pd.DataFrame(
        {
            "user_id": raw[mapping.user].astype("string").fillna("").str.strip().astype(object),
            "item_id": raw[mapping.item].astype("string").fillna("").str.strip().astype(object),
            "kind": (
                map_kinds(raw[mapping.kind].astype(str).str.strip(), kinds or {}, source)
                if mapping.kind
                else mapping.default_kind
            ),
            "rating": pd.to_numeric(raw[mapping.rating], errors="coerce") if mapping.rating else float("nan"),
            "event_time": _event_times(raw[mapping.timestamp], mapping.time_unit, source),
        }
    )
    if mapping.event_id:
        frame["event_id"] = raw[mapping.event_id].astype(str)
    else:
        prefix = hashlib.sha1(name.encode(), usedforsecurity=False).hexdigest()[:8]
        frame["event_id"] = (
            prefix
            + ":"
            + pd.Series(range(len(frame)), dtype="int64").astype(str)
            + ":"
            + frame["user_id"]
            + ":"
            + frame["item_id"]
        )
    return as_interaction_frame(frame, source=source)
