"""The ranking decision table, the model's inputs and outputs, allow-lists, trending order and impressions.

The model server is replaced by a fake at its transport boundary (``predict`` raising the same
``ModelServerRpcError`` the real client raises); the real server is exercised in
tests/integration/test_api_server.py.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Mapping
from typing import Any

import grpc
import numpy as np
import pytest

from serving.api.arms import CanaryGate
from serving.api.impressions import PendingImpression, to_impression
from serving.api.metrics import ApiMetrics
from serving.api.ranking import (
    DEADLINE_RESERVE_S,
    ModelAnswerError,
    NoAnswer,
    Ranker,
    model_inputs,
    parse_answer,
    parse_scores,
)
from serving.api.trending import EMPTY, TrendingSnapshot, rank
from serving.api.user_features import UserFeatures, normalized
from serving.model_client import ModelServerRpcError
from streamrec.core import contracts
from streamrec.core.attributes import Attribute, AttributeSchema, user_model_inputs
from streamrec.core.events import Impression, decode_event
from streamrec.core.exploration import Exploration

# One attribute of each kind, and two event kinds (so per-kind counts are inputs too).
SCHEMA = AttributeSchema(
    user=(
        Attribute(name="segment", type="categorical"),
        Attribute(name="interests", type="multi_categorical"),
        Attribute(name="tenure_days", type="numeric", boundaries=(30.0, 365.0)),
    ),
    event_kinds=("view", "purchase"),
)
INPUTS = user_model_inputs(SCHEMA)


def _outputs(items: list[str], scores: list[float]) -> dict[str, np.ndarray]:
    pad = contracts.TOP_K_EXPORTED - len(items)
    return {
        "item_ids": np.array([[item.encode() for item in items] + [b""] * pad], dtype=object),
        "scores": np.array([scores + [-math.inf] * pad], dtype=np.float32),
    }


class FakeModel:
    """Answers by label from a table (``score`` calls from ``scorer``), or raises the configured gRPC error."""

    def __init__(self, answers: dict[str, tuple[int, dict[str, np.ndarray]]] | None = None) -> None:
        self.answers = answers or {}
        self.errors: dict[str, ModelServerRpcError] = {}
        # score signature, per label: item -> score (an id not in the table scores -inf, as the
        # tiny model scores ids it does not know)
        self.scorer: dict[str, dict[str, float]] = {}
        self.calls: list[tuple[str | None, float | None, dict[str, Any]]] = []
        self.signatures: list[str] = []

    def predict(
        self, inputs: Mapping[str, Any], *, signature: str, label: str | None = None, timeout_s: float | None = None
    ) -> tuple[int, dict[str, np.ndarray]]:
        assert signature in (contracts.RECOMMEND_SIGNATURE, contracts.SCORE_SIGNATURE)
        self.calls.append((label, timeout_s, dict(inputs)))
        self.signatures.append(signature)
        if label in self.errors:
            raise self.errors[str(label)]
        version, outputs = self.answers[str(label)]
        if signature == contracts.SCORE_SIGNATURE:
            table = self.scorer[str(label)]
            ids = [str(item) for item in inputs["item_ids"].reshape(-1)]
            scores = [table.get(item, -math.inf) for item in ids]
            return version, {"scores": np.array([scores], dtype=np.float32)}
        return version, outputs


class FixedTrending:
    def __init__(self, snapshot: TrendingSnapshot) -> None:
        self.snapshot = snapshot


TRENDING = TrendingSnapshot(("t1", "t2", "t3", "t4"), (4.0, 3.0, 2.0, 1.0), refreshed_at=1.0)
KNOWN = UserFeatures(
    user_id="u1",
    attributes={"segment": "gold", "interests": ["jazz", "film", "maps"], "tenure_days": 400.0},
    recent_items=["a", "b"],
    counts={"count_1h": 2, "count_24h": 7, "purchase_count_24h": 1},
    found_views=frozenset({"user_profile", "user_activity"}),
)


def _ranker(
    model: FakeModel,
    trending: TrendingSnapshot = TRENDING,
    budget_s: float = 0.05,
    *,
    interleave: bool = False,
    exploration: Exploration | None = None,
    seed: int = 0,
) -> Ranker:
    return Ranker(
        model,
        FixedTrending(trending),
        ApiMetrics(),
        inputs=INPUTS,
        budget_s=budget_s,
        canary_gate=CanaryGate(5.0),
        interleave=interleave,
        exploration=exploration,
        rng=random.Random(seed),
    )


def _far() -> float:
    return time.monotonic() + 10


def test_model_inputs_are_exactly_the_schemas_inputs_with_each_kinds_shape_and_padding() -> None:
    inputs = model_inputs(KNOWN, ["a", "b"], INPUTS)
    assert list(inputs) == [*INPUTS, "exclude_items"]  # exactly the contract's names, in its order
    assert inputs["user_id"].tolist() == ["u1"] and inputs["user_id"].dtype == object
    # string [1]
    assert inputs["segment"].tolist() == ["gold"] and inputs["segment"].shape == (1,)
    # strings [1, M]: recent_items exactly RECENT_ITEMS_MAX wide, other lists as long as the value
    assert inputs["recent_items"].shape == (1, contracts.RECENT_ITEMS_MAX)
    assert inputs["recent_items"][0, :3].tolist() == ["a", "b", ""]
    assert inputs["interests"].tolist() == [["jazz", "film", "maps"]]
    # int64 [1], 0 for a count the row did not have
    assert inputs["count_24h"].dtype == np.int64 and inputs["count_24h"].tolist() == [7]
    assert inputs["purchase_count_24h"].tolist() == [1] and inputs["view_count_1h"].tolist() == [0]
    # float32 [1]
    assert inputs["tenure_days"].dtype == np.float32 and inputs["tenure_days"].tolist() == [400.0]
    assert inputs["exclude_items"].tolist() == [["a", "b"]]
    assert model_inputs(KNOWN, [], INPUTS)["exclude_items"].tolist() == [[""]]  # E >= 1


def test_model_inputs_of_an_unknown_user_are_the_unknown_value_of_each_kind() -> None:
    inputs = model_inputs(UserFeatures.unknown("new", INPUTS), [], INPUTS)
    assert list(inputs) == [*INPUTS, "exclude_items"]
    assert inputs["segment"].tolist() == [""]
    assert inputs["interests"].tolist() == [[""]]  # M = max(1, len)
    assert inputs["recent_items"].tolist() == [[""] * contracts.RECENT_ITEMS_MAX]
    assert inputs["count_1h"].tolist() == [0] and inputs["purchase_count_1h"].tolist() == [0]
    assert inputs["tenure_days"].shape == (1,) and math.isnan(float(inputs["tenure_days"][0]))
    # a UserFeatures without the names at all (no schema known) gives the same inputs
    bare = model_inputs(UserFeatures.unknown("new"), [], INPUTS)
    assert {name: value.tolist() for name, value in bare.items() if name != "tenure_days"} == {
        name: value.tolist() for name, value in inputs.items() if name != "tenure_days"
    }


def test_a_schema_without_attributes_gives_ids_and_stream_inputs_only() -> None:
    inputs = model_inputs(KNOWN, [], user_model_inputs(AttributeSchema()))
    assert list(inputs) == ["user_id", "recent_items", "count_1h", "count_24h", "exclude_items"]


@pytest.mark.parametrize(
    ("kind", "value", "expected"),
    [
        ("string", None, ""),
        ("string", 7, "7"),
        ("strings", None, []),
        ("strings", ["x", "", None, "y"], ["x", "y"]),
        ("int", None, 0),
        ("int", 3, 3),
        ("float", None, None),
        ("float", math.nan, None),
        ("float", 2, 2.0),
    ],
)
def test_feature_values_are_normalized_by_input_kind(kind: Any, value: Any, expected: Any) -> None:
    assert normalized(kind, value) == expected


def test_raw_features_are_json_ready_and_name_what_the_model_saw() -> None:
    features = UserFeatures.from_inputs(
        "u9",
        {"segment": "", "interests": ["x"], "tenure_days": None, "recent_items": ["i"], "count_1h": 1},
        INPUTS,
    )
    raw = features.raw()
    assert raw == {"segment": "", "interests": ["x"], "tenure_days": None, "recent_items": ["i"], "count_1h": 1}
    assert to_impression(pending_impression(features=raw)).features["tenure_days"] is None


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
    with pytest.raises(ModelAnswerError):
        parse_answer(outputs, 3, frozenset())


def test_a_known_user_gets_the_models_answer_with_its_version() -> None:
    model = FakeModel({"stable": (7, _outputs(["x", "y", "z"], [3.0, 2.0, 1.0]))})
    ranked = _ranker(model).rank(KNOWN, k=2, exclude=[], arm="stable", deadline=_far())
    assert ranked.items == [("x", 3.0), ("y", 2.0)]
    assert (ranked.model_version, ranked.arm, ranked.fallback, ranked.degraded) == (7, "stable", False, False)
    label, timeout_s, _ = model.calls[0]
    assert label == "stable" and timeout_s == pytest.approx(0.05)


def test_a_single_models_list_logs_propensities_and_explores_from_the_candidates_below_it() -> None:
    """No exploration: every item's propensity is 1. Epsilon-greedy on the last position: the
    list's last item is drawn from the next ``pool_size`` candidates (never an excluded one), with
    propensity epsilon / pool; the ranked item it replaced would have had 1 - epsilon."""
    ranked_ids = ["x", "y", "z", "w", "v", "u"]
    model = FakeModel({"stable": (7, _outputs(ranked_ids, [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]))})
    plain = _ranker(model).rank(KNOWN, k=2, exclude=[], arm="stable", deadline=_far())
    assert plain.items == [("x", 6.0), ("y", 5.0)]
    assert plain.propensities == (1.0, 1.0) and plain.explored == (False, False)
    exploring = _ranker(model, exploration=Exploration(policy="epsilon_greedy", epsilon=0.25, slots=1, pool_size=3))
    lists = [exploring.rank(KNOWN, k=2, exclude=["w"], arm="stable", deadline=_far()) for _ in range(400)]
    assert all(ranked.items[0] == ("x", 6.0) and ranked.propensities[0] == 1.0 for ranked in lists)  # type: ignore[index]
    last = {(ranked.items[1][0], ranked.propensities[1], ranked.explored[1]) for ranked in lists}  # type: ignore[index]
    assert last == {("y", 0.75, False), ("z", 0.25 / 3, True), ("v", 0.25 / 3, True), ("u", 0.25 / 3, True)}
    drawn = sum(ranked.explored[1] for ranked in lists) / len(lists)  # type: ignore[index]
    assert drawn == pytest.approx(0.25, abs=0.06)


def test_interleaved_and_fallback_lists_log_no_propensity() -> None:
    model = FakeModel(
        {"stable": (7, _outputs(["x", "y", "z"], [3.0, 2.0, 1.0])), "canary": (8, _outputs(["z", "y"], [3.0, 2.0]))}
    )
    ranker = _ranker(model, interleave=True)
    interleaved = ranker.rank(KNOWN, k=2, exclude=[], arm="canary", deadline=_far())
    assert interleaved.teams is not None and interleaved.propensities is None
    model.errors["stable"] = ModelServerRpcError("Predict", grpc.StatusCode.UNAVAILABLE, "down")
    fallback = ranker.rank(KNOWN, k=2, exclude=[], arm="stable", deadline=_far())
    assert fallback.fallback and fallback.propensities is None


def test_an_unknown_user_gets_the_models_profile_less_answer_marked_cold_start() -> None:
    model = FakeModel({"stable": (3, _outputs(["x"], [1.0]))})
    ranked = _ranker(model).rank(UserFeatures.unknown("new", INPUTS), k=5, exclude=[], arm="stable", deadline=_far())
    assert ranked.items == [("x", 1.0)]
    assert (ranked.fallback_reason, ranked.degraded, ranked.model_version) == ("cold_start", False, 3)
    assert model.calls[0][2]["segment"].tolist() == [""]


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


def test_excluded_ids_go_to_the_model_and_are_never_returned_even_when_it_returns_them() -> None:
    # a model that ignores exclude_items: the API filters its answer again
    model = FakeModel({"stable": (7, _outputs(["x", "gone", "y", "z"], [4.0, 3.0, 2.0, 1.0]))})
    ranked = _ranker(model).rank(KNOWN, k=3, exclude=["gone", "a"], arm="stable", deadline=_far())
    assert [item for item, _ in ranked.items] == ["x", "y", "z"]
    assert model.calls[0][2]["exclude_items"].tolist() == [["gone", "a"]]


def test_excluded_ids_are_left_out_of_the_trending_fallback() -> None:
    model = FakeModel()
    model.errors["stable"] = ModelServerRpcError("Predict", grpc.StatusCode.UNAVAILABLE, "down")
    ranked = _ranker(model).rank(KNOWN, k=3, exclude=["t1", "t3"], arm="stable", deadline=_far())
    assert ranked.items == [("t2", 3.0), ("t4", 1.0)]
    assert ranked.fallback_reason == "model_unavailable"


SCORES = {"c1": 0.5, "c2": 2.0, "c3": 1.0, "c4": 3.0, "t2": 0.1}


def _scoring_model(version: int = 7, label: str = "stable", scores: dict[str, float] = SCORES) -> FakeModel:
    model = FakeModel({label: (version, _outputs(["not", "an", "allowed", "id"], [9.0, 8.0, 7.0, 6.0]))})
    model.scorer[label] = scores
    return model


def test_an_allow_list_is_scored_with_score_and_only_its_ids_come_back_best_first() -> None:
    model = _scoring_model()
    ranked = _ranker(model).rank(
        KNOWN, k=3, exclude=["c4"], arm="stable", deadline=_far(), candidates=["c1", "c2", "c3", "c4", "c2"]
    )
    assert ranked.items == [("c2", 2.0), ("c3", 1.0), ("c1", 0.5)]  # c4 is excluded, c2 counted once
    assert (ranked.model_version, ranked.fallback) == (7, False)
    assert model.signatures == [contracts.SCORE_SIGNATURE]
    sent = model.calls[0][2]
    assert sent["item_ids"].tolist() == [["c1", "c2", "c3"]]  # excluded ids are not even scored
    assert set(sent) == {*INPUTS, "item_ids"}  # the user inputs plus item_ids, no exclude_items


def test_allow_list_ties_keep_request_order_and_ids_the_model_cannot_score_are_left_out() -> None:
    model = _scoring_model(scores={"a1": 1.0, "a2": 1.0, "a3": 2.0})
    ranked = _ranker(model).rank(
        KNOWN, k=10, exclude=[], arm="stable", deadline=_far(), candidates=["a2", "unknown", "a1", "a3"]
    )
    assert ranked.items == [("a3", 2.0), ("a2", 1.0), ("a1", 1.0)]


def test_an_allow_list_falls_back_to_its_ids_in_trending_order_when_the_model_cannot_answer() -> None:
    model = _scoring_model()
    model.errors["stable"] = ModelServerRpcError("Predict", grpc.StatusCode.DEADLINE_EXCEEDED, "slow")
    candidates = ["new-1", "t3", "t1", "t4", "new-2"]
    ranked = _ranker(model).rank(KNOWN, k=4, exclude=["t4"], arm="stable", deadline=_far(), candidates=candidates)
    # trending order first, then ids without trending stats in request order with score 0
    assert ranked.items == [("t1", 4.0), ("t3", 2.0), ("new-1", 0.0), ("new-2", 0.0)]
    assert (ranked.fallback_reason, ranked.degraded, ranked.model_version) == ("model_unavailable", True, 0)


def test_an_allow_list_the_model_scores_none_of_is_a_model_error_answered_from_trending() -> None:
    model = _scoring_model(scores={})
    ranked = _ranker(model).rank(KNOWN, k=2, exclude=[], arm="stable", deadline=_far(), candidates=["t2", "zz"])
    assert ranked.items == [("t2", 3.0), ("zz", 0.0)]
    assert ranked.fallback_reason == "model_error"


def test_an_allow_list_that_is_all_excluded_is_an_empty_answer_without_a_model_call() -> None:
    model = _scoring_model()
    ranked = _ranker(model).rank(KNOWN, k=2, exclude=["c1"], arm="stable", deadline=_far(), candidates=["c1"])
    assert (ranked.items, ranked.fallback, model.calls) == ([], False, [])


def test_an_interleaved_allow_list_asks_both_labels_with_score_and_stays_inside_the_list() -> None:
    model = _scoring_model(version=9, label="canary", scores={"c1": 3.0, "c2": 2.0, "c3": 1.0})
    model.answers["stable"] = (4, {})
    model.scorer["stable"] = {"c3": 3.0, "c2": 2.0, "c1": 1.0}
    ranked = _ranker(model, interleave=True).rank(
        KNOWN, k=3, exclude=[], arm="canary", deadline=_far(), candidates=["c1", "c2", "c3"]
    )
    assert model.signatures == [contracts.SCORE_SIGNATURE, contracts.SCORE_SIGNATURE]
    assert sorted(item for item, _ in ranked.items) == ["c1", "c2", "c3"]
    assert ranked.control_version == 4 and ranked.teams is not None


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ({"item_ids": np.array([[b"x"]], dtype=object)}, "without scores"),
        ({"scores": np.array([[1.0]], dtype=np.float32)}, "1 scores for 2 items"),
        ({"scores": np.array([[1.0, math.nan]], dtype=np.float32)}, "as nan"),
        ({"scores": np.array([[-math.inf, -math.inf]], dtype=np.float32)}, "none of the candidate items"),
    ],
)
def test_parse_scores_refuses_answers_no_user_should_see(outputs: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(ModelAnswerError, match=message):
        parse_scores(outputs, ["x", "y"], 2)


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
    assert snapshot.top_of(["x", "d", "e", "c", "y"], 4) == [("c", 2.0), ("e", 0.5), ("d", 0.0), ("x", 0.0)]
    assert EMPTY.top_of(["x", "y"], 5) == [("x", 0.0), ("y", 0.0)]


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
    assert [(item.propensity, item.explored) for item in decoded.items] == [(None, None), (None, None)]
    logged = decode_event(
        to_impression(pending_impression(propensities=(1.0, 0.05), explored=(False, True))).to_bytes(), Impression
    )
    assert [(item.propensity, item.explored) for item in logged.items] == [(1.0, False), (0.05, True)]
    assert impression.key() == b"u1"
    assert [(item.item_id, item.score, item.position) for item in decoded.items] == [("x", 0.5, 0), ("y", 0.25, 1)]
    assert (decoded.arm, decoded.model_version, decoded.request_id) == ("canary", 9, "r1")
    assert (decoded.fallback, decoded.degraded, decoded.serve_latency_ms) == (True, True, 4.5)
    assert decoded.features["recent_items"] == ["a", "b"] and decoded.features["count_1h"] == 2
    assert decoded.features["segment"] == "gold" and decoded.features["tenure_days"] == 400.0
