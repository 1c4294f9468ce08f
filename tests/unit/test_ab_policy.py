"""The A/B decision rule on simulated Bernoulli streams with known outcomes."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pytest

from serving.rollout.policy import Experiment, PolicyConfig
from serving.rollout.sequential import ArmCounts, msprt

LOOK_EVERY = 50


def run_experiment(
    p_stable: float,
    p_canary: float,
    rng: np.random.Generator,
    config: PolicyConfig,
    max_trials: int = 20_000,
    new_version_every: int = 0,
) -> tuple[str, int]:
    """Stream requests to both arms until a decision; return (action, canary trials).

    ``new_version_every``: the canary line moves to a new version every this many requests per arm.
    """
    experiment = Experiment(1, 2, config)
    for start in range(0, max_trials, LOOK_EVERY):
        if new_version_every and start and start % new_version_every == 0:
            experiment.advance(experiment.canary.version + 1)
        for hit in rng.random(LOOK_EVERY) < p_stable:
            experiment.record("stable", hit=bool(hit))
        for hit in rng.random(LOOK_EVERY) < p_canary:
            experiment.record("canary", hit=bool(hit), version=experiment.canary.version)
        decision = experiment.decide()
        if decision.action != "continue":
            return decision.action, experiment.canary.trials
    return "continue", experiment.canary.trials


def test_msprt_matches_the_closed_form() -> None:
    stable, canary = ArmCounts(1000, 50), ArmCounts(1000, 80)
    result = msprt(stable, canary, alpha=0.05, tau=0.05)
    variance = 0.05 * 0.95 / 1000 + 0.08 * 0.92 / 1000
    expected = math.sqrt(variance / (variance + 0.0025)) * math.exp(
        0.03**2 * 0.0025 / (2 * variance * (variance + 0.0025))
    )
    assert result.likelihood_ratio == pytest.approx(expected)
    assert result.p_value == pytest.approx(min(1.0, 1 / expected))
    assert result.difference == pytest.approx(0.03)


def test_one_request_per_user_gives_the_binomial_variance() -> None:
    config = PolicyConfig()
    by_user, by_request = Experiment(1, 2, config), Experiment(1, 2, config)
    for index in range(600):
        for arm, rate in (("stable", 7), ("canary", 5)):
            hit = index % rate == 0
            by_user.record(arm, hit=False, user_id=f"{arm}-{index}")
            by_request.record(arm, hit=False)
            if hit:  # the click comes after the impression, as in the evaluator
                by_user.record_hit(arm, 2, user_id=f"{arm}-{index}")
                by_request.record_hit(arm, 2)
    assert by_user.stable.counts().variance() == pytest.approx(by_request.stable.counts().variance())
    assert by_user.canary.counts().variance() == pytest.approx(by_request.canary.counts().variance())
    assert by_user.decide().test == by_request.decide().test


def run_clustered(rng: np.random.Generator, config: PolicyConfig, *, cluster_on_users: bool) -> str:
    """Users of mixed difficulty (hit rate ~ Beta(1, 6)) each send 40 requests in a row to their arm;
    the two arms draw users from the same population: no difference between the models."""
    experiment = Experiment(1, 2, config)
    for user in range(200):
        arm: Literal["stable", "canary"] = "stable" if rng.random() < 0.5 else "canary"
        for hit in rng.random(40) < rng.beta(1.0, 6.0):
            experiment.record(arm, hit=bool(hit), user_id=f"u{user}" if cluster_on_users else None)
        decision = experiment.decide()
        if decision.action != "continue":
            return decision.action
    return "continue"


def test_user_clustered_variance_keeps_false_promotions_at_or_below_alpha() -> None:
    """Requests of one user are correlated; counted as independent, the test promotes on noise."""
    config = PolicyConfig(alpha=0.05)
    runs = 150
    clustered = [run_clustered(np.random.default_rng(seed), config, cluster_on_users=True) for seed in range(runs)]
    naive = [run_clustered(np.random.default_rng(seed), config, cluster_on_users=False) for seed in range(runs)]
    assert clustered.count("promote") / runs <= config.alpha, clustered.count("promote")
    assert naive.count("promote") / runs > 2 * config.alpha, naive.count("promote")


def test_p_value_is_a_running_minimum() -> None:
    first = msprt(ArmCounts(500, 25), ArmCounts(500, 45), alpha=0.05, tau=0.05)
    later = msprt(ArmCounts(1000, 50), ArmCounts(1000, 51), alpha=0.05, tau=0.05, previous_p=first.p_value)
    assert later.p_value == first.p_value < 1.0


def test_a_true_lift_is_promoted() -> None:
    rng = np.random.default_rng(7)
    outcomes = [run_experiment(0.05, 0.09, rng, PolicyConfig())[0] for _ in range(40)]
    assert outcomes.count("promote") >= 36, outcomes
    assert "rollback" not in outcomes


def test_no_difference_keeps_false_promotions_at_or_below_alpha() -> None:
    config = PolicyConfig(alpha=0.05)
    rng = np.random.default_rng(11)
    runs = 300
    promotions = sum(run_experiment(0.05, 0.05, rng, config, max_trials=10_000)[0] == "promote" for _ in range(runs))
    assert promotions / runs <= config.alpha, promotions


def test_a_pooled_line_with_no_difference_keeps_false_promotions_at_or_below_alpha() -> None:
    config = PolicyConfig(alpha=0.05)
    rng = np.random.default_rng(17)
    runs = 300
    outcomes = [
        run_experiment(0.05, 0.05, rng, config, max_trials=10_000, new_version_every=400)[0] for _ in range(runs)
    ]
    assert outcomes.count("promote") / runs <= config.alpha, outcomes.count("promote")


def test_a_collapsed_canary_is_rolled_back_within_a_bounded_number_of_requests() -> None:
    rng = np.random.default_rng(3)
    config = PolicyConfig()
    for _ in range(20):
        action, trials = run_experiment(0.06, 0.0, rng, config)
        assert action == "rollback"
        assert trials <= config.collapse_min_trials


def test_a_worse_canary_is_rolled_back() -> None:
    rng = np.random.default_rng(5)
    outcomes = [run_experiment(0.10, 0.06, rng, PolicyConfig())[0] for _ in range(20)]
    assert outcomes.count("rollback") >= 18, outcomes


def test_guardrails_roll_back_on_degraded_share_and_latency() -> None:
    config = PolicyConfig()
    degraded = Experiment(1, 2, config)
    for index in range(config.degraded_min_trials):
        degraded.record("canary", hit=False, degraded=index % 2 == 0)
    decision = degraded.decide()
    assert decision.action == "rollback" and "degraded" in decision.reason

    slow = Experiment(1, 2, config)
    for _ in range(config.latency_min_trials):
        slow.record("stable", hit=False, latency_ms=5.0)
        slow.record("canary", hit=False, latency_ms=80.0)
    decision = slow.decide()
    assert decision.action == "rollback" and "latency" in decision.reason


def test_no_decision_before_the_minimum_sample() -> None:
    experiment = Experiment(1, 2, PolicyConfig(min_trials=200))
    for _ in range(199):
        experiment.record("stable", hit=False)
        experiment.record("canary", hit=True)
    assert experiment.decide().action == "continue"


def test_the_canary_line_pools_evidence_across_versions() -> None:
    """A lift too small for one version's requests is promoted once the line has enough."""
    rng = np.random.default_rng(13)
    experiment = Experiment(1, 2, PolicyConfig())
    version, decision = 2, experiment.decide()
    for step in range(200):
        if step and step % 8 == 0:  # a new trainer version every 8 looks (400 requests per arm)
            version += 1
            experiment.advance(version)
        for hit in rng.random(LOOK_EVERY) < 0.10:
            experiment.record("stable", hit=bool(hit))
        for hit in rng.random(LOOK_EVERY) < 0.14:
            experiment.record("canary", hit=bool(hit), version=version)
        decision = experiment.decide()
        if decision.action != "continue":
            break
    assert decision.action == "promote", decision
    assert experiment.canary.version == version > 2
    assert experiment.canary.trials > experiment.current.trials  # the test used the pooled requests


