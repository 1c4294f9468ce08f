"""The model's embedding layer for raw strings: hashed inside the model, two rows per id.

* **Raw strings in.** Every id and profile value goes through a Keras ``Hashing`` layer inside the
  model, so serving passes exactly what Feast returns and a never-seen user or item id is valid
  input at once (no vocabulary to grow, nothing to re-export but weights).
* **Collisions.** Ids are hashed twice (two salts) into one table per entity and the two rows are
  summed (a Bloom/"hash embedding"): with ``B`` buckets and ``n`` ids, a given id shares *one* row
  with some other id with probability ~``2n/B`` but shares *both* only with ~``(n/B)^2``, so two
  ids almost never get identical vectors. Bigger tables cost memory (``buckets x dim`` floats and
  2x that in Adam state) and nothing else; they are the knob if the catalog grows.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

ID_SALTS = ((0x5EED_0001, 0x5EED_0002), (0x5EED_0003, 0x5EED_0004))


class HashedBagEmbedding(keras.layers.Layer):  # type: ignore[misc]  # keras ships no type hints
    """Hash strings (``""`` = padding) with two salts into one table; sum the two rows; mean over the bag."""

    def __init__(self, buckets: int, dim: int, stddev: float, seed: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hashes = [
            keras.layers.Hashing(buckets, mask_value="", salt=list(salt), name=f"hash_{n}")
            for n, salt in enumerate(ID_SALTS)
        ]
        init = keras.initializers.RandomNormal(stddev=stddev, seed=seed)
        self.table = keras.layers.Embedding(buckets, dim, embeddings_initializer=init, name="table")
        # A serving copy's table stored as float16 or int8 (online_trainer.quantize), read instead
        # of ``table``; not tracked by Keras, so the model's weights stay the float32 ones.
        object.__setattr__(self, "serving_table", None)

    def build(self, input_shape: Any = None) -> None:
        self.table.build()
        self.built = True

    def rows(self, ids: tf.Tensor) -> tf.Tensor:
        """[...] strings -> [..., dim]; padding ("") gives zeros."""
        vectors = self._lookup(self.hashes[0](ids)) + self._lookup(self.hashes[1](ids))
        present = tf.cast(tf.not_equal(ids, ""), vectors.dtype)[..., tf.newaxis]
        return vectors * present

    def _lookup(self, rows: tf.Tensor) -> tf.Tensor:
        serving: Any = self.serving_table
        return self.table(rows) if serving is None else serving.lookup(rows)

    def call(self, ids: tf.Tensor) -> tf.Tensor:
        """[B, L] strings -> [B, dim], the mean over non-padding entries (zeros for an empty bag)."""
        present = tf.cast(tf.not_equal(ids, ""), tf.float32)
        total = tf.reduce_sum(self.rows(ids), axis=-2)
        return total / tf.maximum(tf.reduce_sum(present, axis=-1, keepdims=True), 1.0)
