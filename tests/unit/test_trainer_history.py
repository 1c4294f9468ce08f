"""The trainer's per-user stream state agrees with the offline example builder, and the replay
buffer is a bounded, uniform, deterministic sample."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from online_trainer.buffer import ReplayBuffer
from online_trainer.examples import example_columns, examples_from_interactions
from online_trainer.history import UserHistories, UserHistory
from streamrec.core import contracts
from streamrec.core.attributes import AttributeSchema

KINDS = AttributeSchema(event_kinds=("add_to_cart", "purchase", "view"))


def _interactions(n: int, *, users: int = 5, items: int = 30, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    # seconds apart with gaps of up to 2 h, so the 1 h and 24 h windows both cut somewhere
    seconds = 1_000_000 + np.cumsum(rng.integers(1, 7200, size=n))
    return pd.DataFrame(
        {
            "event_id": [f"e{i}" for i in range(n)],
            "user_id": rng.integers(0, users, size=n).astype(str),
            "item_id": rng.integers(0, items, size=n).astype(str),
            "kind": rng.choice(KINDS.event_kinds, size=n),
            "event_time": pd.to_datetime(seconds, unit="s", utc=True),
        }
    )


def test_online_state_gives_the_same_examples_as_the_offline_builder() -> None:
    interactions = _interactions(400)
    offline = examples_from_interactions(interactions, None, KINDS)
    histories = UserHistories()
    online: dict[str, list[object]] = {"recent_items": []}
    for row in interactions.itertuples():
        history = histories.get(row.user_id)
        online["recent_items"].append(list(history.recent_items))
        for name, value in history.counts(KINDS.counted_kinds).items():
            online.setdefault(name, []).append(value)
        assert history.accept(row.event_id, row.item_id, int(row.event_time.timestamp()), row.kind)
    assert online["recent_items"] == [list(items) for items in offline["recent_items"]]
    assert len(online) == 1 + 2 + 2 * 3  # the windows and each kind's
    for name, values in online.items():
        if name != "recent_items":
            assert values == offline[name].tolist(), name
    assert max(online["count_24h"]) > max(online["count_1h"]) > 0  # the data exercised both windows
    assert max(online["purchase_count_1h"]) > 0


def test_hand_computed_state() -> None:
    history = UserHistory()
    t = 1_000_000
    events = [("a", "1", t, "view"), ("b", "2", t + 10, "purchase"), ("c", "1", t + 3600, "view")]
    for event_id, item, second, kind in [*events, ("d", "3", t + 3610, "view")]:
        history.accept(event_id, item, second, kind)
    assert history.recent_items == ["3", "1", "2"]  # distinct, newest first
    # at t + 3610: 1 h window (t + 10, t + 3610] holds c, d; 24 h holds all four
    assert history.counts() == {"count_1h": 2, "count_24h": 4}
    assert history.counts(("purchase", "view")) == {
        "count_1h": 2,
        "count_24h": 4,
        "purchase_count_1h": 0,
        "purchase_count_24h": 1,
        "view_count_1h": 2,
        "view_count_24h": 3,
    }
    assert not history.accept("c", "9", t + 3620)  # redelivered event id: nothing changes
    assert history.recent_items == ["3", "1", "2"]
    history.accept("e", "4", t + 3610 + 24 * 3600)
    assert history.counts() == {"count_1h": 1, "count_24h": 1}
    assert history.event_ids == ["e"]  # events outside the longest window are forgotten


def test_recent_items_are_bounded() -> None:
    history = UserHistory()
    for i in range(contracts.RECENT_ITEMS_MAX + 5):
        history.accept(f"e{i}", f"item{i}", 1000 + i)
    assert len(history.recent_items) == contracts.RECENT_ITEMS_MAX
    assert history.recent_items[0] == f"item{contracts.RECENT_ITEMS_MAX + 4}"


def test_histories_round_trip_through_a_frame() -> None:
    histories = UserHistories.from_interactions(_interactions(200))
    restored = UserHistories.from_frame(histories.to_frame())
    for user in map(str, range(5)):
        assert restored.snapshot(user) == histories.snapshot(user)
    assert restored.snapshot("nobody") == ([], {"count_1h": 0, "count_24h": 0})
    assert restored.snapshot("1", KINDS.counted_kinds) == histories.snapshot("1", KINDS.counted_kinds)
    assert restored.snapshot("nobody", ("view",)) == ([], {"count_1h": 0, "count_24h": 0, **_zero_view()})


def _zero_view() -> dict[str, int]:
    return {"view_count_1h": 0, "view_count_24h": 0}


def _examples(n: int, start: int = 0) -> pd.DataFrame:
    frame = examples_from_interactions(_interactions(n, seed=start), None, KINDS)
    frame["item_id"] = [f"x{start + i}" for i in range(n)]  # unique ids to follow rows
    return frame


def test_replay_buffer_is_bounded_and_deterministic() -> None:
    first, second = ReplayBuffer(100), ReplayBuffer(100)
    for chunk in range(5):
        first.add(_examples(80, start=chunk * 80))
        second.add(_examples(80, start=chunk * 80))
    assert len(first) == 100 and first.seen == 400
    assert first.frame["item_id"].tolist() == second.frame["item_id"].tolist()
    assert first.frame["item_id"].is_unique
    assert list(first.frame.columns) == list(example_columns(KINDS))


def test_replay_buffer_samples_all_ages_uniformly() -> None:
    buffer = ReplayBuffer(1000)
    rows = _examples(500)
    for chunk in range(20):  # 10,000 examples in arrival order, each chunk tagged with its position
        rows["item_id"] = [str(chunk * 500 + i) for i in range(500)]
        buffer.add(rows)
    positions = buffer.frame["item_id"].astype(int)
    # a uniform sample keeps about as many rows from each half and each tenth of the stream
    assert 0.45 < float((positions < 5000).mean()) < 0.55
    per_tenth = np.bincount(positions // 1000, minlength=10)
    assert per_tenth.min() > 70 and per_tenth.max() < 130


def test_replay_sample_and_mix_size() -> None:
    buffer = ReplayBuffer(200)
    buffer.add(_examples(150))
    sample = buffer.sample(40, seed=3)
    assert len(sample) == 40 and sample["item_id"].is_unique
    assert sample["item_id"].tolist() == buffer.sample(40, seed=3)["item_id"].tolist()
    assert buffer.replay_count(100, 0.5) == 100
    assert buffer.replay_count(100, 0.8) == 150  # capped by what the buffer holds
    assert buffer.replay_count(100, 0.0) == 0
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(-1)
