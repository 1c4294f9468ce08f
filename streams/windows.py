"""Per-entity window state: pure functions, no Faust, so every rule is unit-testable.

One :class:`EntityState` per user (and one per item) holds what the features need:

* the retained events ``(event time, event_id)``, sorted by time, back to
  ``latest - retention`` where ``retention = max(largest window, allowed lateness)``;
* a 64-bit hash of each of those events' ids (deduplication: a redelivered event changes
  nothing; a collision inside one entity's retention is ~n^2/2^65, far below any other risk, and
  it keeps the changelog record, which carries the whole state on every update, compact);
* for users, the ``recent_max`` most recent *distinct* items, newest first;
* ``version_us``, the timestamp the state's feature row is written with (see below).

Rules (the semantics of ``streamrec.core.contracts``):

* an event whose ``event_id`` is retained is a **duplicate**: ignored;
* an event older than ``latest - allowed_lateness`` is **late**: ignored (the caller counts it);
* otherwise it is **accepted** and inserted at its event-time position, so an out-of-order event
  inside the lateness lands in the right windows;
* ``count_W`` = retained events with time in ``(latest - W, latest]``.

Why retention is ``max(W, lateness)``: an accepted event is never older than
``latest - lateness``, so it is still retained whenever it could be redelivered and accepted
again; once evicted, it is older than ``latest - lateness`` for good and is rejected as late.

``recent_items`` order: newest event first; ties in event time are broken by ``item_id``
(greater first, as strings), so the list depends only on the set of events, not on arrival
order. An item takes the position of its newest event. Keeping only the top ``recent_max`` is exact: an item
that fell off can only come back with an event newer than the last kept one.

``version_us``: Feast's Redis store keeps a row only if its timestamp is *strictly* newer than
the stored one, so two states of one entity with the same latest event time (two events in the
same second, a late event that does not move ``latest``) would lose the second write. Each
accepted event therefore moves ``version_us`` to ``max(latest, previous version + 1 µs)``:
strictly increasing per entity, equal to the latest event time except within bursts (offset by
at most one microsecond per event of the burst). Writes stay last-write-wins: re-pushing a state
(after a redelivery) writes the same timestamp, which Feast ignores.
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import json
import struct
import sys
from array import array
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from streamrec.core import contracts

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
US_PER_S = 1_000_000
_HEADER = struct.Struct("<qII")  # version_us, number of retained events, number of recent items


def id_hash(event_id: str) -> int:
    """The unsigned 64-bit digest an event id is deduplicated by."""
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "little")


def to_us(moment: datetime) -> int:
    """Exact integer microseconds since the epoch (no float rounding)."""
    return (moment - _EPOCH) // _MICROSECOND


def from_us(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


class Outcome(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    LATE = "late"


@dataclass(frozen=True)
class WindowConfig:
    """The knobs of :func:`apply`, in microseconds of event time."""

    allowed_lateness_us: int
    windows_us: tuple[tuple[str, int], ...] = tuple(
        (name, seconds * US_PER_S) for name, seconds in contracts.WINDOWS_S.items()
    )
    recent_max: int = contracts.RECENT_ITEMS_MAX

    @classmethod
    def from_seconds(cls, allowed_lateness_s: float) -> WindowConfig:
        return cls(allowed_lateness_us=round(allowed_lateness_s * US_PER_S))

    @property
    def retention_us(self) -> int:
        return max(max(width for _, width in self.windows_us), self.allowed_lateness_us)


@dataclass
class EntityState:
    """Everything the features of one user or item need (see the module docstring)."""

    times: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # id_hash of each retained event, parallel to times
    recent: list[tuple[int, str]] = field(default_factory=list)  # (time, item_id), newest first
    version_us: int = 0
    seen: set[int] = field(default_factory=set, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.seen and self.ids:
            self.seen = set(self.ids)

    @property
    def latest_us(self) -> int | None:
        return self.times[-1] if self.times else None

    # -- changelog encoding (binary: it is written on every update) ---------------------
    def to_bytes(self) -> bytes:
        times, ids = array("q", self.times), array("Q", self.ids)
        recent_times = array("q", [time for time, _ in self.recent])
        recent_items = json.dumps([item for _, item in self.recent], separators=(",", ":")).encode()
        if sys.byteorder != "little":  # pragma: no cover - the encoding is little-endian everywhere
            for column in (times, ids, recent_times):
                column.byteswap()
        header = _HEADER.pack(self.version_us, len(self.times), len(self.recent))
        return header + times.tobytes() + ids.tobytes() + recent_times.tobytes() + recent_items

    @classmethod
    def from_bytes(cls, raw: bytes) -> EntityState:
        try:
            return cls._decode(raw)
        except (struct.error, ValueError, TypeError) as exc:
            raise ValueError(f"corrupt entity state record ({len(raw)} bytes): {exc}") from exc

    @classmethod
    def _decode(cls, raw: bytes) -> EntityState:
        version_us, count, recent_count = _HEADER.unpack_from(raw)
        start = _HEADER.size
        times, ids, recent_times = array("q"), array("Q"), array("q")
        times.frombytes(raw[start : start + 8 * count])
        ids.frombytes(raw[start + 8 * count : start + 16 * count])
        recent_start = start + 16 * count
        recent_times.frombytes(raw[recent_start : recent_start + 8 * recent_count])
        if sys.byteorder != "little":  # pragma: no cover
            for column in (times, ids, recent_times):
                column.byteswap()
        items = json.loads(raw[recent_start + 8 * recent_count :])
        if len(items) != recent_count or len(times) != count:
            raise ValueError("lengths disagree with the header")
        recent = [(int(time), str(item)) for time, item in zip(recent_times, items, strict=True)]
        return cls(times=times.tolist(), ids=ids.tolist(), recent=recent, version_us=version_us)


def apply(state: EntityState, time_us: int, event_id: str, item_id: str | None, config: WindowConfig) -> Outcome:
    """Add one event to ``state`` in place; ``item_id`` feeds ``recent`` (None for item states)."""
    digest = id_hash(event_id)
    if digest in state.seen:
        return Outcome.DUPLICATE
    latest = state.latest_us
    if latest is not None and time_us < latest - config.allowed_lateness_us:
        return Outcome.LATE
    position = bisect.bisect_right(state.times, time_us)
    state.times.insert(position, time_us)
    state.ids.insert(position, digest)
    state.seen.add(digest)
    if latest is None or time_us > latest:
        cutoff = bisect.bisect_left(state.times, time_us - config.retention_us)
        if cutoff:
            state.seen.difference_update(state.ids[:cutoff])
            del state.times[:cutoff]
            del state.ids[:cutoff]
    if item_id is not None:
        _remember_item(state.recent, (time_us, item_id), config.recent_max)
    state.version_us = max(state.times[-1], state.version_us + 1)
    return Outcome.ACCEPTED


def _remember_item(recent: list[tuple[int, str]], entry: tuple[int, str], limit: int) -> None:
    """Place ``entry`` (time, item) in the newest-first, item-distinct list, keeping ``limit``."""
    item_id = entry[1]
    for index, old in enumerate(recent):
        if old[1] == item_id:
            if old >= entry:
                return  # the item is already placed by an event at least as new
            del recent[index]
            break
    position = 0
    while position < len(recent) and recent[position] > entry:
        position += 1
    if position >= limit:
        return
    recent.insert(position, entry)
    del recent[limit:]


def window_counts(state: EntityState, config: WindowConfig) -> dict[str, int]:
    latest = state.latest_us
    if latest is None:
        return {name: 0 for name, _ in config.windows_us}
    total = len(state.times)
    return {name: total - bisect.bisect_right(state.times, latest - width) for name, width in config.windows_us}


def user_features(state: EntityState, config: WindowConfig) -> dict[str, object]:
    """The ``user_activity`` row (without join key and timestamp) of a non-empty state."""
    latest = state.latest_us
    if latest is None:
        raise ValueError("an empty state has no features; push only entities with an accepted event")
    counts = window_counts(state, config)
    return {
        "recent_items": [item for _, item in state.recent],
        "count_1h": counts["count_1h"],
        "count_24h": counts["count_24h"],
        "last_event_ts": latest // US_PER_S,
    }


def item_features(state: EntityState, config: WindowConfig) -> dict[str, object]:
    """The ``item_stats`` row (without join key and timestamp) of a non-empty state."""
    if state.latest_us is None:
        raise ValueError("an empty state has no features; push only entities with an accepted event")
    counts = window_counts(state, config)
    return {
        "count_1h": counts["count_1h"],
        "count_24h": counts["count_24h"],
        "trending_score": contracts.trending_score(counts["count_1h"], counts["count_24h"]),
    }
