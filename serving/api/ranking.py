"""Ask the model for a user's top-k, within a budget, or answer from trending items.

The decision table (what the response and the metrics say):

=====================================  ==================  =========  ========  ==============
situation                              items from          fallback   degraded  reason
=====================================  ==================  =========  ========  ==============
known user, model answers              model               no         no        ""
unknown user (no fresh features)       model, no profile   yes        no        cold_start
feature store failed                   model, no profile   yes        yes       features_unavailable
model server down / past its budget    trending            yes        yes       model_unavailable
model answers garbage or errors        trending            yes        yes       model_error
no time left before the client's       trending            yes        yes       deadline
deadline to ask the model
=====================================  ==================  =========  ========  ==============

The model call runs under ``min(model budget, time left before the client's deadline minus a
small reserve)``, so the trending answer fits inside the caller's deadline unless the host stalls
for longer than the reserve (see docs/design/serving.md#the-deadline-reserve). Seen items
are passed to the model as ``exclude_items`` (it excludes inside the graph) and filtered again
here, as are the trending items, so an excluded id never reaches the user whatever answered.

Canary: a user in the canary arm is served with ``version_label="canary"``. When the model
server has no canary label (no experiment running), the call is retried once with ``stable``
in the same budget, the answer is logged as the stable arm (which it is), and
:class:`~serving.api.arms.CanaryGate` skips the canary attempt for a few seconds.

Interleaving (``interleave``, on by default): once the canary answered, stable is asked too, in
what is left of the same budget, and the user sees the team-draft interleaving of the two lists
(``serving/api/interleave.py``); each item carries the team that picked it and the impression the
stable version, which the evaluator's test reads. If stable fails or is too slow, or both labels
point at one version, the canary's own list is served (no teams): the answer never waits for the
comparison.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import grpc
import numpy as np

from serving.api.arms import CanaryGate
from serving.api.interleave import team_draft
from serving.api.metrics import ApiMetrics
from serving.api.trending import TrendingSnapshot
from serving.api.user_features import UserFeatures
from serving.model_client import ModelServerRpcError
from streamrec.core import contracts
from streamrec.core.events import Arm

log = logging.getLogger(__name__)

# Time kept back from the client's deadline for the trending answer and the response itself.
DEADLINE_RESERVE_S = 0.003
# Below this there is no point starting a model call (it is less than one loopback round trip).
MIN_MODEL_BUDGET_S = 0.001
_UNAVAILABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


class Predictor(Protocol):
    """What the ranker needs of ``serving.model_client.ModelServerClient``."""

    def predict(
        self, inputs: Mapping[str, Any], *, signature: str, label: str | None = None, timeout_s: float | None = None
    ) -> tuple[int, dict[str, np.ndarray]]: ...


class TrendingSource(Protocol):
    """What the ranker needs of ``serving.api.trending.TrendingItems``."""

    @property
    def snapshot(self) -> TrendingSnapshot: ...


class NoAnswer(Exception):
    """Neither the model nor the trending list can answer (the handler returns UNAVAILABLE)."""


class _ModelError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Ranked:
    items: list[tuple[str, float]]
    model_version: int  # 0 when no model answered
    arm: Arm
    fallback_reason: str  # "" for the personalised model answer
    degraded: bool
    # Interleaved answers: the team (arm) that picked each item, whether each was in both models'
    # own top k, and the stable version it was interleaved with; None for a single model's list.
    teams: tuple[Arm, ...] | None = None
    shared: tuple[bool, ...] | None = None
    control_version: int | None = None

    @property
    def fallback(self) -> bool:
        return bool(self.fallback_reason)


def model_inputs(features: UserFeatures, exclude: list[str]) -> dict[str, np.ndarray]:
    """The ``recommend`` signature's inputs for one user (batch of 1), per ``streamrec.core.contracts``."""
    recent = (features.recent_items + [""] * contracts.RECENT_ITEMS_MAX)[: contracts.RECENT_ITEMS_MAX]
    inputs: dict[str, np.ndarray] = {"user_id": np.array([features.user_id], dtype=object)}
    for name in contracts.USER_STRING_INPUTS[1:]:
        inputs[name] = np.array([features.profile.get(name, "")], dtype=object)
    inputs["recent_items"] = np.array([recent], dtype=object)
    for name in contracts.USER_COUNT_INPUTS:
        inputs[name] = np.array([features.counts.get(name, 0)], dtype=np.int64)
    inputs["exclude_items"] = np.array([exclude or [""]], dtype=object)
    return inputs


def _is_missing_label(error: ModelServerRpcError) -> bool:
    # The local server answers NOT_FOUND; TF Serving answers INVALID_ARGUMENT
    # ("Unrecognized servable version label: canary").
    return error.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT) and "label" in error.details


def parse_answer(outputs: dict[str, np.ndarray], k: int, exclude: frozenset[str]) -> list[tuple[str, float]]:
    """Top ``k`` (item, score) from ``recommend``'s outputs; padding ("" / -inf) dropped.

    Raises ``_ModelError`` for an answer no user should see (missing outputs, NaN scores).
    """
    if "item_ids" not in outputs or "scores" not in outputs:
        raise _ModelError("model_error", f"the model answered without item_ids/scores (got {sorted(outputs)})")
    item_ids = outputs["item_ids"].reshape(-1)
    scores = outputs["scores"].reshape(-1)
    picked: list[tuple[str, float]] = []
    for raw_id, raw_score in zip(item_ids, scores, strict=False):
        item_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
        score = float(raw_score)
        if not item_id or score == -math.inf or item_id in exclude:
            continue
        if math.isnan(score) or math.isinf(score):
            raise _ModelError("model_error", f"the model scored item {item_id!r} as {score}")
        picked.append((item_id, score))
        if len(picked) == k:
            break
    if not picked:
        raise _ModelError("model_error", "the model returned no eligible item")
    return picked


