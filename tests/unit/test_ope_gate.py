"""``online_trainer.ope_gate``: stable's logged lists (with exploration and propensities) judge a
candidate before it reaches the canary. The world's click probabilities are known, so a worse
candidate is truly worse and the same policy is truly equal."""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import UTC, datetime

import numpy as np
import pytest

from online_trainer.ope_gate import LoggedList, OpeRule, judge, logged_lists
from streamrec.core.events import LabeledExample
from streamrec.core.exploration import Exploration, explore

pytestmark = pytest.mark.unit

ITEMS = 40
K = 5
EXPLORATION = Exploration("epsilon_greedy", epsilon=0.3, slots=2, pool_size=10)


def click_probabilities(users: int, seed: int) -> np.ndarray:
    """Each user prefers the items of their taste group; items further down a user's order are clicked less."""
    rng = np.random.default_rng(seed)
    affinity = rng.normal(size=(users, ITEMS)) + np.linspace(1.5, -1.5, ITEMS)
    return np.asarray(1 / (1 + np.exp(-(affinity - 1.0))))


def stable_ranking(probabilities: np.ndarray, user: int) -> list[tuple[str, float]]:
    """Stable ranks by a noisy view of the truth (its scores are the truth plus noise)."""
    noise = np.random.default_rng(1_000 + user).normal(scale=0.05, size=ITEMS)
    scores = probabilities[user] + noise
    order = np.argsort(-scores)
    return [(f"i{item}", float(scores[item])) for item in order]


def log_stable(probabilities: np.ndarray, requests: int, seed: int) -> list[LabeledExample]:
    """Stable serves ``requests`` lists with exploration; each shown item is clicked with its probability."""
    rng, draws = random.Random(seed), np.random.default_rng(seed)
    now = datetime(2026, 12, 3, tzinfo=UTC)
    examples = []
    for request in range(requests):
        user = request % len(probabilities)
        shown = explore(stable_ranking(probabilities, user), K, EXPLORATION, rng)
        for position, ((item, score), propensity) in enumerate(zip(shown.items, shown.propensities, strict=True)):
            clicked = bool(draws.random() < probabilities[user, int(item[1:])])
            examples.append(
                LabeledExample(
                    event_id=LabeledExample.id_for(f"r{request}", item),
                    event_time=now,
                    user_id=f"u{user}",
                    request_id=f"r{request}",
                    item_id=item,
                    position=position,
                    arm="stable",
                    model_version=3,
                    score=score,
                    clicked=clicked,
                    impression_time=now,
                    features={"user_id": f"u{user}"},
                    propensity=propensity,
                    explored=shown.explored[position],
                )
            )
    return examples


def ranker(probabilities: np.ndarray, *, reverse: bool = False):  # type: ignore[no-untyped-def]
    """A candidate policy: stable's ranking, or its first ``depth`` items in reverse (a worse one)."""

    def rank(lists: Sequence[LoggedList], depth: int) -> list[list[tuple[str, float]]]:
        rankings = []
        for logged in lists:
            ranked = stable_ranking(probabilities, int(logged.user_id[1:]))[:depth]
            rankings.append(ranked[::-1] if reverse else ranked)
        return rankings

    return rank


def test_logged_lists_keep_complete_stable_lists_with_propensities_only() -> None:
    probabilities = click_probabilities(20, seed=0)
    examples = log_stable(probabilities, 6, seed=0)
    canary = [example.model_copy(update={"arm": "canary", "request_id": "c"}) for example in examples[:K]]
    gap = [example.model_copy(update={"request_id": "g"}) for example in examples[K : 2 * K] if example.position != 2]
    unlogged = [example.model_copy(update={"request_id": "n", "propensity": None}) for example in examples[:K]]
    lists = logged_lists([*examples, *examples[:K], *canary, *gap, *unlogged])
    assert sorted(logged.request_id for logged in lists) == [f"r{r}" for r in range(6)]
    first = next(logged for logged in lists if logged.request_id == "r0")
    assert first.items == tuple(example.item_id for example in examples[:K])
    assert first.propensities == tuple(example.propensity for example in examples[:K])


def test_the_same_policy_passes_and_a_worse_candidate_is_blocked() -> None:
    probabilities = click_probabilities(200, seed=1)
    lists = logged_lists(log_stable(probabilities, 4_000, seed=1))
    rule = OpeRule(estimator="dr", min_lists=100)
    same = judge(lists, ranker(probabilities), EXPLORATION, rule)
    assert same.verdict == "passed", same.summary()
    assert same.support == pytest.approx(1.0)
    assert same.difference is not None and abs(float(same.difference["difference"])) < 1e-12
    worse = judge(lists, ranker(probabilities, reverse=True), EXPLORATION, rule)
    assert worse.verdict == "blocked", worse.summary()
    assert worse.support is not None and worse.support > rule.min_support
    # the estimates agree with the world: the reversed policy's true CTR on the judged slots is lower
    assert float(worse.candidate["dr"]["value"]) < float(worse.stable["dr"]["value"])
    for estimator in ("ips", "snips"):
        assert float(worse.candidate[estimator]["value"]) < float(worse.stable[estimator]["value"])
    assert set(worse.to_json()) >= {"verdict", "support", "candidate", "stable", "difference"}


def test_the_gate_abstains_without_enough_evidence() -> None:
    probabilities = click_probabilities(50, seed=2)
    lists = logged_lists(log_stable(probabilities, 60, seed=2))
    few = judge(lists, ranker(probabilities, reverse=True), EXPLORATION, OpeRule(min_lists=100))
    assert few.verdict == "abstained" and "min_lists" in few.reason
    off = judge(lists, ranker(probabilities, reverse=True), Exploration("none"), OpeRule(min_lists=10))
    assert off.verdict == "abstained" and "exploration is off" in off.reason

    def elsewhere(logged: Sequence[LoggedList], depth: int) -> list[list[tuple[str, float]]]:
        return [[(f"other{n}", 1.0) for n in range(depth)] for _ in logged]

    unlike = judge(lists, elsewhere, EXPLORATION, OpeRule(min_lists=10))
    assert unlike.verdict == "abstained" and "support 0" in unlike.reason
