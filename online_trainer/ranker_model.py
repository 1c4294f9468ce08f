"""The ranking model (second stage): re-scores the retrieval model's candidates for one user.

Design after DCN-v2 (Wang et al., 2021) and the "position as a training-only feature" debiasing of
YouTube's ranking paper (Zhao et al., 2019):

* **One feature vector per (user, candidate) pair**: the hashed user id and item id embeddings
  (:class:`~online_trainer.hash_embedding.HashedBagEmbedding`, the retrieval model's layer, tables
  of its own; a never-seen id is valid input), their elementwise product, the retrieval score, ``log1p`` of the
  user's activity counts, whether the candidate is among the user's recent items, and one
  embedding per declared user attribute (:class:`~online_trainer.model.AttributeEmbedding`:
  categorical hashed, multi-categorical averaged, numeric bucketized, as in the user tower).
  Item attributes are not inputs of the ``rank`` signature; the item id and retrieval score carry
  what the ranker knows of an item.
* **Cross network, then an MLP**: full-rank cross layers ``x_{l+1} = x0 * (W x_l + b) + x_l``
  learn bounded-degree feature interactions cheaply; the MLP maps them to one logit per pair.
* **Starts as the retrieval order**: the logit is ``retrieval_weight * scaled retrieval score``
  (the weight starts at 1) plus the network's output, whose last layer starts at zero. A new
  ranking model therefore serves the retrieval model's order until the labeled examples teach it
  otherwise, instead of a random one.
* **Position bias, training only**: a learned scalar per shown position (row 0, the top, fixed at
  0) is added to the logit in the loss, so the relevance part learns what is clicked *apart from*
  where it was shown. :meth:`RankerModel.logits` leaves it out: the served score is the logit of
  a click at the top position (``streamrec.core.contracts``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

from online_trainer.examples import count_columns
from online_trainer.hash_embedding import HashedBagEmbedding
from online_trainer.model import AttributeEmbedding
from online_trainer.optimizer import LazyAdam
from streamrec.core.attributes import AttributeSchema


@dataclass(frozen=True)
class RankerConfig:
    """Table sizes, layer widths and the optimizer's settings; small defaults that train in seconds on a CPU."""

    user_id_buckets: int = 2**14
    item_id_buckets: int = 2**14
    attribute_buckets: int = 2**10  # hash buckets of each categorical user attribute's table
    embedding_dim: int = 16
    attribute_dim: int = 8  # embedding size of each user attribute
    cross_layers: int = 2
    hidden_units: tuple[int, ...] = (64, 32)
    max_position: int = 20  # positions at or beyond the last row share its bias
    # The bias is this multiple of its table row: Adam moves every weight by about the learning
    # rate per step, so one scalar per position would trail the id embeddings, which then absorb
    # the position effect first and give it back only slowly. Scaled, it keeps pace with them.
    position_bias_scale: float = 10.0
    init_stddev: float = 0.05
    # Retrieval scores are cos / temperature (about +-20 at temperature 0.05): clipped and scaled
    # back to about [-1, 1] so one input does not dominate the cross layers' products.
    retrieval_score_clip: float = 50.0
    retrieval_score_scale: float = 0.05
    learning_rate: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_position < 1 or self.cross_layers < 0 or self.embedding_dim < 1:
            raise ValueError(
                "RankerConfig: max_position and embedding_dim must be >= 1 and cross_layers >= 0; got "
                f"{self.max_position}, {self.embedding_dim}, {self.cross_layers}"
            )
        if any(units < 1 for units in self.hidden_units):
            raise ValueError(f"RankerConfig.hidden_units must all be >= 1, got {self.hidden_units}")

    def to_json(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["hidden_units"] = list(self.hidden_units)
        return values

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> RankerConfig:
        """The config saved by :meth:`to_json`; keys this version does not know are ignored."""
        known = {field.name for field in dataclasses.fields(cls)}
        values = {key: value for key, value in payload.items() if key in known}
        if "hidden_units" in values:
            values["hidden_units"] = tuple(values["hidden_units"])
        return cls(**values)


class RankerModel(keras.Model):  # type: ignore[misc]  # keras ships no type hints
    """Scores [B, N] candidates of B users; fine-tuned in place (its optimizer lives on it)."""

    def __init__(self, schema: AttributeSchema, config: RankerConfig | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        config = config or RankerConfig()
        self.schema = schema
        self.config = config
        d, seed, std = config.embedding_dim, config.seed, config.init_stddev
        self.user_ids_embedding = HashedBagEmbedding(config.user_id_buckets, d, std, seed + 1, name="user_id")
        self.item_ids_embedding = HashedBagEmbedding(config.item_id_buckets, d, std, seed + 2, name="item_id")
        self.user_attribute_embeddings = [
            AttributeEmbedding(
                a, config.attribute_buckets, config.attribute_dim, std, seed + 10 + i, name=f"attr_{a.name}"
            )
            for i, a in enumerate(schema.user)
        ]
        glorot = keras.initializers.GlorotUniform
        self.cross = [
            keras.layers.Dense(self.feature_width, kernel_initializer=glorot(seed + 100 + n), name=f"cross_{n}")
            for n in range(config.cross_layers)
        ]
        self.hidden = [
            keras.layers.Dense(units, activation="relu", kernel_initializer=glorot(seed + 200 + n), name=f"hidden_{n}")
            for n, units in enumerate(config.hidden_units)
        ]
        self.output_logit = keras.layers.Dense(1, kernel_initializer="zeros", name="logit")
        self.position_table = keras.layers.Embedding(
            config.max_position, 1, embeddings_initializer="zeros", name="position_bias"
        )

    @property
    def feature_width(self) -> int:
        """Width of one pair's feature vector (the cross network's input)."""
        cfg = self.config
        per_user = cfg.embedding_dim + len(count_columns(self.schema)) + cfg.attribute_dim * len(self.schema.user)
        per_pair = 2 * cfg.embedding_dim + 2  # item id, user x item product, retrieval score, is-recent
        return per_user + per_pair

    def build(self, input_shape: Any = None) -> None:
        """Create every weight now (no dummy forward pass, no Keras shape guessing)."""
        self.user_ids_embedding.build()
        self.item_ids_embedding.build()
        for layer in self.user_attribute_embeddings:
            layer.build()
        width = self.feature_width
        for cross in self.cross:
            cross.build((None, width))
        for dense in self.hidden:
            dense.build((None, width))
            width = dense.units
        self.output_logit.build((None, width))
        self.retrieval_weight = self.add_weight(name="retrieval_weight", shape=(), initializer="ones")
        self.position_table.build()
        self.built = True

    def user_features(self, user_inputs: dict[str, tf.Tensor]) -> tuple[tf.Tensor, tf.Tensor]:
        """Raw user inputs -> (user id vectors [B, d], the other per-user features [B, C + attributes])."""
        user_vectors = self.user_ids_embedding.rows(user_inputs["user_id"])
        counts = [
            tf.math.log1p(tf.maximum(tf.cast(user_inputs[name], tf.float32), 0.0))
            for name in count_columns(self.schema)
        ]
        parts = [tf.stack(counts, axis=-1)]
        parts += [layer(user_inputs[layer.attribute.name]) for layer in self.user_attribute_embeddings]
        return user_vectors, tf.concat(parts, axis=-1)

    def pair_features(
        self, user_inputs: dict[str, tf.Tensor], item_ids: tf.Tensor, retrieval_scores: tf.Tensor
    ) -> tf.Tensor:
        """[B, N, feature_width]: one feature vector per (user, candidate) pair."""
        cfg = self.config
        user_vectors, user_rest = self.user_features(user_inputs)
        item_vectors = self.item_ids_embedding.rows(item_ids)  # [B, N, d], zeros for padding
        present = tf.not_equal(item_ids, "")
        scores = tf.cast(retrieval_scores, tf.float32)
        # Padding may carry float32 min or NaN; it is masked at the output anyway, but must not overflow.
        scores = tf.where(present & tf.math.is_finite(scores), scores, 0.0)
        scores = tf.clip_by_value(scores, -cfg.retrieval_score_clip, cfg.retrieval_score_clip)
        recent = user_inputs["recent_items"]
        is_recent = tf.reduce_any(tf.equal(item_ids[:, :, tf.newaxis], recent[:, tf.newaxis, :]), axis=-1) & present
        pair_shape = tf.shape(item_ids)
        per_user = tf.concat([user_vectors, user_rest], axis=-1)[:, tf.newaxis, :]
        per_user = tf.broadcast_to(per_user, tf.concat([pair_shape, tf.shape(per_user)[-1:]], axis=0))
        return tf.concat(
            [
                per_user,
                item_vectors,
                item_vectors * user_vectors[:, tf.newaxis, :],
                (scores * cfg.retrieval_score_scale)[..., tf.newaxis],
                tf.cast(is_recent, tf.float32)[..., tf.newaxis],
            ],
            axis=-1,
        )

    def logits(self, user_inputs: dict[str, tf.Tensor], item_ids: tf.Tensor, retrieval_scores: tf.Tensor) -> tf.Tensor:
        """[B, N] logits of a click at the top position (no position term); padding is not masked here."""
        features = self.pair_features(user_inputs, item_ids, retrieval_scores)
        x0 = tf.reshape(features, [-1, self.feature_width])
        x = x0
        for cross in self.cross:
            x = x0 * cross(x) + x
        for dense in self.hidden:
            x = dense(x)
        prior = self.retrieval_weight * features[..., self._retrieval_column]
        return tf.reshape(self.output_logit(x), tf.shape(item_ids)) + prior

    @property
    def _retrieval_column(self) -> int:
        """The scaled retrieval score's column in :meth:`pair_features` (second to last)."""
        return self.feature_width - 2

    def position_bias(self, positions: tf.Tensor) -> tf.Tensor:
        """Positions (any int shape, 0 = top) -> float32 bias of the same shape; 0 at the top, clipped below."""
        clipped = tf.clip_by_value(tf.cast(positions, tf.int32), 0, self.config.max_position - 1)
        bias = self.config.position_bias_scale * tf.squeeze(self.position_table(clipped), axis=-1)
        return tf.where(clipped > 0, bias, tf.zeros_like(bias))

    def call(self, inputs: dict[str, Any]) -> tf.Tensor:
        """``{"users": user inputs, "item_ids", "retrieval_scores"}`` -> :meth:`logits`."""
        return self.logits(inputs["users"], inputs["item_ids"], inputs["retrieval_scores"])


def build_ranker(schema: AttributeSchema, config: RankerConfig | None = None) -> RankerModel:
    """A ranker with its weights created and its optimizer built (lazy Adam: sparse id-table updates)."""
    model = RankerModel(schema, config)
    model.build()
    model.optimizer = LazyAdam(learning_rate=model.config.learning_rate)
    model.optimizer.build(model.trainable_variables)
    return model
