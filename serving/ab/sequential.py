"""An always-valid test of canary vs stable click-through rate (mixture SPRT).

Why this test: the evaluator looks at the experiment continuously and acts the moment the
evidence is strong enough. A fixed-horizon z-test checked after every impression would promote
a no-better canary far more often than its nominal level. The mixture sequential probability
ratio test (mSPRT; Robbins 1970, Johari, Pekelis & Walsh, "Always valid inference", 2017) keeps
its type-I error at ``alpha`` however often it is looked at.

Setting: each impression-item is a Bernoulli trial (clicked or not). With ``n_s``/``n_c`` trials
and ``x_s``/``x_c`` clicks on stable/canary, the difference ``theta = p_c - p_s`` is estimated by
``d = x_c/n_c - x_s/n_s`` with variance ``V = p_s(1-p_s)/n_s + p_c(1-p_c)/n_c`` (plug-in). Mixing
``theta ~ N(0, tau^2)`` over the alternative gives the likelihood ratio against ``theta = 0``::

    Lambda = sqrt(V / (V + tau^2)) * exp(d^2 * tau^2 / (2 V (V + tau^2)))

and ``H0`` is rejected when ``Lambda >= 1/alpha``; the always-valid p-value is the running
minimum of ``1/Lambda``. The sign of ``d`` at rejection says which arm is better. ``tau`` is the
size of effect the test is most sensitive to; a CTR lift of a few points is typical here.

The normal approximation needs a few clicks in each arm, so the policy (``policy.py``) also
requires a minimum number of trials before it acts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ArmCounts:
    trials: int
    clicks: int

    @property
    def rate(self) -> float:
        return self.clicks / self.trials if self.trials else 0.0


@dataclass(frozen=True)
class TestResult:
    difference: float
    likelihood_ratio: float
    p_value: float
    reject: bool

    @property
    def canary_better(self) -> bool:
        return self.reject and self.difference > 0

    @property
    def canary_worse(self) -> bool:
        return self.reject and self.difference < 0


def msprt(stable: ArmCounts, canary: ArmCounts, *, alpha: float, tau: float, previous_p: float = 1.0) -> TestResult:
    """One look at the data; pass the previous look's p-value to keep it always valid."""
    if not 0 < alpha < 1:
        raise ValueError("alpha must be in (0, 1)")
    if stable.trials == 0 or canary.trials == 0:
        return TestResult(0.0, 1.0, previous_p, previous_p <= alpha)
    p_s, p_c = stable.rate, canary.rate
    # Floor the plug-in variance so an arm with no clicks yet does not look infinitely certain.
    floor_s = 0.5 / stable.trials
    floor_c = 0.5 / canary.trials
    variance = (
        max(p_s * (1 - p_s), floor_s * (1 - floor_s)) / stable.trials
        + max(p_c * (1 - p_c), floor_c * (1 - floor_c)) / canary.trials
    )
    difference = p_c - p_s
    tau2 = tau * tau
    log_ratio = 0.5 * math.log(variance / (variance + tau2)) + difference**2 * tau2 / (2 * variance * (variance + tau2))
    likelihood_ratio = math.exp(min(log_ratio, 700.0))
    p_value = min(previous_p, 1.0 / likelihood_ratio)
    return TestResult(difference, likelihood_ratio, p_value, p_value <= alpha)
