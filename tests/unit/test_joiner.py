"""The impression-click join: every click outcome of streams/joiner.py, by hand."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta

from streamrec.core.events import Click, Impression, ImpressionItem, InteractionKind
from streams.joiner import CapOutcome, JoinConfig, JoinState, fit_features

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


def click(item_id: str, after_s: float, request_id: str = "r1", kind: InteractionKind | None = None) -> Click:
    return Click(
        event_id=f"c-{request_id}-{item_id}-{after_s}",
        event_time=T0 + timedelta(seconds=after_s),
        user_id="u1",
        request_id=request_id,
        item_id=item_id,
        kind=kind,
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
        early += state.enforce_caps(config).labeled
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
    assert state.enforce_caps(config) == CapOutcome([], [], over_bytes=False)


def test_a_bursting_user_stays_one_kafka_message() -> None:
    """~1.2 KB impressions (a full recent-items list): without the cap 1,000 of them are ~1.2 MB,
    over Kafka's 1 MiB message limit; with the default cap the state stays near 130 KB."""
    config = JoinConfig(window_s=60, grace_s=5)
    state = JoinState()
    recent = [f"item-{n:04d}" for n in range(50)]
    for n in range(1_000):
        shown = impression(f"request-{n:06d}", T0 + timedelta(milliseconds=25 * n))
        state.add_impression(shown.model_copy(update={"features": {"recent_items": recent}}), config)
        state.enforce_caps(config)
    size = len(json.dumps(state.to_json()))
    assert len(state.open) == config.max_open_per_user and size < 300_000, size


def test_every_example_of_an_item_has_the_same_id_however_often_it_is_labeled() -> None:
    first, again = JoinState(), JoinState()
    for state in (first, again):
        state.add_impression(impression(), CONFIG)
    ids = [e.event_id for e in first.expire(T0 + timedelta(hours=1), CONFIG)[0]]
    assert ids == ["label:r1:i0", "label:r1:i1", "label:r1:i2"]
    assert [e.event_id for e in again.expire(T0 + timedelta(hours=1), CONFIG)[0]] == ids


def test_a_large_context_loses_its_largest_keys_and_the_rest_of_the_features_stay() -> None:
    context = {f"k{n}": "x" * 100 for n in range(150)}  # ~16 KB
    shown = impression().model_copy(update={"features": {"recent_items": ["i9"], "context": context}})
    fitted, dropped = fit_features(shown, max_bytes=8 * 1024)
    assert dropped == ["context"] and fitted.features == {"recent_items": ["i9"]}
    assert fit_features(fitted, max_bytes=8 * 1024) == (fitted, [])
    many = {f"k{n}": "y" * (n * 10) for n in range(1, 20)}  # 1,900 bytes of values in keys of rising size
    trimmed, dropped = fit_features(shown.model_copy(update={"features": many}), max_bytes=1000)
    assert dropped == [f"k{n}" for n in range(19, 12, -1)]  # the largest first, until it fits
    assert len(json.dumps(trimmed.features)) <= 1000 < len(json.dumps({**trimmed.features, "k13": many["k13"]}))


def test_past_the_byte_cap_the_oldest_impressions_are_labeled_early_then_held_clicks_evicted() -> None:
    config = JoinConfig(window_s=60, grace_s=5, max_state_bytes=8 * 1024, max_features_bytes=2 * 1024)
    state = JoinState()
    big = {"recent_items": [f"item-{n:04d}" for n in range(150)]}  # ~1.8 KB
    early = []
    for n in range(10):
        shown = impression(f"r{n}", T0 + timedelta(seconds=n)).model_copy(update={"features": big})
        state.add_impression(shown, config)
        outcome = state.enforce_caps(config)
        early += outcome.labeled
        assert state.size_bytes() <= config.max_state_bytes
    assert sorted({e.request_id for e in early}) == [f"r{n}" for n in range(10 - len(state.open))]
    assert 0 < len(state.open) < 10
    # nothing open: held clicks go, oldest first
    state = JoinState()
    for n in range(200):
        state.add_click(click("i0", n, request_id=f"ghost-{n:03d}"), config)
    outcome = state.enforce_caps(config)
    assert outcome.over_bytes and outcome.labeled == []
    assert [c.request_id for c in outcome.evicted] == [f"ghost-{n:03d}" for n in range(len(outcome.evicted))]
    assert state.size_bytes() <= config.max_state_bytes and state.waiting


