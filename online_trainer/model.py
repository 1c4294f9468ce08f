"""A two-tower retrieval model over the whole catalog, with its preprocessing inside.

Design (after TensorFlow Recommenders' ``tasks/retrieval.py`` and YouTube's two-tower papers):

* **Raw strings in.** Every id and profile value goes through a Keras ``Hashing`` layer inside the
  model, so serving passes exactly what Feast returns and a never-seen user or item id is valid
  input at once (no vocabulary to grow, nothing to re-export but weights).
* **Collisions.** Ids are hashed twice (two salts) into one table per entity and the two rows are
  summed (a Bloom/"hash embedding"): with ``B`` buckets and ``n`` ids, a given id shares *one* row
  with some other id with probability ~``2n/B`` but shares *both* only with ~``(n/B)^2``, so two
  ids almost never get identical vectors. Bigger tables cost memory (``buckets x dim`` floats and
  2x that in Adam state) and nothing else; they are the knob if the catalog grows.
* **User tower**: user id + profile (age bucket, gender, occupation, zip prefix) + the
  position-weighted mean of the recent items' id embeddings (``use_position_weights``; the *same*
  table as the item tower: a user is partly the items they just touched, which is what makes the
  online updates bite) + the mean of the newest three (``use_last_item``, ``last_items``) +
  ``log1p`` of the activity counts, concatenated and projected.
  A new user falls back to profile and recent items.
* **Item tower**: item id + genres (masked mean of hashed-genre embeddings) + release-year bucket.
  A new item's id rows are untrained (small random init), so its vector comes from its content.
* **Loss**: softmax with temperature over L2-normalized vectors, against every catalog item
  (``full_catalog``, the default: exact, and ``B x N`` logits per step is cheap for catalogs of
  thousands of items), or against the batch's own items with the logQ correction (subtract the
  log sampling probability of each in-batch candidate, Yi et al. 2019) and accidental hits (the
  same item twice in a batch) removed from the negatives, for catalogs too large to score per step.
* **Scores** are the logits ``cos(user, item) / temperature``, in memory and in the export alike.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from tqdm import tqdm

from online_trainer.catalog import ItemCatalog
from online_trainer.catalog import catalog_arrays as catalog_arrays  # re-exported: export.py and tests use them
from online_trainer.catalog import item_arrays as item_arrays
from online_trainer.catalog import user_arrays as user_arrays
from online_trainer.optimizer import LazyAdam
from streamrec.core import contracts

PAD_SCORE = float(np.finfo(np.float32).min)  # score of an empty ("") slot in a top-K answer
_ID_SALTS = ((0x5EED_0001, 0x5EED_0002), (0x5EED_0003, 0x5EED_0004))


@dataclass(frozen=True)
class ModelConfig:
    embedding_dim: int = 64
    item_id_buckets: int = 32_768
    user_id_buckets: int = 32_768
    profile_buckets: int = 1_024  # per profile feature (age bucket, gender, occupation, zip prefix)
    profile_dim: int = 16
    genre_buckets: int = 128
    max_genres: int = 8
    content_dim: int = 16
    year_min: int = 1900
    year_bucket_width: int = 5
    year_buckets: int = 32
    use_user_id: bool = True
    use_profile: bool = True
    use_recent_items: bool = True
    # The newest recent item's own embedding beside the mean of all of them: the user's last step,
    # which the mean blurs (ml-100k users rate in bursts, one title leading to the next). In
    # bench/prequential.py on the loop's split (50 % bootstrap, 25 intervals of 1,600 events) it
    # moved online/frozen hit@10 from 1.128 to 1.187 (online 0.174 -> 0.181, frozen 0.154 -> 0.153),
    # no gate rejection: the online model's fresher item rows now also act through that slot.
    use_last_item: bool = True
    # How many of the newest recent items that slot averages. With position weights and
    # ``trainer.replay_fraction`` 0.1 on the same split: 1 / 2 / 3 / 5 gave online hit@10 0.196 /
    # 0.198 / 0.204 / 0.203 (frozen 0.158 / 0.167 / 0.170 / 0.171): the last few titles of a burst
    # say more than the very last one, and more than the whole, position-weighted, history.
    last_items: int = 3
    # The recent items weighted by position (a learned weight per slot, newest first; all equal at
    # the start, which is the plain mean) instead of their plain mean: how fast a user's taste in a
    # burst moves on is learned, not fixed. In bench/prequential.py on the loop's split (50 %
    # bootstrap, 25 intervals of 1,600 events) online hit@10 0.181 -> 0.189, frozen 0.153 -> 0.158,
    # online/frozen 1.187 -> 1.199, no gate rejection.
    use_position_weights: bool = True
    use_counts: bool = True
    use_item_id: bool = True
    use_item_content: bool = True
    init_stddev: float = 0.05
    # Adam updates only the embedding rows a batch touched (``optimizer.LazyAdam``); False: Keras'
    # dense Adam, which rewrites whole 32k-row tables and their moments every step.
    lazy_embedding_updates: bool = True
    learning_rate: float = 0.005
    # With Adam state carried over (the bootstrap run, continued) but a smaller step. In
    # bench/prequential.py (50 % bootstrap, 25 intervals of 1,600 events: the loop's) online/frozen
    # hit@10 was 1.044 / 1.080 / 1.114 at 0.01 / 0.005 / 0.002 with the margin-only gate, which
    # rejected 8 / 8 / 2 of the 25 candidates; with the sign-test gate 1.104 / 1.115 / 1.098 at
    # 0.003 / 0.002 / 0.001. Two epochs per interval at 0.002: 1.065.
    finetune_learning_rate: float = 0.002
    batch_size: int = 1_024
    finetune_batch_size: int = 256  # an interval holds few examples: smaller batches, more steps
    # Softmax over the whole catalog instead of the in-batch candidates (``full_catalog_loss``), for
    # the bootstrap too (fine-tuning follows ``trainer.finetune_loss``). The bootstrap used to train
    # in-batch + logQ and fine-tuning switched losses: in bench/prequential.py on the loop's split
    # (50 % bootstrap, 1,600-event intervals, lr 0.002, sign-test gate) the frozen model scored the
    # same (hit@10 0.1544 vs 0.1540) and online/frozen rose from 1.115 to 1.128 (second half of the
    # stream 1.173 -> 1.191), the first fine-tunes no longer trailing the bootstrap model.
    full_catalog: bool = True
    temperature: float = 0.05
    logq_correction: bool = True
    remove_accidental_hits: bool = True
    # Bootstrap epochs: the best validation epoch of bench/offline_quality.py with LazyAdam was 4 (NDCG@10
    # 0.2341, down to 0.2170 by epoch 9: lazy updates fit the id rows faster than dense Adam did).
    epochs: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.last_items <= contracts.RECENT_ITEMS_MAX:
            raise ValueError(
                f"ModelConfig.last_items must be between 1 and {contracts.RECENT_ITEMS_MAX} (the recent items "
                f"a user has), got {self.last_items}"
            )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> ModelConfig:
        known = {field.name for field in dataclasses.fields(cls)}
        # A model saved before ``use_last_item``, ``last_items`` or ``use_position_weights`` existed
        # was built without them (a last-item slot of one item): restore it that way.
        values = {"use_last_item": False, "last_items": 1, "use_position_weights": False, **payload}
        return cls(**{key: value for key, value in values.items() if key in known})


def in_batch_softmax_loss(
    query: tf.Tensor,
    candidates: tf.Tensor,
    *,
    temperature: float,
    candidate_log_q: tf.Tensor | None = None,
    candidate_ids: tf.Tensor | None = None,
) -> tf.Tensor:
    """Mean softmax cross-entropy of each query against all in-batch candidates (its own is the label).

    ``candidate_log_q`` [B]: log sampling probability of each candidate, subtracted from its logit
    column so popular items are not over-penalized as negatives. ``candidate_ids`` [B]: when given,
    a candidate equal to the row's positive (other than the diagonal) is removed from that row.
    """
    logits = tf.matmul(query, candidates, transpose_b=True) / temperature
    if candidate_log_q is not None:
        logits = logits - tf.cast(candidate_log_q, logits.dtype)[tf.newaxis, :]
    batch = tf.shape(logits)[0]
    labels = tf.eye(batch, dtype=logits.dtype)
    if candidate_ids is not None:
        same = tf.equal(candidate_ids[:, tf.newaxis], candidate_ids[tf.newaxis, :])
        accidental = tf.logical_and(same, tf.logical_not(tf.cast(labels, tf.bool)))
        logits = tf.where(accidental, tf.cast(-1e9, logits.dtype), logits)
    return tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels=labels, logits=logits))


def full_catalog_loss(query: tf.Tensor, catalog: tf.Tensor, rows: tf.Tensor, *, temperature: float) -> tf.Tensor:
    """Mean softmax cross-entropy of each query [B, d] against every catalog item [N, d]; ``rows`` [B]
    holds the positive's catalog row (-1: not in the catalog, left out of the mean).

    Exact where the in-batch loss is sampled: no logQ estimate, and every item is a negative in every
    step, which is what top-k over the catalog ranks against. The cost is ``B x N`` logits per step.
    """
    logits = tf.matmul(query, catalog, transpose_b=True) / temperature
    known = rows >= 0
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.maximum(rows, 0), logits=logits)
    weights = tf.cast(known, losses.dtype)
    return tf.reduce_sum(losses * weights) / tf.maximum(tf.reduce_sum(weights), 1.0)


class _BagEmbedding(keras.layers.Layer):  # type: ignore[misc]  # keras ships no type hints
    """Hash strings (``""`` = padding) with two salts into one table; sum the two rows; mean over the bag."""

    def __init__(self, buckets: int, dim: int, stddev: float, seed: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hashes = [
            keras.layers.Hashing(buckets, mask_value="", salt=list(salt), name=f"hash_{n}")
            for n, salt in enumerate(_ID_SALTS)
        ]
        init = keras.initializers.RandomNormal(stddev=stddev, seed=seed)
        self.table = keras.layers.Embedding(buckets, dim, embeddings_initializer=init, name="table")

    def build(self, input_shape: Any = None) -> None:
        self.table.build()
        self.built = True

    def rows(self, ids: tf.Tensor) -> tf.Tensor:
        """[...] strings -> [..., dim]; padding ("") gives zeros."""
        vectors = self.table(self.hashes[0](ids)) + self.table(self.hashes[1](ids))
        present = tf.cast(tf.not_equal(ids, ""), vectors.dtype)[..., tf.newaxis]
        return vectors * present

    def call(self, ids: tf.Tensor) -> tf.Tensor:
        """[B, L] strings -> [B, dim], the mean over non-padding entries (zeros for an empty bag)."""
        present = tf.cast(tf.not_equal(ids, ""), tf.float32)
        total = tf.reduce_sum(self.rows(ids), axis=-2)
        return total / tf.maximum(tf.reduce_sum(present, axis=-1, keepdims=True), 1.0)


class TwoTowerModel(keras.Model):  # type: ignore[misc]  # keras ships no type hints
    """User and item towers; ``catalog`` is the set of items ``recommend`` and the export rank."""

    def __init__(self, catalog: ItemCatalog, config: ModelConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config = config
        self._catalog = catalog
        d, seed, std = config.embedding_dim, config.seed, config.init_stddev
        self.item_ids_embedding = _BagEmbedding(config.item_id_buckets, d, std, seed + 1, name="item_id")
        self.user_ids_embedding = _BagEmbedding(config.user_id_buckets, d, std, seed + 2, name="user_id")
        self.profile_embeddings = [
            _BagEmbedding(config.profile_buckets, config.profile_dim, std, seed + 10 + i, name=f"profile_{name}")
            for i, name in enumerate(contracts.USER_PROFILE_FEATURES)
        ]
        self.genre_embedding = _BagEmbedding(config.genre_buckets, config.content_dim, std, seed + 3, name="genres")
        year_init = keras.initializers.RandomNormal(stddev=std, seed=seed + 4)
        self.year_embedding = keras.layers.Embedding(
            config.year_buckets, config.content_dim, embeddings_initializer=year_init, name="year"
        )
        glorot = keras.initializers.GlorotUniform
        self.user_projection = keras.layers.Dense(d, kernel_initializer=glorot(seed + 5), name="user_projection")
        self.item_projection = keras.layers.Dense(d, kernel_initializer=glorot(seed + 6), name="item_projection")
        # One logit per recent-items slot (newest first); zeros: the plain mean to start from.
        self.recent_position_logits = keras.layers.Embedding(
            contracts.RECENT_ITEMS_MAX, 1, embeddings_initializer="zeros", name="recent_position"
        )

    def build(self, input_shape: Any = None) -> None:
        """Create every weight the enabled features need (no dummy forward pass, no Keras shape guessing)."""
        cfg = self.config
        user_width = item_width = 0
        if cfg.use_user_id:
            self.user_ids_embedding.build()
            user_width += cfg.embedding_dim
        if cfg.use_profile:
            for layer in self.profile_embeddings:
                layer.build()
            user_width += cfg.profile_dim * len(self.profile_embeddings)
        if cfg.use_recent_items or cfg.use_last_item or cfg.use_item_id or not cfg.use_item_content:
            self.item_ids_embedding.build()
        if cfg.use_recent_items and cfg.use_position_weights:
            self.recent_position_logits.build()
        user_width += cfg.embedding_dim * (int(cfg.use_recent_items) + int(cfg.use_last_item))
        if cfg.use_counts or user_width == 0:
            user_width += len(contracts.USER_COUNT_INPUTS)
        if cfg.use_item_id or not cfg.use_item_content:
            item_width += cfg.embedding_dim
        if cfg.use_item_content:
            self.genre_embedding.build()
            self.year_embedding.build()
            item_width += 2 * cfg.content_dim
        self.user_projection.build((None, user_width))
        self.item_projection.build((None, item_width))
        self.built = True

    @property
    def catalog(self) -> ItemCatalog:
        return self._catalog

    @catalog.setter
    def catalog(self, catalog: ItemCatalog) -> None:
        """Swap the ranked catalog (e.g. new items from the stream); weights are unchanged."""
        self._catalog = catalog

    def user_tower(self, features: dict[str, tf.Tensor]) -> tf.Tensor:
        """Raw user inputs (recommend signature names) -> [B, d] unit vectors.

        Disabled parts (``ModelConfig.use_*``) are not computed at all, and their weights never created.
        """
        cfg = self.config
        parts = []
        if cfg.use_user_id:
            parts.append(self.user_ids_embedding(tf.reshape(features["user_id"], [-1, 1])))
        if cfg.use_profile:
            for name, layer in zip(contracts.USER_PROFILE_FEATURES, self.profile_embeddings, strict=True):
                parts.append(layer(tf.reshape(features[name], [-1, 1])))
        if cfg.use_recent_items:
            parts.append(self._recent_items(features["recent_items"]))
        if cfg.use_last_item:  # recent_items is newest first
            parts.append(self.item_ids_embedding(features["recent_items"][:, : cfg.last_items]))
        if cfg.use_counts or not parts:
            counts = [tf.math.log1p(tf.cast(features[name], tf.float32)) for name in contracts.USER_COUNT_INPUTS]
            parts.append(tf.stack(counts, axis=-1))
        return tf.math.l2_normalize(self.user_projection(tf.concat(parts, axis=-1)), axis=-1)

    def _recent_items(self, ids: tf.Tensor) -> tf.Tensor:
        """[B, L] recent item ids (newest first, "" padded) -> [B, d]: their mean, position-weighted
        (softmax of the slot logits over the present slots) with ``use_position_weights``."""
        if not self.config.use_position_weights:
            return self.item_ids_embedding(ids)
        logits = tf.reshape(self.recent_position_logits(tf.range(tf.shape(ids)[1])), [1, -1])
        weights = tf.exp(logits - tf.reduce_max(logits)) * tf.cast(tf.not_equal(ids, ""), tf.float32)
        total = tf.reduce_sum(self.item_ids_embedding.rows(ids) * weights[..., tf.newaxis], axis=-2)
        return total / tf.maximum(tf.reduce_sum(weights, axis=-1, keepdims=True), 1e-9)

    def item_tower(self, item_ids: tf.Tensor, genres: tf.Tensor, release_year: tf.Tensor) -> tf.Tensor:
        """item ids [N], genres [N, G] ("" padded), release years [N] (-1 unknown) -> [N, d] unit vectors."""
        cfg = self.config
        parts = []
        if cfg.use_item_id or not cfg.use_item_content:
            parts.append(self.item_ids_embedding(tf.reshape(item_ids, [-1, 1])))
        if cfg.use_item_content:
            parts.append(self.genre_embedding(genres))
            year = tf.cast(release_year, tf.int64)
            bucket = tf.clip_by_value((year - cfg.year_min) // cfg.year_bucket_width, 0, cfg.year_buckets - 2) + 1
            parts.append(self.year_embedding(tf.where(year < 0, tf.zeros_like(bucket), bucket)))
        return tf.math.l2_normalize(self.item_projection(tf.concat(parts, axis=-1)), axis=-1)

    def call(self, inputs: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        users = self.user_tower(inputs)
        items = self.item_tower(inputs["item_id"], inputs["item_genres"], inputs["item_release_year"])
        return users, items


# -- build / train / clone ------------------------------------------------------------------


def build_model(catalog: ItemCatalog, config: ModelConfig | None = None) -> TwoTowerModel:
    """A model with its weights created and its optimizer built."""
    config = config or ModelConfig()
    model = TwoTowerModel(catalog, config)
    model.build()
    optimizer = LazyAdam if config.lazy_embedding_updates else keras.optimizers.Adam
    model.optimizer = optimizer(learning_rate=config.learning_rate)
    model.optimizer.build(model.trainable_variables)
    return model


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


def copy_into(target: TwoTowerModel, source: TwoTowerModel) -> TwoTowerModel:
    """Make ``target`` a fine-tune copy of ``source`` again (weights, optimizer state, catalog).

    The online trainer reuses a candidate object that no longer serves instead of building a new
    one each interval: its traced training step is kept, where a new object pays ~2 s of tracing.
    ``target`` must come from :func:`clone_for_finetune` of a model of the same architecture.
    """
    assign_weights(target, weights_by_path(source))
    assign_optimizer_state(target, optimizer_state(source))
    target.catalog = source.catalog
    return target


def trace_train_step(model: TwoTowerModel, examples: pd.DataFrame) -> None:
    """Trace ``model``'s training step now, leaving its weights and optimizer state as they were.

    Why: a model object pays ~3 s of tracing the first time it trains. The online trainer
    alternates between two objects, so a new trainer process used to pay that twice, inside its
    first two intervals, where it delays the versions it publishes. Give ``examples`` more rows
    than a batch: the full batch and the short last one are both traced (``reduce_retracing``
    then serves every later batch size from the second trace).
    """
    if examples.empty:
        return
    weights, state = weights_by_path(model), optimizer_state(model)
    train(model, examples, epochs=1, progress=False)
    assign_weights(model, weights)
    assign_optimizer_state(model, state)


def _training_arrays(model: TwoTowerModel, examples: pd.DataFrame) -> dict[str, np.ndarray]:
    if examples.empty:
        raise ValueError("train: the example frame is empty; nothing to learn from")
    arrays = user_arrays(examples)
    item_ids = examples["item_id"].astype(str).to_numpy(dtype=object)
    n_items = len(item_ids)
    arrays["item_id"], arrays["item_genres"], arrays["item_release_year"] = item_arrays(
        model.catalog, model.config.max_genres, item_ids
    )
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
    def train_step(batch: dict[str, tf.Tensor], catalog: tuple[tf.Tensor, tf.Tensor, tf.Tensor]) -> tf.Tensor:
        with tf.GradientTape() as tape:
            if cfg.full_catalog:
                users = model.user_tower(batch)
                loss = full_catalog_loss(
                    users, model.item_tower(*catalog), batch["catalog_row"], temperature=cfg.temperature
                )
            else:
                users, items = model(batch)
                loss = in_batch_softmax_loss(
                    users,
                    items,
                    temperature=cfg.temperature,
                    candidate_log_q=batch["log_q"] if cfg.logq_correction else None,
                    candidate_ids=batch["item_id"] if cfg.remove_accidental_hits else None,
                )
        variables = model.trainable_variables
        model.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return loss

    object.__setattr__(model, "_compiled_train_step", train_step)
    return train_step


def train(
    model: TwoTowerModel, examples: pd.DataFrame, *, epochs: int | None = None, progress: bool = True
) -> dict[str, float]:
    """Fit on the example frame (``catalog.EXAMPLE_COLUMNS``); returns final loss and examples/s.

    Optimizer state lives on the model, so calling ``train`` once per epoch continues the same run.
    """
    epochs = model.config.epochs if epochs is None else epochs
    arrays = _training_arrays(model, examples)
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
    catalog_parts = catalog_arrays(model.catalog, model.config.max_genres) if model.config.full_catalog else ()
    catalog = tuple(tf.constant(part) for part in catalog_parts)
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


# -- inference ------------------------------------------------------------------------------


def user_vectors(model: TwoTowerModel, user_inputs: pd.DataFrame, *, batch_size: int = 4_096) -> np.ndarray:
    arrays = user_arrays(user_inputs)
    chunks = [
        model.user_tower({name: tf.constant(values[start : start + batch_size]) for name, values in arrays.items()})
        for start in range(0, len(user_inputs), batch_size)
    ]
    return np.concatenate([np.asarray(chunk) for chunk in chunks]) if chunks else np.zeros((0, 1), np.float32)


def catalog_vectors(model: TwoTowerModel) -> np.ndarray:
    ids, genres, years = catalog_arrays(model.catalog, model.config.max_genres)
    return np.asarray(model.item_tower(tf.constant(ids), tf.constant(genres), tf.constant(years)))


def rank(
    user_vecs: tf.Tensor,
    item_vecs: tf.Tensor,
    item_ids: tf.Tensor,
    exclude_rows: tf.Tensor,
    *,
    k: int,
    temperature: float,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Top-k catalog items per user, excluded rows removed; shared by ``recommend`` and the export.

    ``exclude_rows`` [B, E] int64: catalog rows to drop, -1 for padding/unknown. When fewer than
    ``k`` items remain, trailing slots hold id "" and score :data:`PAD_SCORE`.
    """
    scores = tf.matmul(user_vecs, item_vecs, transpose_b=True) / temperature
    batch_rows = tf.broadcast_to(
        tf.range(tf.shape(exclude_rows, out_type=tf.int64)[0])[:, None], tf.shape(exclude_rows, out_type=tf.int64)
    )
    pairs = tf.stack([batch_rows, exclude_rows], axis=-1)
    pairs = tf.boolean_mask(pairs, exclude_rows >= 0)
    scores = tf.tensor_scatter_nd_update(scores, pairs, tf.fill(tf.shape(pairs)[:1], float("-inf")))
    depth = min(k, int(item_vecs.shape[0]))
    top_scores, top_rows = tf.math.top_k(scores, k=depth)
    top_ids = tf.gather(item_ids, top_rows)
    valid = tf.math.is_finite(top_scores)
    top_ids = tf.where(valid, top_ids, "")
    top_scores = tf.where(valid, top_scores, PAD_SCORE)
    if depth < k:
        pad = [[0, 0], [0, k - depth]]
        top_ids = tf.pad(top_ids, pad, constant_values="")
        top_scores = tf.pad(top_scores, pad, constant_values=PAD_SCORE)
    return top_ids, top_scores


