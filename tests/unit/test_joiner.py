"""The impression-click join: every click outcome of streams/joiner.py, by hand."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from streamrec.events import Click, Impression, ImpressionItem
from streams.joiner import JoinConfig, JoinState

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
CONFIG = JoinConfig(window_s=60, grace_s=5)


def impression(request_id: str = "r1", at: datetime = T0) -> Impression:
    return Impression(
        event_id=request_id,
        event_time=at,
        user_id="u1",
        request_id=request_id,
        arm="canary",
        model_version=3,
        items=[ImpressionItem(item_id=f"i{n}", score=1.0 - n / 10, position=n) for n in range(3)],
        features={"recent_items": ["i9"]},
        serve_latency_ms=4.5,
    )


def click(item_id: str, after_s: float, request_id: str = "r1") -> Click:
    return Click(
        event_id=f"c-{request_id}-{item_id}-{after_s}",
        event_time=T0 + timedelta(seconds=after_s),
        user_id="u1",
        request_id=request_id,
        item_id=item_id,
    )


def test_clicks_inside_the_window_label_their_items_and_the_rest_are_negatives() -> None:
    state = JoinState()
    state.add_impression(impression(), CONFIG)
    assert state.add_click(click("i1", 10), CONFIG) == "joined"
    labeled, expired = state.expire(T0 + timedelta(seconds=30), CONFIG)
    assert labeled == [] and expired == []  # window still open
    labeled, expired = state.expire(T0 + timedelta(seconds=66), CONFIG)
    assert [(e.item_id, e.position, e.clicked) for e in labeled] == [
        ("i0", 0, False),
        ("i1", 1, True),
        ("i2", 2, False),
    ]
    assert labeled[1].click_time == T0 + timedelta(seconds=10)
    assert {(e.arm, e.model_version, e.serve_latency_ms) for e in labeled} == {("canary", 3, 4.5)}
    assert labeled[0].features == {"recent_items": ["i9"]}


def test_duplicate_clicks_count_once() -> None:
    state = JoinState()
    state.add_impression(impression(), CONFIG)
    assert state.add_click(click("i0", 1), CONFIG) == "joined"
    assert state.add_click(click("i0", 2), CONFIG) == "duplicate"
    labeled, _ = state.expire(T0 + timedelta(hours=1), CONFIG)
    assert sum(e.clicked for e in labeled) == 1


def test_clicks_before_the_impression_or_after_the_window_are_not_joined() -> None:
    state = JoinState()
    state.add_impression(impression(), CONFIG)
    assert state.add_click(click("i0", -1), CONFIG) == "before_impression"
    assert state.add_click(click("i0", 61), CONFIG) == "late"
    assert state.add_click(click("i7", 5), CONFIG) == "not_shown"
    labeled, _ = state.expire(T0 + timedelta(hours=1), CONFIG)
    assert not any(e.clicked for e in labeled)
    # after labeling, a click on that request is late, not "without impression"
    assert state.add_click(click("i1", 30), CONFIG) == "late"


def test_a_click_overtaking_its_impression_is_held_then_joined() -> None:
    state = JoinState()
    assert state.add_click(click("i2", 3), CONFIG) == "pending"
    outcomes = state.add_impression(impression(), CONFIG)
    assert [outcome for _, outcome in outcomes] == ["joined"]
    labeled, _ = state.expire(T0 + timedelta(hours=1), CONFIG)
    assert [e.item_id for e in labeled if e.clicked] == ["i2"]


def test_a_click_whose_impression_never_comes_expires_for_the_dead_letter_topic() -> None:
    state = JoinState()
    assert state.add_click(click("i2", 3, request_id="ghost"), CONFIG) == "pending"
    _, expired = state.expire(T0 + timedelta(seconds=30), CONFIG)
    assert expired == []
    _, expired = state.expire(T0 + timedelta(seconds=70), CONFIG)
    assert [c.request_id for c in expired] == ["ghost"]
    assert state.waiting == []


def test_state_survives_a_json_round_trip_and_redelivery_changes_nothing() -> None:
    state = JoinState()
    state.add_impression(impression(), CONFIG)
    state.add_click(click("i0", 1), CONFIG)
    restored = JoinState.from_json(state.to_json())
    restored.add_impression(impression(), CONFIG)  # redelivered
    labeled, _ = restored.expire(T0 + timedelta(hours=1), CONFIG)
    assert len(labeled) == 3 and [e.clicked for e in labeled] == [True, False, False]
    restored.add_impression(impression(), CONFIG)  # redelivered after labeling
    assert restored.open == {}
