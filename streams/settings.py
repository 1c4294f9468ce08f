"""Settings of the Faust worker (``streams``): the shared sections plus a ``streams`` section.

The worker writes features, so it subclasses ``FeaturesSettings`` and one set of
``STREAMREC_FEATURES__*`` variables points it and every reader at the same Feast repository.
This module imports nothing heavy (no Faust, no Feast): the environment check imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from features.settings import FeaturesSettings
from streamrec.core.settings import CommonSettings


class StreamsTuning(BaseModel):
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
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    app_id: str = Field(default="streamrec-features", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    allowed_lateness_s: float = Field(default=24 * 3600.0, ge=0)
    max_future_skew_s: float = Field(default=300.0, ge=0)
    # take_events(push_batch_size, within=push_max_wait_s): how often the agents hand applied
    # events to the pushers; pushes themselves run back to back and coalesce what accumulates.
    push_batch_size: int = Field(default=1000, ge=1)
    push_max_wait_s: float = Field(default=0.02, gt=0)
    # A view's pushes start at most this often. Each push costs a fixed part (two Redis round
    # trips, one parquet file in the offline log, a thread hop) and writes one changelog record
    # per dirty entity; back to back under load they shrank to a few rows each, so every event
    # paid for its own changelog record and a share of a file. Waiting lets entities coalesce;
    # it adds up to this much to freshness (the target is p50 < 100 ms).
    push_min_interval_s: float = Field(default=0.05, ge=0)
    # Faust's producer_linger: how long the Kafka producer waits to fill a batch. At 0 every
    # forwarded event and changelog record went out in a produce request of its own (~30k
    # requests for 22k events, measured), each a syscall that also waits for the GIL.
    producer_linger_s: float = Field(default=0.005, ge=0)
    # sys.setswitchinterval for the worker (see streams.app: the push thread and the event loop).
    gil_switch_interval_s: float = Field(default=0.0005, gt=0, le=0.1)
    # Events applied but not yet pushed (their offsets uncommitted); beyond it the agents wait.
    max_held_events: int = Field(default=20_000, ge=1)
    push_offline: bool = True
    metrics_port: int = Field(default=0, ge=0, le=65535)
    web_port: int = Field(default=0, ge=0, le=65535)
    commit_interval_s: float = Field(default=1.0, gt=0)
    # How soon the group notices a dead worker (SIGKILL, lost host) and hands its partitions on;
    # the broker's group.min.session.timeout.ms (6 s by default) is the floor.
    session_timeout_s: float = Field(default=30.0, ge=6)
    # None = ``<paths.state_dir>/streams``; Faust keeps its table metadata there.
    state_dir: Path | None = None
    # The internal repartition topic (keyed by item id); None = ``<interactions>.by-item``.
    by_item_topic: str | None = None
    log_level: str = "info"
    # The worker's asyncio event loop. uvloop (libuv, in C) runs Faust's per-message machinery
    # (fetch -> conductor -> stream queue -> take_events, the producer's sends) with less CPU per
    # wake-up than the pure-Python default; "asyncio" is the fallback where uvloop is missing.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"


class StreamsSettings(FeaturesSettings):
    streams: StreamsTuning = StreamsTuning()

    @property
    def streams_state_dir(self) -> Path:
        return self.streams.state_dir or self.paths.state_dir / "streams"

    @property
    def by_item_topic(self) -> str:
        return self.streams.by_item_topic or f"{self.topics.interactions}.by-item"


SETTINGS_CLASSES: tuple[type[CommonSettings], ...] = (StreamsSettings,)