def test_a_broken_version_in_a_good_line_is_rolled_back_on_its_own_numbers() -> None:
    config = PolicyConfig()
    experiment = Experiment(1, 2, config)
    for index in range(1_000):  # version 2: as good as stable, lots of evidence
        experiment.record("stable", hit=index % 10 == 0)
        experiment.record("canary", hit=index % 10 == 0, version=2)
    assert experiment.decide().action == "continue"
    experiment.advance(3)
    for index in range(config.collapse_min_trials):  # version 3 never gets a click
        experiment.record("stable", hit=index % 10 == 0)
        experiment.record("canary", hit=False, version=3)
    decision = experiment.decide()
    assert decision.action == "rollback" and "collapsed" in decision.reason, decision
    assert experiment.current.version == 3


def test_late_requests_of_an_earlier_line_version_count_for_the_line_only() -> None:
    experiment = Experiment(1, 2, PolicyConfig())
    experiment.advance(3)
    assert experiment.counts_for("canary", 2) and experiment.counts_for("canary", 3)
    assert not experiment.counts_for("canary", 1) and not experiment.counts_for("stable", 2)
    experiment.record("canary", hit=False, version=2)  # the impression, then its click
    experiment.record_hit("canary", 2)
    assert (experiment.canary.trials, experiment.canary.hits) == (1, 1)
    assert (experiment.current.trials, experiment.current.hits) == (0, 0)
    with pytest.raises(ValueError, match="already part"):
        experiment.advance(2)
