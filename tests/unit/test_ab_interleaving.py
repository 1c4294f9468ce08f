"""Team-draft interleaving: the draft, the API's interleaved answer, the evaluator's test on it.

The decision rule is exercised on simulated streams with known outcomes, as the A/B rule is in
test_ab_policy.py: a request is clicked with some probability, and a clicked request is won by
the canary's team with probability ``q`` (1/2: no difference).
"""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
import pytest

from serving.api.arms import CanaryGate
from serving.api.impressions import to_impression
from serving.api.interleave import team_draft
from serving.api.metrics import ApiMetrics
from serving.api.ranking import Ranker
from serving.model_client import ModelServerRpcError
from serving.rollout.evaluator import AbEvaluator
from serving.rollout.policy import Experiment, PolicyConfig
from serving.rollout.sequential import ArmCounts, msprt_share
from streamrec.core.events import Arm, Impression, LabeledExample, decode_event
from streams.joiner import label
from tests.unit.test_api_ranking import INPUTS, KNOWN, TRENDING, FakeModel, FixedTrending, _outputs, pending_impression

CANARY = [(f"c{rank}", 10.0 - rank) for rank in range(10)]
STABLE = [(f"s{rank}", 5.0 - rank) for rank in range(10)]


# -- the draft ----------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(20))
def test_the_draft_keeps_each_teams_order_and_balances_the_teams(seed: int) -> None:
    rng = random.Random(seed)
    shared = ["x", "y", "z"]
    canary = [(item, 1.0) for item in ["x", "c1", "y", "c2", "c3", "c4", "c5", "c6", "c7", "c8"]]
    stable = [(item, 2.0) for item in ["y", "z", "x", "s1", "s2", "s3", "s4", "s5", "s6", "s7"]]
    shown = team_draft(canary, stable, 10, rng)
    items = [item for item, _, _ in shown]
    assert len(items) == 10 and len(set(items)) == 10
    counts = {team: sum(1 for *_, picked in shown if picked == team) for team in ("canary", "stable")}
    assert abs(counts["canary"] - counts["stable"]) <= 1
    for team, ranking in (("canary", canary), ("stable", stable)):
        order = [item for item, _ in ranking]
        picked = [item for item, _, by in shown if by == team]
        assert picked == sorted(picked, key=order.index)  # each team picks best-first
        # a team skips only items already shown, so what it picked is its ranking's prefix minus those
        prefix = order[: order.index(picked[-1]) + 1]
        assert set(prefix) - set(picked) <= set(items)
    assert {score for item, score, by in shown if by == "stable"} == {2.0}
    assert set(shared) <= set(items)


def test_identical_rankings_give_that_ranking_with_fair_coin_teams() -> None:
    rng = random.Random(7)
    first_team_is_canary = 0
    for _ in range(4_000):
        shown = team_draft(CANARY, CANARY, 10, rng)
        assert [item for item, _, _ in shown] == [item for item, _ in CANARY]
        first_team_is_canary += shown[0][2] == "canary"
    assert abs(first_team_is_canary / 4_000 - 0.5) < 0.03


def test_a_short_ranking_is_filled_by_the_other_team() -> None:
    shown = team_draft(CANARY[:2], STABLE, 8, random.Random(1))
    assert len(shown) == 8
    assert sum(1 for *_, team in shown if team == "canary") == 2
    assert team_draft([], [], 5) == []
    with pytest.raises(ValueError, match="k must be at least 1"):
        team_draft(CANARY, STABLE, 0)


# -- the API's answer ---------------------------------------------------------------------------
def _interleaving_ranker(model: FakeModel) -> Ranker:
    return Ranker(
        model,
        FixedTrending(TRENDING),
        ApiMetrics(),
        inputs=INPUTS,
        budget_s=0.05,
        canary_gate=CanaryGate(5.0),
        interleave=True,
    )


def _answers(canary_version: int, stable_version: int) -> FakeModel:
    return FakeModel(
        {
            "canary": (canary_version, _outputs([item for item, _ in CANARY], [score for _, score in CANARY])),
            "stable": (stable_version, _outputs([item for item, _ in STABLE], [score for _, score in STABLE])),
        }
    )


