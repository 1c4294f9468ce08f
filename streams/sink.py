"""The feature sink of the worker: one ``features.push.RowWriter`` per view (Feast online + push log).

Rows carry ``version_us`` as their event timestamp (see ``streams.windows``: the entity's latest
event time, nudged by a microsecond per state change within one instant), so Feast's
strictly-newer check keeps the newest state and ignores a replayed one.

Why ``RowWriter`` rather than ``store.push`` with a frame: ``store.push`` re-reads the view from
the registry and goes through pandas and arrow on every call, which was most of a push's cost;
the writer resolves the view once (``warm_up``) and writes through the same Feast provider call,
so the online store holds exactly what ``store.push`` would have written (see ``features.push``).

Writes are blocking (Redis round trips, a parquet file for the offline log); the pusher calls
:meth:`FeastSink.push` in a worker thread. One ``FeatureStore`` per view keeps the two views'
threads from sharing one Redis client.

The views' features follow the dataset's ``AttributeSchema`` (per-kind counts where it counts
kinds): the sink is given the schema the worker's windows were built from, so the rows and the
views agree; a registry applied from another schema fails at ``warm_up`` naming the fix.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from streamrec.core.attributes import AttributeSchema
from streams.pipeline import FeatureRow, View
from streams.settings import StreamsSettings

if TYPE_CHECKING:
    from features.push import RowWriter


class FeastSink:
    """``FeatureSink`` writing online (always) and offline (``streams.push_offline``)."""

    def __init__(self, settings: StreamsSettings, schema: AttributeSchema) -> None:
        self.settings = settings
        self.schema = schema
        self._writers: dict[View, RowWriter] = {}
        self._lock = threading.Lock()

    def writer(self, view: View) -> RowWriter:
        with self._lock:
            if view not in self._writers:
                from features import views
                from features.push import RowWriter
                from features.store import open_store

                if view == "user_activity":
                    stream_view = views.user_activity_view(self.schema)
                else:
                    stream_view = views.item_stats_view(self.schema)
                self._writers[view] = RowWriter(open_store(self.settings), stream_view)
            return self._writers[view]

    def warm_up(self) -> None:
        """Import Feast and resolve both views before the first batch (seconds on a busy machine
        that would otherwise land on the first events' freshness); at once when done already."""
        for view in ("user_activity", "item_stats"):
            self.writer(view)

    def store_epoch(self) -> str | None:
        """Which run of the online store answers: Redis' ``run_id`` (every master's, for a
        cluster), new after each restart; None while it does not answer. Raises ``FeaturesError``
        when the worker's Redis user may not run ``INFO`` (an ACL that would hide restarts).

        A restarted Redis may have lost the writes of its last second (``appendfsync everysec``)
        although it acknowledged them; the pipeline compares epochs and pushes its states again
        (``FeaturePipeline.check_feature_store``).
        """
        from redis import RedisCluster, RedisError
        from redis.exceptions import NoPermissionError

        from features.errors import FeaturesError
        from features.feast_internals import online_redis_client

        with self._lock:  # never build a writer here: that is warm_up's (seconds), and pushes wait on the lock
            writer = self._writers.get("user_activity")
        client = None if writer is None else online_redis_client(writer.store)
        if client is None:
            return None
        try:
            if isinstance(client, RedisCluster):
                replies = cast(dict[str, dict[str, object]], client.info("server", target_nodes=RedisCluster.PRIMARIES))
                run_ids = sorted(str(reply["run_id"]) for reply in replies.values())
            else:
                reply = cast(dict[str, object], client.info("server"))
                run_ids = [str(reply["run_id"])]
        except NoPermissionError as exc:
            raise FeaturesError(
                f"Redis user {self.settings.redis.username!r} may not run INFO ({exc}), so a restart of the "
                "online store goes unnoticed; grant it +info (as the secure stack's ACL does)"
            ) from exc
        except (RedisError, KeyError, OSError):
            return None
        return ",".join(run_ids)

    def push(self, view: View, rows: Sequence[FeatureRow]) -> float:
        """Online, then the offline log; returns when the rows became readable online (``time.time``)."""
        readable_at: list[float] = []
        self.writer(view).write(
            rows,
            online=True,
            offline=self.settings.streams.push_offline,
            on_online_written=lambda: readable_at.append(time.time()),
        )
        return readable_at[0]
