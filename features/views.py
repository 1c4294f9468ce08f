"""Every Feast object of streamrec, built for one data directory.

Why a builder rather than module-level objects: the parquet paths are absolute and depend on
settings (tests use a temporary data dir per module), and the Feast CLI wants module-level
objects. ``features/definitions.py`` (the module the CLI scans) calls ``build`` with the
configured data dir; ``features.store.apply`` calls it with the store's own.

Layout of ``data_dir``::

    user_profile.parquet, item_profile.parquet   ml-100k profiles (``features.store.write_profiles``)
    push_log/user_activity/*.parquet             offline log of pushed stream rows, one file per push
    push_log/item_stats/*.parquet
    registry.db                                  the local Feast registry (unless configured elsewhere)

TTLs: profile views have none (``timedelta(0)`` = forever): a profile is valid at every point in
time, and its rows carry a fixed 1990-01-01 timestamp. Stream views keep ``STREAM_TTL`` (30
days): a point-in-time join looks back at most that far for a user's latest activity row, so a
user idle for longer gets nulls (= "no recent activity") instead of a months-old count, and the
join's scan stays bounded. Feast does not apply TTLs on online reads; serving checks the age
itself (``FeatureStoreTuning.max_feature_age_s``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, FeastType, Float64, Int64, String

from streamrec.core import contracts

EVENT_TIMESTAMP = "event_timestamp"
STREAM_TTL = timedelta(days=30)
PUSH_LOG_DIR = "push_log"

# Feature dtypes, by name, for the columns of streamrec/core/contracts.py.
_USER_PROFILE_SCHEMA: dict[str, FeastType] = {name: String for name in contracts.USER_PROFILE_FEATURES}
_ITEM_PROFILE_SCHEMA: dict[str, FeastType] = {"genres": Array(String), "release_year": Int64}
_USER_ACTIVITY_SCHEMA: dict[str, FeastType] = {
    "recent_items": Array(String),
    "count_1h": Int64,
    "count_24h": Int64,
    "last_event_ts": Int64,
}
_ITEM_STATS_SCHEMA: dict[str, FeastType] = {"count_1h": Int64, "count_24h": Int64, "trending_score": Float64}

_ARROW_TYPES: dict[str, pa.DataType] = {
    "String": pa.string(),
    "Int64": pa.int64(),
    "Float64": pa.float64(),
    "Array(String)": pa.list_(pa.string()),
}


def profile_path(data_dir: Path, view_name: str) -> Path:
    return data_dir / f"{view_name}.parquet"


def push_log_dir(data_dir: Path, view_name: str) -> Path:
    """A parquet *directory* dataset: Feast's file offline store reads it with ``dd.read_parquet``."""
    return data_dir / PUSH_LOG_DIR / view_name


def arrow_schema(join_key: str, features: dict[str, FeastType]) -> pa.Schema:
    """The parquet schema of a view's rows: join key, features, then the UTC event timestamp."""
    fields = [pa.field(join_key, pa.string())]
    fields += [pa.field(name, _ARROW_TYPES[str(dtype)]) for name, dtype in features.items()]
    fields.append(pa.field(EVENT_TIMESTAMP, pa.timestamp("us", tz="UTC")))
    return pa.schema(fields)


@dataclass(frozen=True)
class StreamView:
    """What a push needs to know about a stream view."""

    view_name: str
    push_source: str
    join_key: str
    schema: pa.Schema

    @property
    def feature_names(self) -> list[str]:
        return [name for name in self.schema.names if name not in (self.join_key, EVENT_TIMESTAMP)]


USER_ACTIVITY = StreamView(
    contracts.USER_ACTIVITY_VIEW,
    contracts.USER_ACTIVITY_PUSH,
    contracts.USER_JOIN_KEY,
    arrow_schema(contracts.USER_JOIN_KEY, _USER_ACTIVITY_SCHEMA),
)
ITEM_STATS = StreamView(
    contracts.ITEM_STATS_VIEW,
    contracts.ITEM_STATS_PUSH,
    contracts.ITEM_JOIN_KEY,
    arrow_schema(contracts.ITEM_JOIN_KEY, _ITEM_STATS_SCHEMA),
)
USER_PROFILE_SCHEMA = arrow_schema(contracts.USER_JOIN_KEY, _USER_PROFILE_SCHEMA)
ITEM_PROFILE_SCHEMA = arrow_schema(contracts.ITEM_JOIN_KEY, _ITEM_PROFILE_SCHEMA)


