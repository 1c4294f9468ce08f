"""Settings of the Feast feature store, shared by every process that reads or writes features.

A component that touches features (the Faust worker, the trainer, the API) subclasses
``FeaturesSettings`` so one ``STREAMREC_FEATURES__*`` environment configures them all alike.
This module imports nothing heavy (no Feast), so the environment check stays cheap.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from streamrec.core.settings import PROJECT_ROOT, CommonSettings


class FeatureStoreTuning(BaseModel):
    """Where the Feast repository and its data live.

    ``data_dir`` and ``registry_path`` default to paths under ``paths.state_dir`` (so a test
    that moves the state dir moves them too); read the resolved values through
    ``FeaturesSettings.data_dir`` / ``FeaturesSettings.registry_path``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    repo_dir: Path = PROJECT_ROOT / "features"
    data_dir: Path | None = None
    registry_path: Path | None = None
    project: str = Field(default="streamrec", pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    # Serving treats stream features older than this as missing: Feast applies no TTL on
    # online reads, so the reader must check ``event_timestamp`` itself.
    max_feature_age_s: float = Field(default=24 * 3600.0, gt=0)


class FeaturesSettings(CommonSettings):
    features: FeatureStoreTuning = FeatureStoreTuning()

    @property
    def data_dir(self) -> Path:
        """Profile parquet files, the offline push log and (by default) the registry."""
        return self.features.data_dir or self.paths.state_dir / "feast"

    @property
    def registry_path(self) -> Path:
        return self.features.registry_path or self.data_dir / "registry.db"


SETTINGS_CLASSES: tuple[type[CommonSettings], ...] = (FeaturesSettings,)
