"""``streamrec.core.ope``: off-policy estimates on a simulated environment whose click
probabilities are known, so the true value of the candidate policy is known too."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest

from streamrec.core.ope import LoggedRows, compare, estimate, estimate_all

ITEMS = 8
USERS = 300


@dataclass
class World:
    """Click probabilities by (user, item); a logging policy and a candidate policy (softmax over
    different scores) by user; the candidate's true click-through rate."""

    clicks: np.ndarray
    logging: np.ndarray
    candidate: np.ndarray

    @property
    def true_value(self) -> float:
        return float((self.candidate * self.clicks).sum(axis=1).mean())


def softmax(scores: np.ndarray, temperature: float) -> np.ndarray:
    exp = np.exp((scores - scores.max(axis=1, keepdims=True)) / temperature)
    return exp / exp.sum(axis=1, keepdims=True)


def world(seed: int = 0) -> World:
    rng = np.random.default_rng(seed)
    affinity = rng.normal(size=(USERS, ITEMS))
    clicks = 1 / (1 + np.exp(-(affinity - 1.5)))
    logging = softmax(rng.normal(size=(USERS, ITEMS)) + 0.3 * affinity, 1.0)
    candidate = softmax(affinity, 0.5)  # a better policy: it follows the users' affinities
    return World(clicks, logging, candidate)


def logged(w: World, rng: np.random.Generator, visits: int, *, model_noise: float = 0.05) -> LoggedRows:
    users = rng.integers(0, USERS, size=visits)
    cumulative = w.logging[users].cumsum(axis=1)
    items = np.minimum((rng.random(visits)[:, None] > cumulative).sum(axis=1), ITEMS - 1)
    clicks = (rng.random(visits) < w.clicks[users, items]).astype(float)
    model = np.clip(w.clicks + rng.normal(scale=model_noise, size=w.clicks.shape), 0, 1)  # a decent reward model
    return LoggedRows.of(
        clicks,
        w.logging[users, items],
        w.candidate[users, items],
        predicted=model[users, items],
        predicted_target=(w.candidate[users] * model[users]).sum(axis=1),
        clusters=users.tolist(),
    )


def test_ips_and_snips_are_unbiased_within_their_intervals() -> None:
    """Over repeated logs, the 95 % intervals cover the true value at least 90 % of the time, and
    the estimates average to it."""
    w = world()
    rng = np.random.default_rng(1)
    runs = 300
    covered = {"ips": 0, "snips": 0, "dr": 0}
    values: dict[str, list[float]] = {"ips": [], "snips": [], "dr": []}
    for _ in range(runs):
        for name, result in estimate_all(logged(w, rng, 2000)).items():
            covered[name] += result.low <= w.true_value <= result.high
            values[name].append(result.value)
    for name in ("ips", "snips", "dr"):
        assert covered[name] / runs >= 0.9, (name, covered[name] / runs)
        mean, spread = float(np.mean(values[name])), float(np.std(values[name]))
        assert abs(mean - w.true_value) < 3 * spread / np.sqrt(runs), (name, mean, w.true_value)
    assert w.true_value > float((w.logging * w.clicks).sum(axis=1).mean())  # the candidate is better


def test_doubly_robust_varies_less_than_ips_with_a_good_reward_model() -> None:
    w = world()
    rng = np.random.default_rng(2)
    runs = [estimate_all(logged(w, rng, 2000)) for _ in range(100)]
    ips = np.std([run["ips"].value for run in runs])
    dr = np.std([run["dr"].value for run in runs])
    assert dr < 0.85 * ips, (dr, ips)
    assert np.mean([run["dr"].std_error for run in runs]) < np.mean([run["ips"].std_error for run in runs])


def test_a_policy_equal_to_the_logging_one_gets_the_logged_rate_exactly_from_snips() -> None:
    rows = LoggedRows.of([1, 0, 0, 1, 0], [0.5, 0.25, 0.1, 0.8, 0.3], [0.5, 0.25, 0.1, 0.8, 0.3])
    assert estimate(rows, "snips").value == pytest.approx(0.4)
    assert estimate(rows, "ips").value == pytest.approx(0.4)
    assert estimate(rows, "ips").weight_sum == pytest.approx(5)


def test_hand_computed_estimates_and_intervals() -> None:
    rows = LoggedRows.of(
        [1, 0, 1, 0], [0.5, 0.5, 0.25, 0.25], [1.0, 0.0, 0.5, 0.5], predicted=[0.5, 0.5, 0.5, 0.5],
        predicted_target=[0.5, 0.5, 0.5, 0.5],
    )  # fmt: skip
    weights = np.array([2.0, 0.0, 2.0, 2.0])
    ips_terms = weights * np.array([1, 0, 1, 0])
    ips = estimate(rows, "ips")
    assert ips.value == pytest.approx(1.0)
    assert ips.std_error == pytest.approx(np.std(ips_terms, ddof=1) / 2)
    assert (ips.low, ips.high) == pytest.approx((1.0 - 1.959964 * ips.std_error, 1.0 + 1.959964 * ips.std_error))
    assert estimate(rows, "snips").value == pytest.approx(4 / 6)
    dr_terms = 0.5 + weights * (np.array([1, 0, 1, 0]) - 0.5)
    assert estimate(rows, "dr").value == pytest.approx(dr_terms.mean())


