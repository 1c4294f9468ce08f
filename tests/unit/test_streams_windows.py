"""Window state rules (``streams.windows``): hand-computed values, and seeded property tests
against a pandas reference computed from the input events."""

from __future__ import annotations

import json
import random
import struct
from typing import Any

import pandas as pd
import pytest
from prometheus_client import REGISTRY

from streamrec.core import contracts
from streamrec.core.attributes import kind_count_feature
from streamrec.core.errors import EventValidationError
from streams.windows import (
    US_PER_S,
    EntityState,
    Outcome,
    OversizeEvent,
    WindowConfig,
    apply,
    id_hash,
    item_features,
    kind_counts,
    record_bytes_bound,
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


# -- bounded state: folding (see "Bounded state" in streams.windows) ------------------------
def fold_model(
    arrivals: list[tuple[int, str, str, str]], config: WindowConfig
) -> tuple[list[str], list[tuple[int, str, str, str]], int]:
    """The documented rules with plain lists and no buckets: each arrival's outcome
    (accepted, duplicate, late, oversize), the accepted events and how many were folded. Only for runs whose buckets
    stay at the starting resolution (no coarsening), where a bucket key is the event's time."""
    exact: list[tuple[int, int, str]] = []  # (time, arrival, event_id), ascending
    horizon: int | None = None
    latest: int | None = None
    outcomes: list[str] = []
    accepted: list[tuple[int, str, str, str]] = []
    folded = 0
    for arrival, event in enumerate(arrivals):
        time_us, event_id = event[0], event[1]
        if any(kept_id == event_id for _, _, kept_id in exact):
            outcomes.append("duplicate")
        elif latest is not None and time_us < latest - config.allowed_lateness_us:
            outcomes.append("late")
        elif horizon is not None and time_us <= horizon:
            outcomes.append("oversize")
        else:
            outcomes.append("accepted")
            accepted.append(event)
            exact.append((time_us, arrival, event_id))
            exact.sort()
            if latest is None or time_us > latest:
                latest = time_us
                cutoff = latest - config.retention_us
                exact = [kept for kept in exact if kept[0] >= cutoff]
                if horizon is not None and horizon < cutoff:
                    horizon = None  # every bucket left with retention
            if len(exact) > config.max_exact_events:  # fold a chunk: 1/64 of the cap, at least one
                chunk = len(exact) - (config.max_exact_events - config.max_exact_events // 64)
                horizon, exact = exact[chunk - 1][0], exact[chunk:]
                folded += chunk
    return outcomes, accepted, folded


def mostly_ordered_arrivals(rng: random.Random, count: int, kinds: tuple[str, ...]) -> list[tuple[int, str, str, str]]:
    """``random_arrivals``' events in time order, shuffled within blocks of 8, with a fifth of
    them redelivered a while later: what a hot entity gets."""
    events = sorted(random_arrivals(rng, count, kinds)[: count + 5])
    for block in range(0, len(events), 8):
        chunk = events[block : block + 8]
        rng.shuffle(chunk)
        events[block : block + 8] = chunk
    for event in rng.sample(events, k=count // 5):
        events.insert(rng.randrange(events.index(event), len(events) + 1), event)
    return events


def counter(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def apply_outcome(state: EntityState, event: tuple[int, str, str, str], config: WindowConfig) -> str:
    time_us, event_id, item_id, kind = event
    try:
        return apply(state, time_us, event_id, item_id, config, kind).value
    except OversizeEvent:
        return "oversize"


def hot_hour(count: int, kinds: tuple[str, ...], seed: int) -> list[tuple[int, str, str, str]]:
    """``count`` events of one entity in one hour of whole seconds, a little out of order."""
    rng = random.Random(seed)
    start = at(880_000_000)
    events = [(start + at(n * 3600 // count), f"hot-{n}", f"i{n % 50}", rng.choice(kinds)) for n in range(count)]
    for block in range(0, count, 200):  # shuffled within blocks of 200: out of order, never far
        chunk = events[block : block + 200]
        rng.shuffle(chunk)
        events[block : block + 200] = chunk
    return events


@pytest.mark.parametrize("seed", range(20))
def test_folding_keeps_exact_counts_and_refuses_only_what_it_cannot_deduplicate(seed: int) -> None:
    """Property: with small caps, each arrival's outcome is the documented rule's (a plain-list
    model), the features equal the pandas reference over the accepted events, the record stays
    under the bound and survives its encoding."""
    rng = random.Random(seed)
    counted_kinds = tuple(rng.sample(KINDS, k=rng.choice((0, 2, 3))))
    config = WindowConfig(
        allowed_lateness_us=at(rng.choice((0.5 * H, 24 * H, 30 * H))),
        recent_max=rng.choice((3, 20)),
        counted_kinds=counted_kinds,
        max_exact_events=rng.choice((1, 5, 40, 130)),
        max_fold_buckets=10_000,  # never coarsens: the model's counts are exact
    )
    arrivals = mostly_ordered_arrivals(rng, rng.randrange(50, 300), KINDS)
    # whole seconds, as MovieLens and the synthetic data have
    arrivals = [(time_us - time_us % US_PER_S, event_id, item, kind) for time_us, event_id, item, kind in arrivals]
    want_outcomes, accepted, want_folded = fold_model(arrivals, config)
    state = EntityState()
    folded_before = counter("streams_folded_events_total")
    bound = record_bytes_bound(config.max_exact_events, config.max_fold_buckets, config.recent_max, counted_kinds)
    outcomes = []
    for step, event in enumerate(arrivals):
        outcomes.append(apply_outcome(state, event, config))
        assert len(state.times) <= config.max_exact_events
        if step % 13 == 0:
            raw = state.to_bytes()
            assert len(raw) <= bound
            state = EntityState.from_bytes(raw)
    assert outcomes == want_outcomes
    assert counter("streams_folded_events_total") - folded_before == want_folded
    frame = pd.DataFrame(accepted, columns=["time_us", "event_id", "item_id", "kind"])
    want = reference_features(frame, counted_kinds, config.recent_max)
    assert user_features(state, config) == want
    counts = {name: value for name, value in want.items() if "count" in name}
    assert item_features(state, config) == {
        **counts,
        "trending_score": contracts.trending_score(want["count_1h"], want["count_24h"]),
    }


def test_a_hot_hour_of_70000_events_stays_under_the_record_cap_with_exact_features() -> None:
    """Fault 8's item half in memory: 70,000 events of one entity in one hour of event time,
    with the worker's default caps and three kinds."""
    config = WindowConfig.from_seconds(allowed_lateness_s=24 * H, counted_kinds=KINDS[:2])
    events = hot_hour(70_000, KINDS, seed=3)
    state = EntityState()
    folded_before = counter("streams_folded_events_total")
    assert {apply_outcome(state, event, config) for event in events} == {"accepted"}
    raw = state.to_bytes()
    assert len(raw) <= config.max_record_bytes < 1024 * 1024
    assert config.fold_to_events <= len(state.times) <= config.max_exact_events
    assert counter("streams_folded_events_total") - folded_before == 70_000 - len(state.times)
    assert state.fold_resolution_us == 1  # 3,600 seconds x 3 kind codes fit without coarsening
    frame = pd.DataFrame(events, columns=["time_us", "event_id", "item_id", "kind"])
    want = reference_features(frame, KINDS[:2], config.recent_max)
    counts = {name: value for name, value in want.items() if "count" in name}
    assert counts["count_1h"] == 70_000
    assert item_features(state, config) == {**counts, "trending_score": contracts.trending_score(70_000, 70_000)}
    # Redelivered: exact events are duplicates, folded ones oversize; nothing changes either way.
    restored = EntityState.from_bytes(raw)
    assert restored == state
    oversize_before = counter("streams_oversize_events_total")
    outcomes = [apply_outcome(restored, event, config) for event in events[::7]]
    assert set(outcomes) == {"duplicate", "oversize"}
    assert counter("streams_oversize_events_total") - oversize_before == outcomes.count("oversize")
    assert restored.to_bytes() == raw


def test_an_oversize_event_is_refused_with_the_reason_and_the_fix() -> None:
    config = WindowConfig(allowed_lateness_us=at(24 * H), max_exact_events=2)
    state = EntityState()
    for second in (10, 20, 30):
        apply(state, at(second), f"e{second}", None, config)
    assert (state.times, state.fold_horizon_us, list(state.fold_counts)) == ([at(20), at(30)], at(10), [1])
    before = state.to_bytes()
    with pytest.raises(OversizeEvent, match="STREAMREC_STREAMS__MAX_EXACT_EVENTS") as refused:
        apply(state, at(10), "new-at-the-horizon", None, config)
    assert refused.value.reason == "oversize"
    assert isinstance(refused.value, EventValidationError)  # the worker dead-letters it
    assert state.to_bytes() == before
    assert apply(state, at(11), "just-after-the-horizon", None, config) is Outcome.ACCEPTED
    assert window_counts(state, config) == {"count_1h": 4, "count_24h": 4}


def test_buckets_leave_with_retention_and_then_nothing_is_folded() -> None:
    config = WindowConfig(allowed_lateness_us=at(2 * H), max_exact_events=1)  # retention 24 h
    state = EntityState()
    apply(state, at(0), "a", None, config)
    apply(state, at(2 * H), "b", None, config)  # "a" folds
    assert (state.fold_horizon_us, list(state.fold_times)) == (at(0), [at(0)])
    apply(state, at(24.5 * H), "c", None, config)  # the bucket of "a" leaves, "b" folds
    assert (state.fold_horizon_us, list(state.fold_times), state.times) == (at(2 * H), [at(2 * H)], [at(24.5 * H)])
    assert window_counts(state, config) == {"count_1h": 1, "count_24h": 2}
    apply(state, at(27 * H), "d", None, config)  # the bucket of "b" leaves, "c" folds
    assert (state.fold_horizon_us, list(state.fold_times)) == (at(24.5 * H), [at(24.5 * H)])
    apply(state, at(60 * H), "e", None, config)  # the last bucket and "d" leave: nothing folded
    assert (state.fold_horizon_us, state.fold_resolution_us, state.times) == (None, 1, [at(60 * H)])
    assert state.to_bytes() == EntityState(times=state.times, ids=state.ids, version_us=state.version_us).to_bytes()
    # the old horizon no longer refuses anything: whatever lies at or before it is late
    assert apply(state, at(24.5 * H), "at-the-old-horizon", None, config) is Outcome.LATE


def test_too_many_buckets_coarsen_and_only_miscount_within_one_resolution_of_a_window_edge() -> None:
    """Coarser buckets overcount at most the folded events within one resolution below a
    window's lower edge, and never undercount."""
    config = WindowConfig(allowed_lateness_us=at(24 * H), max_exact_events=100, max_fold_buckets=64)
    rng = random.Random(5)
    times = sorted(at(rng.uniform(0, 30 * H)) for _ in range(3000))
    state = EntityState()
    for index, time_us in enumerate(times):
        apply(state, time_us, f"e{index}", None, config)
    assert len(state.fold_times) <= 64
    resolution = state.fold_resolution_us
    assert resolution > US_PER_S
    latest = times[-1]
    horizon = state.fold_horizon_us
    assert horizon is not None
    folded = [time_us for time_us in times if time_us <= horizon]
    got = window_counts(state, config)
    for window, seconds in contracts.WINDOWS_S.items():
        edge = latest - seconds * US_PER_S
        want = sum(time_us > edge for time_us in times)
        slack = sum(edge - resolution < time_us <= edge for time_us in folded)
        assert want <= got[window] <= want + slack
    assert EntityState.from_bytes(state.to_bytes()) == state


def test_a_folded_state_with_kinds_round_trips_and_adopts_other_kinds() -> None:
    before = WindowConfig(allowed_lateness_us=at(2 * H), counted_kinds=("view", "purchase"), max_exact_events=2)
    state = EntityState()
    for index, kind in enumerate(["view", "purchase", "purchase", "click", "view"]):
        apply(state, at(60 * index), f"e{index}", None, before, kind)
    assert (list(state.fold_kinds), list(state.fold_counts)) == ([1, 2, 2], [1, 1, 1])
    decoded = EntityState.from_bytes(state.to_bytes())
    assert decoded == state
    after = WindowConfig(allowed_lateness_us=at(2 * H), counted_kinds=("purchase", "view"), max_exact_events=2)
    assert kind_counts(decoded, after) == {
        "purchase_count_1h": 2,
        "purchase_count_24h": 2,
        "view_count_1h": 2,
        "view_count_24h": 2,
    }
    apply(decoded, at(300), "e5", None, after, "purchase")  # recodes exact and folded kinds
    assert (decoded.kind_names, list(decoded.fold_kinds)) == (("purchase", "view"), [2, 1, 1, 0])
    assert kind_counts(decoded, after)["purchase_count_1h"] == 3
    one_kind = WindowConfig(allowed_lateness_us=at(2 * H), max_exact_events=2)
    apply(decoded, at(360), "e6", None, one_kind, "view")
    assert (decoded.kind_names, decoded.fold_kinds) == ((), bytearray())
    assert window_counts(decoded, one_kind) == {"count_1h": 7, "count_24h": 7}
    assert EntityState.from_bytes(decoded.to_bytes()) == decoded


def test_corrupt_buckets_are_refused() -> None:
    config = WindowConfig(allowed_lateness_us=at(2 * H), max_exact_events=1)
    state = EntityState()
    apply(state, at(1), "e1", None, config)
    apply(state, at(2), "e2", None, config)
    raw = state.to_bytes()
    with pytest.raises(ValueError, match="corrupt"):
        EntityState.from_bytes(raw[:-3] + b"]")


def test_caps_over_the_record_limit_are_refused_naming_the_settings() -> None:
    assert record_bytes_bound(20_000, 30_000, contracts.RECENT_ITEMS_MAX, ()) <= 900_000
    with pytest.raises(ValueError, match="STREAMREC_STREAMS__MAX_EXACT_EVENTS"):
        WindowConfig.from_seconds(allowed_lateness_s=H, max_exact_events=60_000)
    with pytest.raises(ValueError, match="max_fold_buckets"):
        WindowConfig(allowed_lateness_us=at(H), counted_kinds=KINDS, max_fold_buckets=7)
