"""Settings of the impression-click joiner (``faust -A streams.joiner_app worker``). Imports nothing heavy."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from streamrec.core.settings import CommonSettings
from streams.settings import APP_ID_PATTERN, FaustAppTuning

# Kafka's default message limit (the producer's max.request.size, the broker's message.max.bytes)
# is 1 MiB; a user's state must stay one message under it, with room for the record's envelope.
MAX_STATE_MESSAGE_BYTES = 900_000


class JoinerTuning(FaustAppTuning):
    """The joiner's knobs (``STREAMREC_JOINER__*``).

    Memory: the join table lives in the worker's memory (and its changelog), one state per user
    with an open window, a held click or a remembered label. Each is at most ``max_state_bytes``
    of JSON (about 3-4 times that as Python objects); a typical one is what the user was shown in
    the last ``label_window_s`` (1-2 KB per impression) plus ~60 B per remembered request id.
    docs/design/streams.md#joiner-state-cap has the figures.
    """

    app_id: str = Field(default="streamrec-joiner", pattern=APP_ID_PATTERN)
    # A click counts for an impression if it happens within this many seconds of it.
    label_window_s: float = Field(default=60.0, gt=0)
    # Extra wall-clock wait after the window before labeling, for clicks still in flight.
    grace_s: float = Field(default=5.0, ge=0)
    # Open impressions one user may have; past it the oldest are labeled early.
    max_open_per_user: int = Field(default=100, ge=1)
    # A user's whole state (one changelog message); past it the oldest open impressions are
    # labeled early, then the oldest held clicks are dead-lettered (streams/joiner.py says why).
    max_state_bytes: int = Field(default=512 * 1024, ge=16 * 1024, le=MAX_STATE_MESSAGE_BYTES)
    # One impression's logged features (user features plus the request context); larger ones
    # lose their largest keys, and the original impression goes to the dead-letter topic.
    max_features_bytes: int = Field(default=8 * 1024, ge=256)
    # How long after its window a labeled request id is remembered (late click or no impression;
    # a redelivered impression is not labeled twice); an idle user's state expires with it.
    labeled_memory_s: float = Field(default=300.0, ge=0)
    # How often closed windows are labeled.
    expire_interval_s: float = Field(default=1.0, gt=0)
    # How soon the group notices a dead joiner and a restarted one gets its partitions back; the
    # broker's group.min.session.timeout.ms (6 s by default) is the floor.
    session_timeout_s: float = Field(default=30.0, ge=6)

    @model_validator(mode="after")
    def _features_fit_the_state(self) -> JoinerTuning:
        if self.max_features_bytes * 4 > self.max_state_bytes:
            raise ValueError(
                f"joiner.max_features_bytes ({self.max_features_bytes}) must be at most a quarter of "
                f"joiner.max_state_bytes ({self.max_state_bytes}), so one impression never fills a user's state; "
                "lower STREAMREC_JOINER__MAX_FEATURES_BYTES or raise STREAMREC_JOINER__MAX_STATE_BYTES"
            )
        return self


class JoinerSettings(CommonSettings):
    joiner: JoinerTuning = JoinerTuning()

    @property
    def joiner_state_dir(self) -> Path:
        return self.joiner.resolved_state_dir(self.paths, "joiner")


SETTINGS_CLASSES = (JoinerSettings,)
