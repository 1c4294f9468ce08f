"""Static features the online trainer reads from Feast's online store: user profiles, item content.

The *sequential* user features (recent items, counts) come from the trainer's own state
(:mod:`online_trainer.history`); what it reads here never changes with the stream: a user's
profile (``user_profile`` through ``recommender_user_v1``) and, for an item the catalog has not
seen, its content (``item_profile`` through ``recommender_item_v1``). Both are cached for the
process's life. A failed read (Redis down) is logged and counted, and the rows get empty values,
which the model treats as "unknown": a transient outage degrades a few examples, it does not stop
the trainer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import pandas as pd
from prometheus_client import Counter

from streamrec.core import contracts

if TYPE_CHECKING:
    from feast import FeatureStore

    from features.settings import FeaturesSettings

log = logging.getLogger(__name__)
LOOKUP_FAILURES = Counter("trainer_feature_lookup_failures_total", "Failed Feast online reads.", ("service",))

EMPTY_PROFILE: dict[str, str] = {name: "" for name in contracts.USER_PROFILE_FEATURES}


class FeatureLookup(Protocol):
    def user_profiles(self, user_ids: Sequence[str]) -> dict[str, dict[str, str]]: ...

    def item_content(self, item_ids: Sequence[str]) -> dict[str, tuple[list[str], int]]: ...


def _text(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and value != value) else str(value)


class FeastLookup:
    """:class:`FeatureLookup` over ``features.store.read_online`` with a per-process cache."""

    def __init__(self, settings: FeaturesSettings, store: FeatureStore | None = None) -> None:
        self._settings = settings
        self._store = store
        self._profiles: dict[str, dict[str, str]] = {}
        self._content: dict[str, tuple[list[str], int]] = {}

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

    def user_profiles(self, user_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        wanted = [str(user) for user in user_ids]
        missing = sorted(set(wanted) - set(self._profiles))
        fetched: dict[str, dict[str, str]] = {}
        if missing:
            frame = self._read(contracts.USER_FEATURE_SERVICE, missing)
            for row, user in enumerate(missing):
                fetched[user] = (
                    dict(EMPTY_PROFILE)
                    if frame is None
                    else {name: _text(frame[name].iloc[row]) for name in contracts.USER_PROFILE_FEATURES}
                )
            if frame is not None:  # an outage is not cached: those users are read again next time
                self._profiles.update(fetched)
        return {user: self._profiles.get(user) or fetched.get(user, dict(EMPTY_PROFILE)) for user in wanted}

    def item_content(self, item_ids: Sequence[str]) -> dict[str, tuple[list[str], int]]:
        missing = sorted({str(item) for item in item_ids} - set(self._content))
        if missing:
            frame = self._read(contracts.ITEM_FEATURE_SERVICE, missing)
            if frame is None:
                return {str(item): self._content.get(str(item), ([], -1)) for item in item_ids}
            for row, item in enumerate(missing):
                genres = frame["genres"].iloc[row]
                year = frame["release_year"].iloc[row]
                self._content[item] = (
                    [str(g) for g in genres] if genres is not None and not isinstance(genres, float) else [],
                    int(year) if year is not None and year == year else -1,
                )
        return {str(item): self._content[str(item)] for item in item_ids}
