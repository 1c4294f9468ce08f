"""``TensorProto`` <-> numpy without TensorFlow's Python helpers on the hot path.

``tf.make_tensor_proto`` / ``tf.make_ndarray`` are general but slow (tens of microseconds of
Python per tensor, and they import the TensorFlow Python API). Every Predict converts about ten
tensors each way, so the dtypes the project's signatures use (string, int64, int32, float32,
float64, bool) are converted here directly: numeric tensors travel as ``tensor_content`` (raw
little-endian bytes, what TF Serving itself sends), strings as ``string_val``. Anything else falls
back to TensorFlow's helpers, so no valid tensor is refused.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np
from tensorflow.core.framework import tensor_pb2, types_pb2

from serving.protocol.errors import InvalidArgument

_NUMERIC: dict[int, np.dtype[Any]] = {
    types_pb2.DT_FLOAT: np.dtype("<f4"),
    types_pb2.DT_DOUBLE: np.dtype("<f8"),
    types_pb2.DT_INT64: np.dtype("<i8"),
    types_pb2.DT_INT32: np.dtype("<i4"),
    types_pb2.DT_BOOL: np.dtype("?"),
}
_VAL_FIELD: dict[int, str] = {
    types_pb2.DT_FLOAT: "float_val",
    types_pb2.DT_DOUBLE: "double_val",
    types_pb2.DT_INT64: "int64_val",
    types_pb2.DT_INT32: "int_val",
    types_pb2.DT_BOOL: "bool_val",
}
_DTYPE_OF_NUMPY: dict[np.dtype[Any], int] = {np.dtype(v).newbyteorder("="): k for k, v in _NUMERIC.items()}

DTYPE_NAMES: dict[int, str] = {value: name for name, value in types_pb2.DataType.items()}
# The most elements one tensor may have (a TensorProto may give one value for a whole shape,
# so without a bound a request of a few bytes could make the server allocate gigabytes).
MAX_TENSOR_ELEMENTS = 1 << 24


def to_tensor_proto(value: Any) -> tensor_pb2.TensorProto:
    """A numpy array (or nested list) as a ``TensorProto``; str/bytes arrays become DT_STRING."""
    proto = tensor_pb2.TensorProto()
    fill_tensor_proto(proto, value)
    return proto


def fill_tensor_proto(proto: tensor_pb2.TensorProto, value: Any) -> None:
    """Write ``value`` into an empty ``proto`` in place (e.g. ``request.inputs[name]``).

    Filling the message a request or response already holds, rather than building a TensorProto
    and ``CopyFrom``-ing it in, skips one message copy and the shape sub-messages per tensor.
    See docs/design/serving.md#filling-tensors-in-place.
    """
    array = np.asarray(value)
    dims = proto.tensor_shape.dim
    for size in array.shape:
        dims.add().size = size
    if array.dtype.kind in "OUS":
        proto.dtype = types_pb2.DT_STRING
        proto.string_val.extend(
            [item if isinstance(item, bytes) else str(item).encode("utf-8") for item in array.ravel().tolist()]
        )
        return
    dtype = _DTYPE_OF_NUMPY.get(array.dtype.newbyteorder("="))
    if dtype is None:
        import tensorflow as tf

        proto.CopyFrom(tf.make_tensor_proto(array))
        return
    data = np.ascontiguousarray(array, dtype=_NUMERIC[dtype])
    if sys.byteorder != "little":  # pragma: no cover - every platform the project runs on is little-endian
        data = data.byteswap()
    proto.dtype = dtype
    proto.tensor_content = data.tobytes()


def to_ndarray(proto: tensor_pb2.TensorProto) -> np.ndarray:
    """A ``TensorProto`` as numpy: strings as an object array of ``bytes`` (like ``tf.make_ndarray``)."""
    if proto.tensor_shape.unknown_rank:
        raise InvalidArgument("a tensor with unknown rank cannot be converted; send its shape")
    shape = tuple(int(dim.size) for dim in proto.tensor_shape.dim)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"tensor shape {list(shape)} has a negative dimension")
    size = math.prod(shape)  # Python ints: a hostile shape cannot overflow into a small size
    if size > MAX_TENSOR_ELEMENTS:
        # one value may stand for the whole shape, so a tiny message could ask for any allocation
        raise InvalidArgument(
            f"tensor shape {list(shape)} has {size} elements, above the limit of {MAX_TENSOR_ELEMENTS}"
        )
    if proto.dtype == types_pb2.DT_STRING:
        values = np.empty(len(proto.string_val), dtype=object)
        values[:] = list(proto.string_val)
        return _fill(values, shape, size, "string_val")
    numpy_dtype = _NUMERIC.get(proto.dtype)
    if numpy_dtype is None:
        import tensorflow as tf

        try:
            return tf.make_ndarray(proto)  # type: ignore[no-any-return]  # untyped TF helper
        except (TypeError, ValueError, KeyError) as exc:  # KeyError: a dtype TF has no numpy type for
            raise InvalidArgument(f"cannot convert tensor of dtype {DTYPE_NAMES.get(proto.dtype)}: {exc}") from exc
    if proto.tensor_content:
        if len(proto.tensor_content) != size * numpy_dtype.itemsize:
            raise InvalidArgument(
                f"tensor_content has {len(proto.tensor_content)} bytes, shape {list(shape)} of "
                f"{DTYPE_NAMES[proto.dtype]} needs {size * numpy_dtype.itemsize}"
            )
        raw = np.frombuffer(proto.tensor_content, dtype=numpy_dtype).reshape(shape)
        return raw.astype(numpy_dtype.newbyteorder("="))
    values = np.asarray(getattr(proto, _VAL_FIELD[proto.dtype]), dtype=numpy_dtype.newbyteorder("="))
    return _fill(values, shape, size, _VAL_FIELD[proto.dtype])


def _fill(values: np.ndarray, shape: tuple[int, ...], size: int, field: str) -> np.ndarray:
    """TensorProto allows one value repeated over the whole shape (and an empty field for zeros)."""
    if values.size == size:
        return values.reshape(shape)
    if values.size == 1:
        return np.full(shape, values[0], dtype=values.dtype)
    if values.size == 0 and field != "string_val":
        return np.zeros(shape, dtype=values.dtype)
    if values.size == 0:
        return np.full(shape, b"", dtype=object)
    raise InvalidArgument(f"{field} has {values.size} values, shape {list(shape)} needs {size}")
