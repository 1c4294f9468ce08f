"""A dataset's attribute rows as the profile views' parquet files, and which dataset set the store up.

Rows come from the normalized frames of ``streamrec.datasets.description.Dataset`` (``users`` /
``items``: the join key and one column per attribute name), never from the loader itself, so
tests and other callers hand frames in directly. Each side with declared attributes gets one
parquet file (``features.views.profile_path``); a side without attributes has none, and a file
left by a previous dataset is removed.

``dataset.json`` records the dataset (name and schema) of the last *completed* set-up. The store
compares it with the dataset being set up: a different one means every online row and push-log
row belongs to another dataset's ids, which must not keep them (``features.store.setup_dataset``
clears them). The stamp is removed before such a switch starts and written after it ends, so an
interrupted switch is redone in full by the next set-up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa

from features import push_log, views
from features.errors import FeaturesError
from streamrec.core import contracts
from streamrec.core.attributes import AttributeSchema, Side

# Profiles are static: one row per entity at a fixed old time, so a point-in-time join finds
# them at any timestamp (ml-100k's events start in 1997).
PROFILE_TIMESTAMP = datetime(1990, 1, 1, tzinfo=UTC)
STAMP_FILE = "dataset.json"

_SIDES: tuple[tuple[Side, str, str], ...] = (
    ("user", contracts.USER_PROFILE_VIEW, contracts.USER_JOIN_KEY),
    ("item", contracts.ITEM_PROFILE_VIEW, contracts.ITEM_JOIN_KEY),
)


@dataclass(frozen=True)
class DatasetStamp:
    """Which dataset the store holds: its name and attribute schema."""

    name: str
    schema: AttributeSchema


def profile_tables(
    schema: AttributeSchema, users: pd.DataFrame | None, items: pd.DataFrame | None
) -> dict[str, pa.Table]:
    """The rows of each profile view ``schema`` declares, by view name, checked against it.

    A frame for a side without attributes is ignored; a side with attributes needs its frame,
    with the join key and every attribute's column, one row per id.
    """
    frames = {"user": users, "item": items}
    tables: dict[str, pa.Table] = {}
    for side, view_name, join_key in _SIDES:
        names = [attribute.name for attribute in schema.side(side)]
        if not names:
            continue
        frame = frames[side]
        if frame is None:
            raise FeaturesError(
                f"The schema declares {side} attributes {names} but no {side} frame was given; "
                f"pass the dataset's normalized `{side}s` frame (streamrec.datasets.description.load_dataset)."
            )
        missing = [column for column in (join_key, *names) if column not in frame.columns]
        if missing:
            raise FeaturesError(
                f"The {side} frame lacks the column(s) {missing} its schema declares; it has {list(frame.columns)}."
            )
        rows = frame.loc[:, [join_key, *names]].reset_index(drop=True)
        rows[join_key] = rows[join_key].astype(str)
        duplicated = rows[join_key][rows[join_key].duplicated()]
        if not duplicated.empty:
            raise FeaturesError(f"The {side} frame has {join_key} {duplicated.iloc[0]!r} more than once.")
        rows[views.EVENT_TIMESTAMP] = PROFILE_TIMESTAMP
        arrow_schema = views.profile_arrow_schema(schema, side)
        try:
            tables[view_name] = pa.Table.from_pandas(rows, schema=arrow_schema, preserve_index=False)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise FeaturesError(
                f"The {side} frame does not match its declared attributes "
                f"({arrow_schema.to_string(show_schema_metadata=False)}): {exc}; build it with "
                "streamrec.datasets.description.load_dataset, which normalizes the values."
            ) from exc
    return tables


def write_profiles(data_dir: Path, tables: dict[str, pa.Table]) -> dict[str, int]:
    """Write each profile view's file (atomically) and remove the file of any view not in ``tables``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for _, view_name, _ in _SIDES:
        path = views.profile_path(data_dir, view_name)
        table = tables.get(view_name)
        if table is None:
            path.unlink(missing_ok=True)
            continue
        push_log.write_parquet_atomically(table, path)
        counts[view_name] = table.num_rows
    return counts


def read_stamp(data_dir: Path) -> DatasetStamp | None:
    """The dataset of the last completed set-up; None when there was none (or it was interrupted)."""
    path = data_dir / STAMP_FILE
    if not path.is_file():
        return None
    try:
        payload = json.loads(path.read_text())
        return DatasetStamp(str(payload["name"]), AttributeSchema.model_validate(payload["schema"]))
    except (ValueError, KeyError, TypeError):
        return None  # unreadable: treated as another dataset, so the next set-up starts clean


def write_stamp(data_dir: Path, stamp: DatasetStamp) -> None:
    path = data_dir / STAMP_FILE
    temp = path.with_suffix(".json.tmp")
    temp.write_text(json.dumps({"name": stamp.name, "schema": stamp.schema.model_dump(mode="json")}, indent=2) + "\n")
    temp.replace(path)


def clear_stamp(data_dir: Path) -> None:
    (data_dir / STAMP_FILE).unlink(missing_ok=True)
