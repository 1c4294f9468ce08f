"""Push stream feature rows (the Faust worker's output) to the online and offline stores.

A frame holds one row per entity: the join key (``user_id`` / ``item_id``), every feature
column of the view (``streamrec.core.contracts``) and ``event_timestamp`` (tz-aware, UTC; the event
time of the entity's newest accepted event). A frame that does not match is rejected whole
with ``PushValidationError`` before anything is written. Timestamps are floored to
microseconds, the precision Feast's online path keeps, so both stores hold the same instant.

Replays are harmless (what the design requires), because of what Feast's Redis store does
(``feast/infra/online_stores/redis.py``, ``RedisOnlineStore.online_write_batch``, Feast 0.67):
it first reads each entity's stored ``_ts:<view>`` field, then writes a row only if its event
timestamp is *strictly newer* than both the stored one and any earlier row of the same batch
for that key. So:

* an older row pushed after a newer one is skipped (last write wins by event time, not by
  arrival), and a replayed row is a no-op;
* a row whose timestamp *equals* the stored one is skipped too, even if its values differ.
  Two events of one entity in the same second (frequent in ml-100k) therefore need distinct
  row timestamps for the second state to land: give each pushed state a timestamp that grows
  with the state, e.g. the newest event time plus ``n`` microseconds for the ``n``-th accepted
  event at that same instant. That is deterministic, so a replay still produces the same
  timestamps and stays a no-op;
* the read-then-write is not atomic: two writers pushing the same key at once can race, so
  one worker (or one partition owner) per key, as Faust's partitioning gives.
  (``skip_dedup: true`` in the Redis config would turn the check off; we leave it off.)

Offline, every push appends one file to the view's log (``features.push_log``), so a replay
adds duplicate rows: same key, same event time, same values, which a point-in-time join
resolves to that same value (``features.history`` keeps the first written of equal-time rows,
like Redis). Why not Feast's own ``to=PushMode.OFFLINE``: it rewrites the whole parquet file on
every push, and it cannot log a list column at all (it reads the file's schema back and fails
on ``list<element: string>``, a ``KeyError`` in ``feast.type_map.pa_to_feast_value_type``).
Measured here (1,000-row pushes, numeric columns only, a busy shared 2-core machine): 7-20 ms
per push with a 10k-50k-row log, 130 ms with 1M rows, growing with the log; writing one new
file took ~1 ms at any size in the same run (a whole offline push of 1,000 rows with their
``recent_items`` lists, validation and conversion included: 15-30 ms).

Online, Feast's push costs ~0.2-0.25 ms per row here (protobuf conversion in Python, two Redis
round trips per batch) plus ~40 ms per call: push one row per entity per batch, never one per
event.

A long-running writer (the Faust worker) uses :class:`RowWriter` instead. ``store.push`` looks up
the push source's views on every call (``list_feature_views`` rebuilds every ``FeatureView`` from
the registry proto, with typeguard checks: ~40% of a push), then goes through pandas and arrow
to reach protobuf values. ``RowWriter`` resolves the view once, builds the ``ValueProto`` of
each value directly, and hands the rows to the same ``provider.online_write_batch`` that
``store.push`` ends in, so the Redis layout and the last-write-wins check above are Feast's own
and ``get_online_features`` reads exactly what a frame push would have written. The price: the
view's definition is read at start, so a re-``apply`` with a changed schema needs a restart (the
constructor checks the registered schema against ``features.views`` and names the fix).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import pandas as pd
import pyarrow as pa
from feast import FeatureStore
from feast.data_source import PushMode
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import StringList
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.value_type import ValueType

from features import push_log, views
from features.errors import FeaturesError, PushValidationError


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


def push_user_activity(store: FeatureStore, frame: pd.DataFrame, *, online: bool = True, offline: bool = True) -> int:
    """Push ``user_activity`` rows: user_id, recent_items, count_1h, count_24h, last_event_ts, event_timestamp."""
    return push(store, views.USER_ACTIVITY, frame, online=online, offline=offline)


def push_item_stats(store: FeatureStore, frame: pd.DataFrame, *, online: bool = True, offline: bool = True) -> int:
    """Push ``item_stats`` rows: item_id, count_1h, count_24h, trending_score, event_timestamp."""
    return push(store, views.ITEM_STATS, frame, online=online, offline=offline)


# -- the row path of a long-running writer ------------------------------------------------
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# How each arrow type of ``features.views`` becomes a Feast value: the same proto fields that
# ``feast.type_map.python_values_to_proto_values`` fills for the registered dtype.
def _int64(value: Any) -> ValueProto:
    return ValueProto(int64_val=int(value))


def _double(value: Any) -> ValueProto:
    return ValueProto(double_val=float(value))


def _string(value: Any) -> ValueProto:
    return ValueProto(string_val=str(value))


def _string_list(value: Any) -> ValueProto:
    return ValueProto(string_list_val=StringList(val=value))  # items: checked as strings by arrow first


_CONVERTERS: dict[pa.DataType, tuple[ValueType, Callable[[Any], ValueProto]]] = {
    pa.int64(): (ValueType.INT64, _int64),
    pa.float64(): (ValueType.DOUBLE, _double),
    pa.string(): (ValueType.STRING, _string),
    pa.list_(pa.string()): (ValueType.STRING_LIST, _string_list),
}


# What ``online_write_batch`` takes: entity key, values by feature, event time, created time.
_ProtoRow = tuple[EntityKeyProto, dict[str, ValueProto], datetime, datetime | None]


class StreamRow(Protocol):
    """One entity's row: its id, every feature of the view, and its event time in µs since the epoch."""

    @property
    def entity_id(self) -> str: ...

    @property
    def features(self) -> Mapping[str, object]: ...

    @property
    def version_us(self) -> int: ...


class RowWriter:
    """Writes rows of one stream view online (Feast's ``online_write_batch``) and to the push log.

    Build one per view and process at start (it reads the registry once) and reuse it; it keeps
    no state between calls besides Feast's Redis client, so one thread at a time per writer.
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
        expected = {name: _CONVERTERS[view.schema.field(name).type][0] for name in view.feature_names}
        if registered != expected or source is None or source.name != view.push_source:
            raise FeaturesError(
                f"The registered view {view.view_name} (features {registered}, source "
                f"{source.name if source else None}) is not the one features.views defines (features {expected}, "
                f"source {view.push_source}); run `streamrec features setup` to apply the definitions, then restart."
            )
        self._converters = [(name, _CONVERTERS[view.schema.field(name).type][1]) for name in view.feature_names]
        self._provider = store._get_provider()

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
            self._provider.online_write_batch(self.store.config, self.feature_view, self._to_protos(rows), None)
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

    def _to_protos(self, rows: Sequence[StreamRow]) -> list[_ProtoRow]:
        join_keys = [self.view.join_key]
        converters = self._converters
        protos: list[_ProtoRow] = [
            (
                EntityKeyProto(join_keys=join_keys, entity_values=[ValueProto(string_val=str(row.entity_id))]),
                {name: convert(row.features[name]) for name, convert in converters},
                _EPOCH + timedelta(microseconds=row.version_us),
                None,
            )
            for row in rows
        ]
        return protos
