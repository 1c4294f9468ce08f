"""One version of one model: load it, warm it up, run its signatures, count who is using it.

Loading follows TF Serving: ``tf.saved_model.load`` on ``<base_path>/<version>``, then every
warm-up request in ``assets.extra/tf_serving_warmup_requests`` (``PredictionLog`` TFRecords, at
most ``MAX_WARMUP_RECORDS``) is run before the version may become AVAILABLE, so the first real
request does not pay for tracing and kernel initialisation. A failing warm-up fails the load.

Predict is the hot path, so everything that can be computed once is: the concrete signature
functions, their input specs and output names, and the ``SignatureDef`` map that
``GetModelMetadata`` returns (read from ``saved_model.pb`` as TF Serving does, so it lists the
same signatures, ``__saved_model_init_op`` included).

A version in use is reference-counted (``acquire``/``release``): unloading waits for the
requests already running on it to finish, as TF Serving's servable handles do.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2, saved_model_pb2
from tensorflow.python.eager import context
from tensorflow.python.framework import ops
from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

from serving.model_server.batching import BatchingOptions, SignatureBatcher, batchable, fixed_trailing_dims
from serving.protocol.errors import FailedPrecondition, InvalidArgument, ModelServerError
from serving.protocol.tensors import DTYPE_NAMES, fill_tensor_proto, to_ndarray

log = logging.getLogger(__name__)

WARMUP_PATH = Path("assets.extra") / "tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000  # TF Serving's limit
DEFAULT_SIGNATURE = "serving_default"
SERVE_TAG = "serve"


class LoadError(ModelServerError):
    """A version could not be loaded; ``code`` is TF's error code when TF said one."""


class _InputCheck(NamedTuple):
    """One input's spec, reduced to what ``check_inputs`` and the tensor conversion compare."""

    spec: tf.TensorSpec
    is_string: bool
    numpy_dtype: np.dtype[Any] | None  # None for strings
    dims: tuple[int | None, ...] | None  # None: any rank
    dtype_enum: int


def _input_check(spec: tf.TensorSpec) -> _InputCheck:
    is_string = spec.dtype == tf.string
    dims = None if spec.shape.rank is None else tuple(spec.shape.as_list())
    numpy_dtype = None if is_string else np.dtype(spec.dtype.as_numpy_dtype)
    return _InputCheck(spec, is_string, numpy_dtype, dims, spec.dtype.as_datatype_enum)


@dataclass(frozen=True)
class Signature:
    """A concrete signature function with what validation needs, computed once.

    ``flat_order`` is the order of the function's flat arguments, when TF exposes it. Calling a
    signature by keyword goes through TF's structured-signature binding (``FunctionType`` bind,
    ``TensorSpec.cast`` per input), which repeats checks ``check_inputs`` has already made; with
    ``flat_order`` the tensors go to the function's flat call directly (see
    docs/design/serving.md#calling-a-signature-by-its-flat-arguments). ``None`` (another TF
    version): the keyword call.

    ``checks`` holds each input's dtype and dimensions as plain Python values: comparing them is
    a few tuple compares per input, where ``TensorShape.is_compatible_with`` builds a
    ``TensorShape`` from the array's shape on every call.
    """

    function: Any  # a ConcreteFunction (TF has no public type for it)
    inputs: dict[str, tf.TensorSpec]
    outputs: tuple[str, ...]
    flat_order: tuple[str, ...] | None = None
    # each output's static shape (None: unknown), for request batching (``batching.batchable``)
    output_shapes: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, _InputCheck] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "checks", {alias: _input_check(spec) for alias, spec in self.inputs.items()})

    @property
    def batchable(self) -> bool:
        shapes = {alias: check.dims for alias, check in self.checks.items()}
        return bool(self.output_shapes) and batchable(shapes, self.output_shapes)

    def __call__(self, tensors: dict[str, tf.Tensor]) -> Any:
        if self.flat_order is None:
            return self.function(**tensors)
        flat = [tensors[alias] for alias in self.flat_order]
        return self.function._call_flat(flat, self.function.captured_inputs)  # noqa: SLF001 - see the docstring


def to_eager_tensor(value: np.ndarray, dtype_enum: int) -> tf.Tensor:
    """``tf.constant(value, dtype)`` without its Python layers, for an already checked input.

    ``tf.constant`` goes through the weak-tensor dispatch wrapper, ``_constant_impl`` and
    ``convert_to_eager_tensor``, which copies the array, resolves the dtype and checks the
    shape, before ending in the ``EagerTensor`` constructor; here the dtype is resolved once per
    signature and ``check_inputs`` has checked the shape (see
    docs/design/serving.md#eager-tensors-without-tfconstant). The array is not copied: it was made
    from the request's ``TensorProto`` for this call alone, so nothing can change it while the
    tensor lives.
    """
    ctx = context.context()
    ctx.ensure_initialized()
    return ops.EagerTensor(value, ctx.device_name, dtype_enum)