class Ranker:
    """Model answer within budget, else trending (see the module docstring for the table)."""

    def __init__(
        self,
        client: Predictor,
        trending: TrendingSource,
        metrics: ApiMetrics,
        *,
        budget_s: float,
        canary_gate: CanaryGate,
        interleave: bool = False,
    ) -> None:
        self._client = client
        self._trending = trending
        self._metrics = metrics
        self._budget_s = budget_s
        self._gate = canary_gate
        self._interleave = interleave

    def rank(
        self,
        features: UserFeatures,
        *,
        k: int,
        exclude: list[str],
        arm: Arm,
        deadline: float,
        features_failed: bool = False,
    ) -> Ranked:
        """``deadline`` is a ``time.monotonic()`` instant (the client's deadline)."""
        excluded = frozenset(exclude)
        if arm == contracts.CANARY_LABEL and not self._gate.canary_available():
            arm = contracts.STABLE_LABEL
        inputs = model_inputs(features, exclude)  # built once: the interleaving call reuses it
        try:
            version, items, arm = self._ask_model(inputs, k=k, excluded=excluded, arm=arm, deadline=deadline)
        except _ModelError as exc:
            self._metrics.degraded.labels("model_server").inc()
            log.debug("model fallback (%s): %s", exc.reason, exc)
            return self._trending_answer(k=k, excluded=excluded, arm=arm, reason=exc.reason)
        self._metrics.model_version.labels(arm).set(version)
        reason = "features_unavailable" if features_failed else "" if features.known else "cold_start"
        ranked = Ranked(items, version, arm, reason, degraded=features_failed)
        if self._interleave and arm == contracts.CANARY_LABEL:
            return self._interleaved(inputs, ranked, k=k, excluded=excluded, deadline=deadline)
        return ranked

    def _interleaved(
        self, inputs: dict[str, np.ndarray], canary: Ranked, *, k: int, excluded: frozenset[str], deadline: float
    ) -> Ranked:
        """The team-draft list of canary and stable, or the canary's own when stable cannot answer.

        Each shown item also says whether it was in *both* top-k lists: a click on such an item is a
        tie for the evaluator, since either model alone would have shown it (``serving/rollout/policy.py``).
        """
        try:
            stable_version, outputs = self._predict(inputs, contracts.STABLE_LABEL, deadline)
            stable_items = parse_answer(outputs, k, excluded)
        except (ModelServerRpcError, _ModelError) as exc:
            log.debug("serving the canary's own list: stable could not answer for interleaving: %s", exc)
            return canary
        if stable_version == canary.model_version:
            return canary
        shown = team_draft(canary.items, stable_items, k)
        in_both = {item_id for item_id, _ in canary.items} & {item_id for item_id, _ in stable_items}
        return replace(
            canary,
            items=[(item_id, score) for item_id, score, _ in shown],
            teams=tuple(team for _, _, team in shown),
            shared=tuple(item_id in in_both for item_id, _, _ in shown),
            control_version=stable_version,
        )

    def _predict(self, inputs: dict[str, np.ndarray], label: Arm, deadline: float) -> tuple[int, dict[str, np.ndarray]]:
        """One ``recommend`` call under what is left of the budget; ``_ModelError("deadline")`` if nothing is."""
        budget = min(self._budget_s, deadline - time.monotonic() - DEADLINE_RESERVE_S)
        if budget < MIN_MODEL_BUDGET_S:
            raise _ModelError("deadline", "no time left before the client's deadline to ask the model")
        return self._client.predict(inputs, signature=contracts.RECOMMEND_SIGNATURE, label=label, timeout_s=budget)

    def _ask_model(
        self, inputs: dict[str, np.ndarray], *, k: int, excluded: frozenset[str], arm: Arm, deadline: float
    ) -> tuple[int, list[tuple[str, float]], Arm]:
        attempts: list[Arm] = [arm] if arm == contracts.STABLE_LABEL else [arm, contracts.STABLE_LABEL]
        for label in attempts:
            try:
                version, outputs = self._predict(inputs, label, deadline)
            except ModelServerRpcError as exc:
                if label == contracts.CANARY_LABEL and _is_missing_label(exc):
                    self._gate.mark_missing()
                    continue
                reason = "model_unavailable" if exc.code in _UNAVAILABLE_CODES else "model_error"
                raise _ModelError(reason, str(exc)) from exc
            return version, parse_answer(outputs, k, excluded), label
        raise _ModelError("model_error", "the model server has neither a canary nor a stable label")

    def _trending_answer(self, *, k: int, excluded: frozenset[str], arm: Arm, reason: str) -> Ranked:
        items = self._trending.snapshot.top(k, excluded)
        if not items:
            raise NoAnswer(
                f"the model could not answer ({reason}) and the trending list is empty; "
                "check the model server and that the feature store has its item profiles (`streamrec features setup`)"
            )
        return Ranked(items, 0, arm, reason, degraded=True)
