"""The evaluator's figures per segment, on a constructed experiment with hand-computed tables.

In memory, as ``test_ab_recovery.py``: labels in a dict, labeled examples built by hand. The
canary wins overall (returning users click far more) but new users click a third as often as on
stable, a loss beyond ``slices.flag_loss``: flagged, recorded, exported, and held when blocking.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from serving.rollout.decision_log import applied_decisions, read_records
from serving.rollout.evaluator import AbEvaluator
from serving.rollout.policy import PolicyConfig
from serving.rollout.settings import EvaluatorSettings
from serving.rollout.slices import SliceStats, history_length
from streamrec.core.events import InteractionKind, LabeledExample
from streamrec.core.settings import SliceTuning

TOPIC = "labeled"
POLICY = PolicyConfig(min_trials=20)
TUNING = SliceTuning(user_activity_bounds=(5, 20), item_popularity_bounds=(10, 100), min_examples=50, flag_loss=0.2)
RETURNING = {"recent_items": [f"seen{n}" for n in range(8)], "count_24h": 3}  # history 8: returning, 5-19
NEW: dict[str, object] = {"recent_items": [], "count_24h": 0}  # history 0: new, 0-4


@dataclass
class Labels:
    current: dict[str, int] = field(default_factory=lambda: {"stable": 1, "canary": 2})
    moves: list[str] = field(default_factory=list)

    def labels(self) -> dict[str, int]:
        return dict(self.current)

    def promote(self, version: int | None = None) -> int:
        self.moves.append("promote")
        self.current["stable"] = self.current["canary"]
        return self.current["stable"]

    def rollback(self, version: int | None = None) -> int:
        self.moves.append("rollback")
        self.current["canary"] = self.current["stable"]
        return self.current["canary"]


def request(
    name: str, arm: str, features: dict[str, object], *, clicked: bool, kind: InteractionKind | None = None
) -> list[LabeledExample]:
    """Two shown items: ``popular`` at position 0 (the one clicked, with ``kind``, when any) and one of its own."""
    now = datetime.now(UTC)
    return [
        LabeledExample(
            event_id=LabeledExample.id_for(name, item),
            event_time=now,
            user_id=f"user-{name}",
            request_id=name,
            item_id=item,
            position=position,
            arm=arm,
            model_version=1 if arm == "stable" else 2,
            score=1.0,
            clicked=clicked and position == 0,
            kind=kind if clicked and position == 0 else None,
            impression_time=now,
            features=features,
        )
        for position, item in enumerate(("popular", f"own-{name}"))
    ]


def traffic(arm: str, segment: str, requests: int, clicks_per_10: int, first: int = 0) -> list[LabeledExample]:
    features = NEW if segment == "new" else RETURNING
    examples = []
    for n in range(first, first + requests):
        examples += request(f"{arm}-{segment}-{n}", arm, features, clicked=n % 10 < clicks_per_10)
    return examples


def canary_loses_new_users() -> list[LabeledExample]:
    """Stable: 0.3 for everyone. Canary: 0.6 for returning users, 0.1 for new ones; overall
    (300 returning + 100 new requests per arm) 0.475 against 0.3."""
    return [
        *traffic("stable", "returning", 300, 3),
        *traffic("stable", "new", 100, 3),
        *traffic("canary", "returning", 300, 6),
        *traffic("canary", "new", 100, 1),
    ]


def feed(evaluator: AbEvaluator, examples: list[LabeledExample], first_offset: int = 0) -> None:
    for offset, labeled in enumerate(examples, start=first_offset):
        evaluator.mark_read(0, offset)
        evaluator.handle(labeled)


def flags(segment: str) -> float:
    return REGISTRY.get_sample_value("streamrec_evaluator_slice_flags_total", {"segment": segment}) or 0.0


def without_p_values(table: dict[str, dict[str, object]]) -> dict[str, dict[str, object]]:
    return {segment: {key: value for key, value in row.items() if key != "p_value"} for segment, row in table.items()}


def counts(trials: int, clicks: int) -> dict[str, float | int]:
    return {"trials": trials, "clicks": clicks, "ctr": clicks / trials}


def row(unit: str, stable: tuple[int, int], canary: tuple[int, int], *, flagged: bool = False) -> dict[str, object]:
    return {"unit": unit, "stable": counts(*stable), "canary": counts(*canary), "flagged": flagged}


EXPECTED_SEGMENTS = {
    "user_tenure=new": row("request", (100, 30), (100, 10), flagged=True),
    "user_tenure=returning": row("request", (300, 90), (300, 180)),
    "user_activity=0-4": row("request", (100, 30), (100, 10), flagged=True),
    "user_activity=5-19": row("request", (300, 90), (300, 180)),
    # ``popular`` drew 310 clicks: head; every ``own-*`` item none: tail (CTR 0 on both, never flagged)
    "item_popularity=head": row("shown item", (400, 120), (400, 190)),
    "item_popularity=tail": row("shown item", (400, 0), (400, 0)),
}
FLAGGED = ["user_tenure=new", "user_activity=0-4"]


def test_a_flagged_canary_is_held_recorded_and_exported(tmp_path: Path) -> None:
    labels = Labels()
    evaluator = AbEvaluator(labels, POLICY, tmp_path, TOPIC, slices=TUNING)
    evaluator.recover()
    before = {segment: flags(segment) for segment in EXPECTED_SEGMENTS}
    examples = canary_loses_new_users()
    feed(evaluator, examples)

    assert evaluator.decide() is None  # the policy promotes; the flag holds it
    assert labels.moves == [] and labels.current == {"stable": 1, "canary": 2}
    assert evaluator.experiment is not None  # the experiment goes on
    (held,) = read_records(evaluator.decisions_path)
    assert (held["state"], held["action"], held["canary_version"]) == ("held", "hold", 2)
    assert "canary CTR higher" in held["reason"] and "held" in held["reason"]
    assert "user_tenure=new, user_activity=0-4" in held["reason"]
    slices = held["figures"]["slices"]
    assert without_p_values(slices["segments"]) == EXPECTED_SEGMENTS
    # the losses are significant (always-valid p below the policy's alpha); the other rows lose nothing
    p_values = {segment: row["p_value"] for segment, row in slices["segments"].items()}
    assert all(p_values[segment] < POLICY.alpha for segment in FLAGGED), p_values
    assert {segment for segment, p_value in p_values.items() if p_value is not None} == set(FLAGGED)
    assert (slices["flagged"], slices["wins_overall"]) == (FLAGGED, True)
    assert applied_decisions(evaluator.decisions_path) == []
    assert {segment: flags(segment) - before[segment] for segment in EXPECTED_SEGMENTS} == {
        segment: float(segment in FLAGGED) for segment in EXPECTED_SEGMENTS
    }
    ctr = REGISTRY.get_sample_value("streamrec_evaluator_slice_ctr", {"arm": "canary", "segment": "user_tenure=new"})
    assert ctr == pytest.approx(0.1)

    # the next look: still flagged, nothing new written or counted
    feed(evaluator, traffic("stable", "returning", 10, 3, first=300), first_offset=len(examples))
    assert evaluator.decide() is None
    assert len(list(read_records(evaluator.decisions_path))) == 1
    assert flags("user_tenure=new") - before["user_tenure=new"] == 1

    # the canary line's new users catch up (0.6 on 400 more): 250 / 500 = 0.5 > 0.3: promoted
    feed(evaluator, traffic("canary", "new", 400, 6, first=100), first_offset=len(examples) + 20)
    decision = evaluator.decide()
    assert decision is not None and decision.action == "promote"
    assert labels.moves == ["promote"]
    (applied,) = applied_decisions(evaluator.decisions_path)
    assert applied["held_on"] == FLAGGED and applied["figures"]["slices"]["flagged"] == []
    assert applied["figures"]["slices"]["segments"]["user_tenure=new"]["canary"] == counts(500, 250)


def test_without_blocking_a_flagged_canary_is_promoted_and_the_record_says_so(tmp_path: Path) -> None:
    labels = Labels()
    evaluator = AbEvaluator(labels, POLICY, tmp_path, TOPIC, slices=TUNING, block_promotion_on_slice_flag=False)
    evaluator.recover()
    before = flags("user_tenure=new")
    feed(evaluator, canary_loses_new_users())
    decision = evaluator.decide()
    assert decision is not None and decision.action == "promote"
    assert labels.moves == ["promote"]
    (intent, applied) = read_records(evaluator.decisions_path)
    assert (intent["state"], applied["state"]) == ("intent", "applied")
    assert "promoted although it loses user_tenure=new, user_activity=0-4" in applied["reason"]
    assert without_p_values(applied["figures"]["slices"]["segments"]) == EXPECTED_SEGMENTS
    assert flags("user_tenure=new") - before == 1


def by_kind(arm: str, requests: int, per_20: dict[InteractionKind | None, int]) -> list[LabeledExample]:
    """``requests`` of returning users; of every 20, ``per_20[kind]`` clicked with that kind (None:
    a click of unknown kind), the rest not clicked."""
    kinds = [kind for kind, count in per_20.items() for _ in range(count)]
    examples = []
    for n in range(requests):
        kind = kinds[n % 20] if n % 20 < len(kinds) else None
        examples += request(f"{arm}-{n}", arm, RETURNING, clicked=n % 20 < len(kinds), kind=kind)
    return examples


def test_a_canary_that_wins_overall_but_loses_purchases_is_flagged_on_that_kind(tmp_path: Path) -> None:
    """Stable: 0.3 overall (0.2 clicks, 0.1 purchases). Canary: 0.5 overall (0.4 clicks, 0.05
    purchases, 0.05 clicks of unknown kind): half of stable's purchases, flagged; the unknown ones
    count in no kind, so the canary's kinds add up to 0.45."""
    labels = Labels()
    evaluator = AbEvaluator(labels, POLICY, tmp_path, TOPIC, slices=TUNING)
    evaluator.recover()
    before = flags("event_kind=purchase")
    examples = [
        *by_kind("stable", 800, {"click": 4, "purchase": 2}),
        *by_kind("canary", 800, {"click": 8, "purchase": 1, None: 1}),
    ]
    feed(evaluator, examples)
    assert evaluator.decide() is None  # the policy promotes; the purchase loss holds it
    (held,) = read_records(evaluator.decisions_path)
    assert held["state"] == "held" and "event_kind=purchase" in held["reason"]
    slices = held["figures"]["slices"]
    assert (slices["flagged"], slices["wins_overall"]) == (["event_kind=purchase"], True)
    assert without_p_values(slices["segments"]) == {
        "user_tenure=returning": row("request", (800, 240), (800, 400)),
        "user_activity=5-19": row("request", (800, 240), (800, 400)),
        "item_popularity=head": row("shown item", (800, 240), (800, 400)),
        "item_popularity=tail": row("shown item", (800, 0), (800, 0)),
        # every request of an arm is a trial of each kind; a hit only in its click's kind
        "event_kind=click": row("request", (800, 160), (800, 320)),
        "event_kind=purchase": row("request", (800, 80), (800, 40), flagged=True),
    }
    assert slices["segments"]["event_kind=purchase"]["p_value"] < POLICY.alpha
    assert (held["figures"]["stable"]["hits"], held["figures"]["canary"]["hits"]) == (240, 400)
    assert flags("event_kind=purchase") - before == 1
    ctr = REGISTRY.get_sample_value(
        "streamrec_evaluator_slice_ctr", {"arm": "canary", "segment": "event_kind=purchase"}
    )
    assert ctr == pytest.approx(0.05)
    # a restarted evaluator rebuilds the same kinds from the experiment's examples
    first_table = evaluator.figures()["slices"]
    evaluator.save_checkpoint()
    second = AbEvaluator(labels, POLICY, tmp_path, TOPIC, slices=TUNING)
    second.recover()
    feed(second, examples)
    assert second.decide() is None and second.figures()["slices"] == first_table
    assert len(list(read_records(second.decisions_path))) == 1 and labels.moves == []


