"""One user's features for a request: the ``recommender_user_v1`` FeatureService, one row.

Read path: the views and features of the ``recommender_user_v1`` FeatureService (resolved once
at start, so the service stays the one list of what the model reads), each read with Feast's
``Provider.online_read`` for one entity key: the same Redis layout and value decoding as
``FeatureStore.get_online_features``, without its per-call request planning and response
building. Under ghz load that planning made ``get_online_features`` 42 % of the API's Python
time (py-spy, ``bench/recommend_load.py --profile``); per read (``/proc`` CPU time, 3,000 reads
of real rows, a busy machine) 0.79 ms of CPU against 0.34 ms for the two ``online_read`` calls.

One round trip: Feast's Redis store keeps every view of an entity in one hash (a field per
feature, ``_ts:<view>`` per view), and ``online_read`` sends one pipeline per view. When the
online store is Feast's ``RedisOnlineStore`` with the redis-py client, the reader asks for all
views' fields in one ``HMGET`` and decodes each view's slice with the store's own
``_get_features_for_entity``; keys and field names come from the store's own helpers, computed
once. Other stores take the ``online_read`` path. Under load redis-py's pipeline machinery,
twice per request, was over half of the feature read (py-spy, ``--profile``); with one ``HMGET``
the API's CPU per request at 200 rps went from 2.57 to 2.30 ms (``bench/recommend_load.py``,
20 s phases, back to back). ``tests/integration/test_api_server.py`` checks that both paths give
the rows ``get_online_features`` gives.

Age: Feast applies no TTL on online reads, so a stream view's row (``user_activity``) whose
event timestamp is older than ``max_age_s`` is treated as missing: the model then sees the same
inputs as for a user with no recent activity, not a week-old "last hour" count. Batch views
(profiles) never go stale. Which views are stream views comes from the registry (a view fed by a
``PushSource`` has a ``stream_source``), not from a list kept here.

What the model sees (``streamrec.core.contracts``): the profile strings ("" when unknown),
``recent_items`` (newest first, at most ``RECENT_ITEMS_MAX``) and the counts (0 when unknown).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from feast import FeatureStore, FeatureView
from feast.infra.online_stores.redis import (
    RedisClient,
    RedisOnlineStore,
    RedisOnlineStoreConfig,
    _versioned_fv_name,  # the view name Feast's Redis store hashes into field names
)
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.type_map import feast_value_type_to_python_type

from serving.api.errors import ApiSetupError
from streamrec.core import contracts

_TS_SUFFIX = "__ts"


@dataclass(frozen=True)
class UserFeatures:
    """The model's user inputs for one request, and what was found."""

    user_id: str
    profile: dict[str, str]
    recent_items: list[str]
    counts: dict[str, int]
    # Views that had a row (stale stream rows excluded), and stream views dropped as too old.
    found_views: frozenset[str] = field(default_factory=frozenset)
    stale_views: frozenset[str] = field(default_factory=frozenset)

    @property
    def known(self) -> bool:
        """False for a cold-start user: the feature store knows nothing (fresh) about them."""
        return bool(self.found_views)

    def raw(self) -> dict[str, Any]:
        """The raw features the model saw, for the impression log (JSON-ready)."""
        return {**self.profile, "recent_items": list(self.recent_items), **self.counts}

    @classmethod
    def unknown(cls, user_id: str) -> UserFeatures:
        return cls(
            user_id=user_id,
            profile={name: "" for name in contracts.USER_STRING_INPUTS[1:]},
            recent_items=[],
            counts={name: 0 for name in contracts.USER_COUNT_INPUTS},
        )


