"""Settings of the train/serve skew checker (``streamrec skew-check``). Imports nothing heavy.

The checker reads the impressions topic (Kafka settings) and recomputes features through the
feature store (``features`` settings), so its class extends ``FeaturesSettings``; its own knobs
are the ``skew`` section (``STREAMREC_SKEW__*``). See docs/design/skew.md.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import AwareDatetime, Field

from features.settings import FeaturesSettings
from streamrec.core.settings import CommonSettings, Section


class SkewThresholds(Section):
    """Values above which the run's log line names a statistic (the alert rules hold their own)."""

    linf: float = Field(default=0.1, ge=0, le=1)
    js: float = Field(default=0.1, ge=0, le=1)
    ks: float = Field(default=0.2, ge=0, le=1)
    mismatch_share: float = Field(default=0.05, ge=0, le=1)

    def as_dict(self) -> dict[str, float]:
        return self.model_dump()


class SkewTuning(Section):
    """The checker's knobs.

    Every ``interval_s`` it checks the impressions of ``(now - window_s - settle_s, now - settle_s]``;
    ``settle_s`` leaves time for the feature rows written just before a request to reach the
    offline log, which the point-in-time join reads. Drift compares that window's served features
    with a reference sample of the offline log up to ``reference_until`` (None: everything logged
    by then), drawn once, at the first run that has impressions.
    """

    interval_s: float = Field(default=60.0, gt=0)
    window_s: float = Field(default=300.0, gt=0)
    settle_s: float = Field(default=5.0, ge=0)
    # Rows compared per run, sampled uniformly from the window; bounds the join's cost.
    max_rows: int = Field(default=2_000, ge=1)
    reference_rows: int = Field(default=5_000, ge=1)
    reference_until: AwareDatetime | None = None
    # Histogram bins of the Jensen-Shannon distance (a numeric feature with at most this many
    # distinct values gets one bin per value).
    bins: int = Field(default=20, ge=2, le=1_000)
    # Two floats are the same value when math.isclose says so with these tolerances.
    rel_tol: float = Field(default=1e-6, ge=0)
    abs_tol: float = Field(default=1e-9, ge=0)
    thresholds: SkewThresholds = SkewThresholds()
    # The consumer's group.id: it reads by assignment and never commits (a restart re-reads the window).
    group_id: str = Field(default="streamrec-skew", min_length=1)
    metrics_port: int = Field(default=0, ge=0, le=65535)
    seed: int = 0


class SkewSettings(FeaturesSettings):
    skew: SkewTuning = SkewTuning()

    def reference_cut(self, now: datetime) -> datetime:
        """The newest offline-log time the drift reference may use."""
        return self.skew.reference_until or now


SETTINGS_CLASSES: tuple[type[CommonSettings], ...] = (SkewSettings,)
