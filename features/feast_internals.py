"""Every use of Feast's private API and internal modules in streamrec, behind one door.

Feast has no public call for what the hot paths need: the provider's ``online_read`` and
``online_write_batch`` (where ``get_online_features`` and ``store.push`` end, without their
per-call planning), the Redis online store's key and field layout (to read every view of an
entity in one ``HMGET``), its ``Value`` protos, and the store's own Redis client. Only this module
touches them: ``tests/unit/test_feast_internals.py`` checks every private name and signature used
here, the integration tests check the round trip on a real Redis, and ``pyproject.toml`` pins
Feast to the versions those tests passed on. See docs/design/features.md#feast-internals.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from feast import FeatureStore, FeatureView, ValueType
from feast.infra.online_stores.redis import (
    RedisClient,
    RedisOnlineStore,
    RedisOnlineStoreConfig,
    _versioned_fv_name,  # the view name Feast's Redis store hashes into field names
)
from feast.infra.provider import Provider
from feast.protos.feast.types.EntityKey_pb2 import EntityKey
from feast.protos.feast.types.Value_pb2 import StringList, Value
from feast.type_map import feast_value_type_to_python_type
from redis import Redis
from redis.cluster import RedisCluster

__all__ = [
    "VALUE_BUILDERS",
    "EntityKey",
    "OneHmgetRead",
    "OnlineWriter",
    "StreamRow",
    "Value",
    "ViewReader",
    "ViewRow",
    "entity_key",
    "online_redis_client",
    "provider",
    "python_value",
]

# One view's row as Feast's online read gives it: the row's event time and the ``Value`` of each
# requested feature by name (both None when the store has no row); decode values with python_value.
ViewRow = tuple[datetime | None, dict[str, Value] | None]

# A Feast ``Value`` as Python, decoded as ``get_online_features(...).to_dict()`` decodes it.
python_value: Callable[[Value], Any] = feast_value_type_to_python_type


def provider(store: FeatureStore) -> Provider:
    """The store's provider (one per store, made on first use): the layer every read and write ends in."""
    return store.provider


def entity_key(join_key: str, entity_id: str) -> EntityKey:
    """The key of one entity of a view with a single string join key."""
    return EntityKey(join_keys=[join_key], entity_values=[Value(string_val=entity_id)])


class ViewReader:
    """Fixed features of one view with ``Provider.online_read``: the Redis layout and decoding of
    ``get_online_features``, without its per-call request planning and response building."""

    def __init__(self, store: FeatureStore, view: FeatureView, feature_names: Sequence[str]) -> None:
        self._store = store
        self._view = view
        self._feature_names = list(feature_names)
        self._provider = provider(store)

    def read(self, entity_keys: list[EntityKey]) -> list[ViewRow]:
        """One row per key, in the keys' order."""
        rows: list[ViewRow] = self._provider.online_read(
            config=self._store.config,
            table=self._view,
            entity_keys=entity_keys,
            # a copy: Feast's Redis store appends its timestamp field to the list it is given
            requested_features=list(self._feature_names),
        )
        return rows


class OneHmgetRead:
    """Several views' features of one entity in a single ``HMGET``, decoded by Feast's Redis store.

    Feast's Redis store keeps every view of an entity in one hash (a field per feature, and
    ``_ts:<view>`` per view) but ``online_read`` sends one pipeline per view. The fields of every
    view and each view's slice of the reply are computed once, by :meth:`plan`, from the store's
    own key helpers; each read is then one command. See docs/design/features.md#user-feature-read.
    """

    def __init__(
        self,
        store: FeatureStore,
        redis_store: RedisOnlineStore,
        fields: list[Any],
        slices: list[tuple[str, list[str], int, int]],
    ) -> None:
        self._store = store
        self._redis_store = redis_store
        self._fields = fields
        self._slices = slices  # (versioned view name, fields requested of it, start, end) per view

    @classmethod
    def plan(cls, store: FeatureStore, reads: Sequence[tuple[FeatureView, Sequence[str]]]) -> OneHmgetRead | None:
        """The read of ``reads`` (view, feature names) in one HMGET; None when the online store is not
        Feast's Redis store with the redis-py client (GLIDE already batches off the GIL)."""
        redis_store = provider(store).online_store
        store_config = store.config.online_store
        if not isinstance(redis_store, RedisOnlineStore) or not isinstance(store_config, RedisOnlineStoreConfig):
            return None
        if store_config.client != RedisClient.redis:
            return None
        fields: list[Any] = []
        slices: list[tuple[str, list[str], int, int]] = []
        for view, names in reads:
            fv_name = _versioned_fv_name(view, store.config)
            requested, hset_keys = redis_store._generate_hset_keys_for_features(
                view, list(names), fv_name_override=fv_name
            )
            slices.append((fv_name, requested, len(fields), len(fields) + len(hset_keys)))
            fields.extend(hset_keys)
        return cls(store, redis_store, fields, slices)

    def read(self, entity_key: EntityKey) -> list[ViewRow]:
        """One row per view of the plan, in its order; what ``ViewReader.read`` gives for the key."""
        config = self._store.config
        redis_store = self._redis_store
        [redis_key] = redis_store._generate_redis_keys_for_entities(config, [entity_key])
        client = redis_store._get_client(config.online_store)  # the store's own (pooled) client
        values = client.hmget(redis_key, self._fields)
        return [
            redis_store._get_features_for_entity(values[start:end], fv_name, requested)
            for fv_name, requested, start, end in self._slices
        ]


