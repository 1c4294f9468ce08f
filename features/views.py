"""Every Feast object of streamrec, generated from a dataset's attribute schema for one data directory.

Why a builder rather than module-level objects: the parquet paths are absolute and depend on
settings (tests use a temporary data dir per module), the views follow the dataset's declared
attributes (``streamrec.core.attributes``), and the Feast CLI wants module-level objects.
``features/definitions.py`` (the module the CLI scans) calls ``build`` with the configured data
dir and the schema stored there; ``features.store.apply`` does the same for the store's own.

What the schema decides:

* ``user_profile`` / ``item_profile`` exist only when the schema declares attributes on that
  side, one feature per attribute: categorical -> String, multi_categorical -> Array(String),
  numeric -> Float64;
* the stream views ``user_activity`` and ``item_stats`` always exist; when the dataset has
  several event kinds they also count each kind (``<kind>_count_1h`` / ``_24h``, Int64);
* ``recommender_user_v1`` = [user_profile if any, user_activity], ``recommender_item_v1`` =
  [item_profile if any, item_stats].

Layout of ``data_dir``::

    attribute_schema.json                        the schema (``features setup --dataset``)
    dataset.json                                 which dataset set the store up (``features.profiles``)
    user_profile.parquet, item_profile.parquet   attribute rows (``features.profiles``)
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

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, FeastType, Float64, Int64, String

from streamrec.core import contracts
from streamrec.core.attributes import (
    Attribute,
    AttributeSchema,
    AttributeType,
    Side,
    item_stats_features,
    read_schema,
    user_activity_features,
)

EVENT_TIMESTAMP = "event_timestamp"
STREAM_TTL = timedelta(days=30)
PUSH_LOG_DIR = "push_log"

_ATTRIBUTE_TYPES: dict[AttributeType, FeastType] = {
    "categorical": String,
    "multi_categorical": Array(String),
    "numeric": Float64,
}
# Stream features that are not Int64 counts (every other one is: windows, per-kind counts, last_event_ts).
_STREAM_TYPES: dict[str, FeastType] = {"recent_items": Array(String), "trending_score": Float64}

_ARROW_TYPES: dict[str, pa.DataType] = {
    "String": pa.string(),
    "Int64": pa.int64(),
    "Float64": pa.float64(),
    "Array(String)": pa.list_(pa.string()),
}

_PROFILE_VIEWS: dict[Side, str] = {"user": contracts.USER_PROFILE_VIEW, "item": contracts.ITEM_PROFILE_VIEW}
_JOIN_KEYS: dict[Side, str] = {"user": contracts.USER_JOIN_KEY, "item": contracts.ITEM_JOIN_KEY}


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


def attribute_features(attributes: tuple[Attribute, ...]) -> dict[str, FeastType]:
    """A profile view's features: one per attribute, typed by the attribute's type."""
    return {attribute.name: _ATTRIBUTE_TYPES[attribute.type] for attribute in attributes}


def profile_arrow_schema(schema: AttributeSchema, side: Side) -> pa.Schema:
    """The parquet schema of one side's profile rows (join key, one column per attribute, time)."""
    return arrow_schema(_JOIN_KEYS[side], attribute_features(schema.side(side)))


def _stream_features(names: tuple[str, ...]) -> tuple[tuple[str, FeastType], ...]:
    return tuple((name, _STREAM_TYPES.get(name, Int64)) for name in names)


@dataclass(frozen=True)
class StreamView:
    """What a push needs to know about a stream view: names, features in order, parquet schema."""

    view_name: str
    push_source: str
    join_key: str
    features: tuple[tuple[str, FeastType], ...]
    schema: pa.Schema = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "schema", arrow_schema(self.join_key, dict(self.features)))

    @property
    def feature_names(self) -> list[str]:
        return [name for name, _ in self.features]


def user_activity_view(schema: AttributeSchema) -> StreamView:
    """``user_activity``: recent_items, count_1h, count_24h, last_event_ts and the per-kind counts."""
    return StreamView(
        contracts.USER_ACTIVITY_VIEW,
        contracts.USER_ACTIVITY_PUSH,
        contracts.USER_JOIN_KEY,
        _stream_features(user_activity_features(schema)),
    )


def item_stats_view(schema: AttributeSchema) -> StreamView:
    """``item_stats``: count_1h, count_24h, trending_score and the per-kind counts."""
    return StreamView(
        contracts.ITEM_STATS_VIEW,
        contracts.ITEM_STATS_PUSH,
        contracts.ITEM_JOIN_KEY,
        _stream_features(item_stats_features(schema)),
    )