@pytest.mark.parametrize(
    ("canary_new_clicks_per_10", "canary_returning_clicks_per_10", "action"),
    [
        (3, 6, "promote"),  # new users as on stable: nothing lost
        (1, 2, "rollback"),  # loses new users, but loses overall too: a rollback, not a flag
    ],
)
def test_no_flag_without_a_segment_lost_by_an_overall_winner(
    tmp_path: Path, canary_new_clicks_per_10: int, canary_returning_clicks_per_10: int, action: str
) -> None:
    labels = Labels()
    evaluator = AbEvaluator(labels, POLICY, tmp_path, TOPIC, slices=TUNING)
    evaluator.recover()
    feed(
        evaluator,
        [
            *traffic("stable", "returning", 300, 3),
            *traffic("stable", "new", 100, 3),
            *traffic("canary", "returning", 300, canary_returning_clicks_per_10),
            *traffic("canary", "new", 100, canary_new_clicks_per_10),
        ],
    )
    decision = evaluator.decide()
    assert decision is not None and decision.action == action
    (applied,) = applied_decisions(evaluator.decisions_path)
    assert applied["figures"]["slices"]["flagged"] == [] and "held_on" not in applied


def test_a_loss_on_thin_evidence_is_not_flagged() -> None:
    """60 requests per arm, 0.3 against 0.2 (a third lower): past min_examples and flag_loss, but
    not significant; at ten times the evidence it is."""
    for scale, flagged in ((1, []), (10, ["user_tenure=new", "user_activity=0-4"])):
        stats = SliceStats(TUNING, alpha=0.05)
        for n in range(60 * scale):
            stats.record_request("stable", NEW)
            stats.record_request("canary", NEW)
            if n % 10 < 3:
                stats.record_request_hit("stable", NEW)
            if n % 10 < 2:
                stats.record_request_hit("canary", NEW)
        table = stats.table(wins_overall=True)
        assert table.flagged == flagged
        (tenure,) = [row for row in table.rows if row.segment == "user_tenure=new"]
        assert tenure.p_value is not None and (tenure.p_value < 0.05) == bool(flagged)