def test_clustered_rows_widen_the_interval_when_a_users_visits_agree() -> None:
    """Each user's visits repeat the same click: the user, not the visit, is the sample."""
    clicks = [1.0] * 5 + [0.0] * 5 + [1.0] * 5 + [0.0] * 5
    users = [user for user in "abcd" for _ in range(5)]
    independent = estimate(LoggedRows.of(clicks, [0.5] * 20, [0.5] * 20), "ips")
    clustered = estimate(LoggedRows.of(clicks, [0.5] * 20, [0.5] * 20, clusters=users), "ips")
    assert clustered.value == independent.value
    assert clustered.std_error > 1.5 * independent.std_error


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"propensities": [0.5, 0.0]}, "propensity must lie in"),
        ({"propensities": [0.5, 1.5]}, "propensity must lie in"),
        ({"targets": [0.5, -0.1]}, "target probability"),
        ({"targets": [0.5]}, "one value per logged row"),
        ({"clicks": [float("nan"), 1.0]}, "NaN"),
    ],
)
def test_bad_rows_are_refused_with_a_reason(change: dict[str, list[float]], message: str) -> None:
    arguments = {"clicks": [1.0, 0.0], "propensities": [0.5, 0.5], "targets": [0.5, 0.5], **change}
    with pytest.raises(ValueError, match=message):
        LoggedRows.of(arguments["clicks"], arguments["propensities"], arguments["targets"])


def test_dr_without_a_reward_model_and_empty_logs_are_refused() -> None:
    with pytest.raises(ValueError, match="DR needs"):
        estimate(LoggedRows.of([1.0], [0.5], [0.5]), "dr")
    with pytest.raises(ValueError, match="no logged rows"):
        estimate(LoggedRows.of([], [], []), "ips")
    assert set(estimate_all(LoggedRows.of([1.0, 0.0], [0.5, 0.5], [0.5, 0.5]))) == {"ips", "snips"}


def with_targets(rows: LoggedRows, w: World, policy: np.ndarray, users: np.ndarray, items: np.ndarray) -> LoggedRows:
    """The same logged rows, weighed for ``policy`` (user x item probabilities); the reward
    model is the true click probabilities."""
    return dataclasses.replace(
        rows, targets=policy[users, items], predicted_target=(policy[users] * w.clicks[users]).sum(axis=1)
    )


def logged_with_choices(w: World, rng: np.random.Generator, visits: int) -> tuple[LoggedRows, np.ndarray, np.ndarray]:
    users = rng.integers(0, USERS, size=visits)
    cumulative = w.logging[users].cumsum(axis=1)
    items = np.minimum((rng.random(visits)[:, None] > cumulative).sum(axis=1), ITEMS - 1)
    clicks = (rng.random(visits) < w.clicks[users, items]).astype(float)
    rows = LoggedRows.of(
        clicks,
        w.logging[users, items],
        w.logging[users, items],
        predicted=w.clicks[users, items],
        predicted_target=(w.logging[users] * w.clicks[users]).sum(axis=1),
        clusters=users.tolist(),
    )
    return rows, users, items


def test_a_paired_comparison_tells_a_worse_candidate_from_the_serving_policy() -> None:
    """Against the logging policy's own estimate on the same rows: the better candidate is
    significantly above, a worse one (it prefers what users like least) significantly below, the
    intervals of the difference cover the true difference, and pairing narrows them."""
    w = world()
    worse = softmax(-np.log(w.clicks / (1 - w.clicks)), 0.5)
    rng = np.random.default_rng(4)
    true_better = w.true_value - float((w.logging * w.clicks).sum(axis=1).mean())
    covered, runs = 0, 200
    for _ in range(runs):
        rows, users, items = logged_with_choices(w, rng, 2000)
        baseline = rows
        better = with_targets(rows, w, w.candidate, users, items)
        for estimator in ("ips", "snips", "dr"):
            difference = compare(better, baseline, estimator)  # type: ignore[arg-type]
            covered += estimator == "ips" and difference.low <= true_better <= difference.high
            assert not difference.significantly_below()
    assert covered / runs >= 0.9
    rows, users, items = logged_with_choices(w, rng, 3000)
    for estimator in ("ips", "snips", "dr"):
        below = compare(with_targets(rows, w, worse, users, items), rows, estimator)  # type: ignore[arg-type]
        assert below.significantly_below(margin=0.05), (estimator, below)
        alone = [estimate(with_targets(rows, w, worse, users, items), estimator), estimate(rows, estimator)]  # type: ignore[arg-type]
        assert below.std_error < np.hypot(alone[0].std_error, alone[1].std_error)


def test_compare_refuses_rows_that_differ() -> None:
    rows = LoggedRows.of([1.0, 0.0], [0.5, 0.5], [0.5, 0.5])
    with pytest.raises(ValueError, match="same logged rows"):
        compare(rows, LoggedRows.of([0.0, 0.0], [0.5, 0.5], [0.5, 0.5]), "ips")
