"""A model's learned state (weights and Adam's step count and moments), read, restored and copied.

The export writes this state beside each SavedModel (``export.load_for_finetune`` restores it),
and fine-tuning trains a copy of the serving model that carries it (:func:`clone_for_finetune`,
:func:`copy_into`), so the serving model stays untouched and the copy continues its Adam run.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from online_trainer.model import TwoTowerModel, build_model
from online_trainer.model_config import ModelConfig


def _weight_name(model: TwoTowerModel, variable: Any) -> str:
    """The variable's Keras path without the model's own (per-instance, auto-numbered) name."""
    path: str = variable.path
    return path.removeprefix(f"{model.name}/")


def weights_by_path(model: TwoTowerModel) -> dict[str, np.ndarray]:
    """Every model weight by its path in the model (reads the backing tf.Variable: no numpy-2 warning)."""
    return {_weight_name(model, variable): np.array(variable.value.numpy()) for variable in model.weights}


def assign_weights(model: TwoTowerModel, weights: dict[str, np.ndarray]) -> None:
    """Set weights saved by :func:`weights_by_path`; every model weight must be present with its shape."""
    for variable in model.weights:
        name = _weight_name(model, variable)
        if name not in weights:
            raise ValueError(f"weights lack {name!r}; they were saved from a model with another config")
        value = weights[name]
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(f"weight {name!r} has shape {value.shape}, the model expects {variable.shape}")
        variable.assign(value)


def optimizer_state(model: TwoTowerModel) -> list[np.ndarray]:
    """Adam's step count and moments in a fixed order (the learning rate is config, not state)."""
    return [np.array(v.value.numpy()) for v in model.optimizer.variables if not v.path.endswith("learning_rate")]


def assign_optimizer_state(model: TwoTowerModel, state: list[np.ndarray]) -> None:
    """Continue a training run: restore what :func:`optimizer_state` returned for a model of the same config."""
    targets = [v for v in model.optimizer.variables if not v.path.endswith("learning_rate")]
    if len(targets) != len(state) or any(tuple(v.shape) != s.shape for v, s in zip(targets, state, strict=False)):
        raise ValueError("optimizer state does not fit this model; it was saved from a model with another config")
    for variable, value in zip(targets, state, strict=True):
        variable.assign(value)


def finetune_config(
    config: ModelConfig, *, learning_rate: float | None = None, full_catalog: bool | None = None
) -> ModelConfig:
    """The config a fine-tune copy trains with (see :func:`clone_for_finetune`)."""
    return dataclasses.replace(
        config,
        learning_rate=config.finetune_learning_rate if learning_rate is None else learning_rate,
        batch_size=config.finetune_batch_size,
        full_catalog=config.full_catalog if full_catalog is None else full_catalog,
    )


def clone_for_finetune(
    model: TwoTowerModel,
    *,
    learning_rate: float | None = None,
    keep_optimizer_state: bool = True,
    full_catalog: bool | None = None,
) -> TwoTowerModel:
    """A copy with the same weights, catalog and optimizer state (the serving model stays untouched).

    The copy trains with ``finetune_learning_rate`` (or ``learning_rate``) and ``finetune_batch_size``,
    and with the full-catalog loss if ``full_catalog`` (None: as the model's config says).
    Adam's moments are carried over (``keep_optimizer_state``): a fresh Adam takes full-size steps on
    every touched weight at first, which measurably hurt the first fine-tunes in bench/prequential.py.
    """
    clone = build_model(
        model.catalog, finetune_config(model.config, learning_rate=learning_rate, full_catalog=full_catalog)
    )
    assign_weights(clone, weights_by_path(model))
    if keep_optimizer_state:
        assign_optimizer_state(clone, optimizer_state(model))
    return clone


def copy_model(model: TwoTowerModel) -> TwoTowerModel:
    """A new model object with ``model``'s config, catalog, weights and Adam state.

    Built in the current ``tf.distribute`` scope: called outside it, the plain model that a model
    trained under a multi-worker strategy is exported from (:mod:`online_trainer.distributed`).
    """
    copy = build_model(model.catalog, model.config)
    assign_weights(copy, weights_by_path(model))
    assign_optimizer_state(copy, optimizer_state(model))
    return copy


def copy_into(target: TwoTowerModel, source: TwoTowerModel) -> TwoTowerModel:
    """Make ``target`` a fine-tune copy of ``source`` again (weights, optimizer state, catalog).

    The online trainer reuses a candidate object that no longer serves instead of building a new
    one each interval: its traced training step is kept, where a new object pays seconds of tracing.
    ``target`` must come from :func:`clone_for_finetune` of a model of the same architecture.
    """
    copy_weights_into(target, source)
    assign_optimizer_state(target, optimizer_state(source))
    return target


def copy_weights_into(target: TwoTowerModel, source: TwoTowerModel) -> TwoTowerModel:
    """``target`` with ``source``'s weights and catalog (not its optimizer state)."""
    assign_weights(target, weights_by_path(source))
    target.catalog = source.catalog
    return target
