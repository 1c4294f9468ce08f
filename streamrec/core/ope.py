"""Off-policy estimates of a candidate policy's click-through rate from logged impressions.

Every shown item is logged with its probability under the serving (logging) policy, its
*propensity*. A candidate policy that gives the same (context, item) the probability
``target`` is judged on those logs without showing it to anyone, by weighting each logged click
with ``target / propensity``:

* **IPS** (inverse propensity scoring): the mean of ``w * click``; unbiased whenever the logging
  policy gives every item the candidate could show a non-zero propensity, with a variance that
  grows with the weights.
* **SNIPS** (self-normalized IPS): ``sum(w * click) / sum(w)``; slightly biased, much less
  variable when a few weights are large.
* **DR** (doubly robust): a reward model's prediction for the candidate's choices, corrected by
  the weighted residuals of the logged clicks; unbiased if either the propensities or the reward
  model are right, and less variable than IPS when the model is good.

Each estimate has a normal-approximation confidence interval. Visits of one user are not
independent (a user who clicks often clicks often under both policies), so with ``clusters``
(the user id of each row) the variance is the cluster-robust one: the sum of each user's
terms, not each row, is the unit of sampling. The evaluator makes the same assumption.
References: Dudík, Langford & Li (2011), "Doubly Robust Policy Evaluation and Learning";
Swaminathan & Joachims (2015), "The Self-Normalized Estimator for Counterfactual Learning".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np
import numpy.typing as npt

Estimator = Literal["ips", "snips", "dr"]

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Estimate:
    """One estimator's value with its confidence interval, from ``rows`` logged rows."""

    estimator: Estimator
    value: float
    std_error: float
    low: float
    high: float
    rows: int
    # sum of the importance weights over the rows: ~rows when the candidate resembles the
    # logging policy; far below, few logged rows speak for the candidate
    weight_sum: float

    def as_dict(self) -> dict[str, float | int | str]:
        return {
            "estimator": self.estimator,
            "value": self.value,
            "std_error": self.std_error,
            "low": self.low,
            "high": self.high,
            "rows": self.rows,
            "weight_sum": self.weight_sum,
        }


@dataclass(frozen=True)
class LoggedRows:
    """Logged rows as arrays: ``clicks`` (0/1 or a reward), ``propensities`` (logging policy,
    each in (0, 1]), ``targets`` (the candidate's probability for the same row, in [0, 1]).
    ``predicted`` (a reward model's prediction for the logged row) and ``predicted_target`` (the
    model's expected reward under the candidate, for the row's context, spread over its rows)
    are needed by DR only. ``clusters`` groups rows (by user) for the variance."""

    clicks: FloatArray
    propensities: FloatArray
    targets: FloatArray
    predicted: FloatArray | None = None
    predicted_target: FloatArray | None = None
    clusters: npt.NDArray[np.int64] | None = None

    @classmethod
    def of(
        cls,
        clicks: Sequence[float] | FloatArray,
        propensities: Sequence[float] | FloatArray,
        targets: Sequence[float] | FloatArray,
        *,
        predicted: Sequence[float] | FloatArray | None = None,
        predicted_target: Sequence[float] | FloatArray | None = None,
        clusters: Sequence[object] | None = None,
    ) -> LoggedRows:
        """Check and convert; a bad input raises ``ValueError`` naming what is wrong."""
        rows = cls(
            clicks=np.asarray(clicks, dtype=np.float64),
            propensities=np.asarray(propensities, dtype=np.float64),
            targets=np.asarray(targets, dtype=np.float64),
            predicted=None if predicted is None else np.asarray(predicted, dtype=np.float64),
            predicted_target=None if predicted_target is None else np.asarray(predicted_target, dtype=np.float64),
            clusters=None if clusters is None else _cluster_codes(clusters),
        )
        rows.validate()
        return rows

    def validate(self) -> None:
        n = len(self.clicks)
        arrays = {
            "propensities": self.propensities,
            "targets": self.targets,
            "predicted": self.predicted,
            "predicted_target": self.predicted_target,
            "clusters": self.clusters,
        }
        for name, values in arrays.items():
            if values is not None and values.shape != (n,):
                raise ValueError(f"{name} has shape {values.shape}, clicks has {n} rows: one value per logged row")
        for name, values in (("clicks", self.clicks), ("propensities", self.propensities), ("targets", self.targets)):
            if not np.all(np.isfinite(values)):
                raise ValueError(f"{name} holds NaN or infinite values")
        if np.any((self.propensities <= 0) | (self.propensities > 1)):
            raise ValueError(
                "every propensity must lie in (0, 1]: a shown item had a non-zero probability under the "
                "policy that showed it; rows logged without one cannot be used for off-policy estimates"
            )
        if np.any((self.targets < 0) | (self.targets > 1)):
            raise ValueError("every target probability must lie in [0, 1]")

    @property
    def weights(self) -> FloatArray:
        return self.targets / self.propensities