@dataclass(frozen=True)
class Definitions:
    user: Entity
    item: Entity
    user_profile: FeatureView
    item_profile: FeatureView
    user_activity_push: PushSource
    item_stats_push: PushSource
    user_activity: FeatureView
    item_stats: FeatureView
    recommender_user: FeatureService
    recommender_item: FeatureService

    def objects(self) -> list[Entity | FeatureView | PushSource | FeatureService]:
        return [
            self.user,
            self.item,
            self.user_activity_push,
            self.item_stats_push,
            self.user_profile,
            self.item_profile,
            self.user_activity,
            self.item_stats,
            self.recommender_user,
            self.recommender_item,
        ]

    @property
    def profile_views(self) -> list[FeatureView]:
        return [self.user_profile, self.item_profile]


def _fields(join_key: str, schema: dict[str, FeastType]) -> list[Field]:
    """The view's schema: its join key (declared, not inferred at apply) and its features."""
    return [Field(name=join_key, dtype=String)] + [Field(name=name, dtype=dtype) for name, dtype in schema.items()]


def build(data_dir: Path) -> Definitions:
    """All entities, sources, views and services, their files under ``data_dir`` (absolute)."""
    data_dir = data_dir.resolve()
    user = Entity(
        name=contracts.USER_ENTITY,
        join_keys=[contracts.USER_JOIN_KEY],
        value_type=ValueType.STRING,
        description="A MovieLens user (string id).",
    )
    item = Entity(
        name=contracts.ITEM_ENTITY,
        join_keys=[contracts.ITEM_JOIN_KEY],
        value_type=ValueType.STRING,
        description="A MovieLens item (string id).",
    )

    def file_source(name: str, path: Path) -> FileSource:
        return FileSource(name=name, path=str(path), timestamp_field=EVENT_TIMESTAMP)

    user_profile = FeatureView(
        name=contracts.USER_PROFILE_VIEW,
        entities=[user],
        ttl=timedelta(0),
        schema=_fields(contracts.USER_JOIN_KEY, _USER_PROFILE_SCHEMA),
        source=file_source("user_profile_source", profile_path(data_dir, contracts.USER_PROFILE_VIEW)),
        description="ml-100k user profile; valid at every point in time.",
    )
    item_profile = FeatureView(
        name=contracts.ITEM_PROFILE_VIEW,
        entities=[item],
        ttl=timedelta(0),
        schema=_fields(contracts.ITEM_JOIN_KEY, _ITEM_PROFILE_SCHEMA),
        source=file_source("item_profile_source", profile_path(data_dir, contracts.ITEM_PROFILE_VIEW)),
        description="ml-100k item profile (release_year -1 when unknown).",
    )
    user_activity_push = PushSource(
        name=contracts.USER_ACTIVITY_PUSH,
        batch_source=file_source("user_activity_log", push_log_dir(data_dir, contracts.USER_ACTIVITY_VIEW)),
    )
    item_stats_push = PushSource(
        name=contracts.ITEM_STATS_PUSH,
        batch_source=file_source("item_stats_log", push_log_dir(data_dir, contracts.ITEM_STATS_VIEW)),
    )
    user_activity = FeatureView(
        name=contracts.USER_ACTIVITY_VIEW,
        entities=[user],
        ttl=STREAM_TTL,
        schema=_fields(contracts.USER_JOIN_KEY, _USER_ACTIVITY_SCHEMA),
        source=user_activity_push,
        description="Pushed by the Faust worker: recent items and event-time window counts.",
    )
    item_stats = FeatureView(
        name=contracts.ITEM_STATS_VIEW,
        entities=[item],
        ttl=STREAM_TTL,
        schema=_fields(contracts.ITEM_JOIN_KEY, _ITEM_STATS_SCHEMA),
        source=item_stats_push,
        description="Pushed by the Faust worker: event-time window counts and trending score.",
    )
    recommender_user = FeatureService(
        name=contracts.USER_FEATURE_SERVICE,
        features=[user_profile, user_activity],
        description="What the model's user tower reads, one row per request.",
    )
    recommender_item = FeatureService(
        name=contracts.ITEM_FEATURE_SERVICE,
        features=[item_profile, item_stats],
        description="What the model's item tower reads, for the whole catalog.",
    )
    return Definitions(
        user=user,
        item=item,
        user_profile=user_profile,
        item_profile=item_profile,
        user_activity_push=user_activity_push,
        item_stats_push=item_stats_push,
        user_activity=user_activity,
        item_stats=item_stats,
        recommender_user=recommender_user,
        recommender_item=recommender_item,
    )
