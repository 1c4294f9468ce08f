"""Open, set up and read the Feast feature store, configured from typed settings.

``open_store`` builds Feast's ``RepoConfig`` in code from ``FeaturesSettings`` rather than from
``features/feature_store.yaml``: every address then comes from the one settings object (tests on
free ports need no environment juggling), and the YAML file is only for the ``feast`` CLI.
The store's ``repo_path`` is the data dir, which is how the helpers below find the parquet files.

Set-up (``streamrec features setup --dataset ...`` runs ``setup``) is ``setup_dataset``: write the
dataset's attribute schema and profile files (``features.profiles``), ``apply`` every object
``features.views`` generates from that schema, and ``materialize_profiles`` into Redis; switching
to another dataset clears the previous one's rows first. Stream views are never materialized: the
Faust worker writes them (``features.push.RowWriter``); ``push_user_activity`` / ``push_item_stats``
(from ``features.push``, re-exported here) push frames of them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
from feast import FeatureStore, RepoConfig
from feast.repo_config import RegistryConfig

from features import profiles, push_log, views
from features.errors import FeaturesError
from features.push import push_item_stats, push_user_activity
from features.settings import FeaturesSettings
from streamrec.core.attributes import AttributeSchema, write_schema

# Feast's default and the only one it does not warn about; the key layout in Redis depends on it.
ENTITY_KEY_SERIALIZATION_VERSION = 3


def redis_connection_string(settings: FeaturesSettings) -> str:
    """Feast's Redis format: ``host:port,db=N`` (for a Redis Cluster ``host:port``, one node to
    discover the others from; a cluster has no ``db``), then every redis-py option of
    ``RedisSettings.client_options``: ``username``, ``password``, ``ssl`` and the TLS files.

    Feast passes each ``key=value`` to ``redis.Redis``/``RedisCluster`` after ``json.loads`` of the
    value where that parses. The password is read from ``redis.password_file`` here, at each
    ``open_store``: it stays in memory (and, for ``streamrec features feast``, in a 0600 temporary
    file while that runs), never in a config file.
    """
    redis = settings.redis
    parts = [f"{redis.host}:{redis.port}"]
    if not redis.cluster:
        parts.append(f"db={redis.db}")
    parts += [f"{key}={_feast_value(key, value)}" for key, value in redis.client_options().items()]
    return ",".join(parts)


def _feast_value(key: str, value: object) -> str:
    """``value`` as Feast's connection string carries it: Feast splits on commas and ``json.loads``
    what it can, so a string that would parse as JSON (``123``, ``true``, ``"x"``) goes JSON-quoted."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    if "," in text:
        raise FeaturesError(
            f"redis.{key} holds a comma, which Feast's Redis connection string cannot carry; "
            "choose a value (or a path) without one"
        )
    try:
        json.loads(text)
    except ValueError:
        return text
    return json.dumps(text)


def online_store_config(settings: FeaturesSettings) -> dict[str, str]:
    """The ``online_store`` section: Feast's Redis store, of ``redis_type`` ``redis_cluster``
    with ``redis.cluster`` (its client then follows the cluster's slot map)."""
    config = {"type": "redis", "connection_string": redis_connection_string(settings)}
    if settings.redis.cluster:
        config["redis_type"] = "redis_cluster"
    return config


def repo_config(settings: FeaturesSettings) -> RepoConfig:
    """The ``RepoConfig`` equivalent of ``feature_store.yaml``, every value from settings."""
    return RepoConfig(
        project=settings.features.project,
        provider="local",
        registry=RegistryConfig(registry_type="file", path=str(settings.registry_path.resolve())),
        online_store=online_store_config(settings),
        offline_store={"type": "file"},
        entity_key_serialization_version=ENTITY_KEY_SERIALIZATION_VERSION,
        repo_path=settings.data_dir.resolve(),
    )


def open_store(settings: FeaturesSettings) -> FeatureStore:
    """A ``FeatureStore`` on the configured Redis, registry and data dir (created if missing).

    Opening does not contact Redis; the first read or write does.
    """
    push_log.ensure_layout(settings.data_dir)
    settings.registry_path.parent.mkdir(parents=True, exist_ok=True)
    config = repo_config(settings)
    return FeatureStore(repo_path=str(config.repo_path), config=config)


def data_dir_of(store: FeatureStore) -> Path:
    if store.config.repo_path is None:
        raise FeaturesError("This FeatureStore has no repo_path; open it with features.store.open_store(settings).")
    return Path(store.config.repo_path)


def apply(store: FeatureStore) -> views.Definitions:
    """Register every object the store's schema defines, and delete registered ones it no longer does.

    Idempotent, and needs Redis only when something is deleted (Feast then removes the deleted
    views' rows online). Objects are built for the store's own data dir and the schema stored
    there, so a store opened on a temporary dir registers temporary paths.
    """
    definitions = views.build(data_dir_of(store))
    wanted_views = {view.name for view in definitions.feature_views}
    wanted_sources = {
        source.name
        for view in definitions.feature_views
        for source in (view.batch_source, view.stream_source)
        if source is not None
    }
    stale: list[Any] = [view for view in store.list_feature_views() if view.name not in wanted_views]
    stale += [source for source in store.list_data_sources() if source.name not in wanted_sources]
    store.apply(definitions.objects(), objects_to_delete=stale, partial=False)  # type: ignore[arg-type]
    return definitions


