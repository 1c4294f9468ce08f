"""Settings of the A/B evaluator (``streamrec evaluator``). Imports nothing heavy."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from serving.settings import ServingSettings


class EvaluatorSection(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    group_id: str = "streamrec-evaluator"
    # Policy (see serving/ab/policy.py for what each one guards).
    alpha: float = Field(default=0.05, gt=0, lt=1)
    tau: float = Field(default=0.05, gt=0)
    min_trials: int = Field(default=200, ge=10)
    collapse_ratio: float = Field(default=0.3, ge=0, le=1)
    collapse_min_trials: int = Field(default=400, ge=10)
    max_degraded_share: float = Field(default=0.2, ge=0, le=1)
    degraded_min_trials: int = Field(default=50, ge=1)
    latency_budget_ms: float = Field(default=50.0, gt=0)
    latency_ratio: float = Field(default=3.0, gt=1)
    latency_min_trials: int = Field(default=100, ge=10)
    # How often the figures are written to the timeline (wall seconds).
    snapshot_interval_s: float = Field(default=5.0, gt=0)
    # How often the current labels are re-read from the model config.
    labels_refresh_s: float = Field(default=2.0, gt=0)
    # None: <paths.state_dir>/evaluator
    output_dir: Path | None = None
    metrics_port: int = Field(default=0, ge=0, le=65535)


class EvaluatorSettings(ServingSettings):
    evaluator: EvaluatorSection = EvaluatorSection()

    @property
    def evaluator_dir(self) -> Path:
        return self.evaluator.output_dir or self.paths.state_dir / "evaluator"


SETTINGS_CLASSES = (EvaluatorSettings,)
