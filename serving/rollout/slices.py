"""The experiment's figures per segment (``streamrec.core.segments``): each arm's CTR on each slice.

Two units, because a request and a shown item carry different segments:

* **user segments** (``user_tenure``, ``user_activity``) per *request*, as the arms' overall CTR:
  a trial per request, a hit when any of its items was clicked. The user's history length is read
  from the features the request was served with (:func:`history_length`), so the segment is the
  one the model saw, at no cost.
* **item segments** (``item_popularity``) per *shown item*: a trial per labeled example, a hit
  when it was clicked. An item's band comes from the clicks it drew in this experiment, both arms
  together (a property of the item, the same for both arms), banded with
  ``slices.item_popularity_bounds`` when the table is built, so the table is a function of the
  experiment's examples alone and a restarted evaluator rebuilds it exactly. Cost: two counters
  per item and arm; no feature-store read.
* **event kinds** (``event_kind``) per *request*: every request of an arm is a trial in the segment
  of each kind the experiment has seen, and a hit only in the segment of its hit's kind: the
  ``kind`` of the clicked example that made it a hit (the first one read; the joiner writes a
  request's examples in position order). So an arm's per-kind CTRs add up to its overall CTR; a
  hit of unknown kind (a producer that sets none) counts in no kind. "Seen" is the kinds of the
  hits counted so far, either arm: one counter per kind and arm (at most the five kinds of
  ``InteractionKind``), a function of the experiment's examples, so a restart rebuilds it too.

A segment is flagged by :func:`streamrec.core.segments.flagged` (the gate's rule): the canary
wins overall, both arms have at least ``slices.min_examples`` trials in the segment, and the
canary's CTR there is more than ``slices.flag_loss`` below stable's; and, since a flag holds a
promotion, only when that loss is also significant: the policy's always-valid test
(``sequential.msprt``, at the policy's ``alpha``, with ``tau`` = ``flag_loss`` (at least 5 %) x
stable's CTR: the loss looked for) rejects with the canary behind. Without it a low-CTR segment (tail items: a few
clicks per arm) would be flagged on noise in most experiments. The variance is the binomial one
(no user clustering per segment), so the guard is a noise floor, not an exact test.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from serving.rollout.sequential import ArmCounts, msprt
from streamrec.core import segments
from streamrec.core.events import InteractionKind
from streamrec.core.settings import SliceTuning

ArmName = Literal["stable", "canary"]
ARMS: tuple[ArmName, ArmName] = ("stable", "canary")
KINDS: tuple[str, ...] = get_args(InteractionKind)


def history_length(features: Mapping[str, Any]) -> int:
    """The user's history length as the served features bound it from below: the larger of the
    distinct recent items (capped at ``RECENT_ITEMS_MAX``) and the interactions of the last 24 h.
    No features (a cold user, a fallback) -> 0, a new user."""
    recent = features.get("recent_items")
    count_24h = features.get("count_24h")
    recent_length = len(recent) if isinstance(recent, list) else 0
    counted = count_24h if isinstance(count_24h, int) and not isinstance(count_24h, bool) else 0
    return max(recent_length, counted, 0)


@dataclass
class SliceCounts:
    trials: int = 0
    clicks: int = 0

    @property
    def ctr(self) -> float:
        return self.clicks / self.trials if self.trials else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {"trials": self.trials, "clicks": self.clicks, "ctr": self.ctr}


@dataclass(frozen=True)
class SliceRow:
    segment: str
    unit: Literal["request", "shown item"]
    arms: dict[ArmName, SliceCounts]
    flagged: bool
    # the always-valid p-value of the canary's loss (module docstring); None: no loss to test
    p_value: float | None = None


@dataclass(frozen=True)
class SliceTable:
    rows: list[SliceRow]
    wins_overall: bool
    tuning: SliceTuning

    @property
    def flagged(self) -> list[str]:
        return [row.segment for row in self.rows if row.flagged]

    def as_record(self) -> dict[str, Any]:
        """The decision log's and timeline's form: segment -> unit, per-arm counts, flagged."""
        return {
            "wins_overall": self.wins_overall,
            "min_examples": self.tuning.min_examples,
            "flag_loss": self.tuning.flag_loss,
            "flagged": self.flagged,
            "segments": {
                row.segment: {
                    "unit": row.unit,
                    **{arm: counts.as_dict() for arm, counts in row.arms.items()},
                    "flagged": row.flagged,
                    "p_value": row.p_value,
                }
                for row in self.rows
            },
        }


@dataclass
class SliceStats:
    """Per-arm counts of one experiment; the evaluator deduplicates before calling (by request and
    position), so every call here is one new trial or hit."""

    tuning: SliceTuning
    alpha: float = 0.05
    _user: dict[tuple[ArmName, str], SliceCounts] = field(default_factory=dict, init=False)
    _shown: dict[ArmName, Counter[str]] = field(default_factory=lambda: {arm: Counter() for arm in ARMS}, init=False)
    _clicked: dict[ArmName, Counter[str]] = field(default_factory=lambda: {arm: Counter() for arm in ARMS}, init=False)
    _requests: Counter[ArmName] = field(default_factory=Counter, init=False)
    _kind_hits: dict[ArmName, Counter[str]] = field(
        default_factory=lambda: {arm: Counter() for arm in ARMS}, init=False
    )

    def user_segments(self, features: Mapping[str, Any]) -> tuple[str, str]:
        length = history_length(features)
        return (
            segments.label(segments.USER_TENURE, segments.tenure(length)),
            segments.label(segments.USER_ACTIVITY, segments.activity_bucket(length, self.tuning.user_activity_bounds)),
        )

    def record_request(self, arm: ArmName, features: Mapping[str, Any]) -> None:
        self._requests[arm] += 1
        for segment in self.user_segments(features):
            self._user.setdefault((arm, segment), SliceCounts()).trials += 1

    def record_request_hit(self, arm: ArmName, features: Mapping[str, Any], kind: str | None = None) -> None:
        """The request became a hit; ``kind``: its hit's interaction kind (None: unknown)."""
        for segment in self.user_segments(features):
            self._user.setdefault((arm, segment), SliceCounts()).clicks += 1
        if kind is not None:
            self._kind_hits[arm][kind] += 1

    def record_shown(self, arm: ArmName, item_id: str) -> None:
        self._shown[arm][item_id] += 1

    def record_clicked(self, arm: ArmName, item_id: str) -> None:
        self._clicked[arm][item_id] += 1

    def table(self, *, wins_overall: bool) -> SliceTable:
        """Every segment with a trial in either arm, in ``segments.all_segments`` order."""
        counts: dict[str, dict[ArmName, SliceCounts]] = {}
        for (arm, segment), user_counts in self._user.items():
            counts.setdefault(segment, {a: SliceCounts() for a in ARMS})[arm] = user_counts
        popularity = self._clicked["stable"] + self._clicked["canary"]
        bounds = self.tuning.item_popularity_bounds
        for arm in ARMS:
            for item_id, shown in self._shown[arm].items():
                band = segments.label(segments.ITEM_POPULARITY, segments.popularity_band(popularity[item_id], bounds))
                band_counts = counts.setdefault(band, {a: SliceCounts() for a in ARMS})[arm]
                band_counts.trials += shown
                band_counts.clicks += self._clicked[arm][item_id]
        seen = set(self._kind_hits["stable"]) | set(self._kind_hits["canary"])
        kinds = sorted(seen, key=lambda kind: (KINDS.index(kind) if kind in KINDS else len(KINDS), kind))
        for kind in kinds:
            counts[segments.label(segments.EVENT_KIND, kind)] = {
                arm: SliceCounts(self._requests[arm], self._kind_hits[arm][kind]) for arm in ARMS
            }
        order = {segment: index for index, segment in enumerate(segments.all_segments(self.tuning, kinds))}
        rows = []
        for segment in sorted(counts, key=lambda name: order.get(name, len(order))):
            arms = {arm: SliceCounts(c.trials, c.clicks) for arm, c in counts[segment].items()}
            stable, canary = arms["stable"], arms["canary"]
            loses = segments.flagged(
                examples=min(stable.trials, canary.trials),
                candidate=canary.ctr,
                baseline=stable.ctr,
                wins_overall=wins_overall,
                tuning=self.tuning,
            )
            p_value = None
            if loses:
                test = msprt(
                    ArmCounts(stable.trials, stable.clicks),
                    ArmCounts(canary.trials, canary.clicks),
                    alpha=self.alpha,
                    tau=max(self.tuning.flag_loss, 0.05) * stable.ctr,
                )
                p_value = test.p_value
                loses = test.canary_worse
            dimension, _ = segments.parse(segment)
            unit: Literal["request", "shown item"] = (
                "shown item" if dimension == segments.ITEM_POPULARITY else "request"
            )
            rows.append(SliceRow(segment, unit, arms, loses, p_value))
        return SliceTable(rows, wins_overall, self.tuning)
