"""A few users' online ``user_activity`` features, read through Feast as serving reads them.

Used by ``streamrec streams watch`` and by ``make demo`` (while the feature worker catches up on
the history replay) to show features moving as events stream in. Each read returns one line
per user and whether it changed since the previous read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from streamrec.core import contracts


def format_row(row: dict[str, object]) -> str:
    """One user's activity row as a fixed-width line: counts, last event time, newest items."""
    recent = row.get("recent_items") or []
    last = row.get("last_event_ts")
    when = datetime.fromtimestamp(int(last), UTC).isoformat() if isinstance(last, int | float) and last == last else "-"
    shown = ",".join(str(item) for item in list(recent)[:8])  # type: ignore[call-overload]
    return (
        f"{row[contracts.USER_JOIN_KEY]!s:>8}  1h={row.get('count_1h')!s:>4}  24h={row.get('count_24h')!s:>5}  "
        f"last={when}  recent=[{shown}]"
    )


@dataclass
class ActivityWatch:
    """Reads ``user_ids``' activity rows; remembers the last line of each to flag changes."""

    store: Any  # feast.FeatureStore (imported lazily by callers: Feast is slow to import)
    user_ids: list[str]
    _previous: dict[str, str] = field(default_factory=dict)

    def read(self) -> list[tuple[str, bool]]:
        """``(line, changed)`` per user, in ``user_ids`` order."""
        refs = [f"{contracts.USER_ACTIVITY_VIEW}:{name}" for name in contracts.USER_ACTIVITY_FEATURES]
        rows = self.store.get_online_features(
            features=refs, entity_rows=[{contracts.USER_JOIN_KEY: user} for user in self.user_ids]
        ).to_dict()
        lines = []
        for index, user in enumerate(self.user_ids):
            row = {name: values[index] for name, values in rows.items()}
            row[contracts.USER_JOIN_KEY] = user
            line = format_row(row)
            lines.append((line, self._previous.get(user) not in (None, line)))
            self._previous[user] = line
        return lines
