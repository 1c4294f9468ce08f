"""Static features the online trainer reads from Feast's online store: user and item attributes.

The *sequential* user features (recent items, counts) come from the trainer's own state
(:mod:`online_trainer.history`); what it reads here never changes with the stream: a user's
declared attributes (``user_profile`` through ``recommender_user_v1``) and, for an item the
catalog has not seen, its attributes (``item_profile`` through ``recommender_item_v1``), each
feature named as the attribute (``streamrec.core.attributes``). A side without attributes is never
read. Both are cached for the process's life. A failed read (Redis down) is logged and counted,
and the rows get unknown values, which the model treats as "unknown": a transient outage degrades
a few examples, it does not stop the trainer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import pandas as pd
from prometheus_client import Counter

from online_trainer.attribute_values import Value, normalize, unknown
from streamrec.core import contracts
from streamrec.core.attributes import Attribute, AttributeSchema

if TYPE_CHECKING:
    from feast import FeatureStore

    from features.settings import FeaturesSettings

log = logging.getLogger(__name__)
LOOKUP_FAILURES = Counter("trainer_feature_lookup_failures_total", "Failed Feast online reads.", ("service",))

Attributes = dict[str, Value]


class FeatureLookup(Protocol):
    """Attribute values by id: name -> normalized value (``attribute_values``), unknown when absent."""

    def user_attributes(self, user_ids: Sequence[str]) -> dict[str, Attributes]: ...

    def item_attributes(self, item_ids: Sequence[str]) -> dict[str, Attributes]: ...


def unknown_row(attributes: Sequence[Attribute]) -> Attributes:
    return {attribute.name: unknown(attribute) for attribute in attributes}


class FeastLookup:
    """:class:`FeatureLookup` over ``features.store.read_online`` with a per-process cache."""

    def __init__(self, settings: FeaturesSettings, schema: AttributeSchema, store: FeatureStore | None = None) -> None:
        self._settings = settings
        self._schema = schema
        self._store = store
        self._cache: dict[str, dict[str, Attributes]] = {"user": {}, "item": {}}

    def _read(self, service: str, ids: list[str]) -> pd.DataFrame | None:
        from features.store import open_store, read_online

        try:
            if self._store is None:
                self._store = open_store(self._settings)
            return read_online(self._store, service, ids)
        except Exception as exc:  # noqa: BLE001 -- any store failure degrades to empty features, counted
            LOOKUP_FAILURES.labels(service=service).inc()
            log.warning("Feast online read of %d ids through %s failed: %s", len(ids), service, exc)
            return None

    def _attributes(self, side: str, service: str, ids: Sequence[str]) -> dict[str, Attributes]:
        attributes = self._schema.user if side == "user" else self._schema.item
        wanted = [str(entity) for entity in ids]
        if not attributes:
            return {entity: {} for entity in wanted}
        cache = self._cache[side]
        missing = sorted(set(wanted) - set(cache))
        fetched: dict[str, Attributes] = {}
        if missing:
            frame = self._read(service, missing)
            for row, entity in enumerate(missing):
                fetched[entity] = (
                    unknown_row(attributes)
                    if frame is None
                    else {
                        a.name: normalize(a, frame[a.name].iloc[row]) if a.name in frame else unknown(a)
                        for a in attributes
                    }
                )
            if frame is not None:  # an outage is not cached: those ids are read again next time
                cache.update(fetched)
        return {entity: cache.get(entity) or fetched.get(entity) or unknown_row(attributes) for entity in wanted}

    def user_attributes(self, user_ids: Sequence[str]) -> dict[str, Attributes]:
        return self._attributes("user", contracts.USER_FEATURE_SERVICE, user_ids)

    def item_attributes(self, item_ids: Sequence[str]) -> dict[str, Attributes]:
        return self._attributes("item", contracts.ITEM_FEATURE_SERVICE, item_ids)


class FrameLookup:
    """:class:`FeatureLookup` over normalized attribute frames (benchmarks, tests: no Feast)."""

    def __init__(self, schema: AttributeSchema, users: pd.DataFrame | None, items: pd.DataFrame | None) -> None:
        self._schema = schema
        self._users = _rows(users, "user_id", schema.user)
        self._items = _rows(items, "item_id", schema.item)

    def user_attributes(self, user_ids: Sequence[str]) -> dict[str, Attributes]:
        return {str(u): self._users.get(str(u)) or unknown_row(self._schema.user) for u in user_ids}

    def item_attributes(self, item_ids: Sequence[str]) -> dict[str, Attributes]:
        return {str(i): self._items.get(str(i)) or unknown_row(self._schema.item) for i in item_ids}


def _row(frame: pd.DataFrame, row: int, attributes: Sequence[Attribute]) -> Attributes:
    return {a.name: normalize(a, frame[a.name].iloc[row]) if a.name in frame else unknown(a) for a in attributes}


def _rows(frame: pd.DataFrame | None, key: str, attributes: Sequence[Attribute]) -> dict[str, Attributes]:
    if frame is None or not attributes:
        return {}
    columns: list[Any] = [frame[a.name] for a in attributes]
    return {
        str(entity): {a.name: normalize(a, value) for a, value in zip(attributes, values, strict=True)}
        for entity, *values in zip(frame[key], *columns, strict=True)
    }
