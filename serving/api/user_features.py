"""One user's features for a request: the ``recommender_user_v1`` FeatureService, one row.

The service's views and features are resolved once at start (the service stays the one list of
what the model reads). Each request reads them in one Redis ``HMGET`` when the online store is
Feast's Redis store with redis-py, else with ``Provider.online_read`` per view; both give the rows
``get_online_features`` gives, without its per-call planning (``features.feast_internals``).

Age: Feast applies no TTL on online reads, so a stream view's row (``user_activity``) older than
``max_age_s`` is treated as missing: the model then sees the inputs of a user with no recent
activity, not a week-old "last hour" count. Batch views (profiles) never go stale; which views
are stream views comes from the registry (a view fed by a ``PushSource`` has a ``stream_source``).

What the model sees (``streamrec.core.contracts``): the profile strings ("" when unknown),
``recent_items`` (newest first, at most ``RECENT_ITEMS_MAX``) and the counts (0 when unknown).
See docs/design/features.md#user-feature-read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from feast import FeatureStore, FeatureView

from features.feast_internals import EntityKey, OneHmgetRead, ViewReader, ViewRow, entity_key, python_value
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
        self._service = store.get_feature_service(service_name)
        self._max_age_s = max_age_s
        self._clock = clock
        # feature ref "view__feature" -> (view, feature), and the stream views among them.
        self._refs: dict[str, tuple[str, str]] = {}
        self._stream_views: set[str] = set()
        # per view of the service: its features, and for each feature the row keys it fills
        # (full feature name, and that plus ``__ts``), built once here
        self._reads: list[tuple[FeatureView, list[str]]] = []
        self._row_keys: list[list[tuple[str, str, str]]] = []
        for projection in self._service.feature_view_projections:
            view = store.get_feature_view(projection.name)
            # the prefix Feast gives full feature names (alias or name, plus any version tag)
            prefix: str = projection.name_to_use()  # type: ignore[no-untyped-call]  # untyped in Feast
            if view.stream_source is not None:
                self._stream_views.add(prefix)
            for feature in projection.features:
                self._refs[f"{prefix}__{feature.name}"] = (prefix, feature.name)
            names = [feature.name for feature in projection.features]
            self._reads.append((view, names))
            self._row_keys.append([(name, f"{prefix}__{name}", f"{prefix}__{name}{_TS_SUFFIX}") for name in names])
        self._per_view = [ViewReader(store, view, names) for view, names in self._reads]
        self._hmget = OneHmgetRead.plan(store, self._reads) if one_round_trip else None
        # one row per view, in ``self._reads`` order: one HMGET, or ``online_read`` per view
        self._read_views: Callable[[EntityKey], list[ViewRow]] = (
            self._hmget.read if self._hmget is not None else self._read_per_view
        )
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
        key = entity_key(contracts.USER_JOIN_KEY, user_id)
        row: dict[str, Any] = {}
        for keys, (event_time, values) in zip(self._row_keys, self._read_views(key), strict=True):
            event_ts = int(event_time.timestamp()) if event_time is not None else 0  # whole seconds, as Feast gives
            found = values or {}
            for name, value_key, ts_key in keys:
                value = found.get(name)
                row[value_key] = None if value is None else python_value(value)
                row[ts_key] = event_ts
        return row

    def _read_per_view(self, key: EntityKey) -> list[ViewRow]:
        return [reader.read([key])[0] for reader in self._per_view]

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
