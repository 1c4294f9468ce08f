"""Settings of the Faust apps in ``streams``: what both apps share, and the feature worker's section.

``FaustAppTuning`` holds what ``streams.faust_app.build_app`` builds every app from; each app's
section subclasses it (``STREAMREC_STREAMS__*`` here, ``STREAMREC_JOINER__*`` in
``streams.joiner_settings``), so both apps read those settings under the same names. The worker
writes features, so ``StreamsSettings`` subclasses ``FeaturesSettings`` and one set of
``STREAMREC_FEATURES__*`` variables points it and every reader at the same Feast repository.
This module imports nothing heavy (no Faust, no Feast): the environment check imports it.
The reasoning behind the tuned defaults: see docs/design/streams.md#worker-tuning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from features.settings import FeaturesSettings
from streamrec.core.settings import CommonSettings, PathSettings, Section

# A Faust app id names its consumer group, changelog topics and state directory.
APP_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"


class FaustAppTuning(Section):
    """What every Faust app of ``streams`` is built from; each app's section sets its ``app_id``."""

    app_id: str = Field(pattern=APP_ID_PATTERN)
    commit_interval_s: float = Field(default=1.0, gt=0)
    # Prometheus /metrics, served when the app starts; 0 = not served.
    metrics_port: int = Field(default=0, ge=0, le=65535)
    # None = ``<paths.state_dir>/<the app's directory>``; Faust keeps its table metadata there.
    state_dir: Path | None = None
    # This process's number among the app's processes on one host (``--workers N`` sets it, see
    # streams.worker_group): process n serves metrics on metrics_port + n, keeps its state in
    # ``<state dir>/worker-<n>`` (n > 0) and names its Kafka client ``<client_id>-<n>``.
    worker_index: int = Field(default=0, ge=0, le=255)
    # The watchdog exits the process (its supervisor restarts it) when a record the app's Kafka
    # producer holds has gone unconfirmed this long: the idempotent producer retries forever, and
    # a batch it never sends again holds every push and offset commit (streams.watchdog).
    producer_stall_s: float = Field(default=60.0, gt=0)

    def resolved_state_dir(self, paths: PathSettings, default_name: str) -> Path:
        base = self.state_dir or paths.state_dir / default_name
        return base / f"worker-{self.worker_index}" if self.worker_index else base

    @property
    def resolved_metrics_port(self) -> int:
        """This process's metrics port (0: none)."""
        return self.metrics_port + self.worker_index if self.metrics_port else 0


class StreamsTuning(FaustAppTuning):
    """How the worker consumes, keeps state and pushes.

    ``allowed_lateness_s`` is measured in event time against the entity's latest accepted event:
    an event older than that is counted (``streams_late_events_total``) and dropped. The default
    (24 h, the largest window) makes every feature a function of the *set* of accepted events,
    independent of arrival order: anything dropped as late lies outside every window of every
    later state. That is what keeps a replay or a catch-up after downtime exact on the item side,
    where events from several user partitions merge with arbitrary event-time skew. A smaller
    value trades that for less state per entity.

    ``max_future_skew_s`` rejects (dead-letters) events from the future relative to the wall
    clock; events from the past (MovieLens is from 1997) are fine.

    Bounded state (rules in ``streams.windows`` and ``streams.expiry``; memory and record sizes in
    docs/design/streams.md#bounded-state): an entity keeps its newest ``max_exact_events`` events
    exactly (17 bytes each in its changelog record, about 190 in memory) and folds older ones into
    at most ``max_fold_buckets`` count buckets (13 bytes each, in the record and in memory); an
    event older than what it folded is dead-lettered (``oversize``). The worker refuses at start
    caps whose largest record could exceed ``max_state_record_bytes``, which stays under the Kafka
    producer's 1,000,000-byte request limit. Keep ``max_exact_events`` at least ``max_held_events``,
    so that events redelivered after a crash are still recognised as duplicates (beyond it they
    are dead-lettered as oversize: dropped either way). Every ``expiry_interval_s`` (0: never), an
    entity idle both in event time (its newest event more than retention + ``expiry_grace_s``
    behind its partition's progress) and on the wall clock (not written for ``expiry_idle_s``)
    leaves its table, with a changelog tombstone; its feature row stays.
    """

    app_id: str = Field(default="streamrec-features", pattern=APP_ID_PATTERN)
    allowed_lateness_s: float = Field(default=24 * 3600.0, ge=0)
    max_future_skew_s: float = Field(default=300.0, ge=0)
    # take_events(push_batch_size, within=push_max_wait_s): how often the agents hand applied
    # events to the pushers; pushes run on their own pace and coalesce what accumulates.
    push_batch_size: int = Field(default=1000, ge=1)
    push_max_wait_s: float = Field(default=0.02, gt=0)
    # A view's writes to the store take at most this share of the time: after a write of d
    # seconds the next push waits d * (1 / share - 1), so pushes that grow with the load coalesce
    # more entities, and a light load's cheap pushes follow each other closely (ViewPusher._run).
    push_busy_share: float = Field(default=0.5, gt=0, le=1)
    # A view's pushes start at most this often, whatever they cost (0: paced by push_busy_share only).
    push_min_interval_s: float = Field(default=0.0, ge=0)
    # Faust's producer_linger: how long the Kafka producer waits to fill a batch.
    producer_linger_s: float = Field(default=0.005, ge=0)
    # sys.setswitchinterval for the worker: lets the event loop run beside the push thread.
    gil_switch_interval_s: float = Field(default=0.0005, gt=0, le=0.1)
    # Events applied but not yet pushed (their offsets uncommitted); beyond it the agents wait.
    max_held_events: int = Field(default=20_000, ge=1)
    push_offline: bool = True
    # How often the worker asks the online store whether it restarted (and may have lost the
    # writes of its last second); after a restart it pushes every state it owns again. 0: never.
    store_check_interval_s: float = Field(default=2.0, ge=0)
    # A partition rewound to records the worker never saw is sought again when they have not come
    # back this long after the last seek (``FeaturePipeline.retry_rewinds``).
    rewind_retry_s: float = Field(default=5.0, gt=0)
    web_port: int = Field(default=0, ge=0, le=65535)
    # How soon the group notices a dead worker (SIGKILL, lost host) and hands its partitions on;
    # the broker's group.min.session.timeout.ms (6 s by default) is the floor.
    session_timeout_s: float = Field(default=30.0, ge=6)
    # The internal repartition topic (keyed by item id); None = ``<interactions>.by-item``.
    by_item_topic: str | None = None
    log_level: str = "info"
    # The worker's asyncio event loop: uvloop (libuv, in C) costs less CPU per wake-up than the
    # pure-Python default; "asyncio" is the fallback where uvloop is missing.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    max_exact_events: int = Field(default=20_000, ge=1)
    max_fold_buckets: int = Field(default=30_000, ge=512)
    max_state_record_bytes: int = Field(default=900_000, ge=65_536, le=990_000)
    expiry_interval_s: float = Field(default=60.0, ge=0)
    expiry_grace_s: float = Field(default=24 * 3600.0, ge=0)
    expiry_idle_s: float = Field(default=600.0, ge=0)


class StreamsSettings(FeaturesSettings):
    streams: StreamsTuning = StreamsTuning()

    @property
    def streams_state_dir(self) -> Path:
        return self.streams.resolved_state_dir(self.paths, "streams")

    @property
    def by_item_topic(self) -> str:
        return self.streams.by_item_topic or f"{self.topics.interactions}.by-item"


SETTINGS_CLASSES: tuple[type[CommonSettings], ...] = (StreamsSettings,)
