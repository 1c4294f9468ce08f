"""The ranking stage: order the retrieved candidates by the ranking model, or keep their order.

The retrieval model answers ``ranking.candidates`` items; the ranking model
(``contracts.RANKER_MODEL_NAME``, signature ``rank``) scores them for the user from the same
user inputs, the item ids and the retrieval scores relative to the best candidate
(:func:`relative_scores`), and the list is sorted by its scores. The
ranking model is asked with the arm's label (canary, then stable when it has no canary label)
under what is left of the model budget. When it cannot answer (down, slow, no label, a bad
answer) the retrieval order is served and ``streamrec_api_ranker_fallbacks_total{reason}``
counts it: the ranking stage never fails a request the retrieval stage answered.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import numpy as np

from serving.api.metrics import ApiMetrics
from serving.model_client import ModelServerRpcError
from streamrec.core import contracts
from streamrec.core.events import Arm

log = logging.getLogger(__name__)


class RankPredictor(Protocol):
    def predict(
        self, inputs: Mapping[str, Any], *, signature: str, label: str | None = None, timeout_s: float | None = None
    ) -> tuple[int, dict[str, np.ndarray]]: ...


@dataclass(frozen=True)
class Reranked:
    """The candidates in serving order, each (item, score): the ranking model's score, or the
    retrieval score when it did not answer; ``retrieval_scores`` by item; the ranking version
    (None: retrieval order)."""

    items: list[tuple[str, float]]
    retrieval_scores: dict[str, float]
    version: int | None


def relative_scores(items: list[tuple[str, float]]) -> dict[str, float]:
    """Each candidate's retrieval score minus the best one's (<= 0): what the ranking model reads.

    Raw scores are not comparable across users (a heavy user's cosines run lower), so a model
    fed raw scores learns their level across users and scrambles the order within one user
    (BENCHMARKS.md, ranker-quality); relative to the user's best candidate they only order."""
    top = max(score for _, score in items)
    return {item_id: score - top for item_id, score in items}


class RerankError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def parse_rank_scores(outputs: Mapping[str, np.ndarray], items: Sequence[tuple[str, float]]) -> list[tuple[str, float]]:
    """``items`` re-scored by the ``rank`` answer, best first (ties keep the retrieval order)."""
    if "scores" not in outputs:
        raise RerankError("model_error", f"the ranking model answered without scores (got {sorted(outputs)})")
    scores = np.asarray(outputs["scores"]).reshape(-1)
    if scores.shape[0] != len(items):
        raise RerankError("model_error", f"the ranking model gave {scores.shape[0]} scores for {len(items)} items")
    if not all(math.isfinite(float(score)) for score in scores):
        raise RerankError("model_error", "the ranking model answered NaN or infinite scores")
    scored = [(item_id, float(score)) for (item_id, _), score in zip(items, scores.tolist(), strict=True)]
    scored.sort(key=lambda pair: -pair[1])
    return scored


class Reranker:
    """Calls ``rank`` for one request's candidates (module docstring)."""

    def __init__(self, client: RankPredictor, metrics: ApiMetrics, *, candidates: int) -> None:
        self._client = client
        self._metrics = metrics
        self.candidates = candidates  # how many items the retrieval stage should answer

    def fallback(self, items: list[tuple[str, float]], reason: str) -> Reranked:
        """The retrieval order, counted as a fallback of ``reason`` (e.g. no time left to ask)."""
        self._metrics.ranker_fallbacks.labels(reason).inc()
        return Reranked(list(items), relative_scores(items), None)

    def rerank(
        self, items: list[tuple[str, float]], *, user_inputs: Mapping[str, np.ndarray], arm: Arm, timeout_s: float
    ) -> Reranked:
        """``items`` (retrieval order) in the ranking model's order; ``user_inputs``: the
        retrieval call's user inputs (the ranking model reads the same)."""
        if not items:
            return Reranked(items, {}, None)
        retrieval = relative_scores(items)
        request = {
            **user_inputs,
            "item_ids": np.array([[item_id for item_id, _ in items]], dtype=object),
            "retrieval_scores": np.array([[retrieval[item_id] for item_id, _ in items]], dtype=np.float32),
        }
        labels: list[Arm] = [arm] if arm == contracts.STABLE_LABEL else [arm, contracts.STABLE_LABEL]
        reason = "model_error"
        for label in labels:
            try:
                version, outputs = self._client.predict(
                    request, signature=contracts.RANK_SIGNATURE, label=label, timeout_s=timeout_s
                )
                return Reranked(parse_rank_scores(outputs, items), retrieval, version)
            except ModelServerRpcError as exc:
                reason = _rpc_reason(exc)
                if reason == "no_label" and label != contracts.STABLE_LABEL:
                    continue  # no ranking canary: the stable ranking model orders the canary's list
                log.debug("ranking model (%s): %s", label, exc)
                break
            except RerankError as exc:
                reason = exc.reason
                log.debug("ranking model (%s): %s", label, exc)
                break
        return self.fallback(items, reason)


def _rpc_reason(error: ModelServerRpcError) -> str:
    if error.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT) and (
        "label" in error.details or "not found" in error.details.lower()
    ):
        return "no_label"
    if error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
        return "unavailable"
    return "model_error"