def _flat_order(function: Any, inputs: dict[str, tf.TensorSpec]) -> tuple[str, ...] | None:
    """The flat argument order of a signature function, if TF exposes it and it covers the inputs."""
    order = getattr(function, "_arg_keywords", None)
    if order is None or not hasattr(function, "_call_flat") or sorted(order) != sorted(inputs):
        return None
    return tuple(str(alias) for alias in order)


class LoadedVersion:
    def __init__(self, model_name: str, version: int, path: Path, batching: BatchingOptions | None = None) -> None:
        self.model_name = model_name
        self.version = version
        self.path = path
        self.batching = batching or BatchingOptions()
        self._batchers: dict[tuple[str, tuple[str, ...]], SignatureBatcher] = {}
        self._batchers_lock = threading.Lock()
        self._model: Any = None
        self.signatures: dict[str, Signature] = {}
        self.signature_defs: dict[str, meta_graph_pb2.SignatureDef] = {}
        self._in_flight = 0
        self._idle = threading.Condition()

    # -- loading -----------------------------------------------------------------------------
    def load(self) -> None:
        """Load the SavedModel and run its warm-up requests; raises ``LoadError``."""
        try:
            self.signature_defs = read_signature_defs(self.path)
            self._model = tf.saved_model.load(str(self.path), tags=[SERVE_TAG])
            for name, function in self._model.signatures.items():
                _, input_specs = function.structured_input_signature
                self.signatures[name] = Signature(
                    function=function,
                    inputs=dict(input_specs),
                    outputs=tuple(sorted(function.structured_outputs)),
                    flat_order=_flat_order(function, dict(input_specs)),
                    output_shapes={
                        alias: getattr(value, "shape", None) for alias, value in function.structured_outputs.items()
                    },
                )
        except LoadError:
            raise
        except tf.errors.OpError as exc:
            raise _load_error(exc.error_code, f"Failed to load SavedModel at {self.path}: {exc.message}") from exc
        except Exception as exc:  # noqa: BLE001 - any failure of a user model fails only this version
            raise _load_error(2, f"Failed to load SavedModel at {self.path}: {type(exc).__name__}: {exc}") from exc
        count = self.warm_up()
        log.info("loaded %s version %d (%d warm-up requests)", self.model_name, self.version, count)

    def warm_up(self) -> int:
        path = self.path / WARMUP_PATH
        if not path.exists():
            return 0
        count = 0
        try:
            for record in tf.data.TFRecordDataset(str(path)):
                count += 1
                if count > MAX_WARMUP_RECORDS:
                    raise _load_error(
                        3, f"Number of warmup records exceeds the maximum ({MAX_WARMUP_RECORDS}) at {path}"
                    )
                entry = prediction_log_pb2.PredictionLog.FromString(record.numpy())
                if entry.WhichOneof("log_type") != "predict_log":
                    raise _load_error(
                        12, f"warm-up record {count} is a {entry.WhichOneof('log_type')}; only predict_log is supported"
                    )
                self.predict(entry.predict_log.request)
        except LoadError:
            raise
        except ModelServerError as exc:
            raise _load_error(exc.code.value[0], f"warm-up request {count} failed: {exc.message}") from exc
        except tf.errors.OpError as exc:
            raise _load_error(exc.error_code, f"cannot read warm-up file {path}: {exc.message}") from exc
        return count

    def unload(self) -> None:
        self.signatures = {}
        self._batchers = {}
        self._model = None

    # -- in-flight accounting ----------------------------------------------------------------
    def acquire(self) -> None:
        with self._idle:
            self._in_flight += 1

    def release(self) -> None:
        with self._idle:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout=timeout_s)

    # -- predict -----------------------------------------------------------------------------
    def predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        """Run the request's signature; errors carry TF Serving's codes and wording."""
        name = request.model_spec.signature_name or DEFAULT_SIGNATURE
        signature = self.signatures.get(name)
        if signature is None:
            raise FailedPrecondition(f'Serving signature key "{name}" not found.')
        arrays = {alias: to_ndarray(tensor) for alias, tensor in request.inputs.items()}
        outputs = self.run(name, signature, arrays, list(request.output_filter))
        response = predict_pb2.PredictResponse()
        spec = response.model_spec
        spec.name = self.model_name
        spec.version.value = self.version
        spec.signature_name = name
        for alias, value in outputs.items():
            fill_tensor_proto(response.outputs[alias], value)
        return response

    def run(
        self, name: str, signature: Signature, inputs: Mapping[str, np.ndarray], output_filter: list[str]
    ) -> dict[str, np.ndarray]:
        check_inputs(signature, inputs)
        for alias in output_filter:
            if alias not in signature.outputs:
                raise InvalidArgument(
                    f"output tensor alias not found in signature: {alias} Outputs expected to be in the set "
                    f"{{{','.join(signature.outputs)}}}."
                )
        wanted = tuple(output_filter) or signature.outputs
        if self.batching.enabled and signature.batchable:
            return self._batcher(name, signature, wanted).run(dict(inputs))
        return self._call(name, signature, inputs, wanted)

    def _call(
        self, name: str, signature: Signature, inputs: Mapping[str, np.ndarray], wanted: tuple[str, ...]
    ) -> dict[str, np.ndarray]:
        checks = signature.checks
        tensors = {alias: to_eager_tensor(value, checks[alias].dtype_enum) for alias, value in inputs.items()}
        try:
            results = signature(tensors)
        except tf.errors.InvalidArgumentError as exc:
            raise InvalidArgument(exc.message) from exc
        except tf.errors.OpError as exc:
            error = ModelServerError(f"signature {name} of version {self.version} failed: {exc.message}")
            raise error from exc
        return {alias: results[alias].numpy() for alias in wanted}

    def _batcher(self, name: str, signature: Signature, wanted: tuple[str, ...]) -> SignatureBatcher:
        key = (name, wanted)
        batcher = self._batchers.get(key)
        if batcher is None:
            with self._batchers_lock:
                batcher = self._batchers.get(key)
                if batcher is None:
                    outputs = {alias: signature.output_shapes.get(alias) for alias in wanted}
                    batcher = SignatureBatcher(
                        functools.partial(self._call, name, signature, wanted=wanted),
                        self.batching,
                        pad=fixed_trailing_dims(outputs),
                    )
                    self._batchers[key] = batcher
        return batcher


