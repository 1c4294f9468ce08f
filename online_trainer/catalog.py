"""The item catalog the model scores, and the training-example frame the model learns from.

Two shapes cross the boundary between the data side (Feast, replay buffers, benchmarks) and the
model side (``training.py``, ``inference.py``, ``export.py``):

* :class:`ItemCatalog`: every item the recommend signature ranks, with its content features
  (``genres``, ``release_year``) as Feast's ``item_profile`` view holds them. The catalog is data,
  not weights: the item tower maps ids and content to vectors, so a new item joins the catalog
  with :meth:`ItemCatalog.with_new_items` and is scored from its content at once.
* The **example frame** (one row per positive interaction), columns :data:`EXAMPLE_COLUMNS`:
  the user inputs of the recommend signature as they were *before* the interaction (point-in-time,
  the way Feast's ``get_historical_features`` returns them) plus the positive ``item_id`` and
  ``event_time``. :func:`examples_from_interactions` computes it with pandas from raw
  interactions and profiles (benchmarks, replay buffers, tests); the trainer's Feast builder
  produces the same columns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from streamrec.core import contracts
from streamrec.core.errors import DatasetError

UNKNOWN_YEAR = -1
USER_PROFILE_COLUMNS = contracts.USER_PROFILE_FEATURES
USER_INPUT_COLUMNS = (*contracts.USER_STRING_INPUTS, "recent_items", *contracts.USER_COUNT_INPUTS)
EXAMPLE_COLUMNS = (*USER_INPUT_COLUMNS, "item_id", "event_time")


def empty_examples() -> pd.DataFrame:
    """An example frame with no rows (object columns), e.g. an empty replay buffer."""
    return pd.DataFrame({column: pd.Series(dtype=object) for column in EXAMPLE_COLUMNS})


@dataclass(frozen=True)
class ItemCatalog:
    """Item ids with their content features, in a fixed order (the row order of exported scores)."""

    item_ids: tuple[str, ...]
    genres: tuple[tuple[str, ...], ...]
    release_year: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (len(self.item_ids) == len(self.genres) == len(self.release_year)):
            raise DatasetError(
                f"ItemCatalog: item_ids ({len(self.item_ids)}), genres ({len(self.genres)}) and "
                f"release_year ({len(self.release_year)}) must have the same length"
            )
        if not self.item_ids:
            raise DatasetError("ItemCatalog: the catalog is empty; the model needs at least one item to rank")
        if "" in self.item_ids:
            raise DatasetError("ItemCatalog: an item id is empty; '' is the padding value of the model inputs")
        if len(set(self.item_ids)) != len(self.item_ids):
            seen: set[str] = set()
            duplicate = next(item for item in self.item_ids if item in seen or seen.add(item))  # type: ignore[func-returns-value]
            raise DatasetError(f"ItemCatalog: item id {duplicate!r} appears twice; ids must be unique")

    def __len__(self) -> int:
        return len(self.item_ids)

    @cached_property
    def index(self) -> Mapping[str, int]:
        """item id -> row, built once per catalog on first use.

        Cached, not rebuilt per call: callers test membership item by item (``item in
        catalog.index`` over an interval's rows), which rebuilding the dict each time made a
        bottleneck of the online trainer (docs/design/trainer.md#catalog-index). ``cached_property``
        stores it in the instance ``__dict__``, so the dataclass stays frozen and hashes by its fields.
        """
        return {item: row for row, item in enumerate(self.item_ids)}

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> ItemCatalog:
        """From columns ``item_id``, ``genres`` (list-like of str), ``release_year`` (int, -1/NA unknown)."""
        missing = [column for column in ("item_id", "genres", "release_year") if column not in frame.columns]
        if missing:
            raise DatasetError(f"ItemCatalog.from_frame: missing column(s) {missing}")
        years = pd.to_numeric(frame["release_year"], errors="coerce").astype("Float64").fillna(UNKNOWN_YEAR)
        return cls(
            item_ids=tuple(str(item) for item in frame["item_id"]),
            genres=tuple(_as_str_tuple(value) for value in frame["genres"]),
            release_year=tuple(int(year) for year in years),
        )

    @classmethod
    def from_movielens(cls) -> ItemCatalog:
        from streamrec.datasets.movielens import load_items

        return cls.from_frame(load_items())

    def with_new_items(
        self, item_ids: Sequence[str], genres: Sequence[Sequence[str]], release_year: Sequence[int]
    ) -> ItemCatalog:
        """A catalog with the given items appended; ids already present are skipped (first wins)."""
        known = set(self.item_ids)
        new_ids: list[str] = []
        new_genres: list[tuple[str, ...]] = []
        new_years: list[int] = []
        for item, item_genres, year in zip(item_ids, genres, release_year, strict=True):
            if item in known:
                continue
            known.add(item)
            new_ids.append(str(item))
            new_genres.append(_as_str_tuple(item_genres))
            new_years.append(int(year))
        if not new_ids:
            return self
        return ItemCatalog(
            self.item_ids + tuple(new_ids), self.genres + tuple(new_genres), self.release_year + tuple(new_years)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "item_ids": list(self.item_ids),
            "genres": [list(g) for g in self.genres],
            "release_year": list(self.release_year),
        }

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> ItemCatalog:
        return cls(
            tuple(payload["item_ids"]), tuple(tuple(g) for g in payload["genres"]), tuple(payload["release_year"])
        )


def _as_str_tuple(value: Any) -> tuple[str, ...]:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ()
    if isinstance(value, str):
        return tuple(part for part in value.split(" ") if part)
    return tuple(str(part) for part in value if str(part))


def user_profiles_from_movielens(users: pd.DataFrame) -> pd.DataFrame:
    """ml-100k user rows (age, gender, occupation, zip_code) -> the ``user_profile`` feature columns."""
    from streamrec.datasets.movielens import user_profile_rows

    return user_profile_rows(users)


def examples_from_interactions(interactions: pd.DataFrame, users: pd.DataFrame | None) -> pd.DataFrame:
    """Point-in-time training examples from an interaction frame (``streamrec.datasets.frames``).

    For each interaction, the user features are those the stream would have written after the
    user's *previous* event (the latest row a point-in-time join may see without leaking the label):
    ``recent_items`` are the distinct items of earlier events, newest first, at most
    ``RECENT_ITEMS_MAX``; ``count_W`` counts the earlier events in ``(t_prev - W, t_prev]``
    (contracts' window semantics, anchored at the previous event's time ``t_prev``). A user's
    first event has no recent items and zero counts.

    ``users`` is either ml-100k profiles (``age``, ``zip_code``), already-bucketed profile columns,
    or None (profiles unknown, all "").
    """
    missing = [column for column in ("event_id", "user_id", "item_id", "event_time") if column not in interactions]
    if missing:
        raise DatasetError(f"examples_from_interactions: missing column(s) {missing}")
    events = interactions.sort_values("event_time", kind="stable").reset_index(drop=True)
    user_ids = events["user_id"].astype(str).to_numpy()
    item_ids = events["item_id"].astype(str).to_numpy()
    seconds = events["event_time"].astype("datetime64[ns, UTC]").astype("int64").to_numpy() // 1_000_000_000
    n = len(events)
    recent: list[list[str]] = [[] for _ in range(n)]
    counts = {name: np.zeros(n, dtype=np.int64) for name in contracts.USER_COUNT_INPUTS}
    for rows in pd.Series(np.arange(n)).groupby(user_ids, sort=False).indices.values():
        _fill_user_history(np.asarray(rows), item_ids, seconds, recent, counts)
    frame = pd.DataFrame({"user_id": user_ids})
    profiles = _profile_columns(users)
    if profiles is not None:
        frame = frame.merge(profiles, on="user_id", how="left")
    for column in USER_PROFILE_COLUMNS:
        frame[column] = frame[column].fillna("").astype(str) if column in frame else ""
    frame["recent_items"] = recent
    for name, values in counts.items():
        frame[name] = values
    frame["item_id"] = item_ids
    frame["event_time"] = events["event_time"].to_numpy()
    frame["event_time"] = pd.to_datetime(frame["event_time"], utc=True)
    return frame[list(EXAMPLE_COLUMNS)]


def _fill_user_history(
    rows: np.ndarray,
    item_ids: np.ndarray,
    seconds: np.ndarray,
    recent: list[list[str]],
    counts: dict[str, np.ndarray],
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
    previous = np.arange(len(rows)) - 1  # index of the previous event, -1 for the first
    for name, window in contracts.WINDOWS_S.items():
        anchor = user_seconds[np.maximum(previous, 0)]
        first_in_window = np.searchsorted(user_seconds, anchor - window, side="right")
        values = np.where(previous >= 0, previous - first_in_window + 1, 0)
        counts[name][rows] = np.maximum(values, 0)


def _profile_columns(users: pd.DataFrame | None) -> pd.DataFrame | None:
    if users is None:
        return None
    if "age" in users.columns and "age_bucket" not in users.columns:
        users = user_profiles_from_movielens(users)
    columns = ["user_id", *[c for c in USER_PROFILE_COLUMNS if c in users.columns]]
    profiles = users[columns].copy()
    profiles["user_id"] = profiles["user_id"].astype(str)
    return profiles.drop_duplicates("user_id", keep="last")


def pad_recent_items(recent_items: Iterable[Sequence[str]], width: int = contracts.RECENT_ITEMS_MAX) -> np.ndarray:
    """Lists of ids -> a [B, width] object array padded with "" (the recommend signature's layout)."""
    rows = list(recent_items)
    padded = np.full((len(rows), width), "", dtype=object)
    for row, items in enumerate(rows):
        clipped = [str(item) for item in list(items)[:width]]
        padded[row, : len(clipped)] = clipped
    return padded


# -- frames -> the model's input arrays -------------------------------------------------------


def user_arrays(user_inputs: pd.DataFrame) -> dict[str, np.ndarray]:
    """The user columns of a frame as the recommend signature's arrays (missing counts -> 0)."""
    missing = [c for c in contracts.USER_STRING_INPUTS if c not in user_inputs.columns]
    if missing:
        raise ValueError(f"user inputs lack column(s) {missing}; expected {list(USER_INPUT_COLUMNS)}")
    arrays: dict[str, np.ndarray] = {
        name: user_inputs[name].fillna("").astype(str).to_numpy(dtype=object) for name in contracts.USER_STRING_INPUTS
    }
    recent: Any = user_inputs["recent_items"] if "recent_items" in user_inputs else [[]] * len(user_inputs)
    arrays["recent_items"] = pad_recent_items(recent)
    for name in contracts.USER_COUNT_INPUTS:
        values = user_inputs[name] if name in user_inputs else pd.Series(0, index=user_inputs.index)
        arrays[name] = values.fillna(0).to_numpy(dtype=np.int64)
    return arrays


def catalog_arrays(catalog: ItemCatalog, max_genres: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids [N], genres [N, max_genres] ("" padded, extra genres dropped), years [N] int64."""
    genres = np.full((len(catalog), max_genres), "", dtype=object)
    for row, item_genres in enumerate(catalog.genres):
        kept = list(item_genres[:max_genres])
        genres[row, : len(kept)] = kept
    return np.asarray(catalog.item_ids, dtype=object), genres, np.asarray(catalog.release_year, dtype=np.int64)


def item_arrays(
    catalog: ItemCatalog, max_genres: int, item_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Content of the given ids from the catalog; an id not in it gets empty content."""
    _, genres, years = catalog_arrays(catalog, max_genres)
    index = catalog.index
    rows = np.fromiter((index.get(str(item), -1) for item in item_ids), dtype=np.int64, count=len(item_ids))
    known = rows >= 0
    item_genres = np.full((len(item_ids), genres.shape[1]), "", dtype=object)
    item_genres[known] = genres[rows[known]]
    item_years = np.full(len(item_ids), -1, dtype=np.int64)
    item_years[known] = years[rows[known]]
    return np.asarray(item_ids, dtype=object), item_genres, item_years
