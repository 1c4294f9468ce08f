"""Settings of the A/B evaluator (``streamrec evaluator``). Imports nothing heavy."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from serving.rollout.policy import PolicyConfig
from serving.settings import ServingSettings


class EvaluatorSection(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # The consumer's group.id; it never joins the group nor commits (checkpoint.py says why).
    group_id: str = "streamrec-evaluator"
    # The decision rule (serving/rollout/policy.py says what each knob guards).
    policy: PolicyConfig = PolicyConfig()
    # How often the figures are written to the timeline (wall seconds).
    snapshot_interval_s: float = Field(default=5.0, gt=0)
    # How often the current labels are re-read from the model config.
    labels_refresh_s: float = Field(default=2.0, gt=0)
    # decisions.jsonl, rejected.json, timeline.jsonl, checkpoint.json; None: <paths.state_dir>/evaluator
    output_dir: Path | None = None
    # Hold a promotion when the canary loses a segment badly (``slices``, on CommonSettings, sets
    # "badly"): a canary that hurts a group of users is not rolled out to all of them unseen; the
    # decision log's ``held`` record says why (serving/rollout/evaluator.py).
    block_promotion_on_slice_flag: bool = True
    # How often streamrec_consumer_group_lag is updated from the consumer's cached watermarks.
    lag_interval_s: float = Field(default=5.0, gt=0)
    # /metrics (prometheus_client's server) on this port; 0: none (the stack sets one per process).
    metrics_port: int = Field(default=0, ge=0, le=65535)


class EvaluatorSettings(ServingSettings):
    evaluator: EvaluatorSection = EvaluatorSection()

    @property
    def evaluator_dir(self) -> Path:
        return self.evaluator.output_dir or self.paths.state_dir / "evaluator"


SETTINGS_CLASSES = (EvaluatorSettings,)