def test_a_canary_user_sees_both_models_lists_interleaved_with_teams() -> None:
    model = _answers(canary_version=5, stable_version=3)
    ranked = _interleaving_ranker(model).rank(KNOWN, k=10, exclude=[], arm="canary", deadline=time.monotonic() + 10)
    assert [label for label, _, _ in model.calls] == ["canary", "stable"]
    assert ranked.arm == "canary" and ranked.model_version == 5 and ranked.control_version == 3
    assert ranked.teams is not None and len(ranked.teams) == len(ranked.items) == 10
    for (item_id, _), team in zip(ranked.items, ranked.teams, strict=True):
        assert item_id.startswith("c" if team == "canary" else "s")
    assert ranked.shared == (False,) * 10  # the two lists have no item in common


def test_items_in_both_models_top_k_are_marked_shared_whoever_picked_them() -> None:
    canary = [("both1", 9.0), ("c1", 8.0), ("both2", 7.0), ("c2", 6.0)]
    stable = [("s1", 9.0), ("both2", 8.0), ("s2", 7.0), ("both1", 6.0)]
    model = FakeModel(
        {
            "canary": (5, _outputs([item for item, _ in canary], [score for _, score in canary])),
            "stable": (3, _outputs([item for item, _ in stable], [score for _, score in stable])),
        }
    )
    ranked = _interleaving_ranker(model).rank(KNOWN, k=4, exclude=[], arm="canary", deadline=time.monotonic() + 10)
    assert ranked.shared is not None and ranked.teams is not None
    marks = {item_id: shared for (item_id, _), shared in zip(ranked.items, ranked.shared, strict=True)}
    assert marks == {item_id: item_id.startswith("both") for item_id, _ in ranked.items}
    assert any(marks.values()) and not all(marks.values())


def test_stable_users_one_version_or_a_failing_stable_get_a_single_list() -> None:
    deadline = time.monotonic() + 10
    stable_user = _interleaving_ranker(_answers(5, 3)).rank(KNOWN, k=10, exclude=[], arm="stable", deadline=deadline)
    same = _interleaving_ranker(_answers(4, 4)).rank(KNOWN, k=10, exclude=[], arm="canary", deadline=deadline)
    failing = _answers(5, 3)
    failing.errors["stable"] = ModelServerRpcError("Predict", grpc.StatusCode.UNAVAILABLE, "down")
    alone = _interleaving_ranker(failing).rank(KNOWN, k=10, exclude=[], arm="canary", deadline=deadline)
    for ranked in (stable_user, same, alone):
        assert ranked.teams is None and ranked.shared is None and ranked.control_version is None
        assert not ranked.degraded
    assert [item for item, _ in alone.items] == [item for item, _ in CANARY]


# -- the test -----------------------------------------------------------------------------------
def run_interleaved(
    win_probability: float,
    rng: np.random.Generator,
    config: PolicyConfig,
    *,
    click_rate: float = 0.15,
    max_requests: int = 40_000,
    look_every: int = 20,
    new_version_every: int = 0,
    users: int = 0,
    user_spread: float = 0.0,
    tie_share: float = 0.0,
    credit_ties: bool = False,
) -> tuple[str, int, str]:
    """Interleaved canary requests (stable's arm too, for the guardrails) until a decision.

    ``users`` > 0: requests come in bursts of 30 from that many users, each with its own canary
    win probability ``win_probability +/- user_spread`` (mean unchanged): equal on average, not
    for each user. ``tie_share``: the share of clicks on an item both models had (its team a coin
    flip); they credit neither, or with ``credit_ties`` the team that picked them, as plain team draft
    does. Returns (action, clicked interleaved requests, reason).
    """
    experiment = Experiment(1, 2, config)
    user_probability = {
        user: float(np.clip(win_probability + user_spread * rng.choice([-1, 1]), 0, 1)) for user in range(users)
    }
    user, left_in_burst = 0, 0
    for start in range(0, max_requests, look_every):
        if new_version_every and start and start % new_version_every == 0:
            experiment.advance(experiment.canary.version + 1)
        for _ in range(look_every):
            if users:
                if left_in_burst == 0:
                    user, left_in_burst = int(rng.integers(users)), 30
                left_in_burst -= 1
            user_id = str(user) if users else None
            experiment.record("stable", hit=bool(rng.random() < click_rate), user_id=user_id)
            experiment.record("canary", hit=False, version=experiment.canary.version, user_id=user_id, interleaved=True)
            if rng.random() < click_rate:
                experiment.record_hit("canary", experiment.canary.version, user_id)
                tie = bool(rng.random() < tie_share)
                q = 0.5 if tie else user_probability[user] if users else win_probability
                team: Arm = "canary" if rng.random() < q else "stable"
                experiment.record_credit(team, experiment.canary.version, user_id, tie=tie and not credit_ties)
        decision = experiment.decide()
        if decision.action != "continue":
            return decision.action, experiment.wins.trials + experiment.ties, decision.reason
    return "continue", experiment.wins.trials + experiment.ties, ""