class UserFeatureReader:
    """Reads users' rows of one FeatureService; resolves the service's views once at start."""

    def __init__(
        self,
        store: FeatureStore,
        service_name: str = contracts.USER_FEATURE_SERVICE,
        *,
        max_age_s: float,
        clock: Callable[[], float] = time.time,
        one_round_trip: bool = True,
    ) -> None:
        self._store = store
        self._service = store.get_feature_service(service_name)
        self._max_age_s = max_age_s
        self._clock = clock
        # feature ref "view__feature" -> (view, feature), and the stream views among them.
        self._refs: dict[str, tuple[str, str]] = {}
        self._stream_views: set[str] = set()
        # what each read asks the provider for: the view, its features, and for each feature the
        # row keys it fills (full feature name, and that plus ``__ts``), built once here
        self._reads: list[tuple[FeatureView, list[str], list[tuple[str, str, str]]]] = []
        self._provider = store._get_provider()  # noqa: SLF001 - Feast's documented Provider, no public getter
        for projection in self._service.feature_view_projections:
            view = store.get_feature_view(projection.name)
            # the prefix Feast gives full feature names (alias or name, plus any version tag)
            prefix: str = projection.name_to_use()  # type: ignore[no-untyped-call]  # untyped in Feast
            if view.stream_source is not None:
                self._stream_views.add(prefix)
            for feature in projection.features:
                self._refs[f"{prefix}__{feature.name}"] = (prefix, feature.name)
            names = [feature.name for feature in projection.features]
            keys = [(name, f"{prefix}__{name}", f"{prefix}__{name}{_TS_SUFFIX}") for name in names]
            self._reads.append((view, names, keys))
        self._hmget = self._one_hmget_plan() if one_round_trip else None
        wanted = set(contracts.USER_STRING_INPUTS[1:]) | {"recent_items"} | set(contracts.USER_COUNT_INPUTS)
        missing = wanted - {feature for _, feature in self._refs.values()}
        if missing:
            raise ApiSetupError(
                f"FeatureService {service_name!r} lacks {sorted(missing)}, which the model reads; "
                "run `streamrec features setup` to register the current feature definitions"
            )

    @property
    def stream_views(self) -> frozenset[str]:
        return frozenset(self._stream_views)

    def read(self, user_id: str) -> UserFeatures:
        """The user's row; raises whatever Feast/Redis raise (the caller decides the fallback)."""
        return self.from_row(user_id, self.read_row(user_id))

    def read_row(self, user_id: str) -> dict[str, Any]:
        """One row as ``get_online_features(...).to_dict(include_event_timestamps=True)`` gives it:
        full feature names to values, and ``<name>__ts`` to the row's event time in whole epoch seconds
        (0 when the store has no row)."""
        entity_key = EntityKeyProto(join_keys=[contracts.USER_JOIN_KEY], entity_values=[ValueProto(string_val=user_id)])
        row: dict[str, Any] = {}
        for (_, _, keys), (event_time, values) in zip(self._reads, self._read_views(entity_key), strict=True):
            event_ts = int(event_time.timestamp()) if event_time is not None else 0  # whole seconds, as Feast gives
            found = values or {}
            for name, value_key, ts_key in keys:
                value = found.get(name)
                row[value_key] = None if value is None else feast_value_type_to_python_type(value)
                row[ts_key] = event_ts
        return row

    def _read_views(self, entity_key: EntityKeyProto) -> list[tuple[Any, dict[str, ValueProto] | None]]:
        """(event time, values by feature name) of each view in ``self._reads``, in that order."""
        config = self._store.config
        if self._hmget is None:
            # a copy of the names: Feast's Redis store appends its timestamp field to the list
            return [
                self._provider.online_read(
                    config=config, table=view, entity_keys=[entity_key], requested_features=list(names)
                )[0]
                for view, names, _ in self._reads
            ]
        redis_store, fields, slices = self._hmget
        [redis_key] = redis_store._generate_redis_keys_for_entities(config, [entity_key])  # noqa: SLF001 - see module doc
        client = redis_store._get_client(config.online_store)  # noqa: SLF001 - the store's own (pooled) client
        values = client.hmget(redis_key, fields)
        return [
            redis_store._get_features_for_entity(values[start:end], fv_name, requested)  # noqa: SLF001
            for fv_name, requested, start, end in slices
        ]

    def _one_hmget_plan(self) -> tuple[RedisOnlineStore, list[Any], list[tuple[str, list[str], int, int]]] | None:
        """The fields of every view for one HMGET, and each view's slice of the reply; None when
        the online store is not Feast's Redis store with the redis-py client."""
        redis_store = self._provider.online_store
        store_config = self._store.config.online_store
        if not isinstance(redis_store, RedisOnlineStore) or not isinstance(store_config, RedisOnlineStoreConfig):
            return None
        if store_config.client != RedisClient.redis:
            return None  # GLIDE: online_read already batches off the GIL

        fields: list[Any] = []
        slices: list[tuple[str, list[str], int, int]] = []
        for view, names, _ in self._reads:
            fv_name = _versioned_fv_name(view, self._store.config)
            requested, hset_keys = redis_store._generate_hset_keys_for_features(  # noqa: SLF001
                view, list(names), fv_name_override=fv_name
            )
            slices.append((fv_name, requested, len(fields), len(fields) + len(hset_keys)))
            fields.extend(hset_keys)
        return redis_store, fields, slices

    def from_row(self, user_id: str, row: dict[str, Any]) -> UserFeatures:
        """Build the model inputs from one ``to_dict(include_event_timestamps=True)`` row."""
        now = self._clock()
        values: dict[str, Any] = {}
        found: set[str] = set()
        stale: set[str] = set()
        for ref, (view, feature) in self._refs.items():
            value = row.get(ref)
            event_ts = row.get(ref + _TS_SUFFIX) or 0
            if value is None or event_ts <= 0:
                continue
            if view in self._stream_views and now - event_ts > self._max_age_s:
                stale.add(view)
                continue
            found.add(view)
            values[feature] = value
        base = UserFeatures.unknown(user_id)
        profile = {name: str(values.get(name) or "") for name in base.profile}
        recent = [str(item) for item in (values.get("recent_items") or []) if item][: contracts.RECENT_ITEMS_MAX]
        counts = {name: int(values.get(name) or 0) for name in base.counts}
        return UserFeatures(
            user_id=user_id,
            profile=profile,
            recent_items=recent,
            counts=counts,
            found_views=frozenset(found),
            stale_views=frozenset(stale - found),
        )
