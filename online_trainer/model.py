"""The two-tower retrieval model over the whole catalog, with its preprocessing inside.

Design after TensorFlow Recommenders' ``tasks/retrieval.py`` and YouTube's two-tower papers; the
id tables are :mod:`online_trainer.hash_embedding`'s, the losses :mod:`online_trainer.losses`.

* **User tower**: user id + profile (age bucket, gender, occupation, zip prefix) + the
  position-weighted mean of the recent items' id embeddings (``use_position_weights``; the *same*
  table as the item tower: a user is partly the items they just touched, which is what makes the
  online updates bite) + the mean of the newest three (``use_last_item``, ``last_items``) +
  ``log1p`` of the activity counts, concatenated and projected.
  A new user falls back to profile and recent items.
* **Item tower**: item id + genres (masked mean of hashed-genre embeddings) + release-year bucket.
  A new item's id rows are untrained (small random init), so its vector comes from its content.
* **Scores** are the logits ``cos(user, item) / temperature``, in memory and in the export alike.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from online_trainer.catalog import ItemCatalog
from online_trainer.hash_embedding import HashedBagEmbedding
from online_trainer.model_config import ModelConfig
from online_trainer.optimizer import LazyAdam
from streamrec.core import contracts


class TwoTowerModel(keras.Model):  # type: ignore[misc]  # keras ships no type hints
    """User and item towers; ``catalog`` is the set of items ``inference.recommend`` and the export rank."""

    def __init__(self, catalog: ItemCatalog, config: ModelConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config = config
        self._catalog = catalog
        d, seed, std = config.embedding_dim, config.seed, config.init_stddev
        self.item_ids_embedding = HashedBagEmbedding(config.item_id_buckets, d, std, seed + 1, name="item_id")
        self.user_ids_embedding = HashedBagEmbedding(config.user_id_buckets, d, std, seed + 2, name="user_id")
        self.profile_embeddings = [
            HashedBagEmbedding(config.profile_buckets, config.profile_dim, std, seed + 10 + i, name=f"profile_{name}")
            for i, name in enumerate(contracts.USER_PROFILE_FEATURES)
        ]
        self.genre_embedding = HashedBagEmbedding(
            config.genre_buckets, config.content_dim, std, seed + 3, name="genres"
        )
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


def build_model(catalog: ItemCatalog, config: ModelConfig | None = None) -> TwoTowerModel:
    """A model with its weights created and its optimizer built."""
    config = config or ModelConfig()
    model = TwoTowerModel(catalog, config)
    model.build()
    optimizer = LazyAdam if config.lazy_embedding_updates else keras.optimizers.Adam
    model.optimizer = optimizer(learning_rate=config.learning_rate)
    model.optimizer.build(model.trainable_variables)
    return model
