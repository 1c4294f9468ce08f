"""Per-entity window state: pure functions, no Faust, so every rule is unit-testable.

One :class:`EntityState` per user (and one per item) holds what the features need:

* the retained events ``(event time, event_id)``, sorted by time, back to
  ``latest - retention`` where ``retention = max(largest window, allowed lateness)``;
* a 64-bit hash of each of those events' ids (deduplication: a redelivered event changes
  nothing; a collision inside one entity's retention is ~n^2/2^65, far below any other risk, and
  it keeps the changelog record, which carries the whole state on every update, compact);
* for users, the ``recent_max`` most recent *distinct* items, newest first;
* ``version_us``, the timestamp the state's feature row is written with (see below);
* where the dataset counts kinds on their own (``WindowConfig.counted_kinds``, from the
  dataset's ``AttributeSchema``), the kind of each retained event (see "Kinds" below).

Rules (the semantics of ``streamrec.core.contracts``):

* an event whose ``event_id`` is retained is a **duplicate**: ignored;
* an event older than ``latest - allowed_lateness`` is **late**: ignored (the caller counts it);
* otherwise it is **accepted** and inserted at its event-time position, so an out-of-order event
  inside the lateness lands in the right windows;
* ``count_W`` = retained events with time in ``(latest - W, latest]``;
* ``<kind>_count_W`` = those of them whose kind is ``kind``.

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

Kinds: ``kinds`` is one byte per retained event, parallel to ``times``: 0 for a kind not
counted, else 1 + the kind's index in ``kind_names`` (the config's ``counted_kinds`` the state
was built with, kept in the changelog so a record stays readable after the kinds change). A
per-kind count is ``kinds.count(code, start of the window)``, a C loop over the window's events:
one byte per event keeps the state and its changelog record small, and the count costs a fraction
of the record's encoding that each push pays anyway (docs/design/streams.md#per-kind-counts).
Deduplication and lateness are the entity's, so a kind count is exactly the count of that kind's
distinct events in the window. A one-kind dataset records nothing (``kinds`` empty, the record
in the format from before kinds). A state from before its kinds were counted (an older record,
or other ``counted_kinds``) is adopted at its next event: kinds it did not record count in no
kind until those events leave the windows.
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
from streamrec.core.attributes import kind_count_feature

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
US_PER_S = 1_000_000
_HEADER = struct.Struct("<qII")  # version_us, number of retained events, number of recent items
# set in the header's recent-item count when the record carries kinds (no older record sets it:
# the count is at most ``recent_max``)
_KINDS_FLAG = 1 << 31
MAX_COUNTED_KINDS = 255  # a kind code is one byte; 0 means "not counted"


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
    # the kinds counted on their own (``AttributeSchema.counted_kinds``; empty for one kind)
    counted_kinds: tuple[str, ...] = ()
    # kind -> its code in ``EntityState.kinds``; derived
    kind_codes: dict[str, int] = field(init=False, repr=False, compare=False)
    # (kind, window, feature name) of every per-kind count, in the views' order; derived
    kind_features: tuple[tuple[str, str, str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        kinds = self.counted_kinds
        if len(set(kinds)) != len(kinds) or len(kinds) > MAX_COUNTED_KINDS:
            raise ValueError(f"counted_kinds {kinds} must be distinct and at most {MAX_COUNTED_KINDS}")
        object.__setattr__(self, "kind_codes", {kind: code for code, kind in enumerate(kinds, start=1)})
        features = tuple(
            (kind, window, kind_count_feature(kind, window)) for kind in kinds for window, _ in self.windows_us
        )
        object.__setattr__(self, "kind_features", features)

    @classmethod
    def from_seconds(cls, allowed_lateness_s: float, counted_kinds: tuple[str, ...] = ()) -> WindowConfig:
        return cls(allowed_lateness_us=round(allowed_lateness_s * US_PER_S), counted_kinds=counted_kinds)

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
    kinds: bytearray = field(default_factory=bytearray)  # kind code per retained event (see "Kinds")
    kind_names: tuple[str, ...] = ()  # what codes 1.. of ``kinds`` stand for
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
        items = [item for _, item in self.recent]
        if sys.byteorder != "little":  # pragma: no cover - the encoding is little-endian everywhere
            for column in (times, ids, recent_times):
                column.byteswap()
        body = times.tobytes() + ids.tobytes() + recent_times.tobytes()
        if not self.kind_names or len(self.kinds) != len(self.times):
            # a one-kind dataset's record, as before kinds were counted (kinds that disagree with
            # the events are never written: the next event adopts the state as "kinds unknown")
            header = _HEADER.pack(self.version_us, len(self.times), len(self.recent))
            return header + body + json.dumps(items, separators=(",", ":")).encode()
        # with kinds: one byte per retained event after the recent times; the JSON tail is
        # [recent items, kind names]
        header = _HEADER.pack(self.version_us, len(self.times), len(self.recent) | _KINDS_FLAG)
        tail = json.dumps([items, list(self.kind_names)], separators=(",", ":")).encode()
        return header + body + bytes(self.kinds) + tail

    @classmethod
    def from_bytes(cls, raw: bytes) -> EntityState:
        try:
            return cls._decode(raw)
        except (struct.error, ValueError, TypeError) as exc:
            raise ValueError(f"corrupt entity state record ({len(raw)} bytes): {exc}") from exc

    @classmethod
    def _decode(cls, raw: bytes) -> EntityState:
        version_us, count, recent_count = _HEADER.unpack_from(raw)
        with_kinds = bool(recent_count & _KINDS_FLAG)
        recent_count &= ~_KINDS_FLAG
        start = _HEADER.size
        times, ids, recent_times = array("q"), array("Q"), array("q")
        times.frombytes(raw[start : start + 8 * count])
        ids.frombytes(raw[start + 8 * count : start + 16 * count])
        recent_start = start + 16 * count
        recent_times.frombytes(raw[recent_start : recent_start + 8 * recent_count])
        if sys.byteorder != "little":  # pragma: no cover
            for column in (times, ids, recent_times):
                column.byteswap()
        tail_start = recent_start + 8 * recent_count
        kinds = bytearray()
        kind_names: tuple[str, ...] = ()
        if with_kinds:
            kinds = bytearray(raw[tail_start : tail_start + count])
            items, names = json.loads(raw[tail_start + count :])
            kind_names = tuple(str(name) for name in names)
            if len(kinds) != count or not kind_names or max(kinds, default=0) > len(kind_names):
                raise ValueError("the kinds disagree with the header")
        else:
            items = json.loads(raw[tail_start:])
        if len(items) != recent_count or len(times) != count or len(ids) != count:
            raise ValueError("lengths disagree with the header")
        recent = [(int(time), str(item)) for time, item in zip(recent_times, items, strict=True)]
        return cls(
            times=times.tolist(),
            ids=ids.tolist(),
            recent=recent,
            version_us=version_us,
            kinds=kinds,
            kind_names=kind_names,
        )


def apply(
    state: EntityState,
    time_us: int,
    event_id: str,
    item_id: str | None,
    config: WindowConfig,
    kind: str | None = None,
) -> Outcome:
    """Add one event to ``state`` in place; ``item_id`` feeds ``recent`` (None for item states).

    ``kind`` is counted on its own when it is one of ``config.counted_kinds`` (ignored otherwise).
    """
    digest = id_hash(event_id)
    if digest in state.seen:
        return Outcome.DUPLICATE
    latest = state.latest_us
    if latest is not None and time_us < latest - config.allowed_lateness_us:
        return Outcome.LATE
    position = bisect.bisect_right(state.times, time_us)
    if config.counted_kinds or state.kind_names:  # a one-kind dataset pays these two tests only
        _insert_kind(state, position, kind, config)
    state.times.insert(position, time_us)
    state.ids.insert(position, digest)
    state.seen.add(digest)
    if latest is None or time_us > latest:
        cutoff = bisect.bisect_left(state.times, time_us - config.retention_us)
        if cutoff:
            state.seen.difference_update(state.ids[:cutoff])
            del state.times[:cutoff]
            del state.ids[:cutoff]
            del state.kinds[:cutoff]
    if item_id is not None:
        _remember_item(state.recent, (time_us, item_id), config.recent_max)
    state.version_us = max(state.times[-1], state.version_us + 1)
    return Outcome.ACCEPTED


def _insert_kind(state: EntityState, position: int, kind: str | None, config: WindowConfig) -> None:
    """Record the kind of an event about to be inserted at ``position`` of ``state.times``."""
    if state.kind_names is not config.counted_kinds or len(state.kinds) != len(state.times):
        _adopt_kinds(state, config)
    if config.counted_kinds:
        state.kinds.insert(position, config.kind_codes.get(kind, 0) if kind is not None else 0)


def _adopt_kinds(state: EntityState, config: WindowConfig) -> None:
    """Make ``state.kinds`` speak ``config.counted_kinds``: recode known kinds, 0 for the unknown."""
    counted = config.counted_kinds
    if not counted:
        state.kinds, state.kind_names = bytearray(), ()
        return
    if len(state.kinds) != len(state.times):  # kinds never recorded: count them nowhere
        state.kinds = bytearray(len(state.times))
    elif state.kind_names != counted:
        codes = [0, *(config.kind_codes.get(name, 0) for name in state.kind_names)]
        table = bytes(codes) + bytes(256 - len(codes))
        state.kinds = bytearray(state.kinds.translate(table))
    state.kind_names = counted  # the config's own tuple: the next event's identity check passes


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


def kind_counts(state: EntityState, config: WindowConfig) -> dict[str, int]:
    """``<kind>_count_<window>`` for every counted kind (empty for a one-kind dataset).

    Read by name, so a state not yet adopted to ``config`` (restored, then only duplicates)
    still counts right; a kind the state did not record counts 0.
    """
    if not config.counted_kinds:
        return {}
    latest = state.latest_us
    kinds, names = state.kinds, state.kind_names
    recorded = len(kinds) == len(state.times)
    starts = {
        window: 0 if latest is None else bisect.bisect_right(state.times, latest - width)
        for window, width in config.windows_us
    }
    return {
        feature: kinds.count(names.index(kind) + 1, starts[window]) if recorded and kind in names else 0
        for kind, window, feature in config.kind_features
    }


def user_features(state: EntityState, config: WindowConfig) -> dict[str, object]:
    """The ``user_activity`` row (without join key and timestamp) of a non-empty state."""
    latest = state.latest_us
    if latest is None:
        raise ValueError("an empty state has no features; push only entities with an accepted event")
    counts = window_counts(state, config)
    features: dict[str, object] = {
        "recent_items": [item for _, item in state.recent],
        "count_1h": counts["count_1h"],
        "count_24h": counts["count_24h"],
        "last_event_ts": latest // US_PER_S,
    }
    if config.counted_kinds:
        features.update(kind_counts(state, config))
    return features


def item_features(state: EntityState, config: WindowConfig) -> dict[str, object]:
    """The ``item_stats`` row (without join key and timestamp) of a non-empty state."""
    if state.latest_us is None:
        raise ValueError("an empty state has no features; push only entities with an accepted event")
    counts = window_counts(state, config)
    features: dict[str, object] = {
        "count_1h": counts["count_1h"],
        "count_24h": counts["count_24h"],
        "trending_score": contracts.trending_score(counts["count_1h"], counts["count_24h"]),
    }
    if config.counted_kinds:
        features.update(kind_counts(state, config))
    return features
