"""TensorProto <-> numpy conversions against TensorFlow's own helpers (the reference)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from serving.protocol.errors import InvalidArgument
from serving.protocol.tensors import to_ndarray, to_tensor_proto

ARRAYS = [
    np.array([[1.5, -2.0], [0.0, np.inf]], dtype=np.float32),
    np.array([1, -(2**40)], dtype=np.int64),
    np.array([[3]], dtype=np.int32),
    np.array([0.25], dtype=np.float64),
    np.array([True, False]),
    np.array([["a", ""], ["ü", "b"]], dtype=object),
    np.array([b"raw", b"\xff"], dtype=object),
    np.zeros((0, 3), dtype=np.float32),
]


@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{a.dtype}{list(a.shape)}")
def test_round_trip_matches_tensorflow(array: np.ndarray) -> None:
    proto = to_tensor_proto(array)
    reference = tf.make_ndarray(proto)  # TF reads what we wrote
    ours = to_ndarray(tf.make_tensor_proto(array))  # we read what TF wrote
    expected = np.vectorize(lambda s: s.encode() if isinstance(s, str) else s, otypes=[object])(array) if (
        array.dtype == object
    ) else array  # fmt: skip
    np.testing.assert_array_equal(reference, expected)
    np.testing.assert_array_equal(ours, expected)
    assert ours.shape == array.shape


def test_a_single_value_fills_the_shape_as_in_tensorflow() -> None:
    proto = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_INT64,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=3)]),
        int64_val=[7],
    )
    np.testing.assert_array_equal(to_ndarray(proto), tf.make_ndarray(proto))


def test_wrong_content_length_is_invalid_argument() -> None:
    proto = to_tensor_proto(np.array([1.0, 2.0], dtype=np.float32))
    proto.tensor_shape.dim[0].size = 3
    with pytest.raises(InvalidArgument, match="needs 12"):
        to_ndarray(proto)
    strings = to_tensor_proto(np.array(["a", "b"], dtype=object))
    strings.tensor_shape.dim[0].size = 5
    with pytest.raises(InvalidArgument, match="string_val has 2 values"):
        to_ndarray(strings)
