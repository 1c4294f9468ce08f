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

Bounded state (docs/design/streams.md#bounded-state): the state is one changelog record, and
Kafka refuses a record over about 1 MB, so an entity keeps at most ``max_exact_events`` events
exactly (``WindowConfig``). When an accepted event makes it hold more, its oldest exact events
are **folded** until ``WindowConfig.fold_to_events`` remain (a chunk of 1/64 of the cap at a
time, so moving the exact lists is paid once a chunk): each is added to a count bucket
(``fold_times``: the bucket's key, ascending; ``fold_kinds``: its kind code, where kinds are
recorded; ``fold_counts``), keyed by ``key = ceil(time / fold_resolution_us) *
fold_resolution_us``, and its id hash is forgotten.

* ``count_W`` adds the buckets with ``key > latest - W`` (``<kind>_count_W`` those of its kind).
  At the starting resolution (1 µs) a key is the event's own time, so every count stays exact;
  coarser, a folded event can be counted on the wrong side of a window's lower edge only if it
  lies within one resolution below that edge.
* ``fold_horizon_us`` is the newest folded event's time, and no exact event is older. An event
  newer than the horizon is deduplicated as before; one **at or before** it (and not late)
  cannot be told from a redelivered folded event, so :func:`apply` raises
  :class:`OversizeEvent` (the worker dead-letters it, reason ``oversize``) and changes nothing.
* Buckets leave with retention (``key < latest - retention``) like exact events; once none is
  left the horizon and the resolution reset (an event at or before the old horizon is late).
* At most ``max_fold_buckets`` buckets: beyond that the resolution steps up (x10 up to 1 s, then
  x2: 1 µs, 10 µs, ..., 1 s, 2 s, 4 s, ...) and the buckets merge, until they fit.

A record therefore never exceeds :func:`record_bytes_bound` of the caps, which ``WindowConfig``
checks against ``max_record_bytes``. A record from before folding has no buckets and reads so.
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
from streamrec.core.errors import EventValidationError
from streams import metrics

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
US_PER_S = 1_000_000
_HEADER = struct.Struct("<qII")  # version_us, number of retained events, number of recent items
# flags in the header's recent-item count (no older record sets them: the count is at most
# ``recent_max``): the record carries kinds; the record carries folded buckets
_KINDS_FLAG = 1 << 31
_FOLDS_FLAG = 1 << 30
_FOLD_HEADER = struct.Struct("<qqI")  # fold_resolution_us, fold_horizon_us, number of buckets
MAX_COUNTED_KINDS = 255  # a kind code is one byte; 0 means "not counted"
MAX_ID_CHARS = 256  # ``streamrec.core.events.NonEmptyId``
# Bytes in a record: per exact event (time, id hash, kind) and per bucket (key, count, kind).
EXACT_EVENT_BYTES = 8 + 8 + 1
FOLD_BUCKET_BYTES = 8 + 4 + 1
_MAX_BUCKET_COUNT = 2**32 - 1  # ``fold_counts`` is an array of uint32
FOLD_CHUNK_DIVISOR = 64  # a fold leaves ``max_exact_events - max_exact_events // 64`` exact events


def id_hash(event_id: str) -> int:
    """The unsigned 64-bit digest an event id is deduplicated by."""
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "little")


def to_us(moment: datetime) -> int:
    """Exact integer microseconds since the epoch (no float rounding)."""
    return (moment - _EPOCH) // _MICROSECOND


def from_us(micros: int) -> datetime:
    return _EPOCH + timedelta(microseconds=micros)


def record_bytes_bound(
    max_exact_events: int, max_fold_buckets: int, recent_max: int, kind_names: tuple[str, ...]
) -> int:
    """The largest changelog record a state can have under these caps (ids of at most 256 chars)."""
    worst_item = 2 + 12 * MAX_ID_CHARS + 1  # quoted, every char a JSON surrogate pair, a comma
    tail = 2 + recent_max * worst_item + 3 + len(json.dumps(list(kind_names), separators=(",", ":")))
    return (
        _HEADER.size
        + max_exact_events * EXACT_EVENT_BYTES
        + recent_max * 8
        + _FOLD_HEADER.size
        + max_fold_buckets * FOLD_BUCKET_BYTES
        + tail
    )


