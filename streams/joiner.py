"""Impression-click join with a label window: the logic, without Faust.

An impression opens a *label window* of ``window_s`` seconds from its ``event_time``. Every click
on one of its items whose ``event_time`` falls inside ``[impression_time, impression_time +
window_s]`` marks that item clicked. When the window has closed (the joiner's clock past its end
plus ``grace_s`` for in-flight clicks) the impression is *labeled*: one
:class:`~streamrec.core.events.LabeledExample` per shown item, clicked or not, carrying position, arm,
model version, score and the features the model saw at serving (log-and-wait), and a clicked
item the kind of its (first) click, where the click had one. Its ``event_id``
is ``label:<request_id>:<item_id>``, the same however often the joiner labels it after a crash,
so consumers deduplicate on it.

What happens to every other click — nothing is dropped silently; each is returned from
:meth:`JoinState.add_click` / :meth:`JoinState.expire` / :meth:`JoinState.enforce_caps` with an
outcome the worker counts, and the unjoinable ones go to the dead-letter topic with the reason:

=========================  ==============================================================
outcome                    when
=========================  ==============================================================
``joined``                 inside the window, on a shown item
``duplicate``              the same item of the same request was already clicked (counted once)
``late``                   after the window end, or after the impression was labeled -> dead letter
``before_impression``      click time earlier than the impression time -> dead letter
``not_shown``              the request exists but did not show that item -> dead letter
``pending``                no impression yet: held for ``window_s + grace_s`` (clicks can
                           overtake their impression across topics)
``no_impression``          a held click whose impression never came -> dead letter at expiry
``evicted``                a held click pushed out by the user's state cap -> dead letter
=========================  ==============================================================

State is per user (both topics are keyed by ``user_id``, so a user's impressions and clicks
share a partition) and JSON-serialisable, for a changelog-backed Faust table. A labeled request
id is remembered for ``labeled_memory_s`` after its window (so a late click is told apart from
one without impression, and a redelivered impression is not labeled twice); a user with nothing
open, held or remembered has an empty state, which the worker deletes from the table.

**A user's state is capped**, because the whole state is one changelog message and Kafka refuses
a message over ``max.request.size`` (1 MiB), which crashes the producer. Three caps
(:meth:`JoinState.enforce_caps`, :func:`fit_features`), each counted by the worker:

* ``max_features_bytes`` per impression: larger ``features`` (a big request context) lose their
  largest keys before the impression is stored; its labels carry what is left.
* ``max_open_per_user`` and ``max_state_bytes``: past either, the oldest open impressions are
  labeled at once instead of at their window's end (a click that comes for one later is
  ``late``); past the byte cap with nothing open, the oldest held clicks are ``evicted``.

See docs/design/streams.md#joiner-state-cap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from streamrec.core.events import Click, Impression, InteractionKind, LabeledExample

ClickOutcome = Literal[
    "joined", "duplicate", "late", "before_impression", "not_shown", "pending", "no_impression", "evicted"
]
DEAD_LETTER_OUTCOMES: frozenset[str] = frozenset({"late", "before_impression", "not_shown", "no_impression", "evicted"})

# Upper bounds of what one part of the state adds to its JSON (Python's default separators, ASCII
# escapes) besides its ids, so ``size_bytes`` never under-counts the changelog message.
_STATE_BYTES = 80
_ENTRY_BYTES = 64  # an open entry's keys and separators around its impression
_CLICK_BYTES = 48  # one clicked item: an ISO time
_KINDS_BYTES = 16  # an entry's "kinds" key and braces, when one of its clicks has a kind
_LABELED_BYTES = 32  # one remembered request id: its expiry


@dataclass(frozen=True)
class JoinConfig:
    window_s: float = 300.0
    grace_s: float = 5.0
    # Labeled requests remembered (at most this many, for at most this long after their window)
    # so a late click can be told apart from one with no impression.
    labeled_memory: int = 1000
    labeled_memory_s: float = 300.0
    # Caps of one user's state (module docstring).
    max_open_per_user: int = 100
    max_state_bytes: int = 512 * 1024
    max_features_bytes: int = 8 * 1024


@dataclass(frozen=True)
class CapOutcome:
    """What :meth:`JoinState.enforce_caps` did: impressions labeled early, held clicks evicted,
    and whether the byte cap (not only the count cap) was hit."""

    labeled: list[LabeledExample]
    evicted: list[Click]
    over_bytes: bool


@dataclass
class JoinState:
    """Open impressions, clicks waiting for their impression, and recently labeled requests."""

    # request_id -> {"impression": ..., "clicked": {item_id: click time}, "bytes": its JSON size,
    # "kinds": {item_id: click kind}} ("kinds" only once a click with a known kind joined)
    open: dict[str, dict[str, Any]] = field(default_factory=dict)
    waiting: list[dict[str, Any]] = field(default_factory=list)  # clicks without an impression yet
    labeled: dict[str, float] = field(default_factory=dict)  # request id -> forget after (epoch s), oldest first

    # -- serialisation for the changelog ---------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"open": self.open, "waiting": self.waiting, "labeled": self.labeled}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> JoinState:
        if not data:
            return cls()
        opened = {request_id: dict(entry) for request_id, entry in data["open"].items()}
        for entry in opened.values():
            if "bytes" not in entry:  # written before the byte cap
                entry["bytes"] = _impression_bytes(entry["impression"])
        labeled = data["labeled"]
        # A list of ids was written before labeled memory expired: forget them at the next tick.
        remembered = {str(rid): 0.0 for rid in labeled} if isinstance(labeled, list) else dict(labeled)
        return cls(open=opened, waiting=list(data["waiting"]), labeled=remembered)

    def is_empty(self) -> bool:
        return not (self.open or self.waiting or self.labeled)

    def size_bytes(self) -> int:
        """An upper bound of this state's JSON size (its changelog message)."""
        total = _STATE_BYTES
        for request_id, entry in self.open.items():
            total += len(json.dumps(request_id)) + _ENTRY_BYTES + entry["bytes"]
            total += sum(len(json.dumps(item_id)) + _CLICK_BYTES for item_id in entry["clicked"])
            if "kinds" in entry:
                kinds = entry["kinds"].items()
                total += _KINDS_BYTES + sum(len(json.dumps(item)) + len(json.dumps(kind)) + 4 for item, kind in kinds)
        total += sum(len(json.dumps(raw)) + 2 for raw in self.waiting)
        total += sum(len(json.dumps(request_id)) + _LABELED_BYTES for request_id in self.labeled)
        return total

    # -- events ------------------------------------------------------------------------------
    def add_impression(self, impression: Impression, config: JoinConfig) -> list[tuple[Click, ClickOutcome]]:
        """Open the window; returns the outcomes of waiting clicks that now find it."""
        if impression.request_id in self.open or impression.request_id in self.labeled:
            return []  # a redelivered impression changes nothing
        stored = impression.model_dump(mode="json")
        self.open[impression.request_id] = {"impression": stored, "clicked": {}, "bytes": _impression_bytes(stored)}
        outcomes = []
        still_waiting = []
        for raw in self.waiting:
            click = Click.model_validate(raw)
            if click.request_id == impression.request_id:
                outcomes.append((click, self.add_click(click, config)))
            else:
                still_waiting.append(raw)
        self.waiting = still_waiting
        return outcomes

    def enforce_caps(self, config: JoinConfig) -> CapOutcome:
        """Keep the state within ``max_open_per_user`` and ``max_state_bytes``: label the oldest
        open impressions now (before their window closes), then evict the oldest held clicks, then
        forget the oldest labeled ids, until it fits."""
        excess = len(self.open) - config.max_open_per_user
        labeled = self._label(self._oldest_open(excess), config) if excess > 0 else []
        evicted: list[Click] = []
        size = self.size_bytes()
        over_bytes = size > config.max_state_bytes
        while size > config.max_state_bytes and self.open:
            labeled += self._label(self._oldest_open(1), config)
            size = self.size_bytes()
        while size > config.max_state_bytes and self.waiting:
            evicted.append(Click.model_validate(self.waiting.pop(0)))
            size = self.size_bytes()
        while size > config.max_state_bytes and self.labeled:
            del self.labeled[next(iter(self.labeled))]
            size = self.size_bytes()
        return CapOutcome(labeled, evicted, over_bytes)

    def add_click(self, click: Click, config: JoinConfig) -> ClickOutcome:
        entry = self.open.get(click.request_id)
        if entry is None:
            if click.request_id in self.labeled:
                return "late"
            self.waiting.append(click.model_dump(mode="json"))
            return "pending"
        impression = Impression.model_validate(entry["impression"])
        if click.event_time < impression.event_time:
            return "before_impression"
        if click.event_time > impression.event_time + timedelta(seconds=config.window_s):
            return "late"
        if click.item_id not in {item.item_id for item in impression.items}:
            return "not_shown"
        if click.item_id in entry["clicked"]:
            return "duplicate"
        entry["clicked"][click.item_id] = click.event_time.isoformat()
        if click.kind is not None:
            entry.setdefault("kinds", {})[click.item_id] = click.kind
        return "joined"

    def expire(self, now: datetime, config: JoinConfig) -> tuple[list[LabeledExample], list[Click]]:
        """Label every impression whose window (plus grace) has closed; give up on old waiting clicks."""
        horizon = timedelta(seconds=config.window_s + config.grace_s)
        labeled = self._label([rid for rid, entry in self.open.items() if _closed(entry, now, horizon)], config)
        orphans = [Click.model_validate(raw) for raw in self.waiting]
        expired = [click for click in orphans if click.event_time + horizon < now]
        self.waiting = [click.model_dump(mode="json") for click in orphans if click.event_time + horizon >= now]
        return labeled, expired

    def forget(self, now: datetime) -> int:
        """Drop labeled ids whose memory has run out; returns how many."""
        cutoff = now.timestamp()
        gone = [request_id for request_id, until in self.labeled.items() if until < cutoff]
        for request_id in gone:
            del self.labeled[request_id]
        return len(gone)

    # -- internals ---------------------------------------------------------------------------
    def _oldest_open(self, count: int) -> list[str]:
        return sorted(self.open, key=lambda rid: self.open[rid]["impression"]["event_time"])[:count]

    def _label(self, request_ids: list[str], config: JoinConfig) -> list[LabeledExample]:
        """Close these open impressions: their examples, and their ids remembered for late clicks."""
        labeled: list[LabeledExample] = []
        memory_s = config.window_s + config.grace_s + config.labeled_memory_s
        for request_id in request_ids:
            entry = self.open.pop(request_id)
            impression = Impression.model_validate(entry["impression"])
            labeled.extend(label(impression, entry["clicked"], entry.get("kinds")))
            self.labeled[request_id] = impression.event_time.timestamp() + memory_s
        for request_id in list(self.labeled)[: max(0, len(self.labeled) - config.labeled_memory)]:
            del self.labeled[request_id]
        return labeled


