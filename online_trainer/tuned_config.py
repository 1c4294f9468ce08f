"""The best configuration ``streamrec tune`` found, and how ``streamrec train`` starts from it.

``streamrec tune`` writes ``best_config.json`` (``TrainerSettings.best_config_path``): the best
trial's hyperparameters (only :data:`~online_trainer.settings.SEARCHED` ModelConfig fields), its
metric, and the dataset and cut-off it was tuned on. ``streamrec train`` builds its ModelConfig
as: ModelConfig's defaults, then that file's values (when ``trainer.search.use_best_config`` and
the file exists), then the flags given on its command line; :func:`train_config` says which
source set what, so a run's log shows the config it used. A file tuned on another dataset is
refused rather than applied: its values were chosen for other data.

Kept apart from :mod:`online_trainer.tuning` so ``train`` reads the file without importing
keras-tuner.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from online_trainer.model_config import ModelConfig
from online_trainer.settings import SEARCHED, TrainerSettings
from streamrec.core.errors import SettingsError


class TunedValues(BaseModel):
    """ModelConfig fields a search chose; a field left out keeps ModelConfig's default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    embedding_dim: int | None = Field(default=None, ge=1)
    batch_size: int | None = Field(default=None, ge=1)
    learning_rate: float | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, gt=0)

    def as_overrides(self) -> dict[str, Any]:
        return {name: value for name, value in self.model_dump().items() if value is not None}


class BestConfig(BaseModel):
    """The content of ``best_config.json``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    values: TunedValues
    metric: str  # e.g. hit_at_10: the gate's metric on the time-ordered hold-out
    metric_value: float
    trial: int
    trials: int
    epochs_per_trial: int
    dataset: str
    until: str
    trials_path: str


def write_best_config(path: Path, best: BestConfig) -> None:
    """Write ``best`` to ``path`` through a temporary file, so ``train`` never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(best.model_dump_json(indent=2) + "\n")
    partial.replace(path)


def read_best_config(path: Path) -> BestConfig | None:
    """The file at ``path`` (None when there is none); a broken one names the fix."""
    if not path.exists():
        return None
    try:
        return BestConfig.model_validate(json.loads(path.read_text()))
    except (ValueError, ValidationError) as exc:
        raise SettingsError(
            f"{path} is not a best configuration written by `streamrec tune` ({exc}); "
            "rerun `streamrec tune`, or delete the file to train with ModelConfig's defaults"
        ) from exc


def train_config(
    settings: TrainerSettings, dataset: str, explicit: dict[str, Any], *, use_best: bool | None = None
) -> tuple[ModelConfig, str]:
    """``streamrec train``'s ModelConfig and a line saying where its values came from.

    ``explicit``: the command line's ModelConfig values (None: not given); they win over the file.
    ``use_best``: the command line's choice (None: ``trainer.search.use_best_config``).
    """
    given = {name: value for name, value in explicit.items() if value is not None}
    path = settings.best_config_path
    use_best = settings.trainer.search.use_best_config if use_best is None else use_best
    best = read_best_config(path) if use_best else None
    if best is not None and best.dataset != dataset:
        raise SettingsError(
            f"{path} was tuned on dataset {best.dataset!r}, not {dataset!r}; run `streamrec tune --dataset "
            f"{dataset} ...`, or pass --no-best-config to train with ModelConfig's defaults"
        )
    tuned = best.values.as_overrides() if best is not None else {}
    config = dataclasses.replace(ModelConfig(), **{**tuned, **given})
    shown = {name: getattr(config, name) for name in SEARCHED}
    values = ", ".join(f"{name}={value:g}" for name, value in shown.items())
    if best is not None:
        source = f"tuned config {path} (trial {best.trial} of {best.trials}, {best.metric} {best.metric_value:.4f})"
    elif use_best:
        source = f"ModelConfig defaults (no tuned config at {path})"
    else:
        source = "ModelConfig defaults (tuned config not used)"
    note = f"; set on the command line: {', '.join(sorted(given))}" if given else ""
    return config, f"model config: {values} from {source}{note}"
