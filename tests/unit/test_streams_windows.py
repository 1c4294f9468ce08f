"""Window state rules (``streams.windows``): hand-computed values, and seeded property tests
against a pandas reference computed from the input events."""

from __future__ import annotations

import json
import random
import struct
from typing import Any

import pandas as pd
import pytest

from streamrec.core import contracts
from streamrec.core.attributes import kind_count_feature
from streams.windows import (
    US_PER_S,
    EntityState,
    Outcome,
    WindowConfig,
    apply,
    id_hash,
    item_features,
    kind_counts,
    user_features,
    window_counts,
)

H = 3600
CONFIG = WindowConfig.from_seconds(allowed_lateness_s=2 * H)  # retention = max(24 h, 2 h) = 24 h
KINDS = ("view", "add_to_cart", "purchase")


def at(seconds: float) -> int:
    return round(seconds * US_PER_S)


# -- the reference -------------------------------------------------------------------------
def accepted_events(arrivals: list[tuple[int, str, str, str]], lateness_us: int) -> pd.DataFrame:
    """The events a state keeps, in arrival order: the first of each event_id, unless it is older
    than the newest kept event minus the lateness (``contracts``: duplicate, then late)."""
    kept: list[tuple[int, str, str, str]] = []
    seen: set[str] = set()
    latest: int | None = None
    for time_us, event_id, item_id, kind in arrivals:
        if event_id in seen or (latest is not None and time_us < latest - lateness_us):
            continue
        seen.add(event_id)
        latest = time_us if latest is None else max(latest, time_us)
        kept.append((time_us, event_id, item_id, kind))
    return pd.DataFrame(kept, columns=["time_us", "event_id", "item_id", "kind"])


def reference_features(events: pd.DataFrame, counted_kinds: tuple[str, ...], recent_max: int) -> dict[str, Any]:
    """The user row of ``events`` (one entity's accepted events), computed with pandas."""
    latest = int(events["time_us"].max())
    in_window = {
        window: events[events["time_us"] > latest - seconds * US_PER_S]
        for window, seconds in contracts.WINDOWS_S.items()
    }
    recent = events.sort_values(["time_us", "item_id"], ascending=False).drop_duplicates("item_id")
    features: dict[str, Any] = {
        "recent_items": recent["item_id"].head(recent_max).tolist(),
        **{window: len(rows) for window, rows in in_window.items()},
        "last_event_ts": latest // US_PER_S,
    }
    for kind in counted_kinds:
        for window, rows in in_window.items():
            features[kind_count_feature(kind, window)] = int((rows["kind"] == kind).sum())
    return features


