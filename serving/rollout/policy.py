"""When to promote a canary, when to roll it back: the decision rule on top of the mSPRT.

The unit of evidence is a *request* (one recommendation list shown): a trial, and a hit when any
of its items was clicked. In the replay simulator a click happens exactly when the user's real
next item was in the list, so the per-arm click-through rate is the online hit rate@K.

Rules, checked after every batch of labeled examples for the current canary version:

1. Guardrails first (roll back at once, no test needed): the canary's degraded share (requests
   answered by a fallback because the model failed) above ``max_degraded_share``; its p95
   serving latency above ``max(latency_budget_ms, latency_ratio x stable p95)``; or a CTR
   collapse: canary CTR below ``collapse_ratio x`` stable CTR once both arms have
   ``collapse_min_trials`` requests (a random-weights model is caught here within a bounded
   number of impressions). The collapse is judged on the version's *plain* requests only, the
   ones that showed its own list; interleaved requests are judged by rule 3 (below says why).
2. Then the always-valid test, once both arms have ``min_trials`` requests: reject with the
   canary ahead -> promote; reject with the canary behind -> roll back. Promotions are
   one-sided on a two-sided test at level ``alpha``, so the false-promotion rate stays at or
   below ``alpha / 2`` under no difference (checked by simulation in the tests).

**The canary line.** The trainer publishes a new canary every interval, too few requests for one
version to show the lift one interval brings. So while ``stable`` stays the same, the evidence of
consecutive canaries is pooled (``pool_canary_line``): the test asks whether *the trainer's line*
beats stable, and a promotion makes the line's newest version stable. The guardrails of rule 1
are checked on the *current* version's own requests, so a broken version is still rolled back on
its own numbers; under no difference the pooled stream keeps the test's false-promotion bound.

**Interleaving** (the API's ``interleave``, on by default). Per-user arms differ far more than two
close versions do, so canary users are shown the team-draft interleaving of the canary's and
stable's lists (``serving/api/interleave.py``), and the canary is judged by the share of clicked
interleaved requests whose click fell on an item its team picked: a comparison within each
request. A click on an item that *both* models had in their own top k is a **tie**: counted, but
crediting neither, since team draft's credit for it would be a coin flip that only dilutes the
share. Under no difference the remaining clicks still fall on either side alike.

Rules for experiments with interleaved requests, after the guardrails of rule 1:

3. The current version's own share, once it has ``interleave_min_credits`` credited requests,
   significantly below 1/2 (its own always-valid test, at the stricter
   ``interleave_version_alpha``: every version gets this test) -> roll back: a broken version in
   a good line is caught on its own clicks.
4. The line's pooled share, once it has ``interleave_min_credits``: significantly above 1/2 ->
   promote, below -> roll back (mSPRT on the share, ``sequential.msprt_share``, ``tau`` =
   ``interleave_tau``).

The A/B figures per arm are still kept (guardrails, reports); the canary arm's CTR is then the
interleaved lists' own.

**No CTR collapse on interleaved requests.** One version's CTR against stable's compares different
users, and a version serves the canary arm for one interval only, so a few bursty users can sink
it while its team wins the clicks. A broken model cannot collapse an interleaved list anyway
(stable's team fills about half of it); rule 3's within-request comparison catches it instead.

See docs/design/serving.md#the-ab-evaluator for the runs behind these rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from serving.rollout.sequential import ArmCounts, TestResult, msprt, msprt_share

Action = Literal["promote", "rollback", "continue"]


class PolicyConfig(BaseModel):
    """The rule's knobs; the evaluator's settings hold one (``STREAMREC_EVALUATOR__POLICY__*``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    alpha: float = Field(default=0.05, gt=0, lt=1)
    # Pool the evidence of consecutive canary versions against one stable (module docstring).
    pool_canary_line: bool = True
    tau: float = Field(default=0.05, gt=0)
    min_trials: int = Field(default=200, ge=10)
    collapse_ratio: float = Field(default=0.3, ge=0, le=1)
    collapse_min_trials: int = Field(default=400, ge=10)
    max_degraded_share: float = Field(default=0.2, ge=0, le=1)
    degraded_min_trials: int = Field(default=50, ge=1)
    latency_budget_ms: float = Field(default=50.0, gt=0)
    latency_ratio: float = Field(default=3.0, gt=1)
    latency_min_trials: int = Field(default=100, ge=10)
    # Interleaved requests (the API's ``interleave``) are judged by the share of clicks the
    # canary's team wins, not by the arms' CTRs (module docstring); the A/B rule above stays for
    # experiments without interleaved requests. ``interleave_tau``: the share-minus-1/2 the test
    # is most sensitive to (a few points); ``interleave_min_credits``: clicked interleaved requests
    # before it acts. See docs/design/serving.md#the-interleaving-knobs.
    interleave_tau: float = Field(default=0.05, gt=0)
    # The level of rule 3 (one version's own clicks), stricter than ``alpha``: every version is
    # tested on its own, and a false rollback ends the line's pooled evidence.
    interleave_version_alpha: float = Field(default=0.005, gt=0, lt=1)
    interleave_min_credits: int = Field(default=30, ge=10)


@dataclass
class ArmStats:
    """Running per-arm figures for one model version (or a pooled canary line).

    Per user it keeps (requests, hits) and three running sums over users, so the user-clustered
    variance of ``sequential.py`` costs O(1) per request: ``sum (x_u - p n_u)^2 = sum x_u^2 -
    2 p sum x_u n_u + p^2 sum n_u^2``.
    """

    version: int
    trials: int = 0
    hits: int = 0
    degraded: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    per_user: dict[str, tuple[int, int]] = field(default_factory=dict, init=False, repr=False)
    _sum_hits_sq: int = field(default=0, init=False, repr=False)
    _sum_hits_trials: int = field(default=0, init=False, repr=False)
    _sum_trials_sq: int = field(default=0, init=False, repr=False)

    def add(self, *, hit: bool, degraded: bool, latency_ms: float | None, user_id: str | None = None) -> None:
        self.trials += 1
        self.hits += int(hit)
        self.degraded += int(degraded)
        if latency_ms is not None:
            self.latencies_ms.append(latency_ms)
        if user_id is None:  # its own cluster: (0, 0) -> (1, hit)
            self._move((0, 0), (1, int(hit)))
        else:
            self._count_user(user_id, trials=1, hits=int(hit))

    def add_hit(self, user_id: str | None = None) -> None:
        """A click for a request already counted (``user_id`` None: an independent request)."""
        self.hits += 1
        if user_id is None:
            self._move((1, 0), (1, 1))
        else:
            self._count_user(user_id, trials=0, hits=1)

    def _count_user(self, user_id: str, *, trials: int, hits: int) -> None:
        old = self.per_user.get(user_id, (0, 0))
        new = (old[0] + trials, old[1] + hits)
        self.per_user[user_id] = new
        self._move(old, new)

    def _move(self, old: tuple[int, int], new: tuple[int, int]) -> None:
        """Replace one cluster's (requests, hits) in the running sums."""
        (old_trials, old_hits), (new_trials, new_hits) = old, new
        self._sum_hits_sq += new_hits**2 - old_hits**2
        self._sum_hits_trials += new_hits * new_trials - old_hits * old_trials
        self._sum_trials_sq += new_trials**2 - old_trials**2

    @property
    def ctr(self) -> float:
        return self.hits / self.trials if self.trials else 0.0

    def p95_latency_ms(self) -> float | None:
        return float(np.percentile(self.latencies_ms, 95)) if self.latencies_ms else None

    def counts(self) -> ArmCounts:
        rate = self.ctr
        cluster_ss = self._sum_hits_sq - 2 * rate * self._sum_hits_trials + rate**2 * self._sum_trials_sq
        return ArmCounts(self.trials, self.hits, max(cluster_ss, 0.0))


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    test: TestResult | None


class Experiment:
    """The canary line against one stable version, from first request to decision.

    ``canary`` holds the line's pooled figures (its ``version`` is the newest); ``current`` the
    newest version's own, which the guardrails read, and ``current_plain`` those of its requests
    that showed its own list, not an interleaved one (the CTR collapse reads only these). With
    one version and no interleaving they are all equal.
    """

    def __init__(self, stable_version: int, canary_version: int, config: PolicyConfig) -> None:
        self.config = config
        self.stable = ArmStats(stable_version)
        self.canary = ArmStats(canary_version)
        self.current = ArmStats(canary_version)
        self.current_plain = ArmStats(canary_version)
        self.canary_versions = [canary_version]
        self.p_value = 1.0
        self.last_test: TestResult | None = None
        # Interleaved comparison: trials = credited (clicked, not tied) interleaved requests, hits =
        # canary team wins; ties = clicked ones whose item both models had in their top k.
        self.interleaved_requests = 0
        self.ties = 0
        self.wins = ArmStats(canary_version)
        self.current_wins = ArmStats(canary_version)
        self.current_p_value = 1.0

    def advance(self, canary_version: int) -> None:
        """The canary label moved to the line's next version: keep the pooled evidence."""
        if canary_version in self.canary_versions:
            raise ValueError(f"version {canary_version} is already part of this canary line")
        self.canary_versions.append(canary_version)
        self.canary.version = canary_version
        self.current = ArmStats(canary_version)
        self.current_plain = ArmStats(canary_version)
        self.wins.version = canary_version
        self.current_wins = ArmStats(canary_version)
        self.current_p_value = 1.0

    def counts_for(self, arm: Literal["stable", "canary"], version: int) -> bool:
        """Whether a request served by ``version`` on ``arm`` is evidence in this experiment."""
        return version == self.stable.version if arm == "stable" else version in self.canary_versions

    def record(
        self,
        arm: Literal["stable", "canary"],
        *,
        hit: bool,
        degraded: bool = False,
        latency_ms: float | None = None,
        version: int | None = None,
        user_id: str | None = None,
        interleaved: bool = False,
    ) -> None:
        """One request; ``version`` None: served by the arm's current version; ``user_id`` None: a
        request independent of every other (no user to cluster on); ``interleaved``: a canary
        request that showed the team-draft list of canary and this experiment's stable."""
        self.interleaved_requests += int(interleaved)
        if arm == "stable":
            self.stable.add(hit=hit, degraded=degraded, latency_ms=latency_ms, user_id=user_id)
            return
        self.canary.add(hit=hit, degraded=degraded, latency_ms=latency_ms, user_id=user_id)
        if version is None or version == self.current.version:
            self.current.add(hit=hit, degraded=degraded, latency_ms=latency_ms, user_id=user_id)
            if not interleaved:
                self.current_plain.add(hit=hit, degraded=degraded, latency_ms=latency_ms, user_id=user_id)

    def record_hit(
        self,
        arm: Literal["stable", "canary"],
        version: int,
        user_id: str | None = None,
        *,
        interleaved: bool = False,
    ) -> None:
        """A click arrived for a request already recorded (labels come after the impression);
        ``interleaved`` as it was recorded."""
        if arm == "stable":
            self.stable.add_hit(user_id)
            return
        self.canary.add_hit(user_id)
        if version == self.current.version:
            self.current.add_hit(user_id)
            if not interleaved:
                self.current_plain.add_hit(user_id)

    def record_credit(
        self, team: Literal["stable", "canary"], version: int, user_id: str | None = None, *, tie: bool = False
    ) -> None:
        """A clicked interleaved request: its (first) click was on an item ``team`` picked; ``tie``:
        an item both models had in their own top k, which credits neither (module docstring)."""
        if tie:
            self.ties += 1
            return
        won = team == "canary"
        self.wins.add(hit=won, degraded=False, latency_ms=None, user_id=user_id)
        if version == self.current.version:
            self.current_wins.add(hit=won, degraded=False, latency_ms=None, user_id=user_id)

    def decide(self) -> Decision:
        guardrail = self._guardrail()
        if guardrail is not None:
            return Decision("rollback", guardrail, self.last_test)
        if self.interleaved_requests:
            return self._decide_interleaved()
        config = self.config
        if min(self.stable.trials, self.canary.trials) < config.min_trials:
            return Decision("continue", "collecting the minimum sample", self.last_test)
        test = msprt(
            self.stable.counts(), self.canary.counts(), alpha=config.alpha, tau=config.tau, previous_p=self.p_value
        )
        self.p_value = test.p_value
        self.last_test = test
        if test.canary_better:
            return Decision("promote", f"canary CTR higher (always-valid p={test.p_value:.4f})", test)
        if test.canary_worse:
            return Decision("rollback", f"canary CTR lower (always-valid p={test.p_value:.4f})", test)
        return Decision("continue", "no significant difference yet", test)

    def _decide_interleaved(self) -> Decision:
        """The current version loses on its own -> roll back; the line wins or loses -> act."""
        config = self.config
        if self.current_wins.trials >= config.interleave_min_credits:
            own = msprt_share(
                self.current_wins.counts(),
                alpha=config.interleave_version_alpha,
                tau=config.interleave_tau,
                previous_p=self.current_p_value,
            )
            self.current_p_value = own.p_value
            if own.canary_worse:
                return Decision(
                    "rollback",
                    f"version {self.current.version} loses the interleaved comparison on its own: its items "
                    f"drew {self.current_wins.ctr:.0%} of {self.current_wins.trials} clicks "
                    f"(always-valid p={own.p_value:.4f})",
                    own,
                )
        if self.wins.trials < config.interleave_min_credits:
            return Decision("continue", "collecting the minimum of credited interleaved requests", self.last_test)
        test = msprt_share(self.wins.counts(), alpha=config.alpha, tau=config.interleave_tau, previous_p=self.p_value)
        self.p_value = test.p_value
        self.last_test = test
        drew = (
            f"{self.wins.ctr:.1%} of {self.wins.trials} credited interleaved clicks, {self.ties} ties left out "
            f"(always-valid p={test.p_value:.4f})"
        )
        if test.canary_better:
            return Decision("promote", f"canary's items drew {drew}", test)
        if test.canary_worse:
            return Decision("rollback", f"canary's items drew only {drew}", test)
        return Decision("continue", "no significant difference yet", test)

    def _guardrail(self) -> str | None:
        config, stable, canary = self.config, self.stable, self.current
        if canary.trials >= config.degraded_min_trials:
            share = canary.degraded / canary.trials
            if share > config.max_degraded_share:
                return f"guardrail: {share:.0%} of canary requests degraded (max {config.max_degraded_share:.0%})"
        plain = self.current_plain  # its own lists only: interleaved ones are rule 3's (module docstring)
        if min(stable.trials, plain.trials) >= config.collapse_min_trials and stable.ctr > 0:
            if plain.ctr < config.collapse_ratio * stable.ctr:
                return (
                    f"guardrail: canary CTR collapsed to {plain.ctr:.3f} "
                    f"(< {config.collapse_ratio:.0%} of stable {stable.ctr:.3f})"
                )
        if min(len(stable.latencies_ms), len(canary.latencies_ms)) >= config.latency_min_trials:
            canary_p95 = canary.p95_latency_ms()
            stable_p95 = stable.p95_latency_ms()
            assert canary_p95 is not None and stable_p95 is not None  # noqa: S101 -- lists are non-empty
            limit = max(config.latency_budget_ms, config.latency_ratio * stable_p95)
            if canary_p95 > limit:
                return f"guardrail: canary p95 latency {canary_p95:.1f} ms > {limit:.1f} ms"
        return None
