"""Ask the model for a user's top-k, within a budget, or answer from trending items.

The decision table (what the response and the metrics say):

=====================================  ==================  =========  ========  ==============
situation                              items from          fallback   degraded  reason
=====================================  ==================  =========  ========  ==============
known user, model answers              model               no         no        ""
unknown user (no fresh features)       model, no features  yes        no        cold_start
feature store failed                   model, no features  yes        yes       features_unavailable
model server down / past its budget    trending            yes        yes       model_unavailable
model answers garbage or errors        trending            yes        yes       model_error
no time left before the client's       trending            yes        yes       deadline
deadline to ask the model
=====================================  ==================  =========  ========  ==============

The model call runs under ``min(model budget, time left before the client's deadline minus a
small reserve)``, so the trending answer fits inside the caller's deadline unless the host stalls
for longer than the reserve (see docs/design/serving.md#the-deadline-reserve). Excluded items
(seen ones, and the request's ``exclude_item_ids``) are passed to the model as ``exclude_items``
(it excludes inside the graph) and filtered again here, as are the trending items, so an excluded
id never reaches the user whatever answered.

Allow-list (``candidate_item_ids``): the model's ``score`` signature scores exactly those ids
(less the excluded ones) for the user and the top ``k`` are returned; an id outside the model's
catalog is scored from the id alone by the real model's item tower, and an id the model scores
``-inf`` (it cannot score it at all) is left out. When the model cannot answer, or scores none of
them, the allow-list comes back in trending order, ids without trending stats last in request
order (score 0), with the table's reason (``model_error`` for "scored none"). An allow-list
that is entirely excluded is an empty answer, and the model is not asked.

Every call carries the user inputs of the dataset's attribute schema (``user_model_inputs``,
built by :func:`user_inputs`); nothing here names an attribute.

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
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import grpc
import numpy as np

from serving.api.arms import CanaryGate
from serving.api.interleave import team_draft
from serving.api.metrics import ApiMetrics
from serving.api.rerank import Reranked, Reranker
from serving.api.trending import TrendingSnapshot
from serving.api.user_features import UserFeatures
from serving.model_client import ModelServerRpcError
from streamrec.core import contracts
from streamrec.core.attributes import InputKind
from streamrec.core.events import Arm
from streamrec.core.exploration import Exploration, explore

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


class ModelAnswerError(Exception):
    """The model gave no usable answer; ``reason`` is the fallback reason it leads to."""

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
    # A single model's list: each item's probability under the serving policy (exploration
    # included) and whether exploration drew it; None for interleaved and fallback lists.
    propensities: tuple[float, ...] | None = None
    explored: tuple[bool, ...] | None = None
    # Two-stage answers: each item's retrieval score and the ranking model's version that ordered
    # the list (interleaved: the arm's); None where the retrieval order was served.
    retrieval_scores: tuple[float, ...] | None = None
    ranker_version: int | None = None

    @property
    def fallback(self) -> bool:
        return bool(self.fallback_reason)


def user_inputs(features: UserFeatures, inputs: Mapping[str, InputKind]) -> dict[str, np.ndarray]:
    """The user inputs of ``recommend``/``score`` for one user (batch of 1), in ``inputs`` order.

    ``inputs`` is ``user_model_inputs(schema)``: ``string`` [1] ("" unknown), ``strings`` [1, M]
    "" padded (``recent_items`` to exactly ``RECENT_ITEMS_MAX``, others to max(1, len)), ``int``
    int64 [1] (0 unknown), ``float`` float32 [1] (NaN unknown).
    """
    arrays: dict[str, np.ndarray] = {}
    for name, kind in inputs.items():
        if name == "user_id":
            arrays[name] = np.array([features.user_id], dtype=object)
        elif name == "recent_items":
            recent = (features.recent_items + [""] * contracts.RECENT_ITEMS_MAX)[: contracts.RECENT_ITEMS_MAX]
            arrays[name] = np.array([recent], dtype=object)
        elif kind == "int":
            arrays[name] = np.array([features.counts.get(name, 0)], dtype=np.int64)
        elif kind == "float":
            value = features.attributes.get(name)
            arrays[name] = np.array([math.nan if value is None else value], dtype=np.float32)
        elif kind == "strings":
            arrays[name] = np.array([list(features.attributes.get(name) or []) or [""]], dtype=object)
        else:
            arrays[name] = np.array([features.attributes.get(name) or ""], dtype=object)
    return arrays


def model_inputs(
    features: UserFeatures, exclude: Sequence[str], inputs: Mapping[str, InputKind]
) -> dict[str, np.ndarray]:
    """The ``recommend`` signature's inputs: :func:`user_inputs` plus ``exclude_items`` [1, max(1, E)]."""
    return {**user_inputs(features, inputs), "exclude_items": np.array([list(exclude) or [""]], dtype=object)}


