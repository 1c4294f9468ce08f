"""Push validation and the offline push log (files only; the online path is in integration)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from features import push_log, views
from features.errors import FeaturesError, PushValidationError
from features.settings import FeaturesSettings
from features.store import open_store
from streamrec.core.attributes import AttributeSchema, write_schema
from streamrec.core.settings import PathSettings, RedisSettings
from streamrec.ops.stack.ports import free_ports

# No attribute schema in the data dir: one-kind stream views, as a dataset without kinds has.
USER_ACTIVITY = views.user_activity_view(AttributeSchema())
ITEM_STATS = views.item_stats_view(AttributeSchema())


@pytest.fixture
def settings(tmp_path: Path) -> FeaturesSettings:
    # Nothing listens on this port: offline pushes must not need Redis.
    return FeaturesSettings(paths=PathSettings(state_dir=tmp_path), redis=RedisSettings(port=free_ports(1)[0]))


def activity_rows(user_ids: list[str], when: str) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": user_ids,
            "recent_items": [["3", "2", "1"] for _ in user_ids],
            "count_1h": [3] * len(user_ids),
            "count_24h": [5] * len(user_ids),
            "last_event_ts": [int(pd.Timestamp(when).timestamp())] * len(user_ids),
            "event_timestamp": pd.to_datetime([when] * len(user_ids), utc=True),
        }
    )


def logged(settings: FeaturesSettings, view: views.StreamView) -> pd.DataFrame:
    return pd.concat([pq.read_table(path).to_pandas() for path in push_log.files(settings.data_dir, view)])


def test_open_store_lays_out_the_data_dir_with_schema_seeds(settings: FeaturesSettings) -> None:
    open_store(settings)
    for view in (USER_ACTIVITY, ITEM_STATS):
        seed = views.push_log_dir(settings.data_dir, view.view_name) / push_log.SEED_NAME
        assert pq.read_schema(seed).remove_metadata() == view.schema
        assert push_log.files(settings.data_dir, view) == []
    assert settings.registry_path.parent.is_dir()


def test_an_offline_push_appends_one_file_per_call_with_microsecond_utc_times(settings: FeaturesSettings) -> None:
    from features.push import push_user_activity

    store = open_store(settings)
    rows = activity_rows(["1", "2"], "1998-01-01T00:00:00.123456789")
    rows["event_timestamp"] = rows["event_timestamp"].dt.tz_convert("Europe/Paris")  # any zone is accepted
    assert push_user_activity(store, rows, online=False, offline=True) == 2
    assert push_user_activity(store, activity_rows(["3"], "1998-01-02"), online=False, offline=True) == 1
    assert len(push_log.files(settings.data_dir, USER_ACTIVITY)) == 2
    frame = logged(settings, USER_ACTIVITY)
    assert list(frame["user_id"]) == ["1", "2", "3"]
    assert frame["event_timestamp"].iloc[0] == pd.Timestamp("1998-01-01T00:00:00.123456", tz="UTC")
    assert list(frame["recent_items"].iloc[0]) == ["3", "2", "1"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda f: f.drop(columns=["count_1h"]), r"missing \['count_1h'\]"),
        (lambda f: f.assign(extra=1), r"unexpected \['extra'\]"),
        (lambda f: f.assign(event_timestamp=f["event_timestamp"].dt.tz_localize(None)), "tz-aware"),
        (lambda f: f.assign(count_1h=["many", "more"]), "count_1h"),
        (lambda f: f.assign(user_id=[None, "2"]), "user_id has missing values"),
        (lambda f: f.assign(recent_items=[1, 2]), "recent_items"),
    ],
)
def test_a_bad_frame_is_rejected_whole_and_nothing_is_written(
    settings: FeaturesSettings, change: object, message: str
) -> None:
    from features.push import push_user_activity

    store = open_store(settings)
    bad = change(activity_rows(["1", "2"], "1998-01-01"))  # type: ignore[operator]
    with pytest.raises(PushValidationError, match=message):
        push_user_activity(store, bad, online=True, offline=True)  # online too: it must fail before Redis
    assert push_log.files(settings.data_dir, USER_ACTIVITY) == []


def test_empty_frames_write_nothing_and_a_push_needs_a_target(settings: FeaturesSettings) -> None:
    from features.push import push_item_stats

    store = open_store(settings)
    empty = pd.DataFrame(
        {
            "item_id": pd.Series(dtype=str),
            "count_1h": pd.Series(dtype="int64"),
            "count_24h": pd.Series(dtype="int64"),
            "trending_score": pd.Series(dtype="float64"),
            "event_timestamp": pd.Series(dtype="datetime64[ns, UTC]"),
        }
    )
    assert push_item_stats(store, empty, online=True, offline=True) == 0
    assert push_log.files(settings.data_dir, ITEM_STATS) == []
    with pytest.raises(FeaturesError, match="at least one store"):
        push_item_stats(store, empty, online=False, offline=False)


def test_compact_merges_the_log_into_one_file_keeping_write_order(settings: FeaturesSettings) -> None:
    from features.push import push_user_activity

    store = open_store(settings)
    for day, user in enumerate(["5", "6", "7"], start=1):
        push_user_activity(store, activity_rows([user], f"1998-01-0{day}"), online=False, offline=True)
    before = logged(settings, USER_ACTIVITY).reset_index(drop=True)
    assert push_log.compact(settings.data_dir, USER_ACTIVITY) == 3
    assert len(push_log.files(settings.data_dir, USER_ACTIVITY)) == 1
    pd.testing.assert_frame_equal(logged(settings, USER_ACTIVITY).reset_index(drop=True), before)
    assert push_log.compact(settings.data_dir, USER_ACTIVITY) == 0


def test_per_kind_counts_follow_the_stored_schema_or_the_one_given(settings: FeaturesSettings) -> None:
    from features.push import push_item_stats

    store = open_store(settings)
    kinds = AttributeSchema(event_kinds=("purchase", "view"))
    per_kind = {f"{kind}_{window}": [1] for kind in ("purchase", "view") for window in ("count_1h", "count_24h")}
    stats = pd.DataFrame(
        {
            "item_id": ["i-1"],
            "count_1h": [2],
            "count_24h": [2],
            "trending_score": [1.9],
            **per_kind,
            "event_timestamp": pd.to_datetime(["2024-01-01"], utc=True),
        }
    )
    with pytest.raises(PushValidationError, match=r"unexpected \['purchase_count_1h'"):
        push_item_stats(store, stats, online=False, offline=True)  # the data dir has no schema yet: no kinds
    assert push_item_stats(store, stats, schema=kinds, online=False, offline=True) == 1
    write_schema(settings.data_dir, kinds)
    with pytest.raises(PushValidationError, match=r"missing \['purchase_count_1h'"):
        push_item_stats(store, stats.drop(columns="purchase_count_1h"), online=False, offline=True)
    assert push_item_stats(store, stats, online=False, offline=True) == 1
    view = views.item_stats_view(kinds)
    assert logged(settings, view)["purchase_count_24h"].tolist() == [1, 1]
