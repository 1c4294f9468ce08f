"""Settings of the impression-click joiner (``faust -A streams.joiner_app worker``). Imports nothing heavy."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from streamrec.core.settings import CommonSettings


class JoinerTuning(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    app_id: str = Field(default="streamrec-joiner", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    # A click counts for an impression if it happens within this many seconds of it.
    label_window_s: float = Field(default=60.0, gt=0)
    # Extra wall-clock wait after the window before labeling, for clicks still in flight.
    grace_s: float = Field(default=5.0, ge=0)
    # Open impressions one user may have; past it the oldest are labeled early, so the user's join
    # state stays one Kafka message well under 1 MiB (streams/joiner.py says why).
    max_open_per_user: int = Field(default=100, ge=1)
    # How often closed windows are labeled.
    expire_interval_s: float = Field(default=1.0, gt=0)
    commit_interval_s: float = Field(default=1.0, gt=0)
    metrics_port: int = Field(default=0, ge=0, le=65535)
    # None = <paths.state_dir>/joiner
    state_dir: Path | None = None


class JoinerSettings(CommonSettings):
    joiner: JoinerTuning = JoinerTuning()

    @property
    def joiner_state_dir(self) -> Path:
        return self.joiner.state_dir or self.paths.state_dir / "joiner"


SETTINGS_CLASSES = (JoinerSettings,)
