"""Point-in-time training reads through a feature service.

``historical_features(store, entity_df, service_name)`` returns ``entity_df`` (join key,
tz-aware ``event_timestamp``, and whatever label columns ride along) with the service's
features as they were at each row's timestamp: for each view of the service, the newest
source row of that key with ``source_ts <= entity_ts`` (and ``source_ts >= entity_ts - ttl``
when the view has a TTL); no such row gives missing values (``<NA>`` for integers, ``NaN``
for floats, ``None`` for strings and lists).
Which views, features, sources and TTLs: all read from the registry, through the service.

Why not ``FeatureStore.get_historical_features``: Feast 0.67's file offline store (dask) gets
three things wrong on our data (the first two are asserted, so an upgrade that fixes them shows,
by ``tests/integration/test_features_history.py::test_feast_defects_that_features_history_works_around``):

1. **Rows vanish.** It left-joins entity rows to source rows and then *drops* the candidates
   outside ``[entity_ts - ttl, entity_ts]``; an entity row all of whose candidates are
   dropped (a user's first interaction, before any ``user_activity`` row) vanishes from the
   result instead of getting nulls, taking its profile features with it. Training would
   silently lose exactly the cold-start examples.
2. **It crashes on the push log.** With a multi-file source (one file per push) and an entity
   that has no rows, dask's ``sort_values`` fails ("Divisions calculation failed for
   non-numeric column ... presence of nulls").
3. **It warns** (pandas ``FutureWarning`` from inside dask), which fails ``filterwarnings=error``.

Its join is also a per-key cross join, O(events per key²); ``pandas.merge_asof`` here is
O(n log n). The semantics are Feast's documented ones, and the tests check that both agree
where Feast works. One refinement: among source rows with the *same* key and timestamp the
first written wins, as in the Redis online store, which skips a write whose timestamp equals
the stored one (``features.push``); push-log files are named in write order to make that so.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from feast import FeatureStore, FeatureView, FileSource

from features import views
from features.errors import FeaturesError

_ORDER = "__source_order"


def _source_files(store: FeatureStore, view: FeatureView) -> list[Path]:
    source = view.batch_source
    if not isinstance(source, FileSource):
        raise FeaturesError(f"Feature view {view.name} reads {type(source).__name__}; only FileSource is supported.")
    path = Path(FileSource.get_uri_for_file_path(store.config.repo_path, source.path))
    if path.is_dir():
        # Sorted names are write order (features.push_log); readers skip dot-files (in flight).
        return sorted(p for p in path.glob("*.parquet") if not p.name.startswith((".", "_")))
    if path.is_file():
        return [path]
    raise FeaturesError(f"{path} (source of {view.name}) is missing; run `streamrec features setup`.")


def read_source(store: FeatureStore, view: FeatureView, columns: list[str]) -> pd.DataFrame:
    """Every source row of ``view`` (only ``columns``), in write order, timestamps in UTC."""
    paths = _source_files(store, view)
    if not paths:
        raise FeaturesError(
            f"{view.name} has no source files (not even the schema seed); run `streamrec features setup`."
        )
    table = pa.concat_tables([pq.read_table(path, columns=columns) for path in paths], promote_options="permissive")
    frame: pd.DataFrame = table.to_pandas()
    frame[views.EVENT_TIMESTAMP] = pd.to_datetime(frame[views.EVENT_TIMESTAMP], utc=True).astype("datetime64[ns, UTC]")
    return frame


def _nullable(frame: pd.DataFrame) -> pd.DataFrame:
    """Integers as nullable ``Int64`` so a missing value does not turn a count into a float."""
    ints = {column: "Int64" for column, dtype in frame.dtypes.items() if pd.api.types.is_integer_dtype(dtype)}
    return frame.astype(ints)


def _join_view(
    store: FeatureStore,
    view: FeatureView,
    feature_names: list[str],
    entities: pd.DataFrame,
    max_age: timedelta | None = None,
) -> pd.DataFrame:
    """``entities`` (unique join key + timestamp) with ``feature_names`` of ``view`` as of each row;
    ``max_age`` replaces the TTL of a view that has one (serving's age rule, for the skew check)."""
    (join_key,) = [column.name for column in view.entity_columns]
    source = read_source(store, view, [join_key, *feature_names, views.EVENT_TIMESTAMP])
    source[join_key] = source[join_key].astype(str)
    source = _nullable(source)
    source[_ORDER] = range(len(source))
    # First written wins among rows of one key at one instant (the online store's rule).
    source = source.sort_values([views.EVENT_TIMESTAMP, _ORDER], kind="stable")
    source = source.drop_duplicates([join_key, views.EVENT_TIMESTAMP], keep="first").drop(columns=_ORDER)
    ttl = view.ttl if view.ttl and view.ttl > timedelta(0) else None
    if ttl is not None and max_age is not None:
        ttl = max_age
    left = entities.sort_values(views.EVENT_TIMESTAMP, kind="stable")
    joined = pd.merge_asof(
        left,
        source.rename(columns={views.EVENT_TIMESTAMP: "__source_ts"}),
        left_on=views.EVENT_TIMESTAMP,
        right_on="__source_ts",
        by=join_key,
        direction="backward",
        allow_exact_matches=True,
        tolerance=pd.Timedelta(ttl) if ttl else None,
    )
    return joined.drop(columns="__source_ts")


def historical_features(
    store: FeatureStore, entity_df: pd.DataFrame, service_name: str, *, max_age: timedelta | None = None
) -> pd.DataFrame:
    """``entity_df`` with the service's features added as of each row's timestamp, order kept;
    ``max_age``, when given, is the oldest a time-limited view's row may be (instead of its TTL)."""
    service = store.get_feature_service(service_name)
    if views.EVENT_TIMESTAMP not in entity_df.columns:
        raise FeaturesError(f"entity_df needs an {views.EVENT_TIMESTAMP!r} column (tz-aware UTC).")
    if not isinstance(entity_df[views.EVENT_TIMESTAMP].dtype, pd.DatetimeTZDtype):
        raise FeaturesError(
            f"entity_df.{views.EVENT_TIMESTAMP} must be tz-aware, got {entity_df[views.EVENT_TIMESTAMP].dtype}; "
            "use pd.to_datetime(..., utc=True)."
        )
    if entity_df[views.EVENT_TIMESTAMP].isna().any():
        raise FeaturesError(f"entity_df.{views.EVENT_TIMESTAMP} has missing values; every row needs a time.")
    result = entity_df.reset_index(drop=True).copy()
    result[views.EVENT_TIMESTAMP] = result[views.EVENT_TIMESTAMP].dt.tz_convert("UTC").astype("datetime64[ns, UTC]")
    for projection in service.feature_view_projections:
        view = store.get_feature_view(projection.name)
        join_keys = [column.name for column in view.entity_columns]
        if len(join_keys) != 1 or join_keys[0] not in result.columns:
            raise FeaturesError(f"entity_df needs the column {join_keys} for feature view {view.name}.")
        join_key = join_keys[0]
        feature_names = [feature.name for feature in projection.features]
        clash = sorted(set(feature_names) & set(result.columns))
        if clash:
            raise FeaturesError(f"entity_df already has columns {clash} that {view.name} would add; rename them.")
        result[join_key] = result[join_key].astype(str)
        entities = result[[join_key, views.EVENT_TIMESTAMP]].drop_duplicates()
        answer = _join_view(store, view, feature_names, entities, max_age)
        result = result.merge(answer, on=[join_key, views.EVENT_TIMESTAMP], how="left", validate="many_to_one")
        for name in feature_names:
            if result[name].dtype == object:  # lists and strings: None, not NaN, when missing
                result[name] = result[name].where(result[name].notna(), None)
    return result
