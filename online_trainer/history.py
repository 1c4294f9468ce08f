"""Per-user stream state of the online trainer: the features an example sees "as of" its event.

The online loop turns each new interaction into a training example whose user inputs are the
user's state *before* that interaction: ``recent_items`` (distinct ids, newest first, at most
``RECENT_ITEMS_MAX``) and ``count_1h`` / ``count_24h`` (contracts' window semantics: events with
time in ``(t - W, t]`` where ``t`` is the user's latest accepted event time). These are exactly
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
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from streamrec.core import contracts

_LONGEST_WINDOW_S = max(contracts.WINDOWS_S.values())


@dataclass
class UserHistory:
    """One user's recent items and the events inside the longest window (sorted by time)."""

    recent_items: list[str] = field(default_factory=list)
    event_seconds: list[int] = field(default_factory=list)
    event_ids: list[str] = field(default_factory=list)

    @property
    def last_seconds(self) -> int | None:
        return self.event_seconds[-1] if self.event_seconds else None

    def counts(self) -> dict[str, int]:
        """``count_W`` as of the latest accepted event (0 for a user with no events)."""
        last = self.last_seconds
        if last is None:
            return {name: 0 for name in contracts.WINDOWS_S}
        return {
            name: len(self.event_seconds) - bisect.bisect_right(self.event_seconds, last - window)
            for name, window in contracts.WINDOWS_S.items()
        }

    def accept(self, event_id: str, item_id: str, seconds: int) -> bool:
        """Add one event; False (and no change) if ``event_id`` was already counted."""
        if event_id in self.event_ids:
            return False
        if item_id in self.recent_items:
            self.recent_items.remove(item_id)
        self.recent_items.insert(0, item_id)
        del self.recent_items[contracts.RECENT_ITEMS_MAX :]
        position = bisect.bisect_right(self.event_seconds, seconds)
        self.event_seconds.insert(position, seconds)
        self.event_ids.insert(position, event_id)
        keep_from = bisect.bisect_right(self.event_seconds, self.event_seconds[-1] - _LONGEST_WINDOW_S)
        del self.event_seconds[:keep_from]
        del self.event_ids[:keep_from]
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

    def snapshot(self, user_id: str) -> tuple[list[str], dict[str, int]]:
        """The user inputs as of now, without creating state for an unknown user."""
        history = self._histories.get(user_id)
        if history is None:
            return [], {name: 0 for name in contracts.WINDOWS_S}
        return list(history.recent_items), history.counts()

    @classmethod
    def from_interactions(cls, interactions: pd.DataFrame) -> UserHistories:
        """State after every event of an interaction frame (``streamrec.datasets.frames``), in time order."""
        histories = cls()
        events = interactions.sort_values("event_time", kind="stable")
        seconds = events["event_time"].astype("datetime64[ns, UTC]").astype("int64").to_numpy() // 1_000_000_000
        for event_id, user_id, item_id, second in zip(
            events["event_id"].astype(str),
            events["user_id"].astype(str),
            events["item_id"].astype(str),
            seconds,
            strict=True,
        ):
            histories.get(user_id).accept(event_id, item_id, int(second))
        return histories

    def to_frame(self) -> pd.DataFrame:
        users = sorted(self._histories)
        return pd.DataFrame(
            {
                "user_id": users,
                "recent_items": [list(self._histories[u].recent_items) for u in users],
                "event_seconds": [list(self._histories[u].event_seconds) for u in users],
                "event_ids": [list(self._histories[u].event_ids) for u in users],
            }
        )

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> UserHistories:
        histories: dict[str, UserHistory] = {}
        for user_id, recent, seconds, ids in zip(
            frame["user_id"], frame["recent_items"], frame["event_seconds"], frame["event_ids"], strict=True
        ):
            histories[str(user_id)] = UserHistory(
                [str(item) for item in _listed(recent)],
                [int(second) for second in _listed(seconds)],
                [str(event_id) for event_id in _listed(ids)],
            )
        return cls(histories)


def _listed(value: Iterable[Any] | None) -> list[Any]:
    return [] if value is None else list(value)