def online_redis_client(store: FeatureStore) -> Redis | RedisCluster | None:
    """The redis-py client Feast's online store made for ``store`` and keeps (made on first use): a
    ``RedisCluster`` for ``redis_type: redis_cluster``; None when the online store has no such client."""
    get_client = getattr(provider(store).online_store, "_get_client", None)
    if get_client is None:
        return None
    client = get_client(store.config.online_store)
    return client if isinstance(client, Redis | RedisCluster) else None


# -- the provider's write path ------------------------------------------------------------
class StreamRow(Protocol):
    """One entity's row: its id, every feature of the view, and its event time in µs since the epoch."""

    @property
    def entity_id(self) -> str: ...

    @property
    def features(self) -> Mapping[str, object]: ...

    @property
    def version_us(self) -> int: ...


def _int64(value: Any) -> Value:
    return Value(int64_val=int(value))


def _double(value: Any) -> Value:
    return Value(double_val=float(value))


def _string(value: Any) -> Value:
    return Value(string_val=str(value))


def _string_list(value: Any) -> Value:
    return Value(string_list_val=StringList(val=value))  # items: checked as strings by the caller first


# The Feast value types the stream views hold, each with the ``Value`` field that
# ``feast.type_map.python_values_to_proto_values`` fills for it.
VALUE_BUILDERS: Mapping[ValueType, Callable[[Any], Value]] = {
    ValueType.INT64: _int64,
    ValueType.DOUBLE: _double,
    ValueType.STRING: _string,
    ValueType.STRING_LIST: _string_list,
}

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# What ``online_write_batch`` takes: entity key, values by feature, event time, created time.
_ProtoRow = tuple[EntityKey, dict[str, Value], datetime, datetime | None]


class OnlineWriter:
    """Rows of one view through ``Provider.online_write_batch``, the call ``store.push`` ends in: the
    same Redis layout and last-write-wins check, without the registry reads and pandas of a push.

    ``features`` are the view's (name, value type) pairs, each type a key of ``VALUE_BUILDERS``.
    See docs/design/features.md#row-writer.
    """

    def __init__(
        self, store: FeatureStore, feature_view: FeatureView, join_key: str, features: Sequence[tuple[str, ValueType]]
    ) -> None:
        self._store = store
        self._feature_view = feature_view
        self._join_keys = [join_key]
        self._builders = [(name, VALUE_BUILDERS[value_type]) for name, value_type in features]
        self._provider = provider(store)

    def write(self, rows: Sequence[StreamRow]) -> None:
        """Write ``rows`` (one per entity, every feature present) online."""
        self._provider.online_write_batch(self._store.config, self._feature_view, self._to_protos(rows), None)

    def _to_protos(self, rows: Sequence[StreamRow]) -> list[_ProtoRow]:
        join_keys = self._join_keys
        builders = self._builders
        protos: list[_ProtoRow] = [
            (
                EntityKey(join_keys=join_keys, entity_values=[Value(string_val=str(row.entity_id))]),
                {name: build(row.features[name]) for name, build in builders},
                _EPOCH + timedelta(microseconds=row.version_us),
                None,
            )
            for row in rows
        ]
        return protos
