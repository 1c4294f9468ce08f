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

**Users, not requests, are independent.** The API assigns arms per user (``serving/api/arms.py``),
and a user sends many requests in a row (an ml-100k user rates tens of movies in one sitting),
some users far easier to recommend for than others. Requests of one user are correlated, so the
binomial variance ``p(1-p)/n`` understates the noise of an arm's CTR: an arm that happened to
draw a few easy users looks better. Each arm's variance is therefore the larger of the binomial
one and the user-clustered (delta-method) one, ``sum_u (x_u - p n_u)^2 / n^2`` over the arm's
users (``ArmCounts.cluster_ss``), which equals the binomial one when every user sends one
request.

**Interleaving** (``msprt_share``): the same mixture test on one proportion, the canary's share
of clicked interleaved requests, against 1/2 (``serving/api/interleave.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ArmCounts:
    trials: int
    clicks: int
    # sum over the arm's users of (clicks_u - rate * trials_u)^2; None: requests are independent
    cluster_ss: float | None = None

    def variance(self) -> float:
        """Variance of the arm's CTR: binomial (floored, see ``msprt``) or user-clustered, the larger."""
        rate = self.rate
        floor = 0.5 / self.trials
        binomial = max(rate * (1 - rate), floor * (1 - floor)) / self.trials
        if self.cluster_ss is None:
            return binomial
        return max(binomial, self.cluster_ss / self.trials**2)

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
    # The plug-in variance is floored so an arm with no clicks yet does not look infinitely certain.
    variance = stable.variance() + canary.variance()
    difference = canary.rate - stable.rate
    return _mixture_test(difference, variance, tau=tau, alpha=alpha, previous_p=previous_p)


def msprt_share(wins: ArmCounts, *, alpha: float, tau: float, previous_p: float = 1.0) -> TestResult:
    """The same mixture test for interleaving: is the canary's share of credited requests 1/2?

    ``wins``: ``trials`` = credited requests (a click on an interleaved list), ``clicks`` = those
    the canary's team won, ``cluster_ss`` their spread over users. ``difference`` is the canary's
    share minus 1/2. When the two models rank alike, the winning team is a fair coin in every
    request, fresh per request, so the variance of the share is ``1 / (4 n)`` whoever the users
    are. When they differ but are equally good *on average*, one may still suit some users
    better, and a user sends many requests, so the user-clustered variance is taken when larger,
    as for the arms.
    """
    if not 0 < alpha < 1:
        raise ValueError("alpha must be in (0, 1)")
    if wins.trials == 0:
        return TestResult(0.0, 1.0, previous_p, previous_p <= alpha)
    variance = 0.25 / wins.trials
    if wins.cluster_ss is not None:
        variance = max(variance, wins.cluster_ss / wins.trials**2)
    return _mixture_test(wins.rate - 0.5, variance, tau=tau, alpha=alpha, previous_p=previous_p)


def _mixture_test(difference: float, variance: float, *, tau: float, alpha: float, previous_p: float) -> TestResult:
    """``Lambda`` of the module docstring for an estimate ``difference`` with ``variance``."""
    tau2 = tau * tau
    log_ratio = 0.5 * math.log(variance / (variance + tau2)) + difference**2 * tau2 / (2 * variance * (variance + tau2))
    likelihood_ratio = math.exp(min(log_ratio, 700.0))
    p_value = min(previous_p, 1.0 / likelihood_ratio)
    return TestResult(difference, likelihood_ratio, p_value, p_value <= alpha)
