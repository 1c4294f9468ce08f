"""Point-in-time reads for training: values as of each timestamp, never the latest.

No Redis is needed here (the offline store is files); this sits with the integration tests
because it drives Feast's registry and offline store for real.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from feast import FeatureStore

from features import profiles
from features import store as feature_store
from features.errors import FeaturesError
from features.history import historical_features
from features.settings import FeaturesSettings, FeatureStoreTuning
from streamrec.core import contracts
from streamrec.core.attributes import Attribute, AttributeSchema, user_activity_features, write_schema
from streamrec.core.settings import PathSettings, RedisSettings
from streamrec.datasets.description import load_dataset
from streamrec.datasets.movielens import load_users
from streamrec.ops.stack.ports import free_ports

T1, T2, T3 = (pd.Timestamp(f"1998-02-0{day}T12:00:00", tz="UTC") for day in (1, 2, 3))
HOUR = pd.Timedelta(hours=1)


def activity(user_id: str, when: pd.Timestamp, count_1h: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": [user_id],
            "recent_items": [[f"item-{count_1h}"]],
            "count_1h": [count_1h],
            "count_24h": [count_1h * 10],
            "last_event_ts": [int(when.timestamp())],
            "event_timestamp": [when],
        }
    )


def offline_store(
    folder: Path, schema: AttributeSchema, users: pd.DataFrame | None, items: pd.DataFrame | None
) -> FeatureStore:
    """A store with the dataset's files and registry, on a Redis that is never contacted (offline only)."""
    settings = FeaturesSettings(
        redis=RedisSettings(port=free_ports(1)[0]),
        paths=PathSettings(state_dir=folder),
        features=FeatureStoreTuning(project=f"t{uuid.uuid4().hex[:10]}"),
    )
    write_schema(settings.data_dir, schema)
    profiles.write_profiles(settings.data_dir, profiles.profile_tables(schema, users, items))
    opened = feature_store.open_store(settings)
    feature_store.apply(opened)
    return opened


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FeatureStore]:
    ml100k = load_dataset("ml-100k")
    opened = offline_store(Path(tmp_path_factory.mktemp("features_history")), ml100k.schema, ml100k.users, ml100k.items)
    # User 7 gets a state at t1 < t2 < t3, each pushed separately (one log file each, written
    # out of order to show that event time, not write order, decides); user 8 one at t2.
    for user_id, when, count in (("7", T2, 2), ("7", T1, 1), ("7", T3, 3), ("8", T2, 20)):
        feature_store.push_user_activity(opened, activity(user_id, when, count), online=False, offline=True)
    yield opened


def test_feast_point_in_time_join_returns_the_value_as_of_each_timestamp(store: FeatureStore) -> None:
    """Feast's own get_historical_features, on rows it handles (each has an earlier state)."""
    entity_df = pd.DataFrame(
        {"user_id": ["7", "7", "7", "7"], "event_timestamp": [T1 + HOUR, T2 - HOUR, T2 + HOUR, T3 + HOUR]}
    )
    with warnings.catch_warnings():
        # Raised inside dask on a multi-file source; see features.history.
        warnings.filterwarnings("ignore", message="Downcasting object dtype arrays", category=FutureWarning)
        job = store.get_historical_features(
            entity_df=entity_df, features=store.get_feature_service(contracts.USER_FEATURE_SERVICE)
        )
        frame = job.to_df().sort_values("event_timestamp").reset_index(drop=True)
    assert list(frame["count_1h"]) == [1, 1, 2, 3]
    assert list(frame["occupation"]) == ["administrator"] * 4  # ml-100k user 7's profile, valid at any time


def test_feast_defects_that_features_history_works_around(store: FeatureStore) -> None:
    """If this fails after a Feast upgrade, Feast fixed them: reconsider features.history."""
    service = store.get_feature_service(contracts.USER_FEATURE_SERVICE)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Downcasting object dtype arrays", category=FutureWarning)
        # 1. A row before the user's first state vanishes instead of getting nulls.
        early = pd.DataFrame({"user_id": ["7", "7"], "event_timestamp": [T1 - HOUR, T2 + HOUR]})
        assert len(store.get_historical_features(entity_df=early, features=service).to_df()) == 1
        # 2. A user without any state, read from the multi-file push log, crashes dask.
        unknown = pd.DataFrame({"user_id": ["7", "9"], "event_timestamp": [T2 + HOUR, T2 + HOUR]})
        with pytest.raises(NotImplementedError, match="Divisions calculation failed"):
            store.get_historical_features(entity_df=unknown, features=service).to_df()


def test_historical_features_match_feast_and_keep_every_row(store: FeatureStore) -> None:
    entity_df = pd.DataFrame(
        {
            "user_id": ["7", "7", "7", "7", "7", "8", "9", "7"],
            "event_timestamp": [
                T3 + HOUR,  # latest state
                T1 - HOUR,  # before the user's first state: Feast drops this row, we keep it with nulls
                T1,  # exactly at t1: included (source_ts <= entity_ts)
                T2 - HOUR,  # between t1 and t2: the t1 state, not the latest
                T2 + HOUR,
                T2 + HOUR,  # another user
                T2,  # a user with no activity at all
                T3 + pd.Timedelta(days=31),  # beyond the 30-day TTL of stream views
            ],
            "label": [0, 1, 2, 3, 4, 5, 6, 7],
        }
    )
    frame = historical_features(store, entity_df, contracts.USER_FEATURE_SERVICE)
    assert list(frame["label"]) == list(range(8))  # every row, in the caller's order
    assert frame["count_1h"].tolist() == [3, pd.NA, 1, 1, 2, 20, pd.NA, pd.NA]
    assert frame["count_24h"].dtype == "Int64"
    assert list(frame.loc[0, "recent_items"]) == ["item-3"]
    assert frame.loc[1, "recent_items"] is None
    occupations = load_users().set_index("user_id")["occupation"]
    assert frame["occupation"].tolist() == [occupations[user] for user in entity_df["user_id"]]  # at any time


def test_duplicate_rows_of_one_instant_resolve_to_the_first_written(store: FeatureStore) -> None:
    # A replay pushes the same state again (harmless); a conflicting state at the same instant
    # loses, as in Redis, which skips a write whose timestamp equals the stored one.
    feature_store.push_user_activity(store, activity("10", T1, 5), online=False, offline=True)
    feature_store.push_user_activity(store, activity("10", T1, 5), online=False, offline=True)
    feature_store.push_user_activity(store, activity("10", T1, 6), online=False, offline=True)
    entity_df = pd.DataFrame({"user_id": ["10", "10"], "event_timestamp": [T1, T1], "label": [1, 0]})
    frame = historical_features(store, entity_df, contracts.USER_FEATURE_SERVICE)
    assert frame["count_1h"].tolist() == [5, 5]


def test_the_item_service_joins_on_item_id(store: FeatureStore) -> None:
    entity_df = pd.DataFrame({"item_id": ["1", "267"], "event_timestamp": [T1, T2]})
    frame = historical_features(store, entity_df, contracts.ITEM_FEATURE_SERVICE)
    assert frame.loc[0, "release_year"] == 1995.0 and pd.isna(frame.loc[1, "release_year"])
    assert frame["trending_score"].isna().all()


def test_bad_entity_frames_are_rejected_with_the_fix(store: FeatureStore) -> None:
    with pytest.raises(FeaturesError, match="tz-aware"):
        historical_features(
            store,
            pd.DataFrame({"user_id": ["7"], "event_timestamp": [pd.Timestamp("1998-01-01")]}),
            contracts.USER_FEATURE_SERVICE,
        )
    with pytest.raises(FeaturesError, match="user_id"):
        historical_features(store, pd.DataFrame({"event_timestamp": [T1]}), contracts.USER_FEATURE_SERVICE)
    with pytest.raises(FeaturesError, match="count_1h"):
        historical_features(
            store,
            pd.DataFrame({"user_id": ["7"], "event_timestamp": [T1], "count_1h": [0]}),
            contracts.USER_FEATURE_SERVICE,
        )


def test_any_schema_reads_its_declared_attributes_and_per_kind_counts(tmp_path: Path) -> None:
    schema = AttributeSchema(
        item=(
            Attribute(name="category", type="categorical"),
            Attribute(name="tags", type="multi_categorical"),
            Attribute(name="price", type="numeric", boundaries=(5.0,)),
        ),
        event_kinds=("purchase", "view"),
    )
    items = pd.DataFrame({"item_id": ["a", "b"], "category": ["hats", ""], "tags": [["x"], []], "price": [3.0, 9.5]})
    store = offline_store(tmp_path, schema, None, items)
    per_kind = {"purchase_count_1h": [1], "purchase_count_24h": [2], "view_count_1h": [4], "view_count_24h": [8]}
    stats = pd.DataFrame(
        {
            "item_id": ["a"],
            "count_1h": [5],
            "count_24h": [10],
            "trending_score": [3.0],
            **per_kind,
            "event_timestamp": [T1],
        }
    )
    feature_store.push_item_stats(store, stats, online=False, offline=True)
    entity_df = pd.DataFrame({"item_id": ["a", "a", "b"], "event_timestamp": [T1 - HOUR, T1 + HOUR, T2]})
    frame = historical_features(store, entity_df, contracts.ITEM_FEATURE_SERVICE)
    assert frame["category"].tolist() == ["hats", "hats", ""]
    assert [list(tags) for tags in frame["tags"]] == [["x"], ["x"], []]
    assert frame["price"].tolist() == [3.0, 3.0, 9.5]
    assert frame["purchase_count_24h"].tolist() == [pd.NA, 2, pd.NA]
    assert frame["view_count_1h"].dtype == "Int64"
    # No user attributes: the user service is the activity view alone.
    users = historical_features(
        store, pd.DataFrame({"user_id": ["u"], "event_timestamp": [T1]}), contracts.USER_FEATURE_SERVICE
    )
    assert list(users.columns) == ["user_id", "event_timestamp", *user_activity_features(schema)]
    assert users.loc[0, "recent_items"] is None
