"""The impression-click join: every click outcome of streams/joiner.py, by hand."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from streamrec.core.events import Click, Impression, ImpressionItem
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


def test_past_the_cap_the_oldest_impressions_are_labeled_early_and_their_later_clicks_are_late() -> None:
    config = JoinConfig(window_s=60, grace_s=5, max_open_per_user=3)
    state = JoinState()
    early = []
    for n in range(5):
        state.add_impression(impression(f"r{n}", T0 + timedelta(seconds=n)), config)
        early += state.label_overflow(config)
    assert sorted(state.open) == ["r2", "r3", "r4"]  # the three newest stay open
    assert [(e.request_id, e.position) for e in early] == [
        ("r0", 0),
        ("r0", 1),
        ("r0", 2),
        ("r1", 0),
        ("r1", 1),
        ("r1", 2),
    ]
    assert state.add_click(click("i0", 10, "r0"), config) == "late"  # dead-lettered, not lost
    assert state.add_click(click("i0", 10, "r4"), config) == "joined"
    assert state.label_overflow(config) == []


def test_a_bursting_user_stays_one_kafka_message() -> None:
    """~1.2 KB impressions (a full recent-items list): without the cap 1,000 of them are ~1.2 MB,
    over Kafka's 1 MiB message limit; with the default cap the state stays near 130 KB."""
    config = JoinConfig(window_s=60, grace_s=5)
    state = JoinState()
    recent = [f"item-{n:04d}" for n in range(50)]
    for n in range(1_000):
        shown = impression(f"request-{n:06d}", T0 + timedelta(milliseconds=25 * n))
        state.add_impression(shown.model_copy(update={"features": {"recent_items": recent}}), config)
        state.label_overflow(config)
    size = len(json.dumps(state.to_json()))
    assert len(state.open) == config.max_open_per_user and size < 300_000, size
