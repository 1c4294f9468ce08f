"""The off-policy gate: judge a candidate on the lists stable showed, before any user sees it.

Stable's lists were logged with each shown item's propensity (``streamrec.core.exploration``)
and labeled by the joiner. For each logged position the candidate's probability of showing the
same item there, given the positions before it (``propensity_of`` on the candidate's own ranking
of the logged user inputs), weighs that position's click. Stable's own probability is the logged
propensity, so its estimate is its realized click rate on the same rows, and the two are compared
as a paired difference (``streamrec.core.ope.compare``, clustered by user).

Only the explorable positions (the last ``exploration.slots`` of a list) are judged: a fixed
position shows exactly one item, so a candidate that ranks another one there has no logged
evidence for its choice, and counting it as a non-click would call every reordering worse. At
an explorable position the logger could show any item of its pool, so a candidate whose choices
fall there is weighed by the clicks they got. The doubly robust estimate uses the logged click
rate of each position as its reward model. ``support`` is the share of judged positions where
the candidate could have shown the logged item; below ``min_support`` (a candidate unlike
stable), with fewer than ``min_lists`` logged lists, or with exploration off, the gate abstains
and the candidate goes on to the canary as it would without the gate.
See docs/design/trainer.md#the-off-policy-gate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from streamrec.core.events import LabeledExample
from streamrec.core.exploration import Exploration, propensity_of
from streamrec.core.ope import Difference, Estimate, Estimator, LoggedRows, compare, estimate_all

Verdict = Literal["passed", "blocked", "abstained"]


@dataclass(frozen=True)
class LoggedList:
    """One list stable showed: the user, the logged user inputs, and per position the item, its
    propensity and whether it was clicked."""

    request_id: str
    user_id: str
    model_version: int
    features: dict[str, Any]
    items: tuple[str, ...]
    propensities: tuple[float, ...]
    clicks: tuple[bool, ...]


def logged_lists(examples: Iterable[LabeledExample]) -> list[LoggedList]:
    """Stable's single-model lists, complete (positions 0..n-1) and logged with propensities.

    Interleaved lists (two policies, no propensity), fallbacks, canary lists and lists with a
    position missing (a label not read yet) are left out; a redelivered example counts once."""
    by_request: dict[str, dict[int, LabeledExample]] = {}
    for example in examples:
        if example.arm != "stable" or example.fallback or example.team is not None or example.propensity is None:
            continue
        by_request.setdefault(example.request_id, {})[example.position] = example
    lists: list[LoggedList] = []
    for request_id, positions in by_request.items():
        if sorted(positions) != list(range(len(positions))):
            continue
        shown = [positions[position] for position in range(len(positions))]
        first = shown[0]
        lists.append(
            LoggedList(
                request_id=request_id,
                user_id=first.user_id,
                model_version=first.model_version,
                features=dict(first.features),
                items=tuple(example.item_id for example in shown),
                propensities=tuple(float(example.propensity or 0.0) for example in shown),
                clicks=tuple(example.clicked for example in shown),
            )
        )
    return lists


RankLists = Callable[[Sequence[LoggedList], int], list[list[tuple[str, float]]]]
"""(logged lists, depth) -> a policy's ranking (item, score), best first, of each list's user inputs."""


@dataclass
class OpeVerdict:
    """What the gate concluded, with the figures behind it (written into the version's lineage)."""

    verdict: Verdict
    reason: str
    estimator: Estimator
    lists: int = 0
    positions: int = 0
    support: float | None = None
    candidate: dict[str, dict[str, float | int | str]] = field(default_factory=dict)
    stable: dict[str, dict[str, float | int | str]] = field(default_factory=dict)
    difference: dict[str, float | str] | None = None
    stable_versions: list[int] = field(default_factory=list)

    @property
    def blocked(self) -> bool:
        return self.verdict == "blocked"

    def summary(self) -> str:
        if self.difference is None:
            return f"ope {self.verdict} ({self.reason})"
        difference = self.difference
        return (
            f"ope {self.verdict}: {self.estimator} CTR {float(difference['candidate']):.4f} vs stable "
            f"{float(difference['baseline']):.4f}, difference [{float(difference['low']):+.4f}, "
            f"{float(difference['high']):+.4f}] on {self.lists} lists, support {self.support:.2f}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "reason": self.reason,
            "estimator": self.estimator,
            "lists": self.lists,
            "positions": self.positions,
            "support": self.support,
            "candidate": self.candidate,
            "stable": self.stable,
            "difference": self.difference,
            "stable_versions": self.stable_versions,
        }


@dataclass(frozen=True)
class OpeRule:
    """The gate's settings (``trainer.ope_gate``)."""

    estimator: Estimator = "dr"
    min_lists: int = 100
    min_support: float = 0.3
    margin: float = 0.0
    confidence: float = 0.95


def judge(
    lists: Sequence[LoggedList], rank_candidate: RankLists, exploration: Exploration, rule: OpeRule
) -> OpeVerdict:
    """The candidate (``rank_candidate``) against stable on ``lists`` (module docstring)."""
    verdict = OpeVerdict("abstained", "", rule.estimator, lists=len(lists))
    verdict.stable_versions = sorted({logged.model_version for logged in lists})
    if len(lists) < rule.min_lists:
        verdict.reason = f"{len(lists)} logged stable lists with propensities, fewer than min_lists {rule.min_lists}"
        return verdict
    if exploration.policy == "none" or exploration.slots == 0 or exploration.epsilon == 0:
        verdict.reason = "exploration is off: no logged position was drawn at random, so nothing can be judged"
        return verdict
    depth = max(len(logged.items) for logged in lists) + exploration.candidates_wanted
    rankings = rank_candidate(lists, depth)
    clicks, logged_p, targets, positions, users = [], [], [], [], []
    for logged, ranked in zip(lists, rankings, strict=True):
        k = len(logged.items)
        for position in range(max(0, k - exploration.slots), k):
            clicks.append(float(logged.clicks[position]))
            logged_p.append(logged.propensities[position])
            targets.append(propensity_of(ranked, k, exploration, logged.items, position))
            positions.append(position)
            users.append(logged.user_id)
    position_of = np.asarray(positions)
    click_array = np.asarray(clicks)
    position_ctr = {p: float(click_array[position_of == p].mean()) for p in set(positions)}
    predicted = np.asarray([position_ctr[p] for p in positions])
    candidate = LoggedRows.of(
        clicks, logged_p, targets, predicted=predicted, predicted_target=predicted, clusters=users
    )
    stable = LoggedRows.of(clicks, logged_p, logged_p, predicted=predicted, predicted_target=predicted, clusters=users)
    verdict.positions = len(clicks)
    verdict.support = float(np.mean(candidate.targets > 0))
    if verdict.support == 0:
        verdict.reason = "support 0: the candidate could have shown none of the logged items"
        return verdict
    verdict.candidate = _as_dicts(estimate_all(candidate, confidence=rule.confidence))
    verdict.stable = _as_dicts(estimate_all(stable, confidence=rule.confidence))
    difference: Difference = compare(candidate, stable, rule.estimator, confidence=rule.confidence)
    verdict.difference = difference.as_dict()
    if verdict.support < rule.min_support:
        verdict.reason = (
            f"support {verdict.support:.2f} < min_support {rule.min_support}: the logs say little about "
            "the candidate's choices"
        )
    elif difference.significantly_below(rule.margin):
        verdict.verdict, verdict.reason = "blocked", "the candidate's estimated CTR is significantly below stable's"
    else:
        verdict.verdict, verdict.reason = "passed", "not significantly below stable"
    return verdict


def _as_dicts(estimates: dict[Estimator, Estimate]) -> dict[str, dict[str, float | int | str]]:
    return {name: value.as_dict() for name, value in estimates.items()}