def test_a_segment_below_min_examples_is_not_flagged() -> None:
    stats = SliceStats(TUNING)
    for n in range(49):  # one short of min_examples in the new-user segment
        stats.record_request("stable", NEW)
        stats.record_request("canary", NEW)
        if n % 2 == 0:
            stats.record_request_hit("stable", NEW)
    table = stats.table(wins_overall=True)
    (tenure,) = [row for row in table.rows if row.segment == "user_tenure=new"]
    assert (tenure.arms["stable"].ctr, tenure.arms["canary"].ctr) == (25 / 49, 0.0)
    assert table.flagged == []
    stats.record_request("stable", NEW)
    stats.record_request("canary", NEW)
    assert stats.table(wins_overall=True).flagged == ["user_tenure=new", "user_activity=0-4"]


@pytest.mark.parametrize(
    ("features", "length"),
    [
        ({}, 0),  # a cold user or a fallback: no features
        ({"recent_items": ["a", "b"], "count_24h": None}, 2),  # count unknown
        ({"recent_items": ["a"] * 20, "count_24h": 150}, 150),  # recent items are capped; the count is not
        ({"recent_items": ["a", "b", "c"], "count_24h": 1}, 3),
        ({"recent_items": "not a list", "count_24h": True}, 0),
    ],
)
def test_history_length_is_the_largest_lower_bound_the_features_give(features: dict[str, object], length: int) -> None:
    assert history_length(features) == length


def test_a_restarted_evaluator_keeps_the_hold_without_writing_it_again(tmp_path: Path) -> None:
    labels = Labels()
    first = AbEvaluator(labels, POLICY, tmp_path, TOPIC, slices=TUNING)
    first.recover()
    examples = canary_loses_new_users()
    feed(first, examples)
    assert first.decide() is None
    first.save_checkpoint()
    # killed here; the next process rebuilds the evidence from where the experiment began
    second = AbEvaluator(labels, POLICY, tmp_path, TOPIC, slices=TUNING)
    assert second.recover() == {}
    feed(second, examples)
    assert second.decide() is None
    assert [record["state"] for record in read_records(second.decisions_path)] == ["held"]
    assert labels.moves == []


def test_blocking_is_on_by_default_and_settings_turn_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert EvaluatorSettings().evaluator.block_promotion_on_slice_flag is True
    monkeypatch.setenv("STREAMREC_EVALUATOR__BLOCK_PROMOTION_ON_SLICE_FLAG", "false")
    monkeypatch.setenv("STREAMREC_SLICES__FLAG_LOSS", "0.5")
    settings = EvaluatorSettings()
    assert settings.evaluator.block_promotion_on_slice_flag is False and settings.slices.flag_loss == 0.5
