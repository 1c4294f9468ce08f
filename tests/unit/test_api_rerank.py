"""The ranking stage of the API: retrieved candidates re-ordered by the ranking model, the
retrieval order when it cannot answer, and what the impression logs (the model server is a
fake at its transport boundary, as in test_api_ranking.py)."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any

import grpc
import numpy as np
import pytest

from serving.api.arms import CanaryGate
from serving.api.impressions import PendingImpression, to_impression
from serving.api.metrics import ApiMetrics
from serving.api.ranking import Ranker
from serving.api.rerank import Reranker
from serving.model_client import ModelServerRpcError
from streamrec.core import contracts
from streamrec.core.exploration import Exploration
from tests.unit.test_api_ranking import INPUTS, KNOWN, TRENDING, FakeModel, FixedTrending, _far, _outputs

pytestmark = pytest.mark.unit


class FakeRankingModel:
    """Scores candidates by a table per label (unknown items 0); records every call."""

    def __init__(self, tables: dict[str, tuple[int, dict[str, float]]]) -> None:
        self.tables = tables
        self.errors: dict[str, ModelServerRpcError] = {}
        self.calls: list[tuple[str | None, dict[str, Any]]] = []

    def predict(
        self, inputs: Mapping[str, Any], *, signature: str, label: str | None = None, timeout_s: float | None = None
    ) -> tuple[int, dict[str, np.ndarray]]:
        assert signature == contracts.RANK_SIGNATURE
        self.calls.append((label, dict(inputs)))
        if label in self.errors:
            raise self.errors[str(label)]
        if label not in self.tables:
            raise ModelServerRpcError("Predict", grpc.StatusCode.NOT_FOUND, f"no version label {label}")
        version, table = self.tables[str(label)]
        ids = [str(item) for item in inputs["item_ids"].reshape(-1)]
        return version, {"scores": np.array([[table.get(item, 0.0) for item in ids]], dtype=np.float32)}


RETRIEVED = ["x", "y", "z", "w", "v", "u"]


def _ranker_fallbacks(metrics: ApiMetrics, reason: str) -> float:
    """The counter's value. Importing Feast turns on prometheus_client's multiprocess mode, where a
    labelled series starts from what an earlier test counted once it is first touched, so touch it
    before reading the value a test starts from."""
    metrics.ranker_fallbacks.labels(reason)
    return metrics.registry.get_sample_value("streamrec_api_ranker_fallbacks_total", {"reason": reason}) or 0.0


def _two_stage(
    ranking: FakeRankingModel, *, candidates: int = 6, exploration: Exploration | None = None, interleave: bool = False
) -> tuple[Ranker, FakeModel, ApiMetrics]:
    retrieval = FakeModel(
        {
            "stable": (7, _outputs(RETRIEVED, [6.0, 5.0, 4.0, 3.0, 2.0, 1.0])),
            "canary": (8, _outputs(RETRIEVED[::-1], [6.0, 5.0, 4.0, 3.0, 2.0, 1.0])),
        }
    )
    metrics = ApiMetrics()
    ranker = Ranker(
        retrieval,
        FixedTrending(TRENDING),
        metrics,
        inputs=INPUTS,
        budget_s=0.05,
        canary_gate=CanaryGate(5.0),
        interleave=interleave,
        exploration=exploration,
        rng=random.Random(0),
        reranker=Reranker(ranking, metrics, candidates=candidates),
    )
    return ranker, retrieval, metrics


def test_the_ranking_model_orders_the_retrieved_candidates() -> None:
    ranking = FakeRankingModel({"stable": (3, {"u": 9.0, "w": 8.0, "x": 1.0})})
    ranker, retrieval, _ = _two_stage(ranking)
    ranked = ranker.rank(KNOWN, k=3, exclude=[], arm="stable", deadline=_far())
    assert ranked.items == [("u", 9.0), ("w", 8.0), ("x", 1.0)]
    assert ranked.retrieval_scores == (-5.0, -3.0, 0.0) and ranked.ranker_version == 3  # relative to the best
    assert ranked.model_version == 7 and ranked.propensities == (1.0, 1.0, 1.0)
    label, inputs = ranking.calls[0]
    assert label == "stable"
    assert set(inputs) == {*INPUTS, "item_ids", "retrieval_scores"}
    assert list(inputs["item_ids"][0]) == RETRIEVED and inputs["retrieval_scores"].dtype == np.float32
    assert list(inputs["retrieval_scores"][0]) == [0.0, -1.0, -2.0, -3.0, -4.0, -5.0]
    assert inputs["user_id"][0] == "u1" and list(inputs["segment"]) == ["gold"]
    assert "exclude_items" not in inputs and len(retrieval.calls) == 1


def test_the_canary_arm_uses_the_ranking_canary_or_else_the_ranking_stable() -> None:
    ranking = FakeRankingModel({"stable": (3, {"v": 9.0})})
    ranker, _, _ = _two_stage(ranking)
    ranked = ranker.rank(KNOWN, k=2, exclude=[], arm="canary", deadline=_far())
    assert [label for label, _ in ranking.calls] == ["canary", "stable"]
    assert ranked.items[0] == ("v", 9.0) and ranked.ranker_version == 3 and ranked.model_version == 8
    ranking.tables["canary"] = (4, {"z": 9.0})
    assert ranker.rank(KNOWN, k=2, exclude=[], arm="canary", deadline=_far()).ranker_version == 4


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ModelServerRpcError("Predict", grpc.StatusCode.UNAVAILABLE, "down"), "unavailable"),
        (ModelServerRpcError("Predict", grpc.StatusCode.INTERNAL, "boom"), "model_error"),
    ],
)
def test_without_the_ranking_model_the_retrieval_order_is_served_and_counted(
    error: ModelServerRpcError, reason: str
) -> None:
    ranking = FakeRankingModel({"stable": (3, {"u": 9.0})})
    ranking.errors["stable"] = error
    ranker, _, metrics = _two_stage(ranking)
    before = _ranker_fallbacks(metrics, reason)
    ranked = ranker.rank(KNOWN, k=3, exclude=[], arm="stable", deadline=_far())
    assert ranked.items == [("x", 6.0), ("y", 5.0), ("z", 4.0)] and not ranked.fallback
    assert ranked.ranker_version is None and ranked.retrieval_scores is None
    assert _ranker_fallbacks(metrics, reason) == before + 1


def test_a_nan_ranking_answer_is_never_served() -> None:
    ranking = FakeRankingModel({"stable": (3, {"u": math.nan})})
    ranker, _, metrics = _two_stage(ranking)
    before = _ranker_fallbacks(metrics, "model_error")
    ranked = ranker.rank(KNOWN, k=2, exclude=[], arm="stable", deadline=_far())
    assert ranked.items == [("x", 6.0), ("y", 5.0)]
    assert _ranker_fallbacks(metrics, "model_error") == before + 1


def test_exploration_draws_from_the_ranking_models_order_and_the_impression_logs_both_scores() -> None:
    ranking = FakeRankingModel({"stable": (3, {item: float(n) for n, item in enumerate(RETRIEVED)})})  # reversed
    exploration = Exploration(policy="epsilon_greedy", epsilon=1.0, slots=1, pool_size=2)
    ranker, _, _ = _two_stage(ranking, exploration=exploration)
    ranked = ranker.rank(KNOWN, k=2, exclude=[], arm="stable", deadline=_far())
    assert ranked.items[0] == ("u", 5.0) and ranked.items[1][0] in {"w", "z"}  # pool: ranked 3rd and 4th
    assert ranked.propensities == (1.0, 0.5) and ranked.explored == (False, True)
    pending = PendingImpression(
        request_id="r1",
        user_id="u1",
        arm="stable",
        model_version=ranked.model_version,
        items=tuple(ranked.items),
        fallback=False,
        degraded=False,
        serve_latency_ms=1.0,
        features={},
        event_time=1.0,
        propensities=ranked.propensities,
        explored=ranked.explored,
        retrieval_scores=ranked.retrieval_scores,
        ranker_version=ranked.ranker_version,
    )
    impression = to_impression(pending)
    assert impression.ranker_version == 3
    assert impression.items[0].retrieval_score == -5.0 and impression.items[0].score == 5.0


def test_interleaved_two_stage_lists_carry_the_retrieval_scores_of_both_arms() -> None:
    ranking = FakeRankingModel({"stable": (3, {"x": 9.0}), "canary": (4, {"u": 9.0})})
    ranker, _, _ = _two_stage(ranking, interleave=True)
    ranked = ranker.rank(KNOWN, k=2, exclude=[], arm="canary", deadline=_far())
    assert ranked.teams is not None and {item for item, _ in ranked.items} == {"u", "x"}
    assert ranked.ranker_version == 4
    assert ranked.retrieval_scores is not None and all(math.isfinite(score) for score in ranked.retrieval_scores)
    assert [label for label, _ in ranking.calls] == ["canary", "stable"]
