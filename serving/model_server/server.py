"""The model server process: gRPC server, health, reflection, pollers, graceful stop.

Start order: the gRPC port opens first with the health service answering NOT_SERVING, then the
first config is applied (every model's first versions load and warm up), then health turns
SERVING. A client can therefore tell "starting" (NOT_SERVING, Predict answers NOT_FOUND) from
"down" (UNAVAILABLE). Two daemon threads then poll: the model base paths every
``file_system_poll_wait_seconds`` (0: only once at start, as in TF Serving), and, when
``model_config_file_poll_wait_seconds`` > 0, the config file, which is re-applied when its
*contents* change (so a config sent by RPC is not reverted by an unchanged file).

``stop()`` turns health NOT_SERVING, lets in-flight RPCs finish within the grace period, then
unloads every version.

Security (``serving.grpc_security``): with ``grpc.tls``, or TF Serving's ``--ssl_config_file``,
the port is TLS (mutual with ``client_verify``), and every RPC but health needs a caller
identity; ``HandleReloadConfigRequest`` needs an admin identity. Whatever the security, a reload
may only point models under ``model_root`` or at the start-up base paths (``model_root``).
``max_concurrent_rpcs`` refuses calls beyond it with RESOURCE_EXHAUSTED; requests above
``grpc_max_message_mb`` are refused by gRPC the same way, and bytes that do not parse as the
request with INVALID_ARGUMENT.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc
from tensorflow_serving.config import model_server_config_pb2

from serving.grpc_security import ServerTls, caller_check, listen, read_ssl_config, server_interceptors, server_tls
from serving.model_server.core import CoreOptions, ServerCore
from serving.model_server.model_root import ModelRoot
from serving.model_server.service import ModelService, PredictionService
from serving.protocol.errors import InvalidArgument, ModelServerError
from serving.protocol.models_config import parse_config, single_model_config
from streamrec.core.settings import GrpcSecurity

log = logging.getLogger(__name__)

SERVICE_NAMES = ("tensorflow.serving.PredictionService", "tensorflow.serving.ModelService")
# The RPCs that load versions and move labels: admin identities only (when callers are identified).
ADMIN_METHODS = ("/tensorflow.serving.ModelService/HandleReloadConfigRequest",)


@dataclass(frozen=True)
class ServerOptions:
    host: str = "0.0.0.0"  # noqa: S104 - TF Serving listens on every interface; settings narrow it
    port: int = 8500  # 0 picks a free port (see ModelServer.port)
    model_config_file: Path | None = None
    model_name: str | None = None
    model_base_path: Path | None = None
    file_system_poll_wait_seconds: float = 1.0
    model_config_file_poll_wait_seconds: float = 0.0
    grpc_max_message_mb: int = 64
    grpc_workers: int = 16
    # Calls beyond this many in flight are refused with RESOURCE_EXHAUSTED; 0: no limit.
    max_concurrent_rpcs: int = 0
    core: CoreOptions = field(default_factory=CoreOptions)
    # TLS and caller identity (``serving.grpc_security``); ``ssl_config_file`` (TF Serving's
    # SSLConfig) replaces the TLS part of ``security``, whose tokens and admins still apply.
    security: GrpcSecurity = field(default_factory=GrpcSecurity)
    ssl_config_file: Path | None = None
    # Where reloads may point models (see ``model_root``); None: only the start-up base paths.
    model_root: Path | None = None

    def tls(self) -> ServerTls | None:
        """The TLS this server listens with (files read now); None: plaintext."""
        if self.ssl_config_file is not None:
            return read_ssl_config(self.ssl_config_file)
        return server_tls(self.security)

    def initial_config(self) -> tuple[model_server_config_pb2.ModelServerConfig, str | None]:
        """The first config and, when it came from a file, that file's text."""
        if self.model_config_file is not None:
            if self.model_name or self.model_base_path:
                raise InvalidArgument("give either --model_config_file or --model_name/--model_base_path, not both")
            text = Path(self.model_config_file).read_text()
            return parse_config(text, source=str(self.model_config_file)), text
        if not self.model_name or self.model_base_path is None:
            raise InvalidArgument("give --model_config_file, or both --model_name and --model_base_path")
        return single_model_config(self.model_name, str(Path(self.model_base_path).resolve())), None


class ModelServer:
    def __init__(self, options: ServerOptions) -> None:
        self.options = options
        self.core = ServerCore(options.core)
        self.model_root = ModelRoot(options.model_root)
        self._tls = options.tls()
        check = caller_check(options.security, self._tls, ADMIN_METHODS)
        limit = options.grpc_max_message_mb * 1024 * 1024
        self._grpc = grpc.server(
            ThreadPoolExecutor(options.grpc_workers, thread_name_prefix="model-rpc"),
            interceptors=server_interceptors(check),
            maximum_concurrent_rpcs=options.max_concurrent_rpcs or None,
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
                # accept the keepalive pings that ModelServerClient sends while calls are active
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.so_reuseport", 0),
            ],
        )
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(self.core), self._grpc)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(self.core, self.model_root), self._grpc)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._grpc,
        )
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._config_text: str | None = None
        self.port = 0

    def start(self) -> ModelServer:
        """Open the port, load the first config, start polling; returns when models are loaded."""
        config, self._config_text = self.options.initial_config()
        self.model_root.allow(model.base_path for model in config.model_config_list.config)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = listen(self._grpc, f"{self.options.host}:{self.options.port}", self._tls)
        self._grpc.start()
        security = "plaintext" if self._tls is None else ("mutual TLS" if self._tls.client_verify else "TLS")
        log.info("model server listening on %s:%d (%s)", self.options.host, self.port, security)
        try:
            self.core.reload_config(config)
        except ModelServerError:
            self._grpc.stop(0)
            raise
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        if self.options.file_system_poll_wait_seconds > 0:
            self._spawn("fs-poller", self._poll_models)
        if self.options.model_config_file is not None and self.options.model_config_file_poll_wait_seconds > 0:
            self._spawn("config-poller", self._poll_config_file)
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._stop.set()
        self._grpc.stop(grace_s).wait()
        for thread in self._threads:
            thread.join(timeout=5)
        self.core.stop()
        log.info("model server stopped")

    def wait(self) -> None:
        self._grpc.wait_for_termination()

    # -- internals ---------------------------------------------------------------------------
    def _set_health(self, status: int) -> None:
        for name in ("", *SERVICE_NAMES):
            self.health.set(name, status)

    def _spawn(self, name: str, target: object) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self._threads.append(thread)

    def _poll_models(self) -> None:
        while not self._stop.wait(self.options.file_system_poll_wait_seconds):
            self.core.poll()

    def _poll_config_file(self) -> None:
        path = self.options.model_config_file
        assert path is not None  # noqa: S101 - only started with a file
        while not self._stop.wait(self.options.model_config_file_poll_wait_seconds):
            try:
                text = path.read_text()
            except OSError as exc:
                log.warning("cannot read model config file %s: %s", path, exc)
                continue
            if text == self._config_text:
                continue
            try:
                self.core.reload_config(parse_config(text, source=str(path)))
                self._config_text = text
                log.info("applied the changed model config file %s", path)
            except ModelServerError as exc:
                log.error("the changed model config file %s was not applied: %s", path, exc.message)
                self._config_text = text  # do not retry the same bad text every poll
