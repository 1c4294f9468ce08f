"""The feature sink of the worker: batched pushes through ``features.store`` (Feast).

Rows carry ``version_us`` as their event timestamp (see ``streams.windows``: the entity's latest
event time, nudged by a microsecond per state change within one instant), so Feast's
strictly-newer check keeps the newest state and ignores a replayed one.

Feast's push is blocking (pandas, Redis round trips, a parquet file for the offline log); the
pipeline calls :meth:`FeastSink.push` in a worker thread. One ``FeatureStore`` per view keeps
the two agents' threads from sharing one Redis client and registry cache.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import pandas as pd

from streams.pipeline import FeatureRow, View
from streams.settings import StreamsSettings

if TYPE_CHECKING:
    from feast import FeatureStore


def rows_to_frame(view: View, rows: Sequence[FeatureRow]) -> pd.DataFrame:
    """The push frame of ``rows``: join key, feature columns, ``event_timestamp`` (UTC, µs)."""
    from features import views

    stream_view = views.USER_ACTIVITY if view == "user_activity" else views.ITEM_STATS
    # Column by column: building from a list of row dicts costs ~10x more at a few hundred rows.
    columns: dict[str, object] = {stream_view.join_key: [row.entity_id for row in rows]}
    for name in stream_view.feature_names:
        columns[name] = [row.features[name] for row in rows]
    columns[views.EVENT_TIMESTAMP] = pd.to_datetime([row.version_us for row in rows], unit="us", utc=True)
    return pd.DataFrame(columns)


class FeastSink:
    """``FeatureSink`` writing online (always) and offline (``streams.push_offline``)."""

    def __init__(self, settings: StreamsSettings) -> None:
        self.settings = settings
        self._stores: dict[View, FeatureStore] = {}
        self._lock = threading.Lock()

    def store(self, view: View) -> FeatureStore:
        with self._lock:
            if view not in self._stores:
                from features.store import open_store

                self._stores[view] = open_store(self.settings)
            return self._stores[view]

    def warm_up(self) -> None:
        """Import Feast, open both stores and read the registry once, before the first batch
        (seconds on a busy machine that would otherwise land on the first events' freshness)."""
        from features import views

        for view, stream_view in (("user_activity", views.USER_ACTIVITY), ("item_stats", views.ITEM_STATS)):
            self.store(view).get_feature_view(stream_view.view_name)  # type: ignore[arg-type]

    def push(self, view: View, rows: Sequence[FeatureRow]) -> None:
        from features.store import push_item_stats, push_user_activity

        frame = rows_to_frame(view, rows)
        push_rows = push_user_activity if view == "user_activity" else push_item_stats
        push_rows(self.store(view), frame, online=True, offline=self.settings.streams.push_offline)
