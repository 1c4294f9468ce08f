"""Push stream feature rows (the Faust worker's output) to the online and offline stores.

A frame holds one row per entity: the join key (``user_id`` / ``item_id``), every feature
column of the view (``features.views.user_activity_view(schema)`` / ``item_stats_view(schema)``:
the per-kind counts follow the dataset's schema) and ``event_timestamp`` (tz-aware, UTC; the event
time of the entity's newest accepted event). A frame that does not match is rejected whole
with ``PushValidationError`` before anything is written. Timestamps are floored to
microseconds, the precision Feast's online path keeps, so both stores hold the same instant.

Replays are harmless: Feast's Redis store writes a row only if its event timestamp is strictly
newer than the stored one (last write wins by event time; an equal timestamp is skipped, so two
states of one entity at one instant need distinct timestamps). Offline, every push appends one
file to the view's log (``features.push_log``). A long-running writer (the Faust worker) uses
:class:`RowWriter`, which resolves the view once and writes through the same provider call as
``store.push``. See docs/design/features.md#push.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
import pyarrow as pa
from feast import FeatureStore, ValueType
from feast.data_source import PushMode

from features import push_log, views
from features.errors import FeaturesError, PushValidationError
from features.feast_internals import OnlineWriter, StreamRow
from streamrec.core.attributes import AttributeSchema, read_schema

__all__ = ["RowWriter", "push", "push_item_stats", "push_user_activity"]


def _normalized(view: views.StreamView, frame: pd.DataFrame) -> pd.DataFrame:
    expected = list(view.schema.names)
    missing = sorted(set(expected) - set(frame.columns))
    extra = sorted(set(frame.columns) - set(expected))
    if missing or extra:
        raise PushValidationError(
            f"A {view.view_name} push needs exactly the columns {expected}; missing {missing}, unexpected {extra}."
        )
    timestamps = frame[views.EVENT_TIMESTAMP]
    if not isinstance(timestamps.dtype, pd.DatetimeTZDtype):
        raise PushValidationError(
            f"{view.view_name}.{views.EVENT_TIMESTAMP} must be tz-aware (UTC), got dtype {timestamps.dtype}; "
            "build it with pd.to_datetime(..., utc=True)."
        )
    for column in (view.join_key, views.EVENT_TIMESTAMP):
        if frame[column].isna().any():
            raise PushValidationError(f"{view.view_name}.{column} has missing values; every row needs one.")
    normalized = frame.loc[:, expected].copy()
    normalized[view.join_key] = normalized[view.join_key].astype(str)
    normalized[views.EVENT_TIMESTAMP] = timestamps.dt.tz_convert("UTC").dt.floor("us")
    return normalized.reset_index(drop=True)


def _to_table(view: views.StreamView, frame: pd.DataFrame) -> pa.Table:
    try:
        return pa.Table.from_pandas(frame, schema=view.schema, preserve_index=False)
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise PushValidationError(
            f"A {view.view_name} push does not match the schema {view.schema.to_string(show_schema_metadata=False)}: "
            f"{exc}"
        ) from exc


def push(store: FeatureStore, view: views.StreamView, frame: pd.DataFrame, *, online: bool, offline: bool) -> int:
    """Validate ``frame`` and write it where asked; returns the number of rows pushed.

    Online goes through ``store.push`` (the view's ``PushSource``), so Feast's last-write-wins
    check applies. Online is written before offline: freshness is measured online, and if the
    offline write then fails the caller retries the batch, which the online store ignores.
    """
    if not (online or offline):
        raise FeaturesError("push(online=False, offline=False) writes nothing; ask for at least one store.")
    normalized = _normalized(view, frame)
    if normalized.empty:
        return 0  # Feast warns on an empty online write; nothing to do either way.
    table = _to_table(view, normalized)
    if online:
        store.push(view.push_source, normalized, to=PushMode.ONLINE)
    if offline:
        if store.config.repo_path is None:
            raise FeaturesError("This FeatureStore has no repo_path; open it with features.store.open_store().")
        push_log.append(store.config.repo_path, view, table)
    return int(table.num_rows)


def _stored_schema(store: FeatureStore) -> AttributeSchema:
    if store.config.repo_path is None:
        raise FeaturesError("This FeatureStore has no repo_path; open it with features.store.open_store().")
    return read_schema(store.config.repo_path)


def push_user_activity(
    store: FeatureStore,
    frame: pd.DataFrame,
    *,
    schema: AttributeSchema | None = None,
    online: bool = True,
    offline: bool = True,
) -> int:
    """Push ``user_activity`` rows: user_id, ``attributes.user_activity_features(schema)``, event_timestamp.

    ``schema`` None: the one stored in the store's data dir (read per call; a long-running writer
    passes it, or uses :class:`RowWriter`).
    """
    view = views.user_activity_view(_stored_schema(store) if schema is None else schema)
    return push(store, view, frame, online=online, offline=offline)


def push_item_stats(
    store: FeatureStore,
    frame: pd.DataFrame,
    *,
    schema: AttributeSchema | None = None,
    online: bool = True,
    offline: bool = True,
) -> int:
    """Push ``item_stats`` rows: item_id, ``attributes.item_stats_features(schema)``, event_timestamp.

    ``schema`` None: the one stored in the store's data dir.
    """
    view = views.item_stats_view(_stored_schema(store) if schema is None else schema)
    return push(store, view, frame, online=online, offline=offline)


# -- the row path of a long-running writer ------------------------------------------------
# The Feast value type of each arrow type of ``features.views``.
_VALUE_TYPES: dict[pa.DataType, ValueType] = {
    pa.int64(): ValueType.INT64,
    pa.float64(): ValueType.DOUBLE,
    pa.string(): ValueType.STRING,
    pa.list_(pa.string()): ValueType.STRING_LIST,
}


class RowWriter:
    """Writes rows of one stream view online (Feast's ``online_write_batch``) and to the push log.

    Build one per view and process at start (it reads the registry once) and reuse it; it keeps
    no state between calls besides Feast's Redis client, so one thread at a time per writer. A
    re-``apply`` with a changed schema needs a restart; the constructor checks the registered view
    against ``features.views`` and names the fix. See docs/design/features.md#row-writer.
    """

    def __init__(self, store: FeatureStore, view: views.StreamView) -> None:
        if store.config.repo_path is None:
            raise FeaturesError("This FeatureStore has no repo_path; open it with features.store.open_store().")
        self.store = store
        self.view = view
        self.data_dir = store.config.repo_path
        self.feature_view = store.get_feature_view(view.view_name)
        source = self.feature_view.stream_source
        registered = {field.name: field.dtype.to_value_type() for field in self.feature_view.features}
        expected = {name: _VALUE_TYPES[view.schema.field(name).type] for name in view.feature_names}
        if registered != expected or source is None or source.name != view.push_source:
            raise FeaturesError(
                f"The registered view {view.view_name} (features {registered}, source "
                f"{source.name if source else None}) is not the one features.views defines (features {expected}, "
                f"source {view.push_source}); run `streamrec features setup` to apply the definitions, then restart."
            )
        self._online = OnlineWriter(store, self.feature_view, view.join_key, list(expected.items()))

    def write(
        self,
        rows: Sequence[StreamRow],
        *,
        online: bool,
        offline: bool,
        on_online_written: Callable[[], None] | None = None,
    ) -> int:
        """Validate ``rows`` (one per entity) and write them where asked, online first; returns the count.

        ``on_online_written`` is called between the two writes: the rows are readable online from
        then on (the streams worker measures freshness there, not after the offline log's file).
        """
        if not (online or offline):
            raise FeaturesError("write(online=False, offline=False) writes nothing; ask for at least one store.")
        if not rows:
            return 0
        table = self._to_table(rows)  # validates every value before anything is written
        if online:
            self._online.write(rows)
            if on_online_written is not None:
                on_online_written()
        if offline:
            push_log.append(self.data_dir, self.view, table)
        return len(rows)

    def _to_table(self, rows: Sequence[StreamRow]) -> pa.Table:
        view = self.view
        try:
            columns: dict[str, object] = {view.join_key: [row.entity_id for row in rows]}
            for name in view.feature_names:
                columns[name] = [row.features[name] for row in rows]
            columns[views.EVENT_TIMESTAMP] = pa.array([row.version_us for row in rows], pa.timestamp("us", tz="UTC"))
            return pa.Table.from_pydict(columns, schema=view.schema)
        except KeyError as exc:
            raise PushValidationError(
                f"A {view.view_name} row lacks the feature {exc}; every row needs {view.feature_names}."
            ) from exc
        except (pa.ArrowException, TypeError, ValueError) as exc:
            raise PushValidationError(
                f"{view.view_name} rows do not match the schema "
                f"{view.schema.to_string(show_schema_metadata=False)}: {exc}"
            ) from exc
