"""A client for TF Serving's gRPC API, used unchanged against real TF Serving and the local server.

Two jobs share one channel:

* **Serving** (the recommendation API): ``predict`` by version, by label or latest, returning the
  version that actually answered (from the response's ``model_spec``) so every impression can
  name it. Deadlines are always set; a failure is a ``ModelServerRpcError`` carrying the gRPC
  code, which the API turns into a fallback answer.
* **Publishing** (trainer, evaluator): ``publish_stable``, ``publish_canary``, ``promote`` and
  ``rollback`` move the ``stable``/``canary`` labels in TF Serving's order. TF Serving refuses a
  label on a version that is not loaded, and a single reload that both drops a version and moves
  its label away leaves a moment when requests for the label miss. So every move is three
  ``HandleReloadConfigRequest`` calls: (1) add the new version to the ``specific`` version set
  with the labels unchanged and wait until it is AVAILABLE; (2) move the labels; (3) drop
  versions no label needs (keeping ``max_versions_loaded``). A move is a no-op step when there is
  nothing to do.

TF Serving has no RPC that returns the current config (labels included), so the config lives in
the ``models.config`` file when one is given: each move reads it under an exclusive file lock,
and writes the new config back atomically after the server accepted it, so two processes moving
labels do not lose each other's change and a restarted server starts with the same labels.
Without a file the client keeps the config in memory (one publisher only).

Channel options, request/response conversion and the error types live in ``serving.model_rpc``
and are re-exported here.

Only standard RPCs are used (no custom ones), so ``ModelServerClient("tf-serving:8500", ...)``
works against the ``tensorflow/serving`` image as well. With ``security`` (the ``grpc`` settings
section) the channel is TLS: the server is verified against ``grpc.ca_file``, the client presents
its certificate and bearer token, whichever server it is (TF Serving ignores the token).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from google.protobuf import wrappers_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_pb2,
    model_service_pb2_grpc,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2

from serving.grpc_security import open_channel
from serving.model_rpc import (
    STATE_NAME,
    ModelLoadError,
    ModelMetadata,
    ModelServerRpcError,
    VersionStatus,
    build_predict_request,
    channel_options,
    parse_predict_response,
    status_code,
)
from serving.protocol.models_config import find_model, read_config, single_model_config, write_config
from streamrec.core import contracts

if TYPE_CHECKING:
    from serving.settings import ServingSettings
    from streamrec.core.settings import GrpcSecurity

log = logging.getLogger(__name__)


class ModelServerClient:
    """Blocking client; thread-safe (gRPC channels are), one per process is enough."""

    def __init__(
        self,
        target: str,
        model_name: str = contracts.MODEL_NAME,
        timeout_s: float = 0.1,
        *,
        admin_timeout_s: float = 30.0,
        config_file: Path | None = None,
        server_base_path: str | None = None,
        load_timeout_s: float = 120.0,
        max_versions_loaded: int = 2,
        max_message_mb: int = 64,
        security: GrpcSecurity | None = None,
    ) -> None:
        self.target = target
        self.model_name = model_name
        self.timeout_s = timeout_s
        self.admin_timeout_s = admin_timeout_s
        self.config_file = Path(config_file) if config_file is not None else None
        self.server_base_path = server_base_path
        self.load_timeout_s = load_timeout_s
        self.max_versions_loaded = max_versions_loaded
        self._channel = open_channel(target, security, channel_options(max_message_mb))
        self._prediction = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)
        self._memory_config: model_server_config_pb2.ModelServerConfig | None = None
        self._move_lock = threading.Lock()

    @classmethod
    def from_settings(
        cls, settings: ServingSettings, *, model_name: str | None = None, server_base_path: str | None = None
    ) -> ModelServerClient:
        """The client of the ``model_server`` section's model, or of ``model_name`` (served from
        ``server_base_path``) on the same server and config file, e.g. the ranking model."""
        section = settings.model_server
        return cls(
            section.target,
            model_name or section.model_name,
            section.request_timeout_ms / 1000.0,
            admin_timeout_s=section.admin_timeout_s,
            config_file=settings.model_config_file,
            server_base_path=server_base_path or settings.server_base_path,
            load_timeout_s=section.load_timeout_s,
            max_versions_loaded=section.max_versions_loaded,
            max_message_mb=section.grpc_max_message_mb,
            security=settings.grpc,
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ModelServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- PredictionService -------------------------------------------------------------------
    def predict(
        self,
        inputs: Mapping[str, Any],
        *,
        signature: str = contracts.RECOMMEND_SIGNATURE,
        version: int | None = None,
        label: str | None = None,
        timeout_s: float | None = None,
        output_filter: list[str] | None = None,
    ) -> tuple[int, dict[str, np.ndarray]]:
        """Run ``signature``; return (the version that served it, outputs as numpy arrays)."""
        request = build_predict_request(
            self.model_name, inputs, signature=signature, version=version, label=label, output_filter=output_filter
        )
        response = self._call("Predict", self._prediction.Predict, request, timeout_s or self.timeout_s)
        return parse_predict_response(response)

    def metadata(self, *, version: int | None = None, label: str | None = None) -> ModelMetadata:
        spec = model_pb2.ModelSpec(name=self.model_name)
        if version is not None:
            spec.version.CopyFrom(wrappers_pb2.Int64Value(value=version))
        elif label is not None:
            spec.version_label = label
        request = get_model_metadata_pb2.GetModelMetadataRequest(model_spec=spec, metadata_field=["signature_def"])
        response = self._call("GetModelMetadata", self._prediction.GetModelMetadata, request, self.admin_timeout_s)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        return ModelMetadata(response.model_spec.version.value, dict(signature_map.signature_def))

    # -- ModelService ------------------------------------------------------------------------
    def status(self, version: int | None = None) -> list[VersionStatus]:
        """Every version the server knows of (or one), newest first."""
        spec = model_pb2.ModelSpec(name=self.model_name)
        if version is not None:
            spec.version.CopyFrom(wrappers_pb2.Int64Value(value=version))
        request = get_model_status_pb2.GetModelStatusRequest(model_spec=spec)
        response = self._call("GetModelStatus", self._models.GetModelStatus, request, self.admin_timeout_s)
        statuses = [
            VersionStatus(item.version, STATE_NAME.get(item.state, str(item.state)), item.status.error_message)
            for item in response.model_version_status
        ]
        return sorted(statuses, key=lambda item: -item.version)

    def available_versions(self) -> list[int]:
        try:
            return [item.version for item in self.status() if item.state == "AVAILABLE"]
        except ModelServerRpcError as exc:
            if exc.code == grpc.StatusCode.NOT_FOUND:
                return []
            raise

    def reload_config(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        """Send ``config`` (the whole server config) with HandleReloadConfigRequest."""
        request = model_management_pb2.ReloadConfigRequest(config=config)
        response = self._call(
            "HandleReloadConfigRequest", self._models.HandleReloadConfigRequest, request, self.admin_timeout_s
        )
        if response.status.error_code != 0:  # TF Serving also puts the error in the body
            code = status_code(response.status.error_code)
            raise ModelServerRpcError("HandleReloadConfigRequest", code, response.status.error_message)

    def wait_until_available(self, version: int, timeout_s: float | None = None) -> None:
        """Block until ``version`` is AVAILABLE; raise ``ModelLoadError`` when it failed or timed out."""
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else self.load_timeout_s)
        pause = 0.02
        last = "not known to the server yet"
        while True:
            try:
                states = self.status(version)
            except ModelServerRpcError as exc:
                if exc.code not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                    raise
                states = []
            for item in states:
                if item.state == "AVAILABLE":
                    return
                if item.state == "END":
                    reason = item.error_message or "it was unloaded (no longer in the version policy?)"
                    raise ModelLoadError(f"version {version} of model {self.model_name} will not be served: {reason}")
                last = f"state {item.state}"
            if time.monotonic() >= deadline:
                raise ModelLoadError(
                    f"version {version} of model {self.model_name} is not AVAILABLE after the wait ({last}); "
                    "check the server log, or raise model_server.load_timeout_s"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.25)

    # -- label moves (TF Serving's order: load, wait, move label, unload) -------------------
    def labels(self) -> dict[str, int]:
        """The labels in the config this client keeps (the models.config file, when given)."""
        model = find_model(self._current_config(), self.model_name)
        return dict(model.version_labels) if model is not None else {}

    def publish_stable(self, version: int) -> None:
        """Serve ``version`` as both ``stable`` and ``canary`` (the first version, or no experiment)."""
        self._move({contracts.STABLE_LABEL: version, contracts.CANARY_LABEL: version})

    def publish_canary(self, version: int) -> None:
        """Load ``version`` and point ``canary`` at it (``stable`` too when there is none yet)."""
        with self._locked_config() as config:
            labels = self._labels_of(config)
            stable = labels.get(contracts.STABLE_LABEL)
            if stable is None:  # first publish: what is served now stays stable, if anything is
                serving = [v for v in self.available_versions() if v != version]
                stable = max(serving) if serving else version
            self._apply(config, {**labels, contracts.STABLE_LABEL: stable, contracts.CANARY_LABEL: version})

    def promote(self, version: int | None = None) -> int:
        """``stable`` := the canary version (checked against ``version`` when given); returns it."""
        with self._locked_config() as config:
            labels = self._labels_of(config)
            canary = labels.get(contracts.CANARY_LABEL)
            if canary is None:
                raise ModelLoadError(f"model {self.model_name} has no {contracts.CANARY_LABEL} label to promote")
            if version is not None and version != canary:
                raise ModelLoadError(f"cannot promote version {version}: the canary is version {canary}")
            self._apply(config, {**labels, contracts.STABLE_LABEL: canary})
            return canary

    def rollback(self, version: int | None = None) -> int:
        """``canary`` := the stable version; returns it. With ``version``, only while the canary is
        that version: a canary that moved on meanwhile (the trainer published a newer one) was
        not judged, and is left serving."""
        with self._locked_config() as config:
            labels = self._labels_of(config)
            stable = labels.get(contracts.STABLE_LABEL)
            if stable is None:
                raise ModelLoadError(f"model {self.model_name} has no {contracts.STABLE_LABEL} label to roll back to")
            canary = labels.get(contracts.CANARY_LABEL)
            if version is not None and canary != version:
                log.info("rollback of version %d: the canary is version %s now, left as it is", version, canary)
                return stable
            self._apply(config, {**labels, contracts.CANARY_LABEL: stable})
            return stable

    def _move(self, labels: dict[str, int]) -> None:
        with self._locked_config() as config:
            self._apply(config, {**self._labels_of(config), **labels})

    def _labels_of(self, config: model_server_config_pb2.ModelServerConfig) -> dict[str, int]:
        model = find_model(config, self.model_name)
        return dict(model.version_labels) if model is not None else {}

    def _apply(self, config: model_server_config_pb2.ModelServerConfig, labels: dict[str, int]) -> None:
        model = find_model(config, self.model_name)
        if model is None:
            if self.server_base_path is None:
                raise ModelLoadError(
                    f"model {self.model_name} is not in the config and no server_base_path was given to add it"
                )
            model = config.model_config_list.config.add(
                name=self.model_name, base_path=self.server_base_path, model_platform="tensorflow"
            )
        old_labels = dict(model.version_labels)
        policy = model.model_version_policy
        if policy.WhichOneof("policy_choice") == "specific":
            loaded = set(policy.specific.versions)
        else:  # latest/all: what is served now must stay until the labels have moved
            loaded = set(self.available_versions())
        loaded |= set(old_labels.values())
        wanted = set(labels.values())
        # (1) load the new versions beside the old ones, labels unchanged
        if not wanted <= loaded:
            self._send(config, model, loaded | wanted, old_labels)
            try:
                for version in sorted(wanted - loaded):
                    self.wait_until_available(version)
            except ModelLoadError:
                self._send(config, model, loaded, old_labels)  # back to the config the file holds
                raise
        # (2) move the labels (every labelled version is now AVAILABLE)
        if labels != old_labels:
            self._send(config, model, loaded | wanted, labels)
        # (3) unload what no label needs, keeping the newest others up to max_versions_loaded
        others = sorted((loaded | wanted) - wanted, reverse=True)
        keep = wanted | set(others[: max(0, self.max_versions_loaded - len(wanted))])
        self._send(config, model, keep, labels)
        self._store(config)

    def _send(
        self,
        config: model_server_config_pb2.ModelServerConfig,
        model: model_server_config_pb2.ModelConfig,
        versions: set[int],
        labels: dict[str, int],
    ) -> None:
        model.model_version_policy.specific.Clear()
        model.model_version_policy.specific.versions.extend(sorted(versions))
        model.version_labels.clear()
        model.version_labels.update(labels)
        self.reload_config(config)

    # -- where the config lives --------------------------------------------------------------
    def _current_config(self) -> model_server_config_pb2.ModelServerConfig:
        if self.config_file is not None and self.config_file.exists():
            return read_config(self.config_file)
        config = model_server_config_pb2.ModelServerConfig()
        if self._memory_config is not None:
            config.CopyFrom(self._memory_config)
        elif self.server_base_path is not None:
            config.CopyFrom(single_model_config(self.model_name, self.server_base_path))
        return config

    @contextlib.contextmanager
    def _locked_config(self) -> Iterator[model_server_config_pb2.ModelServerConfig]:
        with self._move_lock:
            if self.config_file is None:
                yield self._current_config()
                return
            self.config_file.parent.mkdir(parents=True, exist_ok=True)
            lock_path = self.config_file.with_name(self.config_file.name + ".lock")
            with open(lock_path, "a") as lock:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                try:
                    yield self._current_config()
                finally:
                    fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _store(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        self._memory_config = model_server_config_pb2.ModelServerConfig()
        self._memory_config.CopyFrom(config)
        if self.config_file is not None:
            write_config(self.config_file, config)

    # -- plumbing ----------------------------------------------------------------------------
    def _call(self, method: str, stub_method: Any, request: Any, timeout_s: float) -> Any:
        try:
            return stub_method(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            raise ModelServerRpcError(method, exc.code(), exc.details() or "") from exc


__all__ = [
    "ModelLoadError",
    "ModelMetadata",
    "ModelServerClient",
    "ModelServerRpcError",
    "VersionStatus",
    "channel_options",
]