def test_msprt_share_is_the_mixture_test_with_the_null_variance() -> None:
    result = msprt_share(ArmCounts(400, 230), alpha=0.05, tau=0.1)
    variance, difference = 0.25 / 400, 230 / 400 - 0.5
    expected = np.sqrt(variance / (variance + 0.01)) * np.exp(difference**2 * 0.01 / (2 * variance * (variance + 0.01)))
    assert result.likelihood_ratio == pytest.approx(expected)
    assert result.difference == pytest.approx(difference)
    # a spread over users larger than the coin's variance is taken instead
    assert msprt_share(ArmCounts(400, 230, cluster_ss=400.0), alpha=0.05, tau=0.1).p_value > result.p_value


def test_a_canary_winning_60_percent_of_clicks_is_promoted_quickly() -> None:
    rng = np.random.default_rng(0)
    outcomes = [run_interleaved(0.6, rng, PolicyConfig()) for _ in range(30)]
    assert all(action == "promote" for action, _, _ in outcomes)
    assert float(np.median([clicked for _, clicked, _ in outcomes])) < 600


def test_ties_credit_neither_team_and_the_line_is_promoted_on_fewer_clicks() -> None:
    """As in loop_long before its promotion: 60 % of clicks on items both models had, the line winning
    60 % of the rest (team draft's share: 0.54). Leaving ties out needs far fewer clicks."""
    rng = np.random.default_rng(4)
    with_ties_left_out = [run_interleaved(0.6, rng, PolicyConfig(), tie_share=0.6) for _ in range(30)]
    with_ties_credited = [run_interleaved(0.6, rng, PolicyConfig(), tie_share=0.6, credit_ties=True) for _ in range(30)]
    assert all(action == "promote" for action, _, _ in with_ties_left_out)
    assert all("ties left out" in reason for _, _, reason in with_ties_left_out)
    left_out = float(np.median([clicked for _, clicked, _ in with_ties_left_out]))
    credited = float(np.median([clicked for _, clicked, _ in with_ties_credited]))
    assert left_out < 0.7 * credited


def test_no_difference_keeps_false_promotions_at_or_below_alpha() -> None:
    rng = np.random.default_rng(1)
    config = PolicyConfig(alpha=0.05)
    outcomes = [run_interleaved(0.5, rng, config, max_requests=8_000, new_version_every=400) for _ in range(150)]
    actions = [action for action, _, _ in outcomes]
    assert actions.count("promote") / len(actions) <= config.alpha
    # 20 versions per run, each tested on its own: false rollbacks of a version stay rare too
    on_its_own = sum("on its own" in reason for _, _, reason in outcomes)
    assert on_its_own / len(outcomes) <= config.alpha


def test_equal_on_average_but_not_per_user_keeps_false_promotions_at_or_below_alpha() -> None:
    """Users who each prefer one model (0.5 +/- 0.3), in bursts: the clustered variance holds the level."""
    rng = np.random.default_rng(2)
    config = PolicyConfig(alpha=0.05)
    actions = [run_interleaved(0.5, rng, config, max_requests=8_000, users=80, user_spread=0.3)[0] for _ in range(150)]
    assert actions.count("promote") / len(actions) <= config.alpha


def test_a_broken_canary_is_rolled_back_within_a_bounded_number_of_clicks() -> None:
    rng = np.random.default_rng(3)
    outcomes = [run_interleaved(0.03, rng, PolicyConfig()) for _ in range(30)]
    assert all(action == "rollback" for action, _, _ in outcomes)
    assert max(clicked for _, clicked, _ in outcomes) <= 60


def test_a_broken_version_in_a_winning_line_is_rolled_back_on_its_own_clicks() -> None:
    config = PolicyConfig(interleave_min_credits=30)
    experiment = Experiment(1, 2, config)
    for index in range(200):  # version 2 wins a little more than half: not yet significant
        experiment.record("canary", hit=False, version=2, user_id=str(index), interleaved=True)
        experiment.record_credit("canary" if index % 20 < 11 else "stable", 2, str(index))
    assert experiment.decide().action == "continue"
    experiment.advance(3)
    for index in range(40):
        experiment.record_credit("stable", 3, f"n{index}")
    decision = experiment.decide()
    assert decision.action == "rollback" and "version 3 loses" in decision.reason


