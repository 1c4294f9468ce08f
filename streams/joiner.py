"""Impression-click join with a label window: the logic, without Faust.

An impression opens a *label window* of ``window_s`` seconds from its ``event_time``. Every click
on one of its items whose ``event_time`` falls inside ``[impression_time, impression_time +
window_s]`` marks that item clicked. When the window has closed (wall clock past its end plus
``grace_s`` for in-flight clicks) the impression is *labeled*: one
:class:`~streamrec.core.events.LabeledExample` per shown item, clicked or not, carrying position, arm,
model version, score and the features the model saw at serving (log-and-wait).

What happens to every other click — nothing is dropped silently; each is returned from
:meth:`JoinState.add_click` / :meth:`JoinState.expire` with an outcome the worker counts, and
the unjoinable ones go to the dead-letter topic with the reason:

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
=========================  ==============================================================

State is per user (both topics are keyed by ``user_id``, so a user's impressions and clicks
share a partition) and JSON-serialisable, for a changelog-backed Faust table.

**A user's open impressions are capped** (``max_open_per_user``). The whole state is one changelog
message, and Kafka refuses a message over ``max.request.size`` (1 MiB), which crashes the
producer. Past the cap the oldest open impressions are labeled at once
(:meth:`JoinState.label_overflow`) instead of at their window's end; a click that arrives for one
of them later is ``late`` and goes to the dead-letter topic like any other late click. See
docs/design/streams.md#joiner-state-cap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from streamrec.core.events import Click, Impression, LabeledExample

ClickOutcome = Literal["joined", "duplicate", "late", "before_impression", "not_shown", "pending", "no_impression"]
DEAD_LETTER_OUTCOMES: frozenset[str] = frozenset({"late", "before_impression", "not_shown", "no_impression"})


@dataclass(frozen=True)
class JoinConfig:
    window_s: float = 300.0
    grace_s: float = 5.0
    # Labeled requests remembered so a late click can be told apart from one with no impression.
    labeled_memory: int = 1000
    # Open impressions per user; past it the oldest are labeled early (module docstring).
    max_open_per_user: int = 100


@dataclass
class JoinState:
    """Open impressions, clicks waiting for their impression, and recently labeled requests."""

    open: dict[str, dict[str, Any]] = field(default_factory=dict)  # request_id -> impression + clicks
    waiting: list[dict[str, Any]] = field(default_factory=list)  # clicks without an impression yet
    labeled: list[str] = field(default_factory=list)  # request ids, oldest first

    # -- serialisation for the changelog ---------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {"open": self.open, "waiting": self.waiting, "labeled": self.labeled}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> JoinState:
        if not data:
            return cls()
        return cls(open=dict(data["open"]), waiting=list(data["waiting"]), labeled=list(data["labeled"]))

    # -- events ------------------------------------------------------------------------------
    def add_impression(self, impression: Impression, config: JoinConfig) -> list[tuple[Click, ClickOutcome]]:
        """Open the window; returns the outcomes of waiting clicks that now find it."""
        if impression.request_id in self.open or impression.request_id in self.labeled:
            return []  # a redelivered impression changes nothing
        self.open[impression.request_id] = {"impression": impression.model_dump(mode="json"), "clicked": {}}
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

    def label_overflow(self, config: JoinConfig) -> list[LabeledExample]:
        """Label the oldest open impressions beyond ``config.max_open_per_user`` now (before their
        window closes), so the user's state stays one changelog message of bounded size."""
        excess = len(self.open) - config.max_open_per_user
        if excess <= 0:
            return []
        oldest = sorted(self.open, key=lambda rid: self.open[rid]["impression"]["event_time"])[:excess]
        return self._label(oldest, config)

    def _label(self, request_ids: list[str], config: JoinConfig) -> list[LabeledExample]:
        """Close these open impressions: their examples, and their ids remembered for late clicks."""
        labeled: list[LabeledExample] = []
        for request_id in request_ids:
            entry = self.open.pop(request_id)
            labeled.extend(label(Impression.model_validate(entry["impression"]), entry["clicked"]))
            self.labeled.append(request_id)
        del self.labeled[: max(0, len(self.labeled) - config.labeled_memory)]
        return labeled

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
        return "joined"

    def expire(self, now: datetime, config: JoinConfig) -> tuple[list[LabeledExample], list[Click]]:
        """Label every impression whose window (plus grace) has closed; give up on old waiting clicks."""
        horizon = timedelta(seconds=config.window_s + config.grace_s)
        labeled = self._label([rid for rid, entry in self.open.items() if _closed(entry, now, horizon)], config)
        orphans = [Click.model_validate(raw) for raw in self.waiting]
        expired = [click for click in orphans if click.event_time + horizon < now]
        self.waiting = [click.model_dump(mode="json") for click in orphans if click.event_time + horizon >= now]
        return labeled, expired


def _closed(entry: dict[str, Any], now: datetime, horizon: timedelta) -> bool:
    return datetime.fromisoformat(entry["impression"]["event_time"]) + horizon < now


def label(impression: Impression, clicked: dict[str, str]) -> list[LabeledExample]:
    """One example per shown item, in position order."""
    return [
        LabeledExample(
            event_id=f"label:{impression.request_id}:{item.item_id}",
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
            features=impression.features,
            fallback=impression.fallback,
            degraded=impression.degraded,
            serve_latency_ms=impression.serve_latency_ms,
            team=item.team,
            shared=item.shared,
            control_version=impression.control_version,
        )
        for item in sorted(impression.items, key=lambda shown: shown.position)
    ]


def utc_now() -> datetime:
    return datetime.now(UTC)