def test_the_size_bound_is_never_below_the_changelog_message() -> None:
    """Random states (impressions with features, clicks, held clicks, labeled ids): ``size_bytes``
    is at least the JSON Faust writes (default separators, ASCII escapes), so the cap holds."""
    rng = random.Random(7)
    config = JoinConfig(window_s=60, grace_s=5, max_open_per_user=1000, max_state_bytes=10**9)
    for _ in range(30):
        state = JoinState()
        for n in range(rng.randint(0, 40)):
            request = f"req-{n}-{'é' * rng.randint(0, 5)}"
            features = {"recent_items": [f"item-{rng.randint(0, 99999)}" for _ in range(rng.randint(0, 60))]}
            if rng.random() < 0.3:
                features["context"] = {"page": "ü" * rng.randint(0, 300)}
            shown = impression(request, T0 + timedelta(seconds=rng.random() * 100))
            state.add_impression(shown.model_copy(update={"features": features}), config)
            for item in rng.sample(["i0", "i1", "i2"], rng.choice([0, 0, 1, 3])):
                kind = rng.choice([None, "click", "add_to_cart"])
                state.add_click(click(item, rng.random() * 50, request_id=request, kind=kind), config)
            if rng.random() < 0.2:
                state.add_click(click("i0", 1, request_id=f"held-{n}"), config)
        state.expire(T0 + timedelta(seconds=rng.random() * 200), config)
        assert state.size_bytes() >= len(json.dumps({**state.to_json(), "partition": 3}).encode())
    burst = JoinState()  # many open impressions and nothing else
    for n in range(300):
        burst.add_impression(impression(f"burst-request-{n}", T0), config)
    assert burst.size_bytes() >= len(json.dumps({**burst.to_json(), "partition": 3}).encode())


def test_labeled_ids_are_forgotten_after_their_memory_and_the_state_empties() -> None:
    config = JoinConfig(window_s=60, grace_s=5, labeled_memory_s=100)
    state = JoinState()
    state.add_impression(impression(), config)
    state.expire(T0 + timedelta(seconds=66), config)
    assert state.open == {} and not state.is_empty()  # r1 remembered: a click now is late
    assert state.add_click(click("i0", 70), config) == "late"
    assert state.forget(T0 + timedelta(seconds=165)) == 0
    assert state.forget(T0 + timedelta(seconds=166)) == 1
    assert state.is_empty()


def test_a_state_written_before_the_byte_cap_still_loads() -> None:
    state = JoinState()
    state.add_impression(impression("r2"), CONFIG)
    entry = {key: value for key, value in state.open["r2"].items() if key != "bytes"}
    old = {"open": {"r2": entry}, "waiting": [], "labeled": ["r1"]}
    restored = JoinState.from_json(old)
    assert restored.open["r2"]["bytes"] == state.open["r2"]["bytes"]
    assert restored.add_impression(impression("r1"), CONFIG) == [] and "r1" not in restored.open
    assert restored.forget(T0) == 1  # old ids are forgotten at the next tick


def test_a_clicked_example_carries_its_clicks_kind_through_the_changelog() -> None:
    state = JoinState()
    state.add_impression(impression(), CONFIG)
    assert state.add_click(click("i0", 1, kind="purchase"), CONFIG) == "joined"
    assert state.add_click(click("i0", 2, kind="click"), CONFIG) == "duplicate"  # the first click's kind stays
    assert state.add_click(click("i1", 3), CONFIG) == "joined"  # a producer that sets no kind
    assert state.add_click(click("i2", 4, request_id="r2", kind="add_to_cart"), CONFIG) == "pending"
    restored = JoinState.from_json(json.loads(json.dumps(state.to_json())))
    restored.add_impression(impression("r2"), CONFIG)  # the held click joins, with its kind
    labeled, _ = restored.expire(T0 + timedelta(hours=1), CONFIG)
    assert [(e.request_id, e.item_id, e.clicked, e.kind) for e in labeled] == [
        ("r1", "i0", True, "purchase"),
        ("r1", "i1", True, None),
        ("r1", "i2", False, None),
        ("r2", "i0", False, None),
        ("r2", "i1", False, None),
        ("r2", "i2", True, "add_to_cart"),
    ]


def test_a_state_written_before_click_kinds_still_loads_and_labels_without_a_kind() -> None:
    old = {
        "open": {"r1": {"impression": impression().model_dump(mode="json"), "clicked": {"i1": T0.isoformat()}}},
        "waiting": [],
        "labeled": {},
    }
    restored = JoinState.from_json(old)
    assert restored.add_click(click("i2", 3, kind="view"), CONFIG) == "joined"
    labeled, _ = restored.expire(T0 + timedelta(hours=1), CONFIG)
    assert [(e.item_id, e.clicked, e.kind) for e in labeled] == [
        ("i0", False, None),
        ("i1", True, None),
        ("i2", True, "view"),
    ]


def test_each_example_carries_its_items_propensity_through_the_changelog() -> None:
    logged = impression().model_copy(
        update={
            "items": [
                ImpressionItem(item_id="i0", score=0.9, position=0, propensity=1.0, explored=False),
                ImpressionItem(item_id="i1", score=0.8, position=1, propensity=0.05, explored=True),
            ]
        }
    )
    state = JoinState()
    state.add_impression(logged, CONFIG)
    assert state.add_click(click("i1", 1), CONFIG) == "joined"
    restored = JoinState.from_json(json.loads(json.dumps(state.to_json())))
    labeled, _ = restored.expire(T0 + timedelta(hours=1), CONFIG)
    assert [(e.item_id, e.clicked, e.propensity, e.explored) for e in labeled] == [
        ("i0", False, 1.0, False),
        ("i1", True, 0.05, True),
    ]
