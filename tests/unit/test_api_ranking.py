"""The ranking decision table, the model's inputs and outputs, trending order and impressions.

The model server is replaced by a fake at its transport boundary (``predict`` raising the same
``ModelServerRpcError`` the real client raises); the real server is exercised in
tests/integration/test_api_server.py.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any

import grpc
import numpy as np
import pytest

from serving.api.arms import CanaryGate
from serving.api.impressions import PendingImpression, to_impression
from serving.api.metrics import ApiMetrics
from serving.api.ranking import DEADLINE_RESERVE_S, NoAnswer, Ranker, _ModelError, model_inputs, parse_answer
from serving.api.trending import EMPTY, TrendingSnapshot, rank
from serving.api.user_features import UserFeatures
from serving.model_client import ModelServerRpcError
from streamrec.core import contracts
from streamrec.core.events import Impression, decode_event


def _outputs(items: list[str], scores: list[float]) -> dict[str, np.ndarray]:
    pad = contracts.TOP_K_EXPORTED - len(items)
    return {
        "item_ids": np.array([[item.encode() for item in items] + [b""] * pad], dtype=object),
        "scores": np.array([scores + [-math.inf] * pad], dtype=np.float32),
    }


class FakeModel:
    """Answers by label from a table, or raises the configured gRPC error."""

    def __init__(self, answers: dict[str, tuple[int, dict[str, np.ndarray]]] | None = None) -> None:
        self.answers = answers or {}
        self.errors: dict[str, ModelServerRpcError] = {}
        self.calls: list[tuple[str | None, float | None, dict[str, Any]]] = []

    def predict(
        self, inputs: Mapping[str, Any], *, signature: str, label: str | None = None, timeout_s: float | None = None
    ) -> tuple[int, dict[str, np.ndarray]]:
        assert signature == contracts.RECOMMEND_SIGNATURE
        self.calls.append((label, timeout_s, dict(inputs)))
        if label in self.errors:
            raise self.errors[str(label)]
        return self.answers[str(label)]


class FixedTrending:
    def __init__(self, snapshot: TrendingSnapshot) -> None:
        self.snapshot = snapshot


TRENDING = TrendingSnapshot(("t1", "t2", "t3", "t4"), (4.0, 3.0, 2.0, 1.0), refreshed_at=1.0)
KNOWN = UserFeatures(
    user_id="u1",
    profile={"age_bucket": "25-34", "gender": "F", "occupation": "writer", "zip_prefix": "941"},
    recent_items=["a", "b"],
    counts={"count_1h": 2, "count_24h": 7},
    found_views=frozenset({"user_profile", "user_activity"}),
)


def _ranker(model: FakeModel, trending: TrendingSnapshot = TRENDING, budget_s: float = 0.05) -> Ranker:
    return Ranker(model, FixedTrending(trending), ApiMetrics(), budget_s=budget_s, canary_gate=CanaryGate(5.0))


def _far() -> float:
    return time.monotonic() + 10


def test_model_inputs_follow_the_contract_shapes_and_padding() -> None:
    inputs = model_inputs(KNOWN, ["a", "b"])
    assert inputs["user_id"].tolist() == ["u1"]
    assert inputs["occupation"].tolist() == ["writer"]
    assert inputs["recent_items"].shape == (1, contracts.RECENT_ITEMS_MAX)
    assert inputs["recent_items"][0, :3].tolist() == ["a", "b", ""]
    assert inputs["count_24h"].dtype == np.int64 and inputs["count_24h"].tolist() == [7]
    assert inputs["exclude_items"].tolist() == [["a", "b"]]
    assert model_inputs(KNOWN, [])["exclude_items"].tolist() == [[""]]  # E >= 1


def test_parse_answer_drops_padding_and_excluded_ids_and_keeps_k() -> None:
    outputs = _outputs(["x", "a", "y", "z"], [0.9, 0.8, 0.7, 0.6])
    assert parse_answer(outputs, 2, frozenset({"a"})) == [("x", pytest.approx(0.9)), ("y", pytest.approx(0.7))]
    assert [item for item, _ in parse_answer(outputs, 10, frozenset())] == ["x", "a", "y", "z"]


@pytest.mark.parametrize(
    "outputs",
    [
        _outputs(["x"], [math.nan]),
        _outputs([], []),
        {"scores": np.zeros((1, 3), dtype=np.float32)},
    ],
)
def test_parse_answer_refuses_answers_no_user_should_see(outputs: dict[str, np.ndarray]) -> None:
    with pytest.raises(_ModelError):
        parse_answer(outputs, 3, frozenset())


def test_a_known_user_gets_the_models_answer_with_its_version() -> None:
    model = FakeModel({"stable": (7, _outputs(["x", "y", "z"], [3.0, 2.0, 1.0]))})
    ranked = _ranker(model).rank(KNOWN, k=2, exclude=[], arm="stable", deadline=_far())
    assert ranked.items == [("x", 3.0), ("y", 2.0)]
    assert (ranked.model_version, ranked.arm, ranked.fallback, ranked.degraded) == (7, "stable", False, False)
    label, timeout_s, _ = model.calls[0]
    assert label == "stable" and timeout_s == pytest.approx(0.05)


def test_an_unknown_user_gets_the_models_profile_less_answer_marked_cold_start() -> None:
    model = FakeModel({"stable": (3, _outputs(["x"], [1.0]))})
    ranked = _ranker(model).rank(UserFeatures.unknown("new"), k=5, exclude=[], arm="stable", deadline=_far())
    assert ranked.items == [("x", 1.0)]
    assert (ranked.fallback_reason, ranked.degraded, ranked.model_version) == ("cold_start", False, 3)
    assert model.calls[0][2]["gender"].tolist() == [""]


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (grpc.StatusCode.UNAVAILABLE, "model_unavailable"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "model_unavailable"),
        (grpc.StatusCode.INTERNAL, "model_error"),
    ],
)
def test_a_failing_model_gives_trending_marked_degraded(code: grpc.StatusCode, reason: str) -> None:
    model = FakeModel()
    model.errors["stable"] = ModelServerRpcError("Predict", code, "boom")
    ranked = _ranker(model).rank(KNOWN, k=2, exclude=["t1"], arm="stable", deadline=_far())
    assert ranked.items == [("t2", 3.0), ("t3", 2.0)]  # seen items are removed from trending too
    assert (ranked.fallback_reason, ranked.degraded, ranked.model_version) == (reason, True, 0)


class StoppedClock:
    """Stands in for the ranking module's ``time``: ``monotonic()`` stays where the test puts it."""

    def __init__(self, now: float) -> None:
        self.now = now

    def monotonic(self) -> float:
        return self.now


