"""LazyAdam: a sparse gradient moves only the rows it touched, by Adam's formula."""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from online_trainer.optimizer import LazyAdam


def _table(values: np.ndarray) -> keras.Variable:
    return keras.Variable(values.astype(np.float32))


def test_first_step_matches_adam_by_hand_and_leaves_untouched_rows() -> None:
    table = _table(np.ones((4, 2)))
    optimizer = LazyAdam(learning_rate=0.1)
    optimizer.build([table])
    # rows 1 (twice: the two lookups are summed) and 3
    gradient = tf.IndexedSlices(tf.constant([[1.0, -2.0], [1.0, 0.0], [0.5, 0.5]]), tf.constant([1, 1, 3]))
    optimizer.apply_gradients([(gradient, table)])

    beta_1, beta_2, eps, lr = 0.9, 0.999, 1e-7, 0.1
    alpha = lr * math.sqrt(1 - beta_2) / (1 - beta_1)
    expected = np.ones((4, 2))
    for row, grad in ((1, np.array([2.0, -2.0])), (3, np.array([0.5, 0.5]))):
        m, v = (1 - beta_1) * grad, (1 - beta_2) * grad**2
        expected[row] -= alpha * m / (np.sqrt(v) + eps)
    np.testing.assert_allclose(table.numpy(), expected, rtol=1e-5)


def test_untouched_rows_keep_weights_and_moments_where_dense_adam_moves_them() -> None:
    start = np.arange(8, dtype=np.float32).reshape(4, 2)
    first = tf.IndexedSlices(tf.constant([[1.0, 1.0]]), tf.constant([0]), dense_shape=tf.constant([4, 2]))
    second = tf.IndexedSlices(tf.constant([[1.0, 1.0]]), tf.constant([2]), dense_shape=tf.constant([4, 2]))

    lazy_table, dense_table = _table(start), _table(start)
    lazy, dense = LazyAdam(learning_rate=0.1), keras.optimizers.Adam(learning_rate=0.1)
    lazy.build([lazy_table])
    dense.build([dense_table])
    for gradient in (first, second):
        lazy.apply_gradients([(gradient, lazy_table)])
        dense.apply_gradients([(tf.convert_to_tensor(gradient), dense_table)])

    after_first_step = lazy_table.numpy()[0].copy()
    # the same two steps on their rows as dense Adam's for a row touched once, at its step
    np.testing.assert_allclose(lazy_table.numpy()[2], dense_table.numpy()[2], rtol=1e-5)
    # row 0 was touched at step 1 only: dense Adam keeps moving it on momentum, lazy Adam does not
    assert not np.allclose(dense_table.numpy()[0], after_first_step)
    lazy.apply_gradients([(second, lazy_table)])
    np.testing.assert_array_equal(lazy_table.numpy()[0], after_first_step)
    np.testing.assert_array_equal(lazy_table.numpy()[[1, 3]], start[[1, 3]])


def test_dense_gradients_take_keras_adam_unchanged() -> None:
    lazy_weights, dense_weights = _table(np.ones((3,))), _table(np.ones((3,)))
    lazy, dense = LazyAdam(learning_rate=0.05), keras.optimizers.Adam(learning_rate=0.05)
    lazy.build([lazy_weights])
    dense.build([dense_weights])
    for _ in range(3):
        gradient = tf.constant([0.3, -1.0, 2.0])
        lazy.apply_gradients([(gradient, lazy_weights)])
        dense.apply_gradients([(gradient, dense_weights)])
    np.testing.assert_array_equal(lazy_weights.numpy(), dense_weights.numpy())
