"""Trending items, held in memory: the fallback answer when the model cannot give one.

Every fallback needs the whole catalog ranked by ``item_stats.trending_score``; reading that per
request would cost more than the model call it replaces. So a daemon thread re-reads it every
``interval_s`` and swaps in a new immutable :class:`TrendingSnapshot`; requests only read the
current snapshot (one attribute load, no lock).

The catalog (which item ids exist) is the item profile view's batch source (its parquet file;
none for a dataset without item attributes) plus every item the stream view's offline push log
holds (the items that had an event), because Feast's online store cannot list keys: an item first
seen in the stream is in the next refresh's catalog, ranked by its stats like any other. The
stats come from the service's stream view, read online with ``Provider.online_read``
(``features.feast_internals``) in chunks of ``CHUNK`` ids with a ``PAUSE_S`` rest after each, so
a refresh never holds the GIL long enough to stall requests in flight.

Ranking: trending score, then 24 h count, then catalog order; items with no fresh stats rank
after every item with stats, so the list is never empty while the catalog is not. Restricted to
an allow-list (:meth:`TrendingSnapshot.top_of`), ids outside the catalog rank last the same way.
A refresh that fails keeps the previous snapshot (and is counted): stale trending beats no answer.
See docs/design/features.md#trending-refresh.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

from feast import FeatureStore, FeatureView, FileSource

from features.feast_internals import ViewReader, entity_key, python_value
from serving.api.errors import ApiSetupError
from serving.api.metrics import ApiMetrics
from streamrec.core import contracts

log = logging.getLogger(__name__)

CHUNK = 32
PAUSE_S = 0.02
_RANKING_FEATURES = ("trending_score", "count_24h")


@dataclass(frozen=True)
class TrendingSnapshot:
    """The catalog ranked best first, with each item's trending score."""

    item_ids: tuple[str, ...]
    scores: tuple[float, ...]
    refreshed_at: float  # time.time() of the read; 0 for the empty snapshot

    def top(self, k: int, exclude: frozenset[str] = frozenset()) -> list[tuple[str, float]]:
        picked: list[tuple[str, float]] = []
        for item_id, score in zip(self.item_ids, self.scores, strict=True):
            if item_id not in exclude:
                picked.append((item_id, score))
                if len(picked) == k:
                    break
        return picked

    def top_of(self, candidates: Sequence[str], k: int) -> list[tuple[str, float]]:
        """The first ``k`` of ``candidates`` in trending order; ids not in the snapshot follow in
        the given order with score 0 (like catalog items without stats)."""
        positions = self._positions
        unranked = len(positions)
        order = sorted(range(len(candidates)), key=lambda i: (positions.get(candidates[i], unranked), i))
        return [
            (candidates[i], self.scores[positions[candidates[i]]] if candidates[i] in positions else 0.0)
            for i in order[:k]
        ]

    @cached_property
    def _positions(self) -> dict[str, int]:
        # built on first use per snapshot; a race builds it twice, harmlessly
        return {item_id: position for position, item_id in enumerate(self.item_ids)}


EMPTY = TrendingSnapshot((), (), 0.0)


def _ids(path: str) -> list[str]:
    """The distinct non-empty item ids of a parquet file or directory, in first-seen order."""
    import pyarrow.parquet as pq

    column = pq.read_table(path, columns=[contracts.ITEM_JOIN_KEY]).column(contracts.ITEM_JOIN_KEY)
    return [str(item_id) for item_id in column.unique().to_pylist() if item_id]


def rank(catalog: Sequence[str], stats: dict[str, tuple[float, int]]) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """Order ``catalog`` by (trending score, 24 h count) descending, then catalog order."""
    order = sorted(
        range(len(catalog)),
        key=lambda i: (-stats.get(catalog[i], (0.0, 0))[0], -stats.get(catalog[i], (0.0, 0))[1], i),
    )
    return tuple(catalog[i] for i in order), tuple(float(stats.get(catalog[i], (0.0, 0))[0]) for i in order)