def random_arrivals(rng: random.Random, count: int, kinds: tuple[str, ...]) -> list[tuple[int, str, str, str]]:
    """``count`` events over three days, then some redelivered: (time_us, event_id, item_id, kind)."""
    events = [(at(rng.uniform(0, 72 * H)), f"e{n}", f"i{rng.randrange(30)}", rng.choice(kinds)) for n in range(count)]
    # bursts in one instant, so ties in time are exercised too
    events += [(events[0][0], f"tie{n}", f"i{n}", rng.choice(kinds)) for n in range(5)]
    rng.shuffle(events)
    return events + rng.sample(events, k=count // 5)


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


@pytest.mark.parametrize("counted_kinds", [(), KINDS[:2]], ids=["one-kind", "kinds"])
def test_features_do_not_depend_on_arrival_order_when_lateness_covers_the_windows(
    counted_kinds: tuple[str, ...],
) -> None:
    """With lateness >= 24 h, any order of the same events gives the reference's features
    (computed from the set of distinct events); a kind not counted still counts in the totals."""
    config = WindowConfig.from_seconds(allowed_lateness_s=24 * H, counted_kinds=counted_kinds)
    rng = random.Random(7)
    arrivals = random_arrivals(rng, 300, KINDS)
    distinct = pd.DataFrame(arrivals, columns=["time_us", "event_id", "item_id", "kind"]).drop_duplicates("event_id")
    want = reference_features(distinct, counted_kinds, config.recent_max)
    for _ in range(5):
        rng.shuffle(arrivals)
        state = EntityState()
        for time_us, event_id, item_id, kind in arrivals:
            apply(state, time_us, event_id, item_id, config, kind)
        assert user_features(state, config) == want
    kind_features = {kind_count_feature(kind, window) for kind in counted_kinds for window in contracts.WINDOWS_S}
    assert set(want) == {*contracts.USER_ACTIVITY_FEATURES, *kind_features}


@pytest.mark.parametrize("seed", range(20))
def test_any_arrival_order_and_lateness_gives_the_reference_features(seed: int) -> None:
    """Property: for random events, redeliveries, arrival order and lateness, every feature of
    both views equals the pandas reference over the events the contract accepts, and the state
    survives its changelog encoding at every step."""
    rng = random.Random(seed)
    counted_kinds = tuple(rng.sample(KINDS, k=rng.choice((2, 3))))  # sometimes "purchase" is not counted
    config = WindowConfig(
        allowed_lateness_us=at(rng.choice((0, 0.5 * H, 2 * H, 30 * H))),
        recent_max=rng.choice((3, 20)),
        counted_kinds=counted_kinds,
    )
    arrivals = random_arrivals(rng, rng.randrange(1, 200), KINDS)
    state = EntityState()
    for step, (time_us, event_id, item_id, kind) in enumerate(arrivals):
        apply(state, time_us, event_id, item_id, config, kind)
        if step % 17 == 0:
            state = EntityState.from_bytes(state.to_bytes())
    want = reference_features(accepted_events(arrivals, config.allowed_lateness_us), counted_kinds, config.recent_max)
    assert user_features(state, config) == want
    counts = {name: value for name, value in want.items() if "count" in name}
    trending = contracts.trending_score(want["count_1h"], want["count_24h"])
    assert item_features(state, config) == {**counts, "trending_score": trending}
    assert len(state.kinds) == len(state.times)


def test_kind_counts_use_the_window_bounds_of_the_totals() -> None:
    config = WindowConfig.from_seconds(allowed_lateness_s=2 * H, counted_kinds=("view", "purchase"))
    state = EntityState()
    # at t = 24 h: count_1h covers (23 h, 24 h], count_24h (0 h, 24 h]
    for index, (hours, kind) in enumerate(
        [(0, "purchase"), (1, "view"), (23, "purchase"), (23.5, "rating"), (24, "view"), (24, "purchase")]
    ):
        assert apply(state, at(hours * H), f"e{index}", None, config, kind) is Outcome.ACCEPTED
    assert apply(state, at(24 * H), "e5", None, config, "view") is Outcome.DUPLICATE  # the first kind stays
    assert item_features(state, config) == {
        "count_1h": 3,  # the rating counts here, in no kind
        "count_24h": 5,
        "trending_score": contracts.trending_score(3, 5),
        "view_count_1h": 1,
        "view_count_24h": 2,
        "purchase_count_1h": 1,
        "purchase_count_24h": 2,
    }
    apply(state, at(26 * H), "e6", None, config, "purchase")  # evicts 0 h and 1 h (retention 24 h)
    assert state.times == [at(23 * H), at(23.5 * H), at(24 * H), at(24 * H), at(26 * H)]
    assert list(state.kinds) == [2, 0, 1, 2, 2]
    assert kind_counts(state, config) == {
        "view_count_1h": 0,
        "view_count_24h": 1,
        "purchase_count_1h": 1,
        "purchase_count_24h": 3,
    }


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


def test_a_one_kind_state_records_no_kinds_and_keeps_its_changelog_bytes() -> None:
    """No counted kinds: nothing tracked, and the record is the format from before kinds."""
    state = EntityState()
    apply(state, at(10), "e1", "i1", CONFIG, "rating")
    apply(state, at(20), "e2", "i2", CONFIG, "rating")
    assert (state.kinds, state.kind_names) == (bytearray(), ())
    assert set(user_features(state, CONFIG)) == set(contracts.USER_ACTIVITY_FEATURES)
    times = struct.pack("<qq", at(10), at(20))
    ids = struct.pack("<QQ", id_hash("e1"), id_hash("e2"))
    recent = struct.pack("<qq", at(20), at(10)) + b'["i2","i1"]'
    assert state.to_bytes() == struct.pack("<qII", at(20), 2, 2) + times + ids + recent


def test_a_state_with_kinds_round_trips_and_adopts_other_kinds_by_name() -> None:
    before = WindowConfig.from_seconds(allowed_lateness_s=2 * H, counted_kinds=("view", "purchase"))
    state = EntityState()
    for index, kind in enumerate(["view", "purchase", "purchase", "click"]):
        apply(state, at(60 * index), f"e{index}", f"i{index}", before, kind)
    decoded = EntityState.from_bytes(state.to_bytes())
    assert decoded == state
    assert (decoded.kind_names, list(decoded.kinds)) == (("view", "purchase"), [1, 2, 2, 0])
    # the dataset now counts three kinds, in another order: the record is read by kind name
    after = WindowConfig.from_seconds(allowed_lateness_s=2 * H, counted_kinds=("add_to_cart", "purchase", "view"))
    assert kind_counts(decoded, after)["purchase_count_1h"] == 2  # before any new event, too
    apply(decoded, at(300), "e4", "i4", after, "add_to_cart")
    assert kind_counts(decoded, after) == {
        "add_to_cart_count_1h": 1,
        "add_to_cart_count_24h": 1,
        "purchase_count_1h": 2,
        "purchase_count_24h": 2,
        "view_count_1h": 1,
        "view_count_24h": 1,
    }
    # and back to one kind: the kinds are dropped, the record is the one-kind format again
    apply(decoded, at(360), "e5", "i5", CONFIG, "view")
    assert (decoded.kinds, decoded.kind_names) == (bytearray(), ())
    assert EntityState.from_bytes(decoded.to_bytes()).kind_names == ()


def test_a_record_from_before_kinds_counts_its_events_in_no_kind() -> None:
    """An old changelog record (no kinds) restored by a worker that counts kinds: its events stay
    in the totals and count in no kind until they leave the windows."""
    old = EntityState()
    apply(old, at(0), "old", "i0", CONFIG)
    config = WindowConfig.from_seconds(allowed_lateness_s=2 * H, counted_kinds=("view", "purchase"))
    restored = EntityState.from_bytes(old.to_bytes())
    assert kind_counts(restored, config)["view_count_1h"] == 0
    apply(restored, at(60), "new", "i1", config, "view")
    assert user_features(restored, config) | {"recent_items": None} == {
        "recent_items": None,
        "count_1h": 2,
        "count_24h": 2,
        "last_event_ts": 60,
        "view_count_1h": 1,
        "view_count_24h": 1,
        "purchase_count_1h": 0,
        "purchase_count_24h": 0,
    }


def test_corrupt_kinds_are_refused() -> None:
    config = WindowConfig.from_seconds(allowed_lateness_s=2 * H, counted_kinds=("view", "purchase"))
    state = EntityState()
    apply(state, at(1), "e1", None, config, "purchase")
    raw = state.to_bytes()
    tail = json.dumps([[], ["view", "purchase"]], separators=(",", ":")).encode()
    assert raw.endswith(b"\x02" + tail)
    with pytest.raises(ValueError, match="corrupt"):  # a code beyond the kinds it names
        EntityState.from_bytes(raw[: -len(tail) - 1] + b"\x03" + tail)


def test_counted_kinds_must_be_distinct() -> None:
    with pytest.raises(ValueError, match="distinct"):
        WindowConfig.from_seconds(allowed_lateness_s=H, counted_kinds=("view", "view"))


def test_corrupt_state_is_refused() -> None:
    raw = EntityState(times=[1], ids=[2], recent=[(1, "a")], version_us=1).to_bytes()
    with pytest.raises(ValueError, match="corrupt"):
        EntityState.from_bytes(raw[:-3] + b"[]")


def test_empty_state_has_no_features() -> None:
    with pytest.raises(ValueError, match="accepted event"):
        user_features(EntityState(), CONFIG)