def test_the_model_budget_shrinks_to_the_clients_deadline_and_is_skipped_when_none_is_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = StoppedClock(1_000.0)
    monkeypatch.setattr("serving.api.ranking.time", clock)  # the budget is computed from this clock only
    model = FakeModel({"stable": (1, _outputs(["x"], [1.0]))})
    ranker = _ranker(model, budget_s=1.0)
    ranker.rank(KNOWN, k=1, exclude=[], arm="stable", deadline=clock.now + 0.02)
    assert model.calls[0][1] == pytest.approx(0.02 - DEADLINE_RESERVE_S)  # the deadline less the reserve, not 1 s
    ranked = ranker.rank(KNOWN, k=1, exclude=[], arm="stable", deadline=clock.now + 0.001)
    assert ranked.fallback_reason == "deadline" and len(model.calls) == 1


def test_a_missing_canary_label_is_served_by_stable_and_remembered() -> None:
    model = FakeModel({"stable": (4, _outputs(["x"], [1.0]))})
    model.errors["canary"] = ModelServerRpcError("Predict", grpc.StatusCode.NOT_FOUND, "no version label canary")
    ranker = _ranker(model)
    ranked = ranker.rank(KNOWN, k=1, exclude=[], arm="canary", deadline=_far())
    assert (ranked.arm, ranked.model_version, ranked.fallback) == ("stable", 4, False)
    assert [call[0] for call in model.calls] == ["canary", "stable"]
    ranker.rank(KNOWN, k=1, exclude=[], arm="canary", deadline=_far())
    assert [call[0] for call in model.calls] == ["canary", "stable", "stable"]  # gate skips the canary


def test_the_canary_arm_is_served_by_the_canary_label() -> None:
    model = FakeModel({"canary": (9, _outputs(["c"], [1.0])), "stable": (4, _outputs(["s"], [1.0]))})
    ranked = _ranker(model).rank(KNOWN, k=1, exclude=[], arm="canary", deadline=_far())
    assert (ranked.arm, ranked.model_version, ranked.items[0][0]) == ("canary", 9, "c")


def test_no_model_and_no_trending_is_no_answer() -> None:
    model = FakeModel()
    model.errors["stable"] = ModelServerRpcError("Predict", grpc.StatusCode.UNAVAILABLE, "down")
    with pytest.raises(NoAnswer, match="trending list is empty"):
        _ranker(model, trending=EMPTY).rank(KNOWN, k=1, exclude=[], arm="stable", deadline=_far())


def test_trending_ranks_by_score_then_24h_count_then_catalog_order() -> None:
    catalog = ["a", "b", "c", "d", "e"]
    stats = {"b": (2.0, 5), "c": (2.0, 9), "e": (0.5, 1)}
    item_ids, scores = rank(catalog, stats)
    assert item_ids == ("c", "b", "e", "a", "d")
    assert scores == (2.0, 2.0, 0.5, 0.0, 0.0)
    snapshot = TrendingSnapshot(item_ids, scores, 1.0)
    assert snapshot.top(2, frozenset({"c"})) == [("b", 2.0), ("e", 0.5)]


def pending_impression(**changes: Any) -> PendingImpression:
    """A canary answer of two items by version 9, as the handler hands it over (``changes`` applied)."""
    pending = PendingImpression(
        request_id="r1",
        user_id="u1",
        arm="canary",
        model_version=9,
        items=(("x", 0.5), ("y", 0.25)),
        fallback=False,
        degraded=False,
        serve_latency_ms=4.5,
        features=KNOWN.raw(),
        event_time=1_800_000_000.0,
    )
    return dataclasses.replace(pending, **changes)


def test_an_impression_carries_the_whole_answer_and_decodes_as_the_contract() -> None:
    pending = pending_impression(fallback=True, degraded=True)
    impression = to_impression(pending)
    decoded = decode_event(impression.to_bytes(), Impression)
    assert impression.key() == b"u1"
    assert [(item.item_id, item.score, item.position) for item in decoded.items] == [("x", 0.5, 0), ("y", 0.25, 1)]
    assert (decoded.arm, decoded.model_version, decoded.request_id) == ("canary", 9, "r1")
    assert (decoded.fallback, decoded.degraded, decoded.serve_latency_ms) == (True, True, 4.5)
    assert decoded.features["recent_items"] == ["a", "b"] and decoded.features["count_1h"] == 2