class TrendingItems:
    """The current trending snapshot, refreshed in a background thread."""

    def __init__(
        self,
        store: FeatureStore,
        *,
        interval_s: float,
        max_age_s: float,
        metrics: ApiMetrics,
        service_name: str = contracts.ITEM_FEATURE_SERVICE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._interval_s = interval_s
        self._max_age_s = max_age_s
        self._metrics = metrics
        self._clock = clock
        self._snapshot = EMPTY
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        service = store.get_feature_service(service_name)
        self._catalog_paths: list[str] = []
        stats_view: FeatureView | None = None
        for projection in service.feature_view_projections:
            view = store.get_feature_view(projection.name)
            names = {feature.name for feature in projection.features}
            if view.stream_source is not None and set(_RANKING_FEATURES) <= names:
                stats_view = view
            elif view.stream_source is None and isinstance(view.batch_source, FileSource):
                self._catalog_paths.append(view.batch_source.path)
        if stats_view is None:
            raise ApiSetupError(
                f"FeatureService {service_name!r} needs a stream view with {list(_RANKING_FEATURES)}; "
                "run `streamrec features setup`"
            )
        # The items that had events join the catalog: an item first seen in the stream trends at once.
        log_source = getattr(stats_view.stream_source, "batch_source", None)
        self._log_path: str | None = log_source.path if isinstance(log_source, FileSource) else None
        if self._log_path is None and not self._catalog_paths:
            raise ApiSetupError(
                f"FeatureService {service_name!r} has no file-backed item profile view and its stream view "
                f"{stats_view.name!r} no file-backed push log to list the catalog from; "
                "run `streamrec features setup`"
            )
        self._stats = ViewReader(store, stats_view, _RANKING_FEATURES)
        metrics.trending_age.set_function(self._age_s)

    @property
    def snapshot(self) -> TrendingSnapshot:
        return self._snapshot

    def _age_s(self) -> float:
        refreshed = self._snapshot.refreshed_at
        return self._clock() - refreshed if refreshed else float("inf")

    def catalog(self) -> list[str]:
        """Every item id: the item file's, then the push log's (items that had events)."""
        profile_ids, logged_ids = self._listed_ids()
        return list(dict.fromkeys([*profile_ids, *logged_ids]))

    def _listed_ids(self) -> tuple[list[str], list[str]]:
        """(ids of the item profile files, ids of the stream view's push log), each distinct, in file order."""
        return [item for path in self._catalog_paths for item in _ids(path)], (
            _ids(self._log_path) if self._log_path is not None else []
        )

    def _read_stats(self, item_ids: list[str]) -> dict[str, tuple[float, int]]:
        now = self._clock()
        stats: dict[str, tuple[float, int]] = {}
        score_name, count_name = _RANKING_FEATURES
        for start in range(0, len(item_ids), CHUNK):
            chunk = item_ids[start : start + CHUNK]
            rows = self._stats.read([entity_key(contracts.ITEM_JOIN_KEY, item_id) for item_id in chunk])
            for item_id, (event_time, values) in zip(chunk, rows, strict=True):
                if event_time is None or not values or values.get(score_name) is None:
                    continue
                if now - event_time.timestamp() > self._max_age_s:
                    continue
                score = python_value(values[score_name])
                count = python_value(values[count_name]) if count_name in values else 0
                if score is None:
                    continue
                stats[item_id] = (float(score), int(count or 0))
            self._stop.wait(PAUSE_S)  # requests run between chunks; once stopping, no rest
        return stats

    def refresh(self) -> TrendingSnapshot:
        """Read the catalog and its stats now and swap in the new snapshot (raises on failure).

        Stats are read only for the items of the push log when it lists any: with the worker's
        offline log on (``streams.push_offline``, the default) no other item can have a stats row,
        and a large item file then costs nothing per refresh. With the log off (empty), every
        catalog item is read.
        """
        profile_ids, logged_ids = self._listed_ids()
        catalog = list(dict.fromkeys([*profile_ids, *logged_ids]))
        item_ids, scores = rank(catalog, self._read_stats(logged_ids or catalog))
        self._snapshot = TrendingSnapshot(item_ids, scores, self._clock())
        return self._snapshot

    def start(self) -> None:
        """Refresh once now (failures logged, not raised), then every interval in the background."""
        self._refresh_logged()
        self._thread = threading.Thread(target=self._run, name="trending-refresh", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _refresh_logged(self) -> None:
        try:
            snapshot = self.refresh()
            log.debug("trending refreshed: %d items", len(snapshot.item_ids))
        except Exception:  # the previous snapshot stays; a fallback with old trending beats none
            self._metrics.trending_failures.inc()
            log.exception("trending refresh failed; keeping the list from %.0f s ago", self._age_s())

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._refresh_logged()