def stream_views(schema: AttributeSchema) -> tuple[StreamView, StreamView]:
    """Both stream views of ``schema``: (user_activity, item_stats)."""
    return user_activity_view(schema), item_stats_view(schema)


@dataclass(frozen=True)
class Definitions:
    """Every Feast object of one schema; a profile view is None when its side declares no attribute."""

    schema: AttributeSchema
    user: Entity
    item: Entity
    user_profile: FeatureView | None
    item_profile: FeatureView | None
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
            *self.profile_views,
            self.user_activity,
            self.item_stats,
            self.recommender_user,
            self.recommender_item,
        ]

    @property
    def profile_views(self) -> list[FeatureView]:
        return [view for view in (self.user_profile, self.item_profile) if view is not None]

    @property
    def feature_views(self) -> list[FeatureView]:
        return [*self.profile_views, self.user_activity, self.item_stats]


def _fields(join_key: str, features: dict[str, FeastType]) -> list[Field]:
    """The view's schema: its join key (declared, not inferred at apply) and its features."""
    return [Field(name=join_key, dtype=String)] + [Field(name=name, dtype=dtype) for name, dtype in features.items()]


def _file_source(name: str, path: Path) -> FileSource:
    return FileSource(name=name, path=str(path), timestamp_field=EVENT_TIMESTAMP)


def _profile_view(data_dir: Path, schema: AttributeSchema, side: Side, entity: Entity) -> FeatureView | None:
    attributes = schema.side(side)
    if not attributes:
        return None
    name = _PROFILE_VIEWS[side]
    return FeatureView(
        name=name,
        entities=[entity],
        ttl=timedelta(0),
        schema=_fields(_JOIN_KEYS[side], attribute_features(attributes)),
        source=_file_source(f"{name}_source", profile_path(data_dir, name)),
        description=f"The dataset's declared {side} attributes; valid at every point in time.",
    )


def _stream_view(data_dir: Path, stream: StreamView, entity: Entity, description: str) -> FeatureView:
    push = PushSource(
        name=stream.push_source,
        batch_source=_file_source(f"{stream.view_name}_log", push_log_dir(data_dir, stream.view_name)),
    )
    return FeatureView(
        name=stream.view_name,
        entities=[entity],
        ttl=STREAM_TTL,
        schema=_fields(stream.join_key, dict(stream.features)),
        source=push,
        description=description,
    )


def build(data_dir: Path, schema: AttributeSchema | None = None) -> Definitions:
    """All entities, sources, views and services of ``schema``, their files under ``data_dir`` (absolute).

    ``schema`` None: the one stored in ``data_dir`` (``read_schema``; no file = no attributes).
    """
    data_dir = data_dir.resolve()
    if schema is None:
        schema = read_schema(data_dir)
    user = Entity(
        name=contracts.USER_ENTITY,
        join_keys=[contracts.USER_JOIN_KEY],
        value_type=ValueType.STRING,
        description="A user of the dataset (string id).",
    )
    item = Entity(
        name=contracts.ITEM_ENTITY,
        join_keys=[contracts.ITEM_JOIN_KEY],
        value_type=ValueType.STRING,
        description="An item of the dataset's catalog (string id).",
    )
    user_profile = _profile_view(data_dir, schema, "user", user)
    item_profile = _profile_view(data_dir, schema, "item", item)
    user_activity = _stream_view(
        data_dir,
        user_activity_view(schema),
        user,
        "Pushed by the Faust worker: recent items and event-time window counts (per kind when several).",
    )
    item_stats = _stream_view(
        data_dir,
        item_stats_view(schema),
        item,
        "Pushed by the Faust worker: event-time window counts (per kind when several) and trending score.",
    )
    user_views = [view for view in (user_profile, user_activity) if view is not None]
    item_views = [view for view in (item_profile, item_stats) if view is not None]
    return Definitions(
        schema=schema,
        user=user,
        item=item,
        user_profile=user_profile,
        item_profile=item_profile,
        user_activity_push=_push_source(user_activity),
        item_stats_push=_push_source(item_stats),
        user_activity=user_activity,
        item_stats=item_stats,
        recommender_user=FeatureService(
            name=contracts.USER_FEATURE_SERVICE,
            features=user_views,  # type: ignore[arg-type]  # Feast's list type is invariant
            description="What the model's user tower reads, one row per request.",
        ),
        recommender_item=FeatureService(
            name=contracts.ITEM_FEATURE_SERVICE,
            features=item_views,  # type: ignore[arg-type]
            description="What the model's item tower reads, for the whole catalog.",
        ),
    )


def _push_source(view: FeatureView) -> PushSource:
    source = view.stream_source
    if not isinstance(source, PushSource):  # _stream_view always builds one
        raise TypeError(f"{view.name} has no push source")
    return source
