"""SimilarItems' decision table: the model's neighbours, or trending items with the reason.

The model server is a fake at its transport boundary (``predict`` raising the real client's
``ModelServerRpcError``); the real server and the tiny model's ``similar`` signature are exercised
in tests/integration/test_api_similar.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import grpc
import numpy as np
import pytest

from serving.api.metrics import ApiMetrics
from serving.api.ranking import DEADLINE_RESERVE_S, NoAnswer
from serving.api.similar import SimilarItems, item_unknown, similar_inputs
from serving.api.trending import EMPTY, TrendingSnapshot
from serving.model_client import ModelServerRpcError
from streamrec.core import contracts

PAD_SCORE = float(np.finfo(np.float32).min)  # the contract's padding score
TRENDING = TrendingSnapshot(("t1", "t2", "t3", "t4"), (4.0, 3.0, 2.0, 1.0), refreshed_at=1.0)


def _outputs(items: list[str], scores: list[float]) -> dict[str, np.ndarray]:
    pad = contracts.TOP_K_EXPORTED - len(items)
    return {
        "item_ids": np.array([[item.encode() for item in items] + [b""] * pad], dtype=object),
        "scores": np.array([scores + [PAD_SCORE] * pad], dtype=np.float32),
    }


class FakeModel:
    """Answers ``similar`` per item from a table, or raises the configured error."""

    def __init__(self, neighbours: dict[str, dict[str, np.ndarray]], version: int = 3) -> None:
        self.neighbours = neighbours
        self.version = version
        self.error: ModelServerRpcError | None = None
        self.calls: list[tuple[str, str | None, float | None, dict[str, Any]]] = []

    def predict(
        self, inputs: Mapping[str, Any], *, signature: str, label: str | None = None, timeout_s: float | None = None
    ) -> tuple[int, dict[str, np.ndarray]]:
        self.calls.append((signature, label, timeout_s, dict(inputs)))
        if self.error is not None:
            raise self.error
        item_id = str(inputs["item_id"][0])
        return self.version, self.neighbours.get(item_id, _outputs([], []))  # unknown: all padding


class FixedTrending:
    def __init__(self, snapshot: TrendingSnapshot) -> None:
        self.snapshot = snapshot


def _finder(model: FakeModel, trending: TrendingSnapshot = TRENDING, budget_s: float = 0.05) -> SimilarItems:
    return SimilarItems(model, FixedTrending(trending), ApiMetrics(), budget_s=budget_s)


def _far() -> float:
    return time.monotonic() + 10


def test_the_model_answers_from_the_stable_labels_similar_signature() -> None:
    model = FakeModel({"m1": _outputs(["m2", "m3", "m4"], [0.9, 0.5, 0.1])})
    answer = _finder(model).similar("m1", k=2, exclude=["x"], deadline=_far())
    assert answer.items == [("m2", pytest.approx(0.9)), ("m3", pytest.approx(0.5))]
    assert (answer.model_version, answer.fallback, answer.fallback_reason) == (3, False, "")
    signature, label, timeout_s, inputs = model.calls[0]
    assert (signature, label, timeout_s) == (contracts.SIMILAR_SIGNATURE, contracts.STABLE_LABEL, pytest.approx(0.05))
    assert inputs["item_id"].tolist() == ["m1"]
    assert inputs["exclude_items"].tolist() == [["x"]]


def test_the_item_itself_and_excluded_ids_never_come_back_even_when_the_model_returns_them() -> None:
    model = FakeModel({"m1": _outputs(["m1", "m2", "gone", "m3"], [1.0, 0.9, 0.8, 0.7])})
    answer = _finder(model).similar("m1", k=5, exclude=["gone"], deadline=_far())
    assert [item for item, _ in answer.items] == ["m2", "m3"]


def test_an_item_the_model_does_not_know_gets_trending_without_itself_and_the_exclusions() -> None:
    model = FakeModel({})
    answer = _finder(model).similar("t2", k=2, exclude=["t1"], deadline=_far())
    assert answer.items == [("t3", 2.0), ("t4", 1.0)]
    assert (answer.fallback, answer.fallback_reason, answer.model_version) == (True, "item_unknown", 0)


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (grpc.StatusCode.UNAVAILABLE, "model_unavailable"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "model_unavailable"),
        (grpc.StatusCode.INVALID_ARGUMENT, "model_error"),  # e.g. a version without `similar`
    ],
)
def test_a_model_that_cannot_answer_gives_trending_with_the_reason(code: grpc.StatusCode, reason: str) -> None:
    model = FakeModel({})
    model.error = ModelServerRpcError("Predict", code, "boom")
    answer = _finder(model).similar("t1", k=2, exclude=[], deadline=_far())
    assert answer.items == [("t2", 3.0), ("t3", 2.0)]
    assert (answer.fallback_reason, answer.model_version) == (reason, 0)


def test_nan_scores_are_a_model_error_answered_from_trending() -> None:
    model = FakeModel({"m1": _outputs(["m2"], [math.nan])})
    answer = _finder(model).similar("m1", k=1, exclude=[], deadline=_far())
    assert (answer.items, answer.fallback_reason) == ([("t1", 4.0)], "model_error")


def test_no_time_left_skips_the_model_call() -> None:
    model = FakeModel({"m1": _outputs(["m2"], [1.0])})
    answer = _finder(model).similar("m1", k=1, exclude=[], deadline=time.monotonic() + DEADLINE_RESERVE_S / 2)
    assert (answer.fallback_reason, model.calls) == ("deadline", [])


def test_no_model_and_no_trending_is_no_answer() -> None:
    model = FakeModel({})
    with pytest.raises(NoAnswer, match="trending list is empty"):
        _finder(model, trending=EMPTY).similar("m1", k=1, exclude=[], deadline=_far())


def test_similar_inputs_and_the_unknown_item_rule() -> None:
    inputs = similar_inputs("m1", [])
    assert inputs["item_id"].tolist() == ["m1"] and inputs["exclude_items"].tolist() == [[""]]  # E >= 1
    assert item_unknown(_outputs([], []))
    assert not item_unknown(_outputs(["m2"], [0.5]))
    assert not item_unknown({"scores": np.zeros((1, 3), dtype=np.float32)})  # malformed, not "unknown"
