"""Open, set up and read the Feast feature store, configured from typed settings.

``open_store`` builds Feast's ``RepoConfig`` in code from ``FeaturesSettings`` rather than from
``features/feature_store.yaml``: every address then comes from the one settings object (tests on
free ports need no environment juggling), and the YAML file is only for the ``feast`` CLI.
The store's ``repo_path`` is the data dir, which is how the helpers below find the parquet files.

Set-up is three idempotent steps (``streamrec features setup`` runs them): ``write_profiles``
(ml-100k users and items to parquet), ``apply`` (register every object of ``features.views``)
and ``materialize_profiles`` (profiles into Redis). Stream views are never materialized: the
Faust worker writes them (``features.push.RowWriter``); ``push_user_activity`` / ``push_item_stats``
(from ``features.push``, re-exported here) push frames of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
from feast import FeatureStore, RepoConfig
from feast.repo_config import RegistryConfig

from features import push_log, views
from features.errors import FeaturesError
from features.push import push_item_stats, push_user_activity
from features.settings import FeaturesSettings
from streamrec.core import contracts

# Profiles are static: one row per entity at a fixed old time, so a point-in-time join finds
# them at any timestamp (ml-100k's events start in 1997).
PROFILE_TIMESTAMP = datetime(1990, 1, 1, tzinfo=UTC)
# Feast's default and the only one it does not warn about; the key layout in Redis depends on it.
ENTITY_KEY_SERIALIZATION_VERSION = 3


def redis_connection_string(settings: FeaturesSettings) -> str:
    """Feast's Redis format: ``host:port,db=N[,password=...]``."""
    redis = settings.redis
    parts = [f"{redis.host}:{redis.port}", f"db={redis.db}"]
    if redis.password is not None:
        parts.append(f"password={redis.password.get_secret_value()}")
    return ",".join(parts)


def repo_config(settings: FeaturesSettings) -> RepoConfig:
    """The ``RepoConfig`` equivalent of ``feature_store.yaml``, every value from settings."""
    return RepoConfig(
        project=settings.features.project,
        provider="local",
        registry=RegistryConfig(registry_type="file", path=str(settings.registry_path.resolve())),
        online_store={"type": "redis", "connection_string": redis_connection_string(settings)},
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


def profile_frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    """ml-100k users and items as the rows of ``user_profile`` and ``item_profile``."""
    from streamrec.datasets.movielens import load_items, load_users, user_profile_rows

    user_rows = user_profile_rows(load_users()).assign(**{views.EVENT_TIMESTAMP: PROFILE_TIMESTAMP})
    items = load_items()
    item_rows = pd.DataFrame(
        {
            contracts.ITEM_JOIN_KEY: items["item_id"].astype(str),
            "genres": items["genres"],
            "release_year": items["release_year"].fillna(-1).astype("int64"),
            views.EVENT_TIMESTAMP: PROFILE_TIMESTAMP,
        }
    )
    return user_rows, item_rows


def write_profiles(settings: FeaturesSettings) -> dict[str, int]:
    """Write both profile parquet files (atomically; rerunning rewrites them identically)."""
    push_log.ensure_layout(settings.data_dir)
    user_rows, item_rows = profile_frames()
    counts = {}
    for view_name, rows, schema in (
        (contracts.USER_PROFILE_VIEW, user_rows, views.USER_PROFILE_SCHEMA),
        (contracts.ITEM_PROFILE_VIEW, item_rows, views.ITEM_PROFILE_SCHEMA),
    ):
        table = pa.Table.from_pandas(rows, schema=schema, preserve_index=False)
        push_log.write_parquet_atomically(table, views.profile_path(settings.data_dir, view_name))
        counts[view_name] = table.num_rows
    return counts


def apply(store: FeatureStore) -> views.Definitions:
    """Register every entity, source, view and service (idempotent, does not need Redis).

    Objects are built for the store's own data dir, so a store opened on a temporary dir
    registers temporary paths.
    """
    definitions = views.build(data_dir_of(store))
    store.apply(definitions.objects())  # type: ignore[arg-type]  # Feast's list type is invariant
    return definitions


def materialize_profiles(store: FeatureStore) -> None:
    """Load both profile views into the online store (Redis). Needs ``write_profiles`` first."""
    data_dir = data_dir_of(store)
    for view_name in (contracts.USER_PROFILE_VIEW, contracts.ITEM_PROFILE_VIEW):
        if not views.profile_path(data_dir, view_name).is_file():
            raise FeaturesError(
                f"{views.profile_path(data_dir, view_name)} is missing; run `streamrec features setup` "
                "(or features.store.write_profiles) first."
            )
    store.materialize(
        start_date=PROFILE_TIMESTAMP - timedelta(days=1),
        end_date=datetime.now(UTC),
        feature_views=[contracts.USER_PROFILE_VIEW, contracts.ITEM_PROFILE_VIEW],
    )


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
    "PROFILE_TIMESTAMP",
    "apply",
    "data_dir_of",
    "materialize_profiles",
    "open_store",
    "push_item_stats",
    "push_user_activity",
    "read_online",
    "repo_config",
    "write_profiles",
]