def check_inputs(signature: Signature, inputs: Mapping[str, np.ndarray]) -> None:
    """TF Serving's input checks: exact key set, dtype, and shapes compatible with the spec."""
    expected = signature.inputs
    if set(inputs) != set(expected):
        sent, wanted = sorted(inputs), sorted(expected)
        raise InvalidArgument(
            f"input size does not match signature: {len(sent)}!={len(wanted)} len({{{','.join(sent)}}}) != "
            f"len({{{','.join(wanted)}}}). Sent extra: {{{','.join(sorted(set(sent) - set(wanted)))}}}. "
            f"Missing but required: {{{','.join(sorted(set(wanted) - set(sent)))}}}."
        )
    for alias, value in inputs.items():
        check = signature.checks[alias]
        if check.is_string:
            dtype_ok = value.dtype == object or value.dtype.kind in "SU"
        else:
            dtype_ok = value.dtype == check.numpy_dtype
        if not dtype_ok:
            raise InvalidArgument(
                f"input {alias!r}: expects {check.spec.dtype.name} but {_describe_dtype(value)} is provided"
            )
        dims = check.dims
        if dims is not None and (
            len(dims) != value.ndim
            or any(want is not None and want != got for want, got in zip(dims, value.shape, strict=True))
        ):
            raise InvalidArgument(
                f"input {alias!r}: shape {list(value.shape)} is not compatible with {check.spec.shape}"
            )


def _describe_dtype(value: np.ndarray) -> str:
    return "string" if value.dtype == object or value.dtype.kind in "SU" else value.dtype.name


def read_signature_defs(path: Path) -> dict[str, meta_graph_pb2.SignatureDef]:
    """The ``serve`` meta graph's SignatureDefs, straight from ``saved_model.pb``."""
    pb_path = path / "saved_model.pb"
    if not pb_path.exists():
        raise _load_error(5, f"Could not find SavedModel .pb or .pbtxt at supplied export directory path: {path}")
    saved_model = saved_model_pb2.SavedModel()
    try:
        saved_model.ParseFromString(pb_path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError (and sometimes others) on garbage
        raise _load_error(15, f"saved_model.pb at {path} cannot be parsed: {exc}") from exc
    for meta_graph in saved_model.meta_graphs:
        if SERVE_TAG in meta_graph.meta_info_def.tags:
            return dict(meta_graph.signature_def)
    raise _load_error(5, f"SavedModel at {path} has no MetaGraphDef with tag '{SERVE_TAG}'")


def _load_error(code: int, message: str) -> LoadError:
    """A LoadError whose gRPC code is ``code`` (TF and gRPC share the numbering)."""
    import grpc

    error = LoadError(message)
    error.code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    return error


__all__ = ["DTYPE_NAMES", "LoadError", "LoadedVersion", "Signature", "check_inputs", "read_signature_defs"]