def _is_missing_label(error: ModelServerRpcError) -> bool:
    # The local server answers NOT_FOUND; TF Serving answers INVALID_ARGUMENT
    # ("Unrecognized servable version label: canary").
    return error.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT) and "label" in error.details


def parse_answer(outputs: dict[str, np.ndarray], k: int, exclude: frozenset[str]) -> list[tuple[str, float]]:
    """Top ``k`` (item, score) from ``recommend``'s outputs; padding ("" / -inf) dropped.

    Raises ``ModelAnswerError`` for an answer no user should see (missing outputs, NaN scores).
    """
    if "item_ids" not in outputs or "scores" not in outputs:
        raise ModelAnswerError("model_error", f"the model answered without item_ids/scores (got {sorted(outputs)})")
    item_ids = outputs["item_ids"].reshape(-1)
    scores = outputs["scores"].reshape(-1)
    picked: list[tuple[str, float]] = []
    for raw_id, raw_score in zip(item_ids, scores, strict=False):
        item_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
        score = float(raw_score)
        if not item_id or score == -math.inf or item_id in exclude:
            continue
        if math.isnan(score) or math.isinf(score):
            raise ModelAnswerError("model_error", f"the model scored item {item_id!r} as {score}")
        picked.append((item_id, score))
        if len(picked) == k:
            break
    if not picked:
        raise ModelAnswerError("model_error", "the model returned no eligible item")
    return picked


def parse_scores(outputs: dict[str, np.ndarray], item_ids: Sequence[str], k: int) -> list[tuple[str, float]]:
    """Top ``k`` of ``item_ids`` by ``score``'s output, best first (ties in request order).

    An id scored ``-inf`` is left out (the model cannot score it); raises ``ModelAnswerError``
    for a missing or mis-shaped output, a NaN or +inf score, or no id scored at all.
    """
    if "scores" not in outputs:
        raise ModelAnswerError("model_error", f"the model answered without scores (got {sorted(outputs)})")
    scores = outputs["scores"].reshape(-1)
    if scores.shape[0] != len(item_ids):
        raise ModelAnswerError("model_error", f"the model gave {scores.shape[0]} scores for {len(item_ids)} items")
    scored: list[tuple[str, float]] = []
    for item_id, raw_score in zip(item_ids, scores.tolist(), strict=True):
        score = float(raw_score)
        if score == -math.inf:
            continue
        if math.isnan(score) or math.isinf(score):
            raise ModelAnswerError("model_error", f"the model scored item {item_id!r} as {score}")
        scored.append((item_id, score))
    if not scored:
        raise ModelAnswerError("model_error", "the model scored none of the candidate items")
    scored.sort(key=lambda pair: -pair[1])  # stable: ties keep request order
    return scored[:k]


def rpc_fallback_reason(error: ModelServerRpcError) -> str:
    """``model_unavailable`` for a server that is down, slow or overloaded; else ``model_error``."""
    return "model_unavailable" if error.code in _UNAVAILABLE_CODES else "model_error"


def model_budget(budget_s: float, deadline: float) -> float:
    """The model call's timeout: the budget, cut to the deadline less the reserve; raises if too little is left."""
    budget = min(budget_s, deadline - time.monotonic() - DEADLINE_RESERVE_S)
    if budget < MIN_MODEL_BUDGET_S:
        raise ModelAnswerError("deadline", "no time left before the client's deadline to ask the model")
    return budget


@dataclass(frozen=True)
class _Call:
    """One signature's inputs and how to read its answer (kept for the interleaving call)."""

    signature: str
    inputs: dict[str, np.ndarray]
    parse: Callable[[dict[str, np.ndarray]], list[tuple[str, float]]]


