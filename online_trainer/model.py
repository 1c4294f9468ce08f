"""The two-tower retrieval model over the whole catalog, with its preprocessing inside.

Design after TensorFlow Recommenders' ``tasks/retrieval.py`` and YouTube's two-tower papers; the
id tables are :mod:`online_trainer.hash_embedding`'s, the losses :mod:`online_trainer.losses`.
Both towers are built from the dataset's declared attributes (``ModelConfig.attributes``), one
input per attribute (:class:`AttributeEmbedding`), so nothing here names a dataset's fields.

* **User tower**: user id + each user attribute (``use_profile``) + the position-weighted mean of
  the recent items' id embeddings (``use_position_weights``; the *same* table as the item tower: a
  user is partly the items they just touched, which is what makes the online updates bite) + the
  mean of the newest three (``use_last_item``, ``last_items``) + ``log1p`` of the activity counts
  (the windows and, for a dataset with several event kinds, each kind's), concatenated and
  projected. A new user falls back to attributes and recent items.
* **Item tower**: item id + each item attribute (``use_item_content``). A new item's id rows are
  untrained (small random init), so its vector comes from its attributes.
* **Scores** are the logits ``cos(user, item) / temperature``, in memory and in the export alike.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from online_trainer.catalog import ItemCatalog
from online_trainer.examples import count_columns
from online_trainer.hash_embedding import HashedBagEmbedding
from online_trainer.model_config import ModelConfig
from online_trainer.optimizer import LazyAdam
from streamrec.core import contracts
from streamrec.core.attributes import Attribute, AttributeSchema
from streamrec.core.errors import DatasetError

ITEM_INPUT_PREFIX = "item."  # batch keys of the positive item's attribute values (beside user inputs)


class AttributeEmbedding(keras.layers.Layer):  # type: ignore[misc]  # keras ships no type hints
    """One declared attribute -> [B, dim].

    ``categorical`` [B] and ``multi_categorical`` [B, M] strings are hashed (two salts, one table
    of ``buckets`` rows; :class:`HashedBagEmbedding`), the latter averaged over its first
    ``max_tokens`` non-empty tokens. ``numeric`` [B] floats are bucketized with the attribute's
    ``boundaries`` (bucket ``i + 1`` holds ``boundaries[i - 1] <= x < boundaries[i]``) into a
    small table whose row 0 is NaN / unknown.
    """

    def __init__(self, attribute: Attribute, buckets: int, dim: int, stddev: float, seed: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.attribute = attribute
        if attribute.type == "numeric":
            init = keras.initializers.RandomNormal(stddev=stddev, seed=seed)
            self.table = keras.layers.Embedding(
                len(attribute.boundaries) + 2, dim, embeddings_initializer=init, name="buckets"
            )
        else:
            self.table = HashedBagEmbedding(buckets, dim, stddev, seed, name="hashed")

    def build(self, input_shape: Any = None) -> None:
        self.table.build()
        self.built = True

    def bucket(self, values: tf.Tensor) -> tf.Tensor:
        """numeric [B] -> int32 [B]: 0 for NaN, else 1 + the ``Bucketize`` index."""
        values = tf.cast(values, tf.float32)
        edges = [float(edge) for edge in self.attribute.boundaries]
        index = tf.raw_ops.Bucketize(input=values, boundaries=edges) + 1
        return tf.where(tf.math.is_nan(values), tf.zeros_like(index), index)

    def call(self, values: tf.Tensor) -> tf.Tensor:
        kind = self.attribute.type
        if kind == "numeric":
            return self.table(self.bucket(tf.reshape(values, [-1])))
        if kind == "categorical":
            return self.table(tf.reshape(values, [-1, 1]))
        return self.table(values[:, : self.attribute.max_tokens])


class TwoTowerModel(keras.Model):  # type: ignore[misc]  # keras ships no type hints
    """User and item towers; ``catalog`` is the set of items ``inference.recommend`` and the export rank."""

    def __init__(self, catalog: ItemCatalog, config: ModelConfig, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if catalog.attributes != config.attributes.item:
            raise DatasetError(
                f"the catalog's item attributes {[a.name for a in catalog.attributes]} are not the model's "
                f"{[a.name for a in config.attributes.item]}; build the catalog with the model's schema"
            )
        self.config = config
        self._catalog = catalog
        d, seed, std = config.embedding_dim, config.seed, config.init_stddev
        self.item_ids_embedding = HashedBagEmbedding(config.item_id_buckets, d, std, seed + 1, name="item_id")
        self.user_ids_embedding = HashedBagEmbedding(config.user_id_buckets, d, std, seed + 2, name="user_id")
        buckets = config.attribute_buckets
        self.user_attribute_embeddings = [
            AttributeEmbedding(a, buckets, config.profile_dim, std, seed + 10 + i, name=f"user_attr_{a.name}")
            for i, a in enumerate(config.attributes.user)
        ]
        self.item_attribute_embeddings = [
            AttributeEmbedding(a, buckets, config.content_dim, std, seed + 500 + i, name=f"item_attr_{a.name}")
            for i, a in enumerate(config.attributes.item)
        ]
        glorot = keras.initializers.GlorotUniform
        self.user_projection = keras.layers.Dense(d, kernel_initializer=glorot(seed + 5), name="user_projection")
        self.item_projection = keras.layers.Dense(d, kernel_initializer=glorot(seed + 6), name="item_projection")
        # One logit per recent-items slot (newest first); zeros: the plain mean to start from.
        self.recent_position_logits = keras.layers.Embedding(
            contracts.RECENT_ITEMS_MAX, 1, embeddings_initializer="zeros", name="recent_position"
        )

    @property
    def schema(self) -> AttributeSchema:
        return self.config.attributes

    def hashed_embeddings(self) -> list[HashedBagEmbedding]:
        """Every hashed table of the model (ids, then the categorical attributes), in a fixed order."""
        attributes = [*self.user_attribute_embeddings, *self.item_attribute_embeddings]
        return [
            self.item_ids_embedding,
            self.user_ids_embedding,
            *(layer.table for layer in attributes if isinstance(layer.table, HashedBagEmbedding)),
        ]

    def uses_user_attributes(self) -> bool:
        return self.config.use_profile and bool(self.user_attribute_embeddings)

    def uses_item_attributes(self) -> bool:
        return self.config.use_item_content and bool(self.item_attribute_embeddings)

    def uses_item_id(self) -> bool:
        return self.config.use_item_id or not self.uses_item_attributes()

    def uses_counts(self) -> bool:
        cfg = self.config
        return cfg.use_counts or not (
            cfg.use_user_id or self.uses_user_attributes() or cfg.use_recent_items or cfg.use_last_item
        )

    def build(self, input_shape: Any = None) -> None:
        """Create every weight the enabled features need (no dummy forward pass, no Keras shape guessing)."""
        cfg = self.config
        user_width = item_width = 0
        if cfg.use_user_id:
            self.user_ids_embedding.build()
            user_width += cfg.embedding_dim
        if self.uses_user_attributes():
            for layer in self.user_attribute_embeddings:
                layer.build()
            user_width += cfg.profile_dim * len(self.user_attribute_embeddings)
        if cfg.use_recent_items or cfg.use_last_item or self.uses_item_id():
            self.item_ids_embedding.build()
        if cfg.use_recent_items and cfg.use_position_weights:
            self.recent_position_logits.build()
        user_width += cfg.embedding_dim * (int(cfg.use_recent_items) + int(cfg.use_last_item))
        if self.uses_counts():
            user_width += len(count_columns(self.schema))
        if self.uses_item_id():
            item_width += cfg.embedding_dim
        if self.uses_item_attributes():
            for layer in self.item_attribute_embeddings:
                layer.build()
            item_width += cfg.content_dim * len(self.item_attribute_embeddings)
        self.user_projection.build((None, user_width))
        self.item_projection.build((None, item_width))
        self.built = True

    @property
    def catalog(self) -> ItemCatalog:
        return self._catalog

    @catalog.setter
    def catalog(self, catalog: ItemCatalog) -> None:
        """Swap the ranked catalog (e.g. new items from the stream); weights are unchanged."""
        if catalog.attributes != self._catalog.attributes:
            raise DatasetError("the new catalog declares other item attributes than the model was built with")
        self._catalog = catalog

    def user_tower(self, features: dict[str, tf.Tensor]) -> tf.Tensor:
        """Raw user inputs (``user_model_inputs(schema)`` names) -> [B, d] unit vectors.

        Disabled parts (``ModelConfig.use_*``) are not computed at all, and their weights never created.
        """
        cfg = self.config
        parts = []
        if cfg.use_user_id:
            parts.append(self.user_ids_embedding(tf.reshape(features["user_id"], [-1, 1])))
        if self.uses_user_attributes():
            parts += [layer(features[layer.attribute.name]) for layer in self.user_attribute_embeddings]
        if cfg.use_recent_items:
            parts.append(self._recent_items(features["recent_items"]))
        if cfg.use_last_item:  # recent_items is newest first
            parts.append(self.item_ids_embedding(features["recent_items"][:, : cfg.last_items]))
        if self.uses_counts():
            counts = [tf.math.log1p(tf.cast(features[name], tf.float32)) for name in count_columns(self.schema)]
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

    def item_tower(self, item_ids: tf.Tensor, values: dict[str, tf.Tensor]) -> tf.Tensor:
        """item ids [N] and each item attribute's values (``catalog.item_arrays``) -> [N, d] unit vectors."""
        parts = []
        if self.uses_item_id():
            parts.append(self.item_ids_embedding(tf.reshape(item_ids, [-1, 1])))
        if self.uses_item_attributes():
            parts += [layer(values[layer.attribute.name]) for layer in self.item_attribute_embeddings]
        return tf.math.l2_normalize(self.item_projection(tf.concat(parts, axis=-1)), axis=-1)

    def call(self, inputs: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        """A training batch: user inputs, ``item_id`` and the item's values under ``item.<name>``."""
        users = self.user_tower(inputs)
        values = {a.name: inputs[ITEM_INPUT_PREFIX + a.name] for a in self.schema.item if self.uses_item_attributes()}
        return users, self.item_tower(inputs["item_id"], values)


def build_model(catalog: ItemCatalog, config: ModelConfig | None = None) -> TwoTowerModel:
    """A model with its weights created and its optimizer built."""
    config = config or ModelConfig()
    model = TwoTowerModel(catalog, config)
    model.build()
    optimizer = LazyAdam if config.lazy_embedding_updates else keras.optimizers.Adam
    model.optimizer = optimizer(learning_rate=config.learning_rate)
    model.optimizer.build(model.trainable_variables)
    return model
