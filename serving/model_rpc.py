"""The pieces of TF Serving's gRPC API every client shares: channel options, request building,
response parsing, and the errors and records the clients return.

``serving.model_client`` (blocking, with the label moves) is built on these, so it speaks to
real TF Serving and the local server alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import grpc
import numpy as np
from tensorflow_serving.apis import get_model_status_pb2, predict_pb2

from serving.protocol.tensors import fill_tensor_proto, to_ndarray
from streamrec.core.errors import StreamrecError

if TYPE_CHECKING:
    from tensorflow.core.protobuf import meta_graph_pb2

_STATE_NAMES = dict(get_model_status_pb2.ModelVersionStatus.State.items())
STATE_NAME: dict[int, str] = {value: name for name, value in _STATE_NAMES.items()}


class ModelServerRpcError(StreamrecError):
    """An RPC to the model server failed; ``code`` is the gRPC status code."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{method} failed with {code.name}: {details}")
        self.method = method
        self.code = code
        self.details = details


class ModelLoadError(StreamrecError):
    """A version did not become AVAILABLE (its load failed, it was unloaded, or it timed out)."""


class VersionStatus(NamedTuple):
    version: int
    state: str  # START, LOADING, AVAILABLE, UNLOADING, END
    error_message: str  # "" when the version is fine


@dataclass(frozen=True)
class ModelMetadata:
    version: int
    signatures: dict[str, meta_graph_pb2.SignatureDef]


def channel_options(max_message_mb: int = 64) -> list[tuple[str, int]]:
    """Options for a long-lived channel to a model server.

    Keepalive pings only while calls are active (idle pings make servers with default settings
    answer GOAWAY "too_many_pings"); a short reconnect backoff so a restarted server is used
    again within about a second rather than after gRPC's default of up to two minutes.
    """
    limit = max_message_mb * 1024 * 1024
    return [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1_000),
    ]


def build_predict_request(
    model_name: str,
    inputs: Mapping[str, Any],
    *,
    signature: str,
    version: int | None = None,
    label: str | None = None,
    output_filter: list[str] | None = None,
) -> predict_pb2.PredictRequest:
    if version is not None and label is not None:
        raise ValueError("give a version or a label, not both")
    # filled in place: building sub-messages and copying them in costs as much as the tensors
    request = predict_pb2.PredictRequest()
    spec = request.model_spec
    spec.name = model_name
    spec.signature_name = signature
    if version is not None:
        spec.version.value = version
    elif label is not None:
        spec.version_label = label
    if output_filter:
        request.output_filter.extend(output_filter)
    for name, value in inputs.items():
        fill_tensor_proto(request.inputs[name], value)
    return request


def parse_predict_response(response: predict_pb2.PredictResponse) -> tuple[int, dict[str, np.ndarray]]:
    return response.model_spec.version.value, {name: to_ndarray(t) for name, t in response.outputs.items()}


def status_code(value: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN
