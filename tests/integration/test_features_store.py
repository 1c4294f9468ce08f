"""The feature store on a real Redis: set-up, online reads through the services, pushes."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from feast import FeatureStore

from features import store as feature_store
from features.settings import FeaturesSettings, FeatureStoreTuning
from features.watch import ActivityWatch
from streamrec.core import contracts
from streamrec.core.attributes import read_schema
from streamrec.core.settings import PathSettings
from streamrec.datasets.description import ML100K_ITEM_ATTRIBUTES, ML100K_USER_ATTRIBUTES
from streamrec.datasets.movielens import load_items, load_users
from streamrec.ops.settings import StackSettings

SAMPLE_USERS = ["1", "2", "405", "943"]
SAMPLE_ITEMS = ["1", "50", "267", "1682"]
USER_ATTRIBUTES = [attribute.name for attribute in ML100K_USER_ATTRIBUTES]
ITEM_ATTRIBUTES = [attribute.name for attribute in ML100K_ITEM_ATTRIBUTES]


@pytest.fixture(scope="module")
def settings(
    local_stack: object, stack_settings: StackSettings, tmp_path_factory: pytest.TempPathFactory
) -> FeaturesSettings:
    # A project of its own: Feast's Redis keys are prefixed with it, so other tests on this
    # Redis never see these rows.
    return FeaturesSettings(
        redis=stack_settings.redis,
        paths=PathSettings(state_dir=Path(tmp_path_factory.mktemp("features_store"))),
        features=FeatureStoreTuning(project=f"t{uuid.uuid4().hex[:10]}"),
    )


@pytest.fixture(scope="module")
def store(settings: FeaturesSettings) -> Iterator[FeatureStore]:
    report = feature_store.setup(settings)  # the default dataset: ml-100k
    assert (report.dataset, report.switched) == ("ml-100k", True)
    assert report.profile_rows == {"user_profile": 943, "item_profile": 1682}
    yield feature_store.open_store(settings)


def user_activity(user_id: str, when: str, count_1h: int, recent: list[str]) -> pd.DataFrame:
    stamp = pd.Timestamp(when, tz="UTC")
    return pd.DataFrame(
        {
            "user_id": [user_id],
            "recent_items": [recent],
            "count_1h": [count_1h],
            "count_24h": [count_1h + 10],
            "last_event_ts": [int(stamp.timestamp())],
            "event_timestamp": [stamp],
        }
    )


def online_user(store: FeatureStore, user_id: str) -> dict[str, object]:
    row = feature_store.read_online(store, contracts.USER_FEATURE_SERVICE, [user_id]).iloc[0]
    return {str(key): value for key, value in row.items()}


def test_the_user_service_serves_the_ml100k_profile(store: FeatureStore) -> None:
    users = load_users().set_index("user_id")
    frame = feature_store.read_online(store, contracts.USER_FEATURE_SERVICE, SAMPLE_USERS)
    assert list(frame["user_id"]) == SAMPLE_USERS
    for _, row in frame.iterrows():
        profile = users.loc[row["user_id"]]
        assert row["age"] == float(profile["age"])
        assert (row["gender"], row["occupation"]) == (profile["gender"], profile["occupation"])
        assert row["zip_prefix"] == profile["zip_code"][:3]
    assert set(frame.columns) == {"user_id", *USER_ATTRIBUTES, *contracts.USER_ACTIVITY_FEATURES}


def test_the_item_service_serves_genres_and_release_year(store: FeatureStore) -> None:
    items = load_items().set_index("item_id")
    frame = feature_store.read_online(store, contracts.ITEM_FEATURE_SERVICE, SAMPLE_ITEMS)
    assert set(frame.columns) == {"item_id", *ITEM_ATTRIBUTES, *contracts.ITEM_STATS_FEATURES}
    for _, row in frame.iterrows():
        item = items.loc[row["item_id"]]
        assert list(row["genres"]) == list(item["genres"])
        if pd.isna(item["release_year"]):
            assert pd.isna(row["release_year"])  # item 267 has no release date in ml-100k
        else:
            assert row["release_year"] == float(item["release_year"])
    assert frame.set_index("item_id")["release_year"].isna().to_dict() == {
        "1": False,
        "50": False,
        "267": True,
        "1682": False,
    }


def test_unknown_entities_come_back_empty(store: FeatureStore) -> None:
    row = online_user(store, "no-such-user")
    assert all(row[name] is None for name in (*USER_ATTRIBUTES, *contracts.USER_ACTIVITY_FEATURES))


def test_pushed_user_activity_is_read_back_beside_the_profile(store: FeatureStore) -> None:
    feature_store.push_user_activity(store, user_activity("2", "1998-03-01T10:00:00", 4, ["9", "8"]), offline=False)
    row = online_user(store, "2")
    assert (row["recent_items"], row["count_1h"], row["count_24h"]) == (["9", "8"], 4, 14)
    assert row["last_event_ts"] == int(pd.Timestamp("1998-03-01T10:00:00", tz="UTC").timestamp())
    assert row["occupation"] == "other"  # the push did not touch the profile view's fields


def test_pushed_item_stats_are_read_back(store: FeatureStore) -> None:
    stats = pd.DataFrame(
        {
            "item_id": ["50", "1"],
            "count_1h": [6, 1],
            "count_24h": [48, 1],
            "trending_score": [contracts.trending_score(6, 48), contracts.trending_score(1, 1)],
            "event_timestamp": pd.to_datetime(["1998-03-01T10:00:00", "1998-03-01T09:00:00"], utc=True),
        }
    )
    assert feature_store.push_item_stats(store, stats, offline=False) == 2
    frame = feature_store.read_online(store, contracts.ITEM_FEATURE_SERVICE, ["50", "1"]).set_index("item_id")
    assert frame.loc["50", "count_24h"] == 48
    assert frame.loc["50", "trending_score"] == pytest.approx(2.0)
    assert frame.loc["1", "count_1h"] == 1


def test_last_write_wins_by_event_time_so_replays_are_harmless(store: FeatureStore) -> None:
    feature_store.push_user_activity(store, user_activity("3", "1998-03-02T12:00:00", 7, ["new"]), offline=False)
    # An older state arriving later (a replay, or a slow partition) must not overwrite it ...
    feature_store.push_user_activity(store, user_activity("3", "1998-03-02T11:00:00", 1, ["old"]), offline=False)
    assert (online_user(store, "3")["count_1h"], online_user(store, "3")["recent_items"]) == (7, ["new"])
    # ... and neither does a row with the same event time (Feast skips equal timestamps).
    feature_store.push_user_activity(store, user_activity("3", "1998-03-02T12:00:00", 99, ["same"]), offline=False)
    assert online_user(store, "3")["count_1h"] == 7
    # Within one batch, too, the newest row of a key wins whatever its position.
    batch = pd.concat(
        [user_activity("3", "1998-03-02T14:00:00", 9, ["newest"]), user_activity("3", "1998-03-02T13:00:00", 8, ["x"])]
    )
    feature_store.push_user_activity(store, batch, offline=False)
    assert online_user(store, "3")["count_1h"] == 9
    # A newer row lands; the timestamps Feast keeps are the event times, not the write times.
    feature_store.push_user_activity(
        store, user_activity("3", "1998-03-02T14:00:00.000001", 10, ["tie-broken"]), offline=False
    )
    frame = feature_store.read_online(store, contracts.USER_FEATURE_SERVICE, ["3"], include_event_timestamps=True)
    assert frame.loc[0, "count_1h"] == 10
    assert frame.loc[0, "count_1h__ts"] == int(pd.Timestamp("1998-03-02T14:00:00", tz="UTC").timestamp())


def test_setup_is_idempotent_and_keeps_the_stream_rows(store: FeatureStore, settings: FeaturesSettings) -> None:
    feature_store.push_user_activity(store, user_activity("5", "1998-03-05T10:00:00", 2, ["7"]), offline=False)
    report = feature_store.setup(settings, "ml-100k")
    assert (report.switched, report.profile_rows) == (False, {"user_profile": 943, "item_profile": 1682})
    assert online_user(store, "1")["occupation"] == "technician"
    assert online_user(store, "5")["recent_items"] == ["7"]  # same dataset: its activity stays
    names = sorted(view.name for view in store.list_feature_views())
    assert names == sorted(
        [
            contracts.USER_PROFILE_VIEW,
            contracts.ITEM_PROFILE_VIEW,
            contracts.USER_ACTIVITY_VIEW,
            contracts.ITEM_STATS_VIEW,
        ]
    )


@dataclass(frozen=True)
class Row:
    """One entity's row as the streams worker hands it to ``features.push.RowWriter``."""

    entity_id: str
    features: dict[str, object]
    version_us: int


def test_the_row_writer_stores_exactly_what_a_frame_push_stores(
    store: FeatureStore, settings: FeaturesSettings
) -> None:
    """The worker's ``RowWriter`` skips pandas and the per-push registry reads, not Feast's format."""
    import redis

    from features import views
    from features.push import RowWriter

    when = pd.Timestamp("1998-04-01T08:00:00.000123", tz="UTC")
    features = {"recent_items": ["7", "3"], "count_1h": 2, "count_24h": 12, "last_event_ts": int(when.timestamp())}
    frame = user_activity("30", "1998-04-01T08:00:00.000123", 2, ["7", "3"])
    feature_store.push_user_activity(store, frame, offline=False)
    writer = RowWriter(store, views.user_activity_view(read_schema(settings.data_dir)))
    version_us = (when - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(microseconds=1)
    assert writer.write([Row("31", features, version_us)], online=True, offline=False) == 1

    def stored(user_id: str) -> dict[bytes, bytes]:
        """The user_activity fields of the user's Redis hash (profile fields share the hash)."""
        from feast.infra.online_stores.helpers import _mmh3
        from feast.infra.online_stores.redis import _redis_key
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        entity_key = EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=user_id)])
        key = _redis_key(store.config.project, entity_key, entity_key_serialization_version=3)
        fields = [b"_ts:user_activity", *(_mmh3(f"user_activity:{name}") for name in features)]
        client = redis.Redis(host=settings.redis.host, port=settings.redis.port, db=settings.redis.db)
        return dict(zip(fields, client.hmget(key, fields), strict=True))

    # same fields and bytes (the key differs only by the entity id), and the same read back
    assert None not in stored("30").values()
    assert stored("31") == stored("30")
    assert online_user(store, "31")["recent_items"] == ["7", "3"]
    # last write wins by event time on this path too: an older row is skipped
    assert writer.write([Row("31", {**features, "count_1h": 99}, version_us - 1)], online=True, offline=False) == 1
    assert online_user(store, "31")["count_1h"] == 2


def test_activity_watch_shows_pushed_features_and_flags_only_changed_users(store: FeatureStore) -> None:
    """``ActivityWatch`` (``make demo`` and ``streams watch``) reads through Feast and flags changes."""
    watch = ActivityWatch(store, ["70", "71"])
    first = watch.read()
    assert [changed for _, changed in first] == [False, False]  # nothing to compare with yet
    assert re.sub(r"=\s+", "=", first[0][0]).split()[1] == "1h=None"  # no activity row yet

    feature_store.push_user_activity(store, user_activity("70", "1998-01-01T10:00:00", 3, ["50", "172"]), offline=False)
    second = watch.read()
    assert [changed for _, changed in second] == [True, False]
    shown = re.sub(r"=\s+", "=", second[0][0]).split()
    assert shown == ["70", "1h=3", "24h=13", "last=1998-01-01T10:00:00+00:00", "recent=[50,172]"]
    assert [changed for _, changed in watch.read()] == [False, False]


def test_the_row_writer_signals_when_rows_are_readable_online_before_the_offline_log(store: FeatureStore) -> None:
    """The worker's freshness is taken in ``on_online_written``: the row must be readable online by
    then, and the offline log's file must not be written yet (it comes after, off the figure)."""
    from features import push_log, views
    from features.push import RowWriter

    when = pd.Timestamp("1998-04-02T08:00:00", tz="UTC")
    features = {"recent_items": ["9"], "count_1h": 1, "count_24h": 1, "last_event_ts": int(when.timestamp())}
    log_dir = store.config.repo_path
    assert log_dir is not None
    stream = views.user_activity_view(read_schema(log_dir))
    writer = RowWriter(store, stream)
    files_before = len(push_log.files(log_dir, stream))
    seen: dict[str, object] = {}

    def online_written() -> None:
        seen["recent_items"] = online_user(store, "40")["recent_items"]
        seen["log_files"] = len(push_log.files(log_dir, stream))

    version_us = (when - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(microseconds=1)
    writer.write([Row("40", features, version_us)], online=True, offline=True, on_online_written=online_written)
    assert seen == {"recent_items": ["9"], "log_files": files_before}
    assert len(push_log.files(log_dir, stream)) == files_before + 1


def test_feast_internals_read_exactly_what_feasts_public_push_wrote(store: FeatureStore) -> None:
    """``features.feast_internals`` (the API's fast reads) against Feast's public write and read."""
    from feast.data_source import PushMode

    from features import feast_internals

    when = pd.Timestamp("1998-05-01T08:00:00.000250", tz="UTC")
    store.push(
        contracts.USER_ACTIVITY_PUSH,
        user_activity("80", "1998-05-01T08:00:00.000250", 5, ["11", "12"]),
        to=PushMode.ONLINE,
    )
    reads = [
        (store.get_feature_view(contracts.USER_PROFILE_VIEW), USER_ATTRIBUTES),
        (store.get_feature_view(contracts.USER_ACTIVITY_VIEW), list(contracts.USER_ACTIVITY_FEATURES)),
    ]
    plan = feast_internals.OneHmgetRead.plan(store, reads)
    assert plan is not None  # Feast's Redis store with redis-py: the API's default path
    refs = [f"{view.name}:{name}" for view, names in reads for name in names]
    for user_id in ("80", "1", "no-such-user"):
        key = feast_internals.entity_key(contracts.USER_JOIN_KEY, user_id)
        per_view = [feast_internals.ViewReader(store, view, names).read([key])[0] for view, names in reads]
        assert plan.read(key) == per_view, user_id
        public = store.get_online_features(features=refs, entity_rows=[{"user_id": user_id}]).to_dict(
            include_event_timestamps=True
        )
        for (_, names), (event_time, values) in zip(reads, per_view, strict=True):
            assert values is not None
            event_ts = int(event_time.timestamp()) if event_time is not None else 0
            for name in names:
                assert feast_internals.python_value(values[name]) == public[name][0], (user_id, name)
                assert event_ts == public[f"{name}__ts"][0], (user_id, name)
    event_time, values = plan.read(feast_internals.entity_key(contracts.USER_JOIN_KEY, "80"))[1]
    assert values is not None and event_time == when.to_pydatetime()  # to the microsecond
    assert {name: feast_internals.python_value(values[name]) for name in contracts.USER_ACTIVITY_FEATURES} == {
        "recent_items": ["11", "12"],
        "count_1h": 5,
        "count_24h": 15,
        "last_event_ts": int(when.timestamp()),
    }


@pytest.mark.parametrize(
    ("view_name", "join_key", "entity_id", "features"),
    [
        (contracts.ITEM_STATS_VIEW, "item_id", "90", {"count_1h": 4, "count_24h": 9, "trending_score": 1.25}),
        (
            contracts.USER_ACTIVITY_VIEW,
            "user_id",
            "81",
            {"recent_items": ["5", "6"], "count_1h": 2, "count_24h": 3, "last_event_ts": 894_009_600},
        ),
    ],
)
def test_rows_written_through_feast_internals_read_back_with_feasts_public_api(
    store: FeatureStore, view_name: str, join_key: str, entity_id: str, features: dict[str, object]
) -> None:
    from features import feast_internals

    view = store.get_feature_view(view_name)
    writer = feast_internals.OnlineWriter(
        store, view, join_key, [(feature.name, feature.dtype.to_value_type()) for feature in view.features]
    )
    when = pd.Timestamp("1998-05-01T09:00:00.000007", tz="UTC")
    writer.write([Row(entity_id, features, (when - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(microseconds=1))])
    public = store.get_online_features(
        features=[f"{view_name}:{name}" for name in features], entity_rows=[{join_key: entity_id}]
    ).to_dict(include_event_timestamps=True)
    assert {name: public[name][0] for name in features} == features
    assert {public[f"{name}__ts"][0] for name in features} == {int(when.timestamp())}
    key = feast_internals.entity_key(join_key, entity_id)
    [(event_time, _)] = feast_internals.ViewReader(store, view, list(features)).read([key])
    assert event_time == when.to_pydatetime()


def test_the_online_redis_client_is_the_one_feast_reads_through(store: FeatureStore) -> None:
    """The API sets its retry policy on this client, so it must be the store's own, kept one."""
    from features import feast_internals

    client = feast_internals.online_redis_client(store)
    assert client is not None and client.ping()
    assert client is store.provider.online_store._get_client(store.config.online_store)
    assert feast_internals.online_redis_client(store) is client