# -- the evaluator ------------------------------------------------------------------------------
class Labels:
    def __init__(self) -> None:
        self.current = {"stable": 1, "canary": 2}

    def labels(self) -> dict[str, int]:
        return dict(self.current)

    def promote(self, version: int | None = None) -> int:
        self.current["stable"] = version or self.current["canary"]
        return self.current["stable"]

    def rollback(self, version: int | None = None) -> int:
        self.current["canary"] = self.current["stable"]
        return self.current["canary"]


def _example(
    request: str, position: int, team: Arm | None, control: int | None, clicked: bool, shared: bool = False
) -> LabeledExample:
    now = datetime.now(UTC)
    return LabeledExample(
        event_id=f"label:{request}:{position}",
        event_time=now,
        user_id=f"user-{request}",
        request_id=request,
        item_id=f"item{position}",
        position=position,
        arm="canary",
        model_version=2,
        score=1.0,
        clicked=clicked,
        impression_time=now,
        team=team,
        shared=shared if team is not None else None,
        control_version=control,
    )


def test_the_evaluator_credits_each_interleaved_request_once_and_only_against_its_stable(tmp_path: Path) -> None:
    evaluator = AbEvaluator(Labels(), PolicyConfig(), tmp_path)
    evaluator.refresh_labels()
    evaluator.handle(_example("r1", 0, "canary", 1, clicked=True))
    evaluator.handle(_example("r1", 1, "stable", 1, clicked=True))  # a second click: no second credit
    evaluator.handle(_example("r2", 0, "stable", 1, clicked=False))
    evaluator.handle(_example("r2", 1, "stable", 1, clicked=True))
    evaluator.handle(_example("r3", 0, "canary", 7, clicked=True))  # interleaved with another stable
    evaluator.handle(_example("r4", 0, "canary", 1, clicked=True, shared=True))  # both models had it: a tie
    experiment = evaluator.experiment
    assert experiment is not None
    assert (experiment.wins.trials, experiment.wins.hits, experiment.ties) == (2, 1, 1)
    assert experiment.interleaved_requests == 3 and experiment.canary.trials == 4
    figures = evaluator.figures()["interleaving"]
    assert (figures["clicked"], figures["credited"], figures["ties"], figures["canary_share"]) == (3, 2, 1, 0.5)


def test_teams_travel_from_the_api_through_the_impression_to_the_labeled_examples() -> None:
    pending = pending_impression(teams=("stable", "canary"), shared=(True, False), control_version=7)
    impression = decode_event(to_impression(pending).to_bytes(), Impression)
    assert [item.team for item in impression.items] == ["stable", "canary"] and impression.control_version == 7
    assert [item.shared for item in impression.items] == [True, False]
    examples = label(impression, {"y": impression.event_time.isoformat()})
    assert [(example.team, example.shared, example.control_version, example.clicked) for example in examples] == [
        ("stable", True, 7, False),
        ("canary", False, 7, True),
    ]


def test_a_version_whose_interleaved_lists_draw_few_clicks_from_a_hard_user_is_not_collapsed() -> None:
    """As version 25 in loop_full_h30 (2026-11-30): its 635 interleaved requests came mostly from two
    users in long bursts, one hard to recommend for, and their CTR fell under 30 % of stable's while
    its team won most credited clicks. Users differ; the within-request comparison does not."""
    config = PolicyConfig()
    experiment = Experiment(1, 2, config)
    for index in range(2_000):
        experiment.record("stable", hit=index % 7 == 0, user_id=f"s{index % 40}")
    for index in range(635):
        user = "hard" if index < 400 else f"c{index % 15}"
        clicked = index % 25 == 0
        experiment.record("canary", hit=False, version=2, user_id=user, interleaved=True)
        if clicked:
            experiment.record_hit("canary", 2, user, interleaved=True)
            experiment.record_credit("canary" if index % 4 else "stable", 2, user)
    assert experiment.current.ctr < config.collapse_ratio * experiment.stable.ctr  # the old rule's trigger
    assert experiment.decide().action == "continue"


def test_a_broken_version_showing_its_own_lists_still_collapses() -> None:
    config = PolicyConfig()
    experiment = Experiment(1, 2, config)
    for index in range(config.collapse_min_trials):
        experiment.record("stable", hit=index % 7 == 0)
        experiment.record("canary", hit=False, version=2)  # not interleaved: its own list
    decision = experiment.decide()
    assert decision.action == "rollback" and "collapsed" in decision.reason, decision
