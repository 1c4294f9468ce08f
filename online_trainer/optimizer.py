"""Adam that updates only the embedding rows a batch touched ("lazy" Adam).

Why: Keras 3's ``Adam`` turns the sparse gradient of an embedding lookup (``tf.IndexedSlices``)
into dense updates of the whole table, its first and second moments included. The model's id
tables hold 32,768 rows x 64 dims each, and a 256-example fine-tune batch touches a few hundred
rows, so the dense update dominated a fine-tune step. The lazy update is the one TensorFlow Addons'
``LazyAdam`` (and TF1's ``tf.contrib.opt.LazyAdamOptimizer``) made: moments and weights of
untouched rows stay as they are, instead of decaying and drifting on stale momentum.

Keras 3 has no lazy Adam and TensorFlow Addons does not support Keras 3, hence this subclass. Dense
gradients (the towers' projection layers) take Keras' own ``Adam.update_step`` unchanged, and the
optimizer's variables are Keras Adam's, so checkpoints and ``model_state.optimizer_state`` are the same.
See docs/design/trainer.md#lazy-adam.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="streamrec")
class LazyAdam(keras.optimizers.Adam):  # type: ignore[misc]  # keras has no type hints
    """Keras ``Adam`` whose update of an ``IndexedSlices`` gradient touches only its rows."""

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        if not isinstance(gradient, tf.IndexedSlices) or self.amsgrad:
            super().update_step(gradient, variable, learning_rate)
            return
        dtype = variable.dtype
        # One row per distinct index: a batch can look the same row up many times.
        rows, position = tf.unique(gradient.indices)
        grad = tf.math.unsorted_segment_sum(tf.cast(gradient.values, dtype), position, tf.shape(rows)[0])
        step = tf.cast(self.iterations + 1, dtype)
        beta_1 = tf.cast(self.beta_1, dtype)
        beta_2 = tf.cast(self.beta_2, dtype)
        alpha = tf.cast(learning_rate, dtype) * tf.sqrt(1 - tf.pow(beta_2, step)) / (1 - tf.pow(beta_1, step))
        index = self._get_variable_index(variable)
        m, v = self._momentums[index], self._velocities[index]
        m_rows = beta_1 * tf.gather(m.value, rows) + (1 - beta_1) * grad
        v_rows = beta_2 * tf.gather(v.value, rows) + (1 - beta_2) * tf.square(grad)
        self.assign(m, tf.IndexedSlices(m_rows, rows))
        self.assign(v, tf.IndexedSlices(v_rows, rows))
        self.assign_sub(variable, tf.IndexedSlices(alpha * m_rows / (tf.sqrt(v_rows) + self.epsilon), rows))