def estimate(rows: LoggedRows, estimator: Estimator, *, confidence: float = 0.95) -> Estimate:
    """The ``estimator``'s estimate of the candidate's click-through rate (per logged row)."""
    n = len(rows.clicks)
    if n == 0:
        raise ValueError("no logged rows: an off-policy estimate needs impressions logged with propensities")
    weights = rows.weights
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    if estimator in ("ips", "dr"):
        terms = _terms(rows, estimator)
        value = float(terms.mean())
        std_error = _std_error(terms - value, rows.clusters)
    elif estimator == "snips":
        weight_mean = float(weights.mean())
        if weight_mean == 0:
            raise ValueError("the candidate gives every logged row probability 0: SNIPS is undefined")
        value = float((weights * rows.clicks).sum() / weights.sum())
        # delta method: the ratio's residuals, scaled by the mean weight
        std_error = _std_error(weights * (rows.clicks - value), rows.clusters) / weight_mean
    else:
        raise ValueError(f"unknown estimator {estimator!r}: one of ips, snips, dr")
    return Estimate(
        estimator=estimator,
        value=value,
        std_error=std_error,
        low=value - z * std_error,
        high=value + z * std_error,
        rows=n,
        weight_sum=float(weights.sum()),
    )


@dataclass(frozen=True)
class Difference:
    """A candidate's estimate minus a baseline's, on the same logged rows, with its interval."""

    estimator: Estimator
    candidate: float
    baseline: float
    value: float
    std_error: float
    low: float
    high: float

    def significantly_below(self, margin: float = 0.0) -> bool:
        """The whole interval lies more than ``margin`` below zero."""
        return self.high < -margin

    def as_dict(self) -> dict[str, float | str]:
        return {
            "estimator": self.estimator,
            "candidate": self.candidate,
            "baseline": self.baseline,
            "difference": self.value,
            "std_error": self.std_error,
            "low": self.low,
            "high": self.high,
        }


def compare(
    candidate: LoggedRows, baseline: LoggedRows, estimator: Estimator, *, confidence: float = 0.95
) -> Difference:
    """The paired difference of two policies' estimates on the same logged rows (same clicks,
    propensities and clusters; only ``targets`` and ``predicted_target`` differ). Paired, its
    interval is much narrower than the two intervals side by side: most of the noise (which
    users came, what they clicked) is shared."""
    if len(candidate.clicks) != len(baseline.clicks) or not np.array_equal(candidate.clicks, baseline.clicks):
        raise ValueError("compare needs the same logged rows for both policies")
    ours, theirs = estimate(candidate, estimator), estimate(baseline, estimator)
    if estimator == "snips":
        residuals = candidate.weights * (candidate.clicks - ours.value) / float(candidate.weights.mean()) - (
            baseline.weights * (baseline.clicks - theirs.value) / float(baseline.weights.mean())
        )
    else:
        residuals = _terms(candidate, estimator) - _terms(baseline, estimator) - (ours.value - theirs.value)
    std_error = _std_error(residuals, candidate.clusters)
    value = ours.value - theirs.value
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    return Difference(
        estimator, ours.value, theirs.value, value, std_error, value - z * std_error, value + z * std_error
    )


def _terms(rows: LoggedRows, estimator: Estimator) -> FloatArray:
    """The per-row terms whose mean is the IPS or DR estimate."""
    if estimator == "ips":
        return rows.weights * rows.clicks
    if rows.predicted is None or rows.predicted_target is None:
        raise ValueError("DR needs the reward model's predictions (predicted and predicted_target)")
    return rows.predicted_target + rows.weights * (rows.clicks - rows.predicted)


def estimate_all(rows: LoggedRows, *, confidence: float = 0.95) -> dict[Estimator, Estimate]:
    """IPS and SNIPS, and DR where the rows carry the reward model's predictions."""
    estimators: list[Estimator] = ["ips", "snips"]
    if rows.predicted is not None and rows.predicted_target is not None:
        estimators.append("dr")
    return {name: estimate(rows, name, confidence=confidence) for name in estimators}


def _std_error(residuals: FloatArray, clusters: npt.NDArray[np.int64] | None) -> float:
    """Standard error of the mean of per-row terms whose residuals (term - mean) are given:
    rows independent, or with ``clusters`` the cluster-robust (sandwich) form with the small
    sample factor G / (G - 1)."""
    n = len(residuals)
    if clusters is None:
        if n < 2:
            return float("inf")
        return float(np.sqrt((residuals**2).sum() / (n - 1) / n))
    sums = np.bincount(clusters, weights=residuals)
    groups = len(sums)
    if groups < 2:
        return float("inf")
    return float(np.sqrt(groups / (groups - 1) * (sums**2).sum()) / n)


def _cluster_codes(clusters: Sequence[object]) -> npt.NDArray[np.int64]:
    codes: dict[object, int] = {}
    return np.asarray([codes.setdefault(cluster, len(codes)) for cluster in clusters], dtype=np.int64)
