"""MovieLens-100K, read from the files the ``recbole`` wheel ships.

The wheel is installed with ``pip install --no-deps recbole`` and never imported (importing it
pulls in torch); we only locate its ``dataset_example/ml-100k/`` folder through the installed
distribution's file list. The files are RecBole "atomic files": tab-separated, with a header of
``name:type`` columns.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from streamrec.core.errors import DatasetError
from streamrec.datasets.frames import as_interaction_frame

INSTALL_HINT = "pip install --no-deps recbole"
_DATASET_SUBDIR = Path("recbole") / "dataset_example" / "ml-100k"


def ml100k_dir() -> Path:
    """The folder holding ``ml-100k.inter``, ``.user`` and ``.item`` inside the recbole wheel."""
    try:
        distribution = importlib.metadata.distribution("recbole")
    except importlib.metadata.PackageNotFoundError as exc:
        raise DatasetError(
            f"MovieLens-100K comes from the recbole wheel, which is not installed: run `{INSTALL_HINT}`"
        ) from exc
    folder = Path(str(distribution.locate_file(_DATASET_SUBDIR)))
    if not (folder / "ml-100k.inter").is_file():
        raise DatasetError(f"{folder / 'ml-100k.inter'} is missing; reinstall with `{INSTALL_HINT}`")
    return folder


def _read_atomic(path: Path) -> pd.DataFrame:
    """Read a RecBole atomic file, stripping the ``:type`` suffixes from the header."""
    if not path.is_file():
        raise DatasetError(f"{path} is missing; reinstall with `{INSTALL_HINT}`")
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    frame.columns = [str(column).split(":", 1)[0] for column in frame.columns]
    return frame


@dataclass(frozen=True)
class MovieLens100K:
    interactions: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame


def load_interactions(folder: Path | None = None) -> pd.DataFrame:
    """All 100,000 ratings as an interaction frame (kind ``rating``), in event-time order."""
    raw = _read_atomic((folder or ml100k_dir()) / "ml-100k.inter")
    seconds = pd.to_numeric(raw["timestamp"], errors="raise").astype("int64")
    frame = pd.DataFrame(
        {
            "event_id": "ml-100k:" + raw["user_id"] + ":" + raw["item_id"] + ":" + seconds.astype(str),
            "user_id": raw["user_id"],
            "item_id": raw["item_id"],
            "kind": "rating",
            "rating": pd.to_numeric(raw["rating"], errors="raise"),
            "event_time": pd.to_datetime(seconds, unit="s", utc=True),
        }
    )
    return as_interaction_frame(frame, source="ml-100k.inter")


def load_users(folder: Path | None = None) -> pd.DataFrame:
    """User profiles: user_id (str), age (int), gender, occupation, zip_code (str)."""
    raw = _read_atomic((folder or ml100k_dir()) / "ml-100k.user")
    raw["age"] = pd.to_numeric(raw["age"], errors="raise").astype("int64")
    return raw[["user_id", "age", "gender", "occupation", "zip_code"]]


def load_items(folder: Path | None = None) -> pd.DataFrame:
    """Item profiles: item_id, title, release_year (Int64, missing for a few), genres (list[str])."""
    raw = _read_atomic((folder or ml100k_dir()) / "ml-100k.item")
    return pd.DataFrame(
        {
            "item_id": raw["item_id"],
            "title": raw["movie_title"],
            "release_year": pd.to_numeric(raw["release_year"], errors="coerce").astype("Int64"),
            "genres": raw["class"].str.split(" ").map(lambda genres: [g for g in genres if g]),
        }
    )


def load(folder: Path | None = None) -> MovieLens100K:
    folder = folder or ml100k_dir()
    return MovieLens100K(load_interactions(folder), load_users(folder), load_items(folder))


ZIP_PREFIX_LEN = 3  # the MovieLens preset keeps the first 3 digits of a zip code (an area)
