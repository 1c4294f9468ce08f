"""One user's features for a request: the ``recommender_user_v1`` FeatureService, one row.

The service's views and features are resolved once at start (the service stays the one list of
what the model reads). Each request reads them in one Redis ``HMGET`` when the online store is
Feast's Redis store with redis-py, else with ``Provider.online_read`` per view; both give the rows
``get_online_features`` gives, without its per-call planning (``features.feast_internals``).

Nothing here names a dataset's attributes: what the model reads is
``streamrec.core.attributes.user_model_inputs(schema)`` for the dataset's ``attribute_schema.json``
(``recent_items``, the window counts, and one input per declared user attribute), and each is
normalized by its kind: ``string`` -> str ("" unknown), ``strings`` -> list[str] ([] unknown),
``int`` -> int (0 unknown), ``float`` -> float (None unknown, NaN to the model). At start the
reader checks that the service has every one of them with a matching Feast type, so a schema
and a registry that disagree fail there (rerun ``streamrec features setup``), not per request.

Age: Feast applies no TTL on online reads, so a stream view's row (``user_activity``) older than
``max_age_s`` is treated as missing: the model then sees the inputs of a user with no recent
activity, not a week-old "last hour" count. Batch views (profiles) never go stale; which views
are stream views comes from the registry (a view fed by a ``PushSource`` has a ``stream_source``).
See docs/design/features.md#user-feature-read.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from feast import FeatureStore, FeatureView

from features.feast_internals import EntityKey, OneHmgetRead, ViewReader, ViewRow, entity_key, python_value
from serving.api.errors import ApiSetupError
from streamrec.core import contracts
from streamrec.core.attributes import InputKind

_TS_SUFFIX = "__ts"
# The Feast dtypes (``str(field.dtype)``) each model input kind can be read from.
_FEAST_TYPES: dict[InputKind, frozenset[str]] = {
    "string": frozenset({"String"}),
    "strings": frozenset({"Array(String)"}),
    "int": frozenset({"Int64", "Int32"}),
    "float": frozenset({"Float64", "Float32"}),
}
_RECENT = "recent_items"


@dataclass(frozen=True)
class UserFeatures:
    """The model's user inputs for one request, and what was found.

    ``attributes`` holds the declared user attributes (str, list[str], or float / None when
    unknown), ``counts`` the ``int`` inputs (window counts). A name missing from either reads as
    unknown, so :meth:`unknown` needs no schema.
    """

    user_id: str
    attributes: dict[str, Any]
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
        """The features the model saw, for the impression log: JSON-ready (unknown numbers are None)."""
        attributes = {name: list(v) if isinstance(v, list) else v for name, v in self.attributes.items()}
        return {**attributes, _RECENT: list(self.recent_items), **self.counts}

    @classmethod
    def unknown(cls, user_id: str, inputs: Mapping[str, InputKind] | None = None) -> UserFeatures:
        """A user the store knows nothing about; with ``inputs``, every input is present as unknown."""
        features = {name: normalized(kind, None) for name, kind in (inputs or {}).items() if name != "user_id"}
        return cls.from_inputs(user_id, features, inputs or {})

    @classmethod
    def from_inputs(
        cls,
        user_id: str,
        values: Mapping[str, Any],
        inputs: Mapping[str, InputKind],
        *,
        found_views: frozenset[str] = frozenset(),
        stale_views: frozenset[str] = frozenset(),
    ) -> UserFeatures:
        """Split normalized ``values`` (input name -> value) into attributes, recent items and counts."""
        attributes: dict[str, Any] = {}
        counts: dict[str, int] = {}
        for name, kind in inputs.items():
            if name in ("user_id", _RECENT) or name not in values:
                continue
            if kind == "int":
                counts[name] = int(values[name])
            else:
                attributes[name] = values[name]
        recent = list(values.get(_RECENT) or [])[: contracts.RECENT_ITEMS_MAX]
        return cls(user_id, attributes, recent, counts, found_views=found_views, stale_views=stale_views)


def normalized(kind: InputKind, value: Any) -> Any:
    """One feature value as the model input ``kind`` reads it (see the module docstring)."""
    if kind == "string":
        return "" if value is None else str(value)
    if kind == "strings":
        return [str(token) for token in (value or []) if token is not None and str(token)]
    if kind == "int":
        return 0 if value is None else int(value)
    number = None if value is None else float(value)
    return None if number is None or math.isnan(number) else number


class UserFeatureReader:
    """Reads users' rows of one FeatureService; resolves the service's views once at start.

    ``inputs`` is ``user_model_inputs(schema)``: the model inputs (name -> kind) to fill from the
    service's features.
    """

    def __init__(
        self,
        store: FeatureStore,
        service_name: str = contracts.USER_FEATURE_SERVICE,
        *,
        inputs: Mapping[str, InputKind],
        max_age_s: float,
        clock: Callable[[], float] = time.time,
        one_round_trip: bool = True,
    ) -> None:
        self._service = store.get_feature_service(service_name)
        self._inputs = dict(inputs)
        self._max_age_s = max_age_s
        self._clock = clock
        # feature ref "view__feature" -> (view, feature), and the stream views among them.
        self._refs: dict[str, tuple[str, str]] = {}
        self._stream_views: set[str] = set()
        # per view of the service: its features, and for each feature the row keys it fills
        # (full feature name, and that plus ``__ts``), built once here
        self._reads: list[tuple[FeatureView, list[str]]] = []
        self._row_keys: list[list[tuple[str, str, str]]] = []
        feast_types: dict[str, str] = {}
        for projection in self._service.feature_view_projections:
            view = store.get_feature_view(projection.name)
            # the prefix Feast gives full feature names (alias or name, plus any version tag)
            prefix: str = projection.name_to_use()  # type: ignore[no-untyped-call]  # untyped in Feast
            if view.stream_source is not None:
                self._stream_views.add(prefix)
            for feature in projection.features:
                self._refs[f"{prefix}__{feature.name}"] = (prefix, feature.name)
                feast_types[feature.name] = str(feature.dtype)
            names = [feature.name for feature in projection.features]
            self._reads.append((view, names))
            self._row_keys.append([(name, f"{prefix}__{name}", f"{prefix}__{name}{_TS_SUFFIX}") for name in names])
        self._per_view = [ViewReader(store, view, names) for view, names in self._reads]
        self._hmget = OneHmgetRead.plan(store, self._reads) if one_round_trip else None
        # one row per view, in ``self._reads`` order: one HMGET, or ``online_read`` per view
        self._read_views: Callable[[EntityKey], list[ViewRow]] = (
            self._hmget.read if self._hmget is not None else self._read_per_view
        )
        self._check_inputs(service_name, feast_types)

    def _check_inputs(self, service_name: str, feast_types: dict[str, str]) -> None:
        wanted = {name: kind for name, kind in self._inputs.items() if name != "user_id"}
        missing = sorted(set(wanted) - set(feast_types))
        mistyped = sorted(
            f"{name} ({feast_types[name]}, the model reads {kind})"
            for name, kind in wanted.items()
            if name in feast_types and feast_types[name] not in _FEAST_TYPES[kind]
        )
        if missing or mistyped:
            problems = ([f"lacks {missing}"] if missing else []) + ([f"has {mistyped}"] if mistyped else [])
            raise ApiSetupError(
                f"FeatureService {service_name!r} {' and '.join(problems)}, which the dataset's attribute schema "
                "says the model reads; run `streamrec features setup` to register the current feature definitions"
            )

    @property
    def inputs(self) -> dict[str, InputKind]:
        """The model inputs this reader fills (``user_model_inputs(schema)``)."""
        return dict(self._inputs)

    @property
    def stream_views(self) -> frozenset[str]:
        return frozenset(self._stream_views)

    def unknown(self, user_id: str) -> UserFeatures:
        """The features of a user the store knows nothing about (every input unknown)."""
        return UserFeatures.unknown(user_id, self._inputs)

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
        inputs = {name: normalized(kind, values.get(name)) for name, kind in self._inputs.items() if name != "user_id"}
        return UserFeatures.from_inputs(
            user_id, inputs, self._inputs, found_views=frozenset(found), stale_views=frozenset(stale - found)
        )