def fit_features(impression: Impression, max_bytes: int) -> tuple[Impression, list[str]]:
    """``impression`` with ``features`` of at most ``max_bytes`` of JSON: its largest keys dropped
    until the rest fits. Returns the impression to store and the dropped keys (none: unchanged)."""
    size = len(json.dumps(impression.features))
    if size <= max_bytes:
        return impression, []
    sizes = {name: len(json.dumps(name)) + len(json.dumps(value)) + 2 for name, value in impression.features.items()}
    dropped: list[str] = []
    for name in sorted(sizes, key=lambda key: -sizes[key]):
        if size <= max_bytes:
            break
        dropped.append(name)
        size -= sizes[name]
    kept = {name: value for name, value in impression.features.items() if name not in dropped}
    return impression.model_copy(update={"features": kept}), dropped


def _impression_bytes(stored: dict[str, Any]) -> int:
    return len(json.dumps(stored))


def _closed(entry: dict[str, Any], now: datetime, horizon: timedelta) -> bool:
    return datetime.fromisoformat(entry["impression"]["event_time"]) + horizon < now


def label(
    impression: Impression, clicked: dict[str, str], kinds: dict[str, InteractionKind] | None = None
) -> list[LabeledExample]:
    """One example per shown item, in position order; ``clicked``: item -> click time (ISO),
    ``kinds``: item -> the kind of that click, where known."""
    kinds = kinds or {}
    return [
        LabeledExample(
            event_id=LabeledExample.id_for(impression.request_id, item.item_id),
            event_time=impression.event_time,
            user_id=impression.user_id,
            request_id=impression.request_id,
            item_id=item.item_id,
            position=item.position,
            arm=impression.arm,
            model_version=impression.model_version,
            score=item.score,
            clicked=item.item_id in clicked,
            impression_time=impression.event_time,
            click_time=datetime.fromisoformat(clicked[item.item_id]) if item.item_id in clicked else None,
            kind=kinds.get(item.item_id) if item.item_id in clicked else None,
            features=impression.features,
            fallback=impression.fallback,
            degraded=impression.degraded,
            serve_latency_ms=impression.serve_latency_ms,
            team=item.team,
            shared=item.shared,
            control_version=impression.control_version,
            propensity=item.propensity,
            explored=item.explored,
            retrieval_score=item.retrieval_score,
            ranker_version=impression.ranker_version,
        )
        for item in sorted(impression.items, key=lambda shown: shown.position)
    ]


def utc_now() -> datetime:
    return datetime.now(UTC)