def materialize_profiles(store: FeatureStore, definitions: views.Definitions | None = None) -> list[str]:
    """Load the profile views the schema declares into the online store; returns their names.

    Needs their parquet files (``setup_dataset``) first.
    """
    definitions = definitions or views.build(data_dir_of(store))
    names = [view.name for view in definitions.profile_views]
    for name in names:
        path = views.profile_path(data_dir_of(store), name)
        if not path.is_file():
            raise FeaturesError(f"{path} is missing; run `streamrec features setup --dataset ...` first.")
    if names:
        store.materialize(
            start_date=profiles.PROFILE_TIMESTAMP - timedelta(days=1), end_date=datetime.now(UTC), feature_views=names
        )
    return names


def clear_online(store: FeatureStore, definitions: views.Definitions) -> None:
    """Delete every online row of this Feast project, of every view, for both entities."""
    # Feast's Redis store deletes all keys of the project per join key (user_id, item_id).
    store.provider.teardown_infra(store.project, [definitions.user_activity, definitions.item_stats], [])


def clear_profiles_online(store: FeatureStore, definitions: views.Definitions) -> None:
    """Delete the profile views' online rows (the stream views' fields stay)."""
    if definitions.profile_views:
        store.provider.update_infra(
            project=store.project,
            tables_to_delete=definitions.profile_views,
            tables_to_keep=[],
            entities_to_delete=[],
            entities_to_keep=[],
            partial=False,
        )


@dataclass(frozen=True)
class SetupReport:
    """What ``setup_dataset`` did."""

    dataset: str
    switched: bool  # another dataset (or none) was set up before: every online and push-log row was cleared
    profile_rows: dict[str, int]
    objects: int


def setup_dataset(
    store: FeatureStore,
    name: str,
    schema: AttributeSchema,
    users: pd.DataFrame | None,
    items: pd.DataFrame | None,
) -> SetupReport:
    """Set the store up for one dataset: schema, profile files, registry, online profiles.

    ``users`` / ``items``: the dataset's normalized attribute frames (``features.profiles``).
    When the store last held another dataset (name or schema differ, or none is recorded), every
    online row of the project and the stream views' push logs are cleared before the new profiles
    are loaded: a dataset's ids
    must never pick up another dataset's attributes or activity. Otherwise only the profile rows
    are rewritten (an id dropped from the file loses its row; stream rows stay). Stop the stream
    workers while switching datasets. Idempotent.
    """
    data_dir = data_dir_of(store)
    tables = profiles.profile_tables(schema, users, items)  # checked before anything changes
    stamp = profiles.DatasetStamp(name, schema)
    switched = profiles.read_stamp(data_dir) != stamp
    if switched:
        profiles.clear_stamp(data_dir)  # an interrupted switch is redone in full next time
    write_schema(data_dir, schema)
    counts = profiles.write_profiles(data_dir, tables)
    if switched:
        push_log.reset(data_dir, schema)
    definitions = apply(store)
    if switched:
        clear_online(store, definitions)
    else:
        clear_profiles_online(store, definitions)
    materialize_profiles(store, definitions)
    profiles.write_stamp(data_dir, stamp)
    return SetupReport(name, switched, counts, len(definitions.objects()))


def setup(settings: FeaturesSettings, spec: str | None = None, *, columns: str | None = None) -> SetupReport:
    """Load the dataset ``spec`` names (default: ``settings.dataset``) and ``setup_dataset`` it."""
    from streamrec.datasets.description import load_dataset

    dataset = load_dataset(spec or settings.dataset, columns=columns)
    store = open_store(settings)
    return setup_dataset(store, dataset.name, dataset.schema, dataset.users, dataset.items)


def read_online(
    store: FeatureStore, service_name: str, entity_ids: Sequence[str], *, include_event_timestamps: bool = False
) -> pd.DataFrame:
    """Online features of ``entity_ids`` through one feature service, one row per id in order.

    Missing values come back as None/NaN. Feast applies no TTL here: ask for
    ``include_event_timestamps`` (adds ``<feature>__ts``, epoch seconds of the row's event time)
    and treat stream features older than ``max_feature_age_s`` as missing.
    """
    service = store.get_feature_service(service_name)
    join_keys = {
        column.name
        for projection in service.feature_view_projections
        for column in store.get_feature_view(projection.name).entity_columns
    }
    if len(join_keys) != 1:
        raise FeaturesError(f"Feature service {service_name} spans join keys {sorted(join_keys)}; expected one.")
    (join_key,) = join_keys
    rows: list[dict[str, Any]] = [{join_key: str(entity_id)} for entity_id in entity_ids]
    response = store.get_online_features(features=service, entity_rows=rows)
    return response.to_df(include_event_timestamps=include_event_timestamps)


__all__ = [
    "ENTITY_KEY_SERIALIZATION_VERSION",
    "SetupReport",
    "apply",
    "clear_online",
    "clear_profiles_online",
    "data_dir_of",
    "materialize_profiles",
    "online_store_config",
    "open_store",
    "push_item_stats",
    "push_user_activity",
    "read_online",
    "repo_config",
    "setup",
    "setup_dataset",
]
