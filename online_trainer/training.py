"""Training a :class:`~online_trainer.model.TwoTowerModel` on an example frame.

The optimizer state lives on the model and the traced training step is kept on it, so calling
:func:`train` again (an epoch, or the next interval's fine-tune) continues one run without tracing
again. The loss is the config's (:mod:`online_trainer.losses`), each example weighted by its event
kind (``kind_weights``, the trainer's setting; ``examples.example_weights``).
See docs/design/trainer.md#training-step-tracing-and-reuse.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import tensorflow as tf
from tqdm import tqdm

from online_trainer.catalog import catalog_arrays, item_arrays
from online_trainer.examples import example_weights, user_arrays
from online_trainer.losses import full_catalog_loss, in_batch_softmax_loss
from online_trainer.model import ITEM_INPUT_PREFIX, TwoTowerModel
from online_trainer.model_state import assign_optimizer_state, assign_weights, optimizer_state, weights_by_path


def trace_train_step(
    model: TwoTowerModel, examples: pd.DataFrame, *, kind_weights: Mapping[str, float] | None = None
) -> None:
    """Trace ``model``'s training step now, leaving its weights and optimizer state as they were.

    Why: a model object pays seconds of tracing the first time it trains. The online trainer
    alternates between two objects, so a new trainer process used to pay that twice, inside its
    first two intervals, where it delays the versions it publishes. Give ``examples`` more rows
    than a batch: the full batch and the short last one are both traced (``reduce_retracing``
    then serves every later batch size from the second trace).
    """
    if examples.empty:
        return
    weights, state = weights_by_path(model), optimizer_state(model)
    train(model, examples, epochs=1, progress=False, kind_weights=kind_weights)
    assign_weights(model, weights)
    assign_optimizer_state(model, state)


def _training_arrays(
    model: TwoTowerModel, examples: pd.DataFrame, kind_weights: Mapping[str, float] | None
) -> dict[str, np.ndarray]:
    if examples.empty:
        raise ValueError("train: the example frame is empty; nothing to learn from")
    arrays = user_arrays(examples, model.schema)
    item_ids = examples["item_id"].astype(str).to_numpy(dtype=object)
    n_items = len(item_ids)
    arrays["item_id"], values = item_arrays(model.catalog, item_ids)
    arrays.update({ITEM_INPUT_PREFIX + name: column for name, column in values.items()})
    arrays["weight"] = example_weights(examples, kind_weights)
    # logQ: in-batch candidates are drawn with the item's frequency in this training set.
    frequency = pd.Series(item_ids).map(pd.Series(item_ids).value_counts(normalize=True))
    arrays["log_q"] = np.log(frequency.to_numpy(dtype=np.float32))
    index = model.catalog.index
    arrays["catalog_row"] = np.fromiter((index.get(item, -1) for item in item_ids), dtype=np.int64, count=n_items)
    return arrays


def _train_step(model: TwoTowerModel) -> Any:
    step = getattr(model, "_compiled_train_step", None)
    if step is not None:
        return step
    cfg = model.config

    @tf.function(reduce_retracing=True)  # type: ignore[untyped-decorator]  # tf.function has no type hints
    def train_step(batch: dict[str, tf.Tensor], catalog: tuple[Any, ...]) -> tf.Tensor:
        with tf.GradientTape() as tape:
            if cfg.full_catalog:
                users = model.user_tower(batch)
                loss = full_catalog_loss(
                    users,
                    model.item_tower(*catalog),
                    batch["catalog_row"],
                    temperature=cfg.temperature,
                    weights=batch["weight"],
                )
            else:
                users, items = model(batch)
                loss = in_batch_softmax_loss(
                    users,
                    items,
                    temperature=cfg.temperature,
                    candidate_log_q=batch["log_q"] if cfg.logq_correction else None,
                    candidate_ids=batch["item_id"] if cfg.remove_accidental_hits else None,
                    weights=batch["weight"],
                )
        variables = model.trainable_variables
        model.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return loss

    object.__setattr__(model, "_compiled_train_step", train_step)
    return train_step


def train(
    model: TwoTowerModel,
    examples: pd.DataFrame,
    *,
    epochs: int | None = None,
    progress: bool = True,
    kind_weights: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Fit on the example frame (``examples.example_columns``); returns final loss and examples/s.

    ``kind_weights``: each example's loss weight by its ``kind`` (1.0 for a kind not named).
    Optimizer state lives on the model, so calling ``train`` once per epoch continues the same run.
    """
    epochs = model.config.epochs if epochs is None else epochs
    arrays = _training_arrays(model, examples, kind_weights)
    n = len(examples)
    # A new order per epoch (seeded by the step count), reproducible across restarts. Shuffled here
    # by index, not with ``Dataset.shuffle(n)``, which copies every string tensor through its buffer.
    order = np.random.default_rng(model.config.seed * 1_000_003 + int(model.optimizer.iterations))

    def epoch_batches() -> tf.data.Dataset:
        permutation = order.permutation(n)
        shuffled = {name: values[permutation] for name, values in arrays.items()}
        return tf.data.Dataset.from_tensor_slices(shuffled).batch(model.config.batch_size).prefetch(2)

    step = _train_step(model)
    # The catalog is an argument, not a captured constant: it can grow between calls (new items).
    catalog: tuple[Any, ...] = ()
    if model.config.full_catalog:
        ids, values = catalog_arrays(model.catalog)
        catalog = (tf.constant(ids), {name: tf.constant(column) for name, column in values.items()})
    steps_per_epoch = math.ceil(n / model.config.batch_size)
    losses: list[float] = []
    started = time.perf_counter()
    with tqdm(total=epochs * steps_per_epoch, desc="train", unit="batch", disable=not progress) as bar:
        for _ in range(epochs):
            epoch_loss = tf.constant(0.0)
            for batch in epoch_batches():
                epoch_loss += step(batch, catalog)
                bar.update(1)
            losses.append(float(epoch_loss) / steps_per_epoch)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    elapsed = time.perf_counter() - started
    final = losses[-1] if losses else float("nan")
    return {"loss": final, "examples_per_s": n * epochs / elapsed if elapsed > 0 else 0.0, "seconds": elapsed}
