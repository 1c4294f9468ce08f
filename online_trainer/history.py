"""Per-user stream state of the online trainer: the features an example sees "as of" its event.

The online loop turns each new interaction into a training example whose user inputs are the
user's state *before* that interaction: ``recent_items`` (distinct ids, newest first, at most
``RECENT_ITEMS_MAX``) and ``count_1h`` / ``count_24h`` (contracts' window semantics: events with
time in ``(t - W, t]`` where ``t`` is the user's latest accepted event time), and for a dataset
with several event kinds ``<kind>_count_W`` (the events of that kind in the same window). These are exactly
the values the Faust worker pushes after the previous event and ``catalog.examples_from_interactions``
computes for bootstrap, so online and offline examples agree.

Why the trainer keeps its own state instead of reading Feast online per event: the online store
is written by another process that may be ahead of the trainer (its row may already include the
event being learned, a label leak) or behind it; the trainer's state is deterministic in the
consumed offsets, costs no network round trip per event, and is saved with every version
(:mod:`online_trainer.checkpoint`) so a restart continues from the exact committed position.

Redelivered events (same ``event_id`` within the 24 h window) change nothing.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from streamrec.core import contracts
from streamrec.core.attributes import kind_count_feature

_LONGEST_WINDOW_S = max(contracts.WINDOWS_S.values())


def zero_counts(counted_kinds: Sequence[str] = ()) -> dict[str, int]:
    """Every count of a user with no events."""
    names = [*contracts.WINDOWS_S, *(kind_count_feature(k, w) for k in counted_kinds for w in contracts.WINDOWS_S)]
    return {name: 0 for name in names}


@dataclass
class UserHistory:
    """One user's recent items and the events inside the longest window (sorted by time)."""

    recent_items: list[str] = field(default_factory=list)
    event_seconds: list[int] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)
    event_kinds: list[str] = field(default_factory=list)  # parallel to event_seconds

    @property
    def last_seconds(self) -> int | None:
        return self.event_seconds[-1] if self.event_seconds else None

    def counts(self, counted_kinds: Sequence[str] = ()) -> dict[str, int]:
        """``count_W`` and ``<kind>_count_W`` as of the latest accepted event (0 for a user with no events)."""
        last = self.last_seconds
        counts = zero_counts(counted_kinds)
        if last is None:
            return counts
        for name, window in contracts.WINDOWS_S.items():
            first = bisect.bisect_right(self.event_seconds, last - window)
            counts[name] = len(self.event_seconds) - first
            for kind in counted_kinds:
                counts[kind_count_feature(kind, name)] = self.event_kinds[first:].count(kind)
        return counts

    def accept(self, event_id: str, item_id: str, seconds: int, kind: str = "") -> bool:
        """Add one event of ``kind``; False (and no change) if ``event_id`` was already counted."""
        if event_id in self.event_ids:
            return False
        if item_id in self.recent_items:
            self.recent_items.remove(item_id)
        self.recent_items.insert(0, item_id)
        del self.recent_items[contracts.RECENT_ITEMS_MAX :]
        position = bisect.bisect_right(self.event_seconds, seconds)
        self.event_seconds.insert(position, seconds)
        self.event_ids.insert(position, event_id)
        self.event_kinds.insert(position, kind)
        keep_from = bisect.bisect_right(self.event_seconds, self.event_seconds[-1] - _LONGEST_WINDOW_S)
        del self.event_seconds[:keep_from]
        del self.event_ids[:keep_from]
        del self.event_kinds[:keep_from]
        return True


class UserHistories:
    """Every user's :class:`UserHistory`, with a frame form for checkpoints."""

    def __init__(self, histories: dict[str, UserHistory] | None = None) -> None:
        self._histories: dict[str, UserHistory] = histories or {}

    def __len__(self) -> int:
        return len(self._histories)

    def get(self, user_id: str) -> UserHistory:
        history = self._histories.get(user_id)
        if history is None:
            history = self._histories[user_id] = UserHistory()
        return history

    def snapshot(self, user_id: str, counted_kinds: Sequence[str] = ()) -> tuple[list[str], dict[str, int]]:
        """The user inputs as of now, without creating state for an unknown user."""
        history = self._histories.get(user_id)
        if history is None:
            return [], zero_counts(counted_kinds)
        return list(history.recent_items), history.counts(counted_kinds)

    @classmethod
    def from_interactions(cls, interactions: pd.DataFrame) -> UserHistories:
        """State after every event of an interaction frame (``streamrec.datasets.frames``), in time order."""
        histories = cls()
        events = interactions.sort_values("event_time", kind="stable")
        seconds = events["event_time"].astype("datetime64[ns, UTC]").astype("int64").to_numpy() // 1_000_000_000
        kinds = events["kind"].astype(str) if "kind" in events.columns else pd.Series([""] * len(events))
        for event_id, user_id, item_id, second, kind in zip(
            events["event_id"].astype(str),
            events["user_id"].astype(str),
            events["item_id"].astype(str),
            seconds,
            kinds,
            strict=True,
        ):
            histories.get(user_id).accept(event_id, item_id, int(second), kind)
        return histories

    def to_frame(self) -> pd.DataFrame:
        users = sorted(self._histories)
        return pd.DataFrame(
            {
                "user_id": users,
                "recent_items": [list(self._histories[u].recent_items) for u in users],
                "event_seconds": [list(self._histories[u].event_seconds) for u in users],
                "event_ids": [list(self._histories[u].event_ids) for u in users],
                "event_kinds": [list(self._histories[u].event_kinds) for u in users],
            }
        )

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> UserHistories:
        histories: dict[str, UserHistory] = {}
        kinds = frame["event_kinds"] if "event_kinds" in frame.columns else [None] * len(frame)
        for user_id, recent, seconds, ids, event_kinds in zip(
            frame["user_id"], frame["recent_items"], frame["event_seconds"], frame["event_ids"], kinds, strict=True
        ):
            ids_list = [str(event_id) for event_id in _listed(ids)]
            histories[str(user_id)] = UserHistory(
                [str(item) for item in _listed(recent)],
                [int(second) for second in _listed(seconds)],
                ids_list,
                [str(kind) for kind in _listed(event_kinds)] or [""] * len(ids_list),
            )
        return cls(histories)


def _listed(value: Iterable[Any] | None) -> list[Any]:
    return [] if value is None else list(value)
