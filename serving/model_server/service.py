"""gRPC servicers for ``tensorflow.serving.PredictionService`` and ``tensorflow.serving.ModelService``.

Thin on purpose: each RPC resolves its ``ModelSpec`` through ``ServerCore`` and turns a
``ModelServerError`` into the gRPC status it carries, so every code and message is decided in
one place (``core``/``manager``/``versions``) and reads like TF Serving's. ``Classify``,
``Regress`` and ``MultiInference`` answer UNIMPLEMENTED: the project's models have only predict
signatures. ``HandleReloadConfigRequest`` first checks that every base path lies where a reload
may point (``model_root``); who may call it at all is decided before, by the server's
``serving.grpc_security`` interceptor.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving.model_server import metrics
from serving.model_server.core import ServerCore
from serving.model_server.manager import ModelManager
from serving.model_server.model_root import ModelRoot
from serving.model_server.versions import LoadedVersion
from serving.protocol.errors import InvalidArgument, ModelServerError
from serving.protocol.models_config import validate_config

log = logging.getLogger(__name__)
T = TypeVar("T")


def _abort(context: grpc.ServicerContext, error: ModelServerError) -> NoReturn:
    context.abort(error.code, error.message)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def _describe(spec: model_pb2.ModelSpec) -> str:
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return f"Specific({spec.name}, {spec.version.value})"
    if choice == "version_label":
        return f"Label({spec.name}, {spec.version_label})"
    return f"Latest({spec.name})"


def _acquire(core: ServerCore, spec: model_pb2.ModelSpec) -> LoadedVersion:
    if not spec.name:
        raise InvalidArgument("ModelSpec has no name specified.")
    manager: ModelManager = core.require(spec.name, _describe(spec))
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
        return manager.acquire(version=spec.version.value)
    if choice == "version_label":
        return manager.acquire(label=spec.version_label)
    return manager.acquire()


def _guarded(context: grpc.ServicerContext, call: Callable[[], T], method: str) -> T:
    """Run one RPC's work, timed; a ``ModelServerError`` becomes the gRPC status it carries."""
    started = time.perf_counter()
    try:
        return call()
    except ModelServerError as exc:
        metrics.ERRORS.labels(method=method, code=exc.code.name).inc()
        _abort(context, exc)
    finally:
        metrics.REQUEST_SECONDS.labels(method=method).observe(time.perf_counter() - started)


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):  # type: ignore[misc]  # untyped stubs
    def __init__(self, core: ServerCore) -> None:
        self._core = core

    def Predict(  # noqa: N802 - gRPC method name
        self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext
    ) -> predict_pb2.PredictResponse:
        def run() -> predict_pb2.PredictResponse:
            loaded = _acquire(self._core, request.model_spec)
            try:
                return loaded.predict(request)
            finally:
                loaded.release()

        return _guarded(context, run, "Predict")

    def GetModelMetadata(  # noqa: N802 - gRPC method name
        self, request: get_model_metadata_pb2.GetModelMetadataRequest, context: grpc.ServicerContext
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        def run() -> get_model_metadata_pb2.GetModelMetadataResponse:
            fields = list(request.metadata_field)
            if not fields:
                raise InvalidArgument("GetModelMetadataRequest must specify at least one metadata_field")
            unsupported = [name for name in fields if name != "signature_def"]
            if unsupported:
                raise InvalidArgument(f"Metadata field {unsupported[0]} is not supported")
            loaded = _acquire(self._core, request.model_spec)
            try:
                response = get_model_metadata_pb2.GetModelMetadataResponse()
                response.model_spec.name = loaded.model_name
                response.model_spec.version.value = loaded.version
                signatures = get_model_metadata_pb2.SignatureDefMap()
                for name, signature_def in loaded.signature_defs.items():
                    signatures.signature_def[name].CopyFrom(signature_def)
                response.metadata["signature_def"].Pack(signatures)
                return response
            finally:
                loaded.release()

        return _guarded(context, run, "GetModelMetadata")

    def _unimplemented(self, _request: Any, context: grpc.ServicerContext) -> NoReturn:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "this model server serves predict signatures only")
        raise AssertionError("unreachable")  # pragma: no cover

    Classify = _unimplemented
    Regress = _unimplemented
    MultiInference = _unimplemented


class ModelService(model_service_pb2_grpc.ModelServiceServicer):  # type: ignore[misc]  # untyped stubs
    def __init__(self, core: ServerCore, model_root: ModelRoot) -> None:
        self._core = core
        self._model_root = model_root

    def GetModelStatus(  # noqa: N802 - gRPC method name
        self, request: get_model_status_pb2.GetModelStatusRequest, context: grpc.ServicerContext
    ) -> get_model_status_pb2.GetModelStatusResponse:
        def run() -> get_model_status_pb2.GetModelStatusResponse:
            spec = request.model_spec
            if not spec.name:
                raise InvalidArgument("ModelSpec has no name specified.")
            manager = self._core.manager(spec.name)
            version = spec.version.value if spec.HasField("version") else None
            if manager is None:
                from serving.protocol.errors import NotFound

                if version is not None:
                    raise NotFound(f"Could not find version {version} of model {spec.name}")
                raise NotFound(f"Could not find any versions of model {spec.name}")
            response = get_model_status_pb2.GetModelStatusResponse()
            for record in manager.statuses(version):
                status = response.model_version_status.add(version=record.version, state=int(record.state))
                status.status.error_code = record.error_code
                status.status.error_message = record.error_message
            return response

        return _guarded(context, run, "GetModelStatus")

    def HandleReloadConfigRequest(  # noqa: N802 - gRPC method name
        self, request: model_management_pb2.ReloadConfigRequest, context: grpc.ServicerContext
    ) -> model_management_pb2.ReloadConfigResponse:
        def run() -> model_management_pb2.ReloadConfigResponse:
            try:
                validate_config(request.config)
                self._model_root.check(request.config)  # before anything changes
                self._core.reload_config(request.config)
            except ModelServerError as exc:
                log.error("ServerCore failed to reload config: %s", exc.message)
                raise
            return model_management_pb2.ReloadConfigResponse()

        return _guarded(context, run, "HandleReloadConfigRequest")
