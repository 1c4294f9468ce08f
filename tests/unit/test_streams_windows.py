"""Window state rules with hand-computed values (``streams.windows``)."""

from __future__ import annotations

import random

import pytest

from streams.windows import (
    US_PER_S,
    EntityState,
    Outcome,
    WindowConfig,
    apply,
    id_hash,
    item_features,
    user_features,
    window_counts,
)

H = 3600
CONFIG = WindowConfig.from_seconds(allowed_lateness_s=2 * H)  # retention = max(24 h, 2 h) = 24 h


def at(seconds: float) -> int:
    return round(seconds * US_PER_S)


def test_counts_are_relative_to_the_latest_event_and_exclude_the_window_start() -> None:
    state = EntityState()
    # events at 0 h, 23 h, 23.5 h and 24 h: at t=24 h, count_1h covers (23 h, 24 h], count_24h (0 h, 24 h]
    for index, hours in enumerate((0, 23, 23.5, 24)):
        assert apply(state, at(hours * H), f"e{index}", f"i{index}", CONFIG) is Outcome.ACCEPTED
    assert window_counts(state, CONFIG) == {"count_1h": 2, "count_24h": 3}
    features = user_features(state, CONFIG)
    assert features == {
        "recent_items": ["i3", "i2", "i1", "i0"],
        "count_1h": 2,
        "count_24h": 3,
        "last_event_ts": 24 * H,
    }


def test_old_events_are_evicted_beyond_retention_but_still_counted_within() -> None:
    state = EntityState()
    apply(state, at(0), "a", None, CONFIG)
    apply(state, at(10 * H), "b", None, CONFIG)
    apply(state, at(30 * H), "c", None, CONFIG)  # retention 24 h: "a" (0 h) goes, "b" (10 h) stays
    assert state.times == [at(10 * H), at(30 * H)]
    assert state.ids == [id_hash("b"), id_hash("c")]
    assert window_counts(state, CONFIG) == {"count_1h": 1, "count_24h": 2}


def test_a_redelivered_event_changes_nothing() -> None:
    state = EntityState()
    apply(state, at(100), "e1", "i1", CONFIG)
    apply(state, at(200), "e2", "i2", CONFIG)
    before = EntityState.from_bytes(state.to_bytes())
    assert apply(state, at(100), "e1", "i1", CONFIG) is Outcome.DUPLICATE
    assert apply(state, at(200), "e2", "i2", CONFIG) is Outcome.DUPLICATE
    assert state == before


def test_out_of_order_inside_lateness_lands_in_the_right_window_and_later_is_dropped() -> None:
    state = EntityState()
    apply(state, at(10 * H), "now", "i-now", CONFIG)
    # 30 min late: inside the 1 h window
    assert apply(state, at(10 * H - 1800), "late-30m", "i-30m", CONFIG) is Outcome.ACCEPTED
    # 90 min late: outside the 1 h window, inside 24 h, inside the 2 h lateness
    assert apply(state, at(10 * H - 5400), "late-90m", "i-90m", CONFIG) is Outcome.ACCEPTED
    # 3 h late: beyond the allowed 2 h, dropped although it would be inside 24 h
    assert apply(state, at(7 * H), "late-3h", "i-3h", CONFIG) is Outcome.LATE
    assert user_features(state, CONFIG) == {
        "recent_items": ["i-now", "i-30m", "i-90m"],
        "count_1h": 2,
        "count_24h": 3,
        "last_event_ts": 10 * H,
    }
    # exactly at the lateness boundary is still accepted
    assert apply(state, at(8 * H), "edge", "i-edge", CONFIG) is Outcome.ACCEPTED


def test_recent_items_are_distinct_newest_first_ties_by_item_and_bounded() -> None:
    config = WindowConfig(allowed_lateness_us=at(24 * H), recent_max=3)
    state = EntityState()
    apply(state, at(10), "e1", "a", config)
    apply(state, at(20), "e2", "b", config)
    apply(state, at(30), "e3", "a", config)  # "a" moves to the front
    assert [item for _, item in state.recent] == ["a", "b"]
    apply(state, at(30), "e4", "c", config)  # same second as "a": "c" > "a" as strings, so first
    apply(state, at(5), "e5", "z", config)  # older than everything and the list is full: not kept
    assert [item for _, item in state.recent] == ["c", "a", "b"]
    apply(state, at(15), "e6", "b", config)  # an older event of "b" does not move it
    assert [item for _, item in state.recent] == ["c", "a", "b"]
    apply(state, at(40), "e7", "d", config)  # "b" falls off the end
    assert [item for _, item in state.recent] == ["d", "c", "a"]


def test_features_do_not_depend_on_arrival_order_when_lateness_covers_the_windows() -> None:
    """With lateness >= 24 h, any order of the same events gives the same features."""
    config = WindowConfig.from_seconds(allowed_lateness_s=24 * H)
    rng = random.Random(7)
    events = [(at(rng.uniform(0, 72 * H)), f"e{n}", f"i{rng.randrange(30)}") for n in range(300)]
    reference = None
    for _ in range(5):
        rng.shuffle(events)
        state = EntityState()
        for time_us, event_id, item_id in events + events[:50]:  # with some redeliveries
            apply(state, time_us, event_id, item_id, config)
        features = user_features(state, config)
        reference = reference or features
        assert features == reference
    latest = max(time for time, _, _ in events)
    assert reference is not None
    assert reference["count_24h"] == sum(1 for time, _, _ in events if time > latest - at(24 * H))
    assert reference["count_1h"] == sum(1 for time, _, _ in events if time > latest - at(H))


def test_version_strictly_increases_even_within_one_instant() -> None:
    state = EntityState()
    versions = []
    for index in range(3):
        apply(state, at(50), f"same-second-{index}", None, CONFIG)
        versions.append(state.version_us)
    apply(state, at(49), "a-bit-late", None, CONFIG)
    versions.append(state.version_us)
    apply(state, at(60), "later", None, CONFIG)
    versions.append(state.version_us)
    assert versions == [at(50), at(50) + 1, at(50) + 2, at(50) + 3, at(60)]
    apply(state, at(60), "later", None, CONFIG)  # a duplicate does not move the version
    assert state.version_us == at(60)


def test_item_features_follow_the_trending_formula() -> None:
    config = WindowConfig.from_seconds(allowed_lateness_s=24 * H)
    state = EntityState()
    for index in range(6):
        apply(state, at(H * 10 + index), f"recent-{index}", None, config)
    for index in range(18):
        apply(state, at(H * 2 + index), f"earlier-{index}", None, config)
    # count_1h = 6, count_24h = 24 -> 6 / (1 + 24 / 24) = 3.0
    assert item_features(state, config) == {"count_1h": 6, "count_24h": 24, "trending_score": 3.0}


def test_state_round_trips_through_its_changelog_encoding() -> None:
    state = EntityState()
    for index in range(25):
        apply(state, at(index * 60), f"event-{index}", f"item-é-{index % 7}", CONFIG)
    decoded = EntityState.from_bytes(state.to_bytes())
    assert decoded == state
    assert decoded.seen == state.seen
    assert apply(decoded, at(0), "event-0", "x", CONFIG) is Outcome.DUPLICATE


def test_corrupt_state_is_refused() -> None:
    raw = EntityState(times=[1], ids=[2], recent=[(1, "a")], version_us=1).to_bytes()
    with pytest.raises(ValueError, match="corrupt"):
        EntityState.from_bytes(raw[:-3] + b"[]")


def test_empty_state_has_no_features() -> None:
    with pytest.raises(ValueError, match="accepted event"):
        user_features(EntityState(), CONFIG)
