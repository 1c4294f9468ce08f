"""Training a :class:`~online_trainer.model.TwoTowerModel` on an example frame.

The optimizer state lives on the model and the traced training step is kept on it, so calling
:func:`train` again (an epoch, or the next interval's fine-tune) continues one run without tracing
again. The loss is the config's (:mod:`online_trainer.losses`), each example weighted by its event
kind (``kind_weights``, the trainer's setting; ``examples.example_weights``). Each step also returns
the global L2 norm of its gradients (:func:`gradient_norm`), summed and maxed on the device and read
once per call, so a diverging fine-tune is visible (``trainer_gradient_norm``) at no extra sync.
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
from online_trainer.distributed import shard_steps
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
    first two intervals, where it delays the versions it publishes. The step's signature leaves
    the batch and catalog sizes unknown, so this one trace serves every later interval.
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


def _batch_loss(model: TwoTowerModel, batch: dict[str, tf.Tensor], catalog: tuple[Any, ...], denominator: Any) -> Any:
    """The config's loss of one batch; ``denominator``: the global batch's count when ``batch`` is a shard."""
    cfg = model.config
    if cfg.full_catalog:
        users = model.user_tower(batch)
        return full_catalog_loss(
            users,
            model.item_tower(*catalog),
            batch["catalog_row"],
            temperature=cfg.temperature,
            weights=batch["weight"],
            denominator=denominator,
        )
    users, items = model(batch)
    return in_batch_softmax_loss(
        users,
        items,
        temperature=cfg.temperature,
        candidate_log_q=batch["log_q"] if cfg.logq_correction else None,
        candidate_ids=batch["item_id"] if cfg.remove_accidental_hits else None,
        weights=batch["weight"],
        denominator=denominator,
    )


def gradient_norm(gradients: list[Any]) -> tf.Tensor:
    """The global L2 norm of ``gradients``, as if each were dense.

    An embedding's gradient comes as ``tf.IndexedSlices`` with one row per lookup; rows of the same
    index are summed first (``tf.linalg.global_norm`` would take each lookup's row on its own).
    """
    squares = []
    for gradient in gradients:
        if gradient is None:
            continue
        if isinstance(gradient, tf.IndexedSlices):
            unique, position = tf.unique(gradient.indices)
            gradient = tf.math.unsorted_segment_sum(gradient.values, position, tf.shape(unique)[0])
        squares.append(tf.reduce_sum(tf.square(tf.cast(gradient, tf.float32))))
    return tf.sqrt(tf.add_n(squares)) if squares else tf.constant(0.0)


def _apply_step(
    model: TwoTowerModel, batch: dict[str, tf.Tensor], catalog: tuple[Any, ...], denominator: Any
) -> tuple[Any, Any]:
    """One optimizer step; returns (loss, global gradient norm) of the batch (of this worker's shard)."""
    with tf.GradientTape() as tape:
        loss = _batch_loss(model, batch, catalog, denominator)
    variables = model.trainable_variables
    gradients = tape.gradient(loss, variables)
    # Under tf.distribute the optimizer sums the workers' gradients (Keras' _all_reduce_sum_gradients).
    model.optimizer.apply_gradients(zip(gradients, variables, strict=True))
    return loss, gradient_norm(gradients)


def _first_dim_unknown(structure: Any) -> Any:
    """``structure``'s tensors (or specs) as specs whose first dimension is unknown, the rest kept."""
    return tf.nest.map_structure(lambda tensor: tf.TensorSpec([None, *tensor.shape[1:]], tensor.dtype), structure)


def _train_step(model: TwoTowerModel, batch: dict[str, tf.Tensor], catalog: tuple[Any, ...]) -> Any:
    """``model``'s compiled training step, traced once for any batch size and any catalog size.

    The signature leaves both sizes unknown: a last short batch, and a catalog grown by an
    interval's new items, would each trace the step again (seconds inside an interval)."""
    step = getattr(model, "_compiled_train_step", None)
    if step is not None:
        return step

    signature = [_first_dim_unknown(batch), _first_dim_unknown(catalog)]

    @tf.function(input_signature=signature)  # type: ignore[untyped-decorator]  # tf.function has no type hints
    def train_step(batch: dict[str, tf.Tensor], catalog: tuple[Any, ...]) -> tuple[tf.Tensor, tf.Tensor]:
        return _apply_step(model, batch, catalog, None)

    object.__setattr__(model, "_compiled_train_step", train_step)
    return train_step


def _sharded_step(model: TwoTowerModel, strategy: Any) -> Any:
    """One step of every worker on its shard of the global batch; returns the global batch's loss.

    No gradient norm: each worker holds only its shard's part of the gradient, and the norm of the
    sum is not a function of the parts' norms."""
    step = getattr(model, "_compiled_sharded_step", None)
    if step is not None:
        return step

    @tf.function(reduce_retracing=True)  # type: ignore[untyped-decorator]  # tf.function has no type hints
    def sharded_step(batch: dict[str, tf.Tensor], catalog: tuple[Any, ...], denominator: tf.Tensor) -> tf.Tensor:
        per_worker, _ = strategy.run(_apply_step, args=(model, batch, catalog, denominator))
        return strategy.reduce(tf.distribute.ReduceOp.SUM, per_worker, axis=None)

    object.__setattr__(model, "_compiled_sharded_step", sharded_step)
    return sharded_step


def _catalog_argument(model: TwoTowerModel) -> tuple[Any, ...]:
    # The catalog is an argument, not a captured constant: it can grow between calls (new items).
    if not model.config.full_catalog:
        return ()
    ids, values = catalog_arrays(model.catalog)
    return (tf.constant(ids), {name: tf.constant(column) for name, column in values.items()})


def train(
    model: TwoTowerModel,
    examples: pd.DataFrame,
    *,
    epochs: int | None = None,
    progress: bool = True,
    kind_weights: Mapping[str, float] | None = None,
    strategy: Any = None,
) -> dict[str, float]:
    """Fit on the example frame (``examples.example_columns``); returns the last epoch's mean loss
    (``loss``), examples/s, seconds, and the mean and max global gradient norm over every step
    (``gradient_norm_mean``, ``gradient_norm_max``; not with a multi-worker ``strategy``).

    ``kind_weights``: each example's loss weight by its ``kind`` (1.0 for a kind not named).
    Optimizer state lives on the model, so calling ``train`` once per epoch continues the same run.
    ``strategy``: a multi-worker ``tf.distribute`` strategy the model was built under
    (:mod:`online_trainer.distributed`); every worker passes the same ``examples`` and trains on its
    shard of each global batch of ``config.batch_size`` rows.
    """
    epochs = model.config.epochs if epochs is None else epochs
    if strategy is not None and strategy.num_replicas_in_sync > 1:
        return _train_sharded(model, examples, epochs, progress=progress, kind_weights=kind_weights, strategy=strategy)
    arrays = _training_arrays(model, examples, kind_weights)
    n = len(examples)
    # A new order per epoch (seeded by the step count), reproducible across restarts. Shuffled here
    # by index, not with ``Dataset.shuffle(n)``, which copies every string tensor through its buffer.
    order = _epoch_order(model)

    def epoch_batches() -> tf.data.Dataset:
        permutation = order.permutation(n)
        shuffled = {name: values[permutation] for name, values in arrays.items()}
        return tf.data.Dataset.from_tensor_slices(shuffled).batch(model.config.batch_size).prefetch(2)

    catalog = _catalog_argument(model)
    step = _train_step(model, {name: tf.constant(values[:1]) for name, values in arrays.items()}, catalog)
    steps_per_epoch = math.ceil(n / model.config.batch_size)
    losses: list[float] = []
    norm_sum, norm_max = tf.constant(0.0), tf.constant(0.0)  # NaN propagates through both
    started = time.perf_counter()
    with tqdm(total=epochs * steps_per_epoch, desc="train", unit="batch", disable=not progress) as bar:
        for _ in range(epochs):
            epoch_loss = tf.constant(0.0)
            for batch in epoch_batches():
                loss, norm = step(batch, catalog)
                epoch_loss += loss
                norm_sum, norm_max = norm_sum + norm, tf.maximum(norm_max, norm)
                bar.update(1)
            losses.append(float(epoch_loss) / steps_per_epoch)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    stats = _stats(losses, n * epochs, time.perf_counter() - started)
    stats["gradient_norm_mean"] = float(norm_sum) / max(epochs * steps_per_epoch, 1)
    stats["gradient_norm_max"] = float(norm_max)
    return stats


def _epoch_order(model: TwoTowerModel) -> np.random.Generator:
    return np.random.default_rng(model.config.seed * 1_000_003 + int(model.optimizer.iterations.value.numpy()))


def _stats(losses: list[float], examples: int, elapsed: float) -> dict[str, float]:
    final = losses[-1] if losses else float("nan")
    return {"loss": final, "examples_per_s": examples / elapsed if elapsed > 0 else 0.0, "seconds": elapsed}


def _train_sharded(
    model: TwoTowerModel,
    examples: pd.DataFrame,
    epochs: int,
    *,
    progress: bool,
    kind_weights: Mapping[str, float] | None,
    strategy: Any,
) -> dict[str, float]:
    """:func:`train` on one worker of several: the same permutations and global batches as one worker,
    each worker stepping through its shard (``distributed.shard_steps``), gradients summed across them."""
    arrays = _training_arrays(model, examples, kind_weights)
    n, batch_size = len(examples), model.config.batch_size
    workers, task = strategy.num_replicas_in_sync, strategy.cluster_resolver.task_id
    counted = arrays["catalog_row"] >= 0 if model.config.full_catalog else np.ones(n, dtype=bool)
    order = _epoch_order(model)
    step = _sharded_step(model, strategy)
    catalog = _catalog_argument(model)
    steps_per_epoch = math.ceil(n / batch_size)
    losses: list[float] = []
    started = time.perf_counter()
    with tqdm(total=epochs * steps_per_epoch, desc="train", unit="batch", disable=not progress) as bar:
        for _ in range(epochs):
            epoch_loss = tf.constant(0.0)
            for shard, global_rows in shard_steps(order.permutation(n), batch_size, workers, task):
                batch = {name: values[shard] for name, values in arrays.items()}
                epoch_loss += step(batch, catalog, tf.constant(float(counted[global_rows].sum())))
                bar.update(1)
            losses.append(float(epoch_loss) / steps_per_epoch)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return _stats(losses, n * epochs, time.perf_counter() - started)