class Outcome(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    LATE = "late"


class OversizeEvent(EventValidationError):
    """An event at or before its entity's fold horizon (see "Bounded state"): not applied.

    The worker dead-letters it with reason ``oversize``; the entity's state is unchanged.
    """

    def __init__(self, event_id: str, time_us: int, horizon_us: int, max_exact_events: int) -> None:
        super().__init__(
            "oversize",
            f"event {event_id!r} at {from_us(time_us).isoformat()} is at or before its entity's fold horizon "
            f"{from_us(horizon_us).isoformat()}: the entity keeps only its newest {max_exact_events} events "
            "exactly and has folded older ones into counts, so this event cannot be told from a redelivered "
            "one and is not applied. If such late events are expected for hot entities, raise "
            "STREAMREC_STREAMS__MAX_EXACT_EVENTS (memory per entity: docs/design/streams.md#bounded-state).",
        )


@dataclass(frozen=True)
class WindowConfig:
    """The knobs of :func:`apply`, in microseconds of event time, and the state's caps."""

    allowed_lateness_us: int
    windows_us: tuple[tuple[str, int], ...] = tuple(
        (name, seconds * US_PER_S) for name, seconds in contracts.WINDOWS_S.items()
    )
    recent_max: int = contracts.RECENT_ITEMS_MAX
    # the kinds counted on their own (``AttributeSchema.counted_kinds``; empty for one kind)
    counted_kinds: tuple[str, ...] = ()
    # "Bounded state": events kept exactly, count buckets, and the record size both must fit in
    max_exact_events: int = 20_000
    max_fold_buckets: int = 30_000
    max_record_bytes: int = 900_000
    # kind -> its code in ``EntityState.kinds``; derived
    kind_codes: dict[str, int] = field(init=False, repr=False, compare=False)
    # (kind, window, feature name) of every per-kind count, in the views' order; derived
    kind_features: tuple[tuple[str, str, str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        kinds = self.counted_kinds
        if len(set(kinds)) != len(kinds) or len(kinds) > MAX_COUNTED_KINDS:
            raise ValueError(f"counted_kinds {kinds} must be distinct and at most {MAX_COUNTED_KINDS}")
        # a coarsening must be able to merge down to two keys per kind code (see _coarsen)
        if self.max_exact_events < 1 or self.max_fold_buckets < 2 * (len(kinds) + 1):
            raise ValueError(
                f"max_exact_events ({self.max_exact_events}) must be at least 1 and max_fold_buckets "
                f"({self.max_fold_buckets}) at least {2 * (len(kinds) + 1)}"
            )
        bound = record_bytes_bound(self.max_exact_events, self.max_fold_buckets, self.recent_max, kinds)
        if bound > self.max_record_bytes:
            raise ValueError(
                f"a state with max_exact_events={self.max_exact_events} and max_fold_buckets={self.max_fold_buckets} "
                f"can reach {bound} bytes, over max_record_bytes={self.max_record_bytes}: lower "
                "STREAMREC_STREAMS__MAX_EXACT_EVENTS or STREAMREC_STREAMS__MAX_FOLD_BUCKETS "
                f"({EXACT_EVENT_BYTES} and {FOLD_BUCKET_BYTES} bytes each)"
            )
        object.__setattr__(self, "kind_codes", {kind: code for code, kind in enumerate(kinds, start=1)})
        features = tuple(
            (kind, window, kind_count_feature(kind, window)) for kind in kinds for window, _ in self.windows_us
        )
        object.__setattr__(self, "kind_features", features)

    @classmethod
    def from_seconds(
        cls,
        allowed_lateness_s: float,
        counted_kinds: tuple[str, ...] = (),
        *,
        max_exact_events: int = 20_000,
        max_fold_buckets: int = 30_000,
        max_record_bytes: int = 900_000,
    ) -> WindowConfig:
        return cls(
            allowed_lateness_us=round(allowed_lateness_s * US_PER_S),
            counted_kinds=counted_kinds,
            max_exact_events=max_exact_events,
            max_fold_buckets=max_fold_buckets,
            max_record_bytes=max_record_bytes,
        )

    @property
    def fold_to_events(self) -> int:
        """How many exact events a fold leaves: it folds a chunk (1/64 of the cap), so the
        cost of moving the exact lists is paid once per chunk, not once per event."""
        return self.max_exact_events - self.max_exact_events // FOLD_CHUNK_DIVISOR

    @property
    def retention_us(self) -> int:
        return max(max(width for _, width in self.windows_us), self.allowed_lateness_us)


def _uint32s() -> array[int]:
    return array("I")


def _int64s() -> array[int]:
    return array("q")


@dataclass
class EntityState:
    """Everything the features of one user or item need (see the module docstring)."""

    times: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)  # id_hash of each retained event, parallel to times
    recent: list[tuple[int, str]] = field(default_factory=list)  # (time, item_id), newest first
    version_us: int = 0
    kinds: bytearray = field(default_factory=bytearray)  # kind code per retained event (see "Kinds")
    kind_names: tuple[str, ...] = ()  # what codes 1.. of ``kinds`` stand for
    # folded events (see "Bounded state"): bucket keys, their kind codes (where kinds are
    # recorded) and counts, all older than every exact event
    fold_times: array[int] = field(default_factory=_int64s)
    fold_kinds: bytearray = field(default_factory=bytearray)
    fold_counts: array[int] = field(default_factory=_uint32s)
    fold_resolution_us: int = 1
    fold_horizon_us: int | None = None  # the newest folded event's time; None: nothing folded
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
        fold_times, fold_counts = array("q", self.fold_times), array("I", self.fold_counts)
        items = [item for _, item in self.recent]
        if sys.byteorder != "little":  # pragma: no cover - the encoding is little-endian everywhere
            for column in (times, ids, recent_times, fold_times, fold_counts):
                column.byteswap()
        body = times.tobytes() + ids.tobytes() + recent_times.tobytes()
        # kinds that disagree with the events are never written: the next event adopts the
        # state as "kinds unknown"
        with_kinds = bool(self.kind_names) and len(self.kinds) == len(self.times)
        flags = len(self.recent)
        if with_kinds:
            # one byte per retained event after the recent times; the JSON tail is [recent items, kind names]
            flags |= _KINDS_FLAG
            body += bytes(self.kinds)
        if self.fold_horizon_us is not None:
            # after them: the fold header, the bucket keys, counts and (with kinds) kind codes
            flags |= _FOLDS_FLAG
            body += _FOLD_HEADER.pack(self.fold_resolution_us, self.fold_horizon_us, len(fold_times))
            body += fold_times.tobytes() + fold_counts.tobytes()
            if with_kinds:
                body += bytes(self.fold_kinds) if len(self.fold_kinds) == len(fold_times) else bytes(len(fold_times))
        tail = [items, list(self.kind_names)] if with_kinds else items
        # without kinds or folds: the one-kind record, byte for byte the format from before them
        return _HEADER.pack(self.version_us, len(self.times), flags) + body + _json(tail)

    @classmethod
    def from_bytes(cls, raw: bytes) -> EntityState:
        try:
            return cls._decode(raw)
        except (struct.error, ValueError, TypeError) as exc:
            raise ValueError(f"corrupt entity state record ({len(raw)} bytes): {exc}") from exc

    @classmethod
    def _decode(cls, raw: bytes) -> EntityState:
        version_us, count, flags = _HEADER.unpack_from(raw)
        with_kinds, with_folds = bool(flags & _KINDS_FLAG), bool(flags & _FOLDS_FLAG)
        recent_count = flags & ~(_KINDS_FLAG | _FOLDS_FLAG)
        start = _HEADER.size
        times, ids, recent_times = array("q"), array("Q"), array("q")
        times.frombytes(raw[start : start + 8 * count])
        ids.frombytes(raw[start + 8 * count : start + 16 * count])
        recent_start = start + 16 * count
        recent_times.frombytes(raw[recent_start : recent_start + 8 * recent_count])
        position = recent_start + 8 * recent_count
        kinds = bytearray()
        if with_kinds:
            kinds = bytearray(raw[position : position + count])
            position += count
        fold_times, fold_counts, fold_kinds = array("q"), array("I"), bytearray()
        resolution_us, horizon_us = 1, None
        if with_folds:
            resolution_us, horizon_us, buckets = _FOLD_HEADER.unpack_from(raw, position)
            position += _FOLD_HEADER.size
            fold_times.frombytes(raw[position : position + 8 * buckets])
            fold_counts.frombytes(raw[position + 8 * buckets : position + 12 * buckets])
            position += 12 * buckets
            if with_kinds:
                fold_kinds = bytearray(raw[position : position + buckets])
                position += buckets
            if len(fold_times) != buckets or len(fold_counts) != buckets or resolution_us < 1:
                raise ValueError("the folded buckets disagree with their header")
        if sys.byteorder != "little":  # pragma: no cover
            for column in (times, ids, recent_times, fold_times, fold_counts):
                column.byteswap()
        kind_names: tuple[str, ...] = ()
        if with_kinds:
            items, names = json.loads(raw[position:])
            kind_names = tuple(str(name) for name in names)
            highest = max(max(kinds, default=0), max(fold_kinds, default=0))
            if len(kinds) != count or len(fold_kinds) != len(fold_times) or not kind_names or highest > len(kind_names):
                raise ValueError("the kinds disagree with the header")
        else:
            items = json.loads(raw[position:])
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
            fold_times=fold_times,
            fold_kinds=fold_kinds,
            fold_counts=fold_counts,
            fold_resolution_us=resolution_us,
            fold_horizon_us=horizon_us,
        )


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


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
    Raises :class:`OversizeEvent`, with ``state`` unchanged, for an event at or before the fold
    horizon (see "Bounded state").
    """
    digest = id_hash(event_id)
    if digest in state.seen:
        return Outcome.DUPLICATE
    latest = state.latest_us
    if latest is not None and time_us < latest - config.allowed_lateness_us:
        return Outcome.LATE
    horizon = state.fold_horizon_us
    if horizon is not None and time_us <= horizon:
        metrics.OVERSIZE_EVENTS.inc()
        raise OversizeEvent(event_id, time_us, horizon, config.max_exact_events)
    position = bisect.bisect_right(state.times, time_us)
    if config.counted_kinds or state.kind_names:  # a one-kind dataset pays these two tests only
        _insert_kind(state, position, kind, config)
    state.times.insert(position, time_us)
    state.ids.insert(position, digest)
    state.seen.add(digest)
    if latest is None or time_us > latest:
        cutoff_us = time_us - config.retention_us
        cutoff = bisect.bisect_left(state.times, cutoff_us)
        if cutoff:
            state.seen.difference_update(state.ids[:cutoff])
            del state.times[:cutoff]
            del state.ids[:cutoff]
            del state.kinds[:cutoff]
        if state.fold_horizon_us is not None:
            _evict_folds(state, cutoff_us)
    if len(state.times) > config.max_exact_events:
        _fold(state, len(state.times) - config.fold_to_events)
    if len(state.fold_times) > config.max_fold_buckets:
        _coarsen(state, config.max_fold_buckets)
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
    """Make ``state.kinds`` (and ``fold_kinds``) speak ``config.counted_kinds``: recode known
    kinds, 0 for the unknown."""
    counted = config.counted_kinds
    if not counted:
        state.kinds, state.kind_names, state.fold_kinds = bytearray(), (), bytearray()
        return
    codes = [0, *(config.kind_codes.get(name, 0) for name in state.kind_names)]
    table = bytes(codes) + bytes(256 - len(codes))

    def recoded(recorded: bytearray, length: int) -> bytearray:
        if len(recorded) != length or not state.kind_names:  # kinds never recorded: count them nowhere
            return bytearray(length)
        return recorded if state.kind_names == counted else bytearray(recorded.translate(table))

    state.kinds = recoded(state.kinds, len(state.times))
    state.fold_kinds = recoded(state.fold_kinds, len(state.fold_times))
    state.kind_names = counted  # the config's own tuple: the next event's identity check passes


def _evict_folds(state: EntityState, cutoff_us: int) -> None:
    """Drop the buckets older than retention; with none left, nothing is folded any more."""
    cutoff = bisect.bisect_left(state.fold_times, cutoff_us)
    if cutoff:
        del state.fold_times[:cutoff]
        del state.fold_counts[:cutoff]
        del state.fold_kinds[:cutoff]
    if not state.fold_times:
        state.fold_horizon_us, state.fold_resolution_us, state.fold_kinds = None, 1, bytearray()


def _fold(state: EntityState, count: int) -> None:
    """Move the ``count`` oldest exact events into count buckets (see "Bounded state")."""
    with_kinds = bool(state.kind_names) and len(state.kinds) == len(state.times)
    keys, counts, codes = state.fold_times, state.fold_counts, state.fold_kinds
    if not with_kinds:
        codes.clear()
    elif len(codes) != len(keys):
        codes[:] = bytes(len(keys))
    resolution = state.fold_resolution_us
    for index in range(count):
        key = -(-state.times[index] // resolution) * resolution
        code = state.kinds[index] if with_kinds else 0
        _add_to_bucket(keys, counts, codes if with_kinds else None, key, code, 1)
    state.fold_horizon_us = state.times[count - 1]
    state.seen.difference_update(state.ids[:count])
    del state.times[:count]
    del state.ids[:count]
    del state.kinds[:count]
    metrics.FOLDED_EVENTS.inc(count)


def _add_to_bucket(
    keys: array[int], counts: array[int], codes: bytearray | None, key: int, code: int, count: int
) -> None:
    """Add ``count`` to bucket (key, code); ``key`` is at least every key held (keys ascend)."""
    index = len(keys) - 1
    while index >= 0 and keys[index] == key:
        if codes is None or codes[index] == code:
            counts[index] = min(counts[index] + count, _MAX_BUCKET_COUNT)
            return
        index -= 1
    keys.append(key)
    counts.append(min(count, _MAX_BUCKET_COUNT))
    if codes is not None:
        codes.append(code)


def _next_resolution(resolution_us: int) -> int:
    return resolution_us * 10 if resolution_us < US_PER_S else resolution_us * 2


def _coarsen(state: EntityState, max_buckets: int) -> None:
    """Step the resolution up and merge buckets until at most ``max_buckets`` remain."""
    with_codes = len(state.fold_kinds) == len(state.fold_times) and bool(state.fold_kinds)
    while len(state.fold_times) > max_buckets:
        resolution = _next_resolution(state.fold_resolution_us)
        keys, counts, codes = _int64s(), _uint32s(), bytearray()
        old_codes = state.fold_kinds if with_codes else bytes(len(state.fold_times))
        for old_key, code, count in zip(state.fold_times, old_codes, state.fold_counts, strict=True):
            _add_to_bucket(
                keys, counts, codes if with_codes else None, -(-old_key // resolution) * resolution, code, count
            )
        state.fold_times, state.fold_counts, state.fold_kinds = keys, counts, codes
        state.fold_resolution_us = resolution
        metrics.FOLD_COARSENINGS.inc()


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
    counts = {name: total - bisect.bisect_right(state.times, latest - width) for name, width in config.windows_us}
    if state.fold_times:
        for name, width in config.windows_us:
            counts[name] += sum(state.fold_counts[bisect.bisect_right(state.fold_times, latest - width) :])
    return counts


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
    folded = _folded_kind_counts(state, config) if latest is not None and state.fold_times else {}
    return {
        feature: (kinds.count(names.index(kind) + 1, starts[window]) if recorded and kind in names else 0)
        + (folded[window][names.index(kind) + 1] if window in folded and kind in names else 0)
        for kind, window, feature in config.kind_features
    }


def _folded_kind_counts(state: EntityState, config: WindowConfig) -> dict[str, list[int]]:
    """Per window, the folded events by kind code (empty when the buckets carry no kinds)."""
    keys, codes, counts = state.fold_times, state.fold_kinds, state.fold_counts
    latest = state.latest_us
    if latest is None or len(codes) != len(keys) or not state.kind_names:
        return {}
    by_window: dict[str, list[int]] = {}
    for window, width in config.windows_us:
        by_code = [0] * (len(state.kind_names) + 1)
        start = bisect.bisect_right(keys, latest - width)
        for code, count in zip(codes[start:], counts[start:], strict=True):
            by_code[code] += count
        by_window[window] = by_code
    return by_window


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