class Ranker:
    """Model answer within budget, else trending (see the module docstring for the table).

    ``inputs`` is ``user_model_inputs(schema)``: the user inputs every model call carries.
    """

    def __init__(
        self,
        client: Predictor,
        trending: TrendingSource,
        metrics: ApiMetrics,
        *,
        inputs: Mapping[str, InputKind],
        budget_s: float,
        canary_gate: CanaryGate,
        interleave: bool = False,
        on_answer: Callable[[int], None] | None = None,
        exploration: Exploration | None = None,
        rng: random.Random | None = None,
        reranker: Reranker | None = None,
    ) -> None:
        self._client = client
        self._reranker = reranker  # the ranking stage; None: the retrieval order is served
        self._on_answer = on_answer  # told the version of every model answer (model freshness)
        self._trending = trending
        self._metrics = metrics
        self._inputs = dict(inputs)
        self._budget_s = budget_s
        self._gate = canary_gate
        self._interleave = interleave
        self._exploration = exploration or Exploration()
        self._rng = rng or random.Random()  # noqa: S311 -- exploration draws, not secrets

    def rank(
        self,
        features: UserFeatures,
        *,
        k: int,
        exclude: Sequence[str],
        arm: Arm,
        deadline: float,
        features_failed: bool = False,
        candidates: Sequence[str] | None = None,
    ) -> Ranked:
        """``deadline`` is a ``time.monotonic()`` instant (the client's deadline); ``candidates``
        an optional allow-list (rank only those)."""
        excluded = frozenset(exclude)
        if arm == contracts.CANARY_LABEL and not self._gate.canary_available():
            arm = contracts.STABLE_LABEL
        allowed: list[str] | None = None
        if candidates is not None:
            allowed = [item_id for item_id in dict.fromkeys(candidates) if item_id not in excluded]
            if not allowed:  # every candidate is excluded: nothing to rank, nothing to ask
                return Ranked([], 0, arm, "", degraded=features_failed)
        wanted = k + self._exploration.candidates_wanted
        if self._reranker is not None:
            wanted = max(wanted, self._reranker.candidates)
        call = self._call(features, k=wanted, exclude=exclude, excluded=excluded, allowed=allowed)
        try:
            version, items, arm = self._ask_model(call, arm=arm, deadline=deadline)
        except ModelAnswerError as exc:
            self._metrics.degraded.labels("model_server").inc()
            log.debug("model fallback (%s): %s", exc.reason, exc)
            return self._trending_answer(k=k, excluded=excluded, arm=arm, reason=exc.reason, allowed=allowed)
        self._metrics.model_version.labels(arm).set(version)
        if self._on_answer is not None:
            self._on_answer(version)
        reason = "features_unavailable" if features_failed else "" if features.known else "cold_start"
        reranked = self._rerank(call, items, arm=arm, deadline=deadline)
        items = reranked.items
        if self._interleave and arm == contracts.CANARY_LABEL:
            ranked = self._with_ranking(Ranked(items[:k], version, arm, reason, degraded=features_failed), reranked)
            return self._interleaved(call, ranked, reranked, k=k, deadline=deadline)
        shown = explore(items[: k + self._exploration.candidates_wanted], k, self._exploration, self._rng)
        ranked = Ranked(
            shown.items,
            version,
            arm,
            reason,
            degraded=features_failed,
            propensities=shown.propensities,
            explored=shown.explored,
        )
        return self._with_ranking(ranked, reranked)

    def _rerank(self, call: _Call, items: list[tuple[str, float]], *, arm: Arm, deadline: float) -> Reranked:
        """The ranking stage's order of the retrieved ``items`` (the retrieval order without one)."""
        if self._reranker is None:
            return Reranked(items, {}, None)
        try:
            timeout_s = model_budget(self._budget_s, deadline)
        except ModelAnswerError:
            return self._reranker.fallback(items, "deadline")
        user_part = {name: value for name, value in call.inputs.items() if name in self._inputs}
        return self._reranker.rerank(items, user_inputs=user_part, arm=arm, timeout_s=timeout_s)

    @staticmethod
    def _with_ranking(ranked: Ranked, reranked: Reranked) -> Ranked:
        """``ranked`` with its items' retrieval scores and the ranking version, when one ordered it."""
        if reranked.version is None:
            return ranked
        scores = tuple(reranked.retrieval_scores.get(item_id, math.nan) for item_id, _ in ranked.items)
        return replace(ranked, retrieval_scores=scores, ranker_version=reranked.version)

    def _call(
        self,
        features: UserFeatures,
        *,
        k: int,
        exclude: Sequence[str],
        excluded: frozenset[str],
        allowed: list[str] | None,
    ) -> _Call:
        """``recommend`` over the catalog, or ``score`` over the allow-list; built once per request."""
        if allowed is None:
            return _Call(
                contracts.RECOMMEND_SIGNATURE,
                model_inputs(features, exclude, self._inputs),
                lambda outputs: parse_answer(outputs, k, excluded),
            )
        inputs = {**user_inputs(features, self._inputs), "item_ids": np.array([allowed], dtype=object)}
        return _Call(contracts.SCORE_SIGNATURE, inputs, lambda outputs: parse_scores(outputs, allowed, k))

    def _interleaved(self, call: _Call, canary: Ranked, canary_ranking: Reranked, *, k: int, deadline: float) -> Ranked:
        """The team-draft list of canary and stable, or the canary's own when stable cannot answer.

        Each shown item also says whether it was in *both* top-k lists: a click on such an item is a
        tie for the evaluator, since either model alone would have shown it (``serving/rollout/policy.py``).
        """
        try:
            stable_version, outputs = self._predict(call, contracts.STABLE_LABEL, deadline)
            stable_ranking = self._rerank(call, call.parse(outputs), arm=contracts.STABLE_LABEL, deadline=deadline)
            stable_items = stable_ranking.items[:k]
        except (ModelServerRpcError, ModelAnswerError) as exc:
            log.debug("serving the canary's own list: stable could not answer for interleaving: %s", exc)
            return canary
        if stable_version == canary.model_version:
            return canary
        shown = team_draft(canary.items, stable_items, k)
        in_both = {item_id for item_id, _ in canary.items} & {item_id for item_id, _ in stable_items}
        interleaved = replace(
            canary,
            items=[(item_id, score) for item_id, score, _ in shown],
            teams=tuple(team for _, _, team in shown),
            shared=tuple(item_id in in_both for item_id, _, _ in shown),
            control_version=stable_version,
            retrieval_scores=None,
        )
        both = Reranked(
            [], {**stable_ranking.retrieval_scores, **canary_ranking.retrieval_scores}, canary_ranking.version
        )
        return self._with_ranking(interleaved, both)

    def _predict(self, call: _Call, label: Arm, deadline: float) -> tuple[int, dict[str, np.ndarray]]:
        """One model call under what is left of the budget; ``ModelAnswerError("deadline")`` if nothing is."""
        budget = model_budget(self._budget_s, deadline)
        return self._client.predict(call.inputs, signature=call.signature, label=label, timeout_s=budget)

    def _ask_model(self, call: _Call, *, arm: Arm, deadline: float) -> tuple[int, list[tuple[str, float]], Arm]:
        attempts: list[Arm] = [arm] if arm == contracts.STABLE_LABEL else [arm, contracts.STABLE_LABEL]
        for label in attempts:
            try:
                version, outputs = self._predict(call, label, deadline)
            except ModelServerRpcError as exc:
                if label == contracts.CANARY_LABEL and _is_missing_label(exc):
                    self._gate.mark_missing()
                    continue
                raise ModelAnswerError(rpc_fallback_reason(exc), str(exc)) from exc
            return version, call.parse(outputs), label
        raise ModelAnswerError("model_error", "the model server has neither a canary nor a stable label")

    def _trending_answer(
        self, *, k: int, excluded: frozenset[str], arm: Arm, reason: str, allowed: list[str] | None
    ) -> Ranked:
        snapshot = self._trending.snapshot
        items = snapshot.top(k, excluded) if allowed is None else snapshot.top_of(allowed, k)
        if not items:
            raise NoAnswer(
                f"the model could not answer ({reason}) and the trending list is empty; "
                "check the model server and that the feature store has its item profiles (`streamrec features setup`)"
            )
        return Ranked(items, 0, arm, reason, degraded=True)