def _exclude_rows(model: TwoTowerModel, exclude: Sequence[Sequence[str]] | None, batch: int) -> np.ndarray:
    if exclude is None:
        return np.full((batch, 1), -1, dtype=np.int64)
    if len(exclude) != batch:
        raise ValueError(f"exclude has {len(exclude)} rows for {batch} users; pass one list per user")
    index = model.catalog.index
    width = max(1, max((len(row) for row in exclude), default=1))
    rows = np.full((batch, width), -1, dtype=np.int64)
    for b, items in enumerate(exclude):
        rows[b, : len(items)] = [index.get(str(item), -1) for item in items]
    return rows


def recommend(
    model: TwoTowerModel,
    user_inputs: pd.DataFrame,
    *,
    k: int,
    exclude: Sequence[Sequence[str]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k item ids [B, k] (str) and scores [B, k] over the model's catalog, excluded ids removed."""
    users = user_vectors(model, user_inputs)
    items = catalog_vectors(model)
    rows = _exclude_rows(model, exclude, len(user_inputs))
    ids, scores = rank(
        tf.constant(users),
        tf.constant(items),
        tf.constant(np.asarray(model.catalog.item_ids, dtype=object)),
        tf.constant(rows),
        k=k,
        temperature=model.config.temperature,
    )
    return np.asarray(ids.numpy()).astype(str), np.asarray(scores.numpy())


def score(
    model: TwoTowerModel, user_inputs: pd.DataFrame, item_ids: Sequence[Sequence[str]] | np.ndarray
) -> np.ndarray:
    """Scores [B, N] of the given items for each user; an item not in the catalog is scored by its id alone."""
    grid = np.asarray(item_ids, dtype=object)
    if grid.ndim != 2 or grid.shape[0] != len(user_inputs):
        raise ValueError(f"item_ids must be [B, N] with B = {len(user_inputs)} users; got shape {grid.shape}")
    users = user_vectors(model, user_inputs)
    ids, genres, years = item_arrays(model.catalog, model.config.max_genres, grid.reshape(-1))
    items = np.asarray(model.item_tower(tf.constant(ids), tf.constant(genres), tf.constant(years)))
    items = items.reshape(grid.shape[0], grid.shape[1], -1)
    return cast(np.ndarray, np.einsum("bd,bnd->bn", users, items) / model.config.temperature).astype(np.float32)
