"""Settings of the impression-click joiner (``faust -A streams.joiner_app worker``). Imports nothing heavy."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from streamrec.core.settings import CommonSettings
from streams.settings import APP_ID_PATTERN, FaustAppTuning


class JoinerTuning(FaustAppTuning):
    app_id: str = Field(default="streamrec-joiner", pattern=APP_ID_PATTERN)
    # A click counts for an impression if it happens within this many seconds of it.
    label_window_s: float = Field(default=60.0, gt=0)
    # Extra wall-clock wait after the window before labeling, for clicks still in flight.
    grace_s: float = Field(default=5.0, ge=0)
    # Open impressions one user may have; past it the oldest are labeled early, so the user's join
    # state stays one Kafka message well under 1 MiB (streams/joiner.py says why).
    max_open_per_user: int = Field(default=100, ge=1)
    # How often closed windows are labeled.
    expire_interval_s: float = Field(default=1.0, gt=0)


class JoinerSettings(CommonSettings):
    joiner: JoinerTuning = JoinerTuning()

    @property
    def joiner_state_dir(self) -> Path:
        return self.joiner.resolved_state_dir(self.paths, "joiner")


SETTINGS_CLASSES = (JoinerSettings,)
