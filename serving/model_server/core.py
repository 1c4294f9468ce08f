"""The server's state across models: TF Serving's ``ServerCore``, without the gRPC parts.

It owns one ``ModelManager`` per configured model and applies configs the way TF Serving's
``ServerCore::ReloadConfig`` does:

1. validate the config (names unique, platform ``tensorflow``, ...);
2. check every ``version_labels`` entry against the versions AVAILABLE *now* (TF Serving checks
   labels before it touches the models); a label on an unavailable version fails the whole
   reload with FAILED_PRECONDITION and changes nothing, unless
   ``allow_version_labels_for_unavailable_models`` is set and the label is new (a label that
   exists may still only move to an AVAILABLE version);
3. add, update and retire models, and poll their base paths once, so new versions start loading.

The reload does not wait for new *versions* to load (TF Serving waits only for new *models*);
clients poll ``GetModelStatus``, as ``ModelServerClient.wait_until_available`` does.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tensorflow_serving.config import model_server_config_pb2

from serving.model_server.batching import BatchingOptions
from serving.model_server.manager import ModelManager, State
from serving.protocol.errors import FailedPrecondition, NotFound
from serving.protocol.models_config import validate_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoreOptions:
    num_load_threads: int = 2
    num_unload_threads: int = 1
    max_num_load_retries: int = 5
    load_retry_interval_s: float = 60.0
    allow_version_labels_for_unavailable_models: bool = False
    # How long the first config waits for its models' first versions (TF Serving waits forever).
    initial_load_timeout_s: float = 600.0
    # TF Serving's --enable_batching and its batching parameters (``batching``)
    batching: BatchingOptions = field(default_factory=BatchingOptions)


class ServerCore:
    def __init__(self, options: CoreOptions) -> None:
        self.options = options
        self._load_pool = ThreadPoolExecutor(options.num_load_threads, thread_name_prefix="model-load")
        self._unload_pool = ThreadPoolExecutor(options.num_unload_threads, thread_name_prefix="model-unload")
        self._config_lock = threading.Lock()
        self._models: dict[str, ModelManager] = {}
        self._config: model_server_config_pb2.ModelServerConfig | None = None

    @property
    def config(self) -> model_server_config_pb2.ModelServerConfig | None:
        return self._config

    def manager(self, name: str) -> ModelManager | None:
        return self._models.get(name)

    def require(self, name: str, request: str) -> ModelManager:
        manager = self._models.get(name)
        if manager is None:
            raise NotFound(f"Servable not found for request: {request}")
        return manager

    # -- config ------------------------------------------------------------------------------
    def reload_config(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        """Apply ``config``; raises a ModelServerError (with its gRPC code) and changes nothing on a bad one."""
        validate_config(config)
        with self._config_lock:
            first = self._config is None
            self._check_labels(config)
            wanted = {model.name: model for model in config.model_config_list.config}
            for name in list(self._models):
                if name not in wanted:
                    log.info("model %s left the config; unloading it", name)
                    self._models.pop(name).retire()
            new_models = []
            for name, model_config in wanted.items():
                manager = self._models.get(name)
                if manager is None:
                    manager = ModelManager(
                        model_config,
                        load_executor=self._load_pool,
                        unload_executor=self._unload_pool,
                        max_num_load_retries=self.options.max_num_load_retries,
                        load_retry_interval_s=self.options.load_retry_interval_s,
                        batching=self.options.batching,
                    )
                    self._models[name] = manager
                    new_models.append(manager)
                else:
                    manager.update_config(model_config)
                manager.set_labels(dict(model_config.version_labels))
                manager.refresh()
            self._config = model_server_config_pb2.ModelServerConfig()
            self._config.CopyFrom(config)
        # TF Serving waits for the versions of models that are new (all of them, at start).
        for manager in new_models:
            if not manager.wait_settled(self.options.initial_load_timeout_s):
                log.warning("model %s: first versions still loading after the initial wait", manager.name)
        if first:
            log.info("serving models: %s", ", ".join(sorted(self._models)) or "(none)")

    def _check_labels(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        for model in config.model_config_list.config:
            manager = self._models.get(model.name)
            current = manager.labels if manager is not None else {}
            for label, version in model.version_labels.items():
                available = manager is not None and manager.version_state(version) == State.AVAILABLE
                if available:
                    continue
                allowed = self.options.allow_version_labels_for_unavailable_models and current.get(label) in (
                    None,
                    version,
                )
                if not allowed:
                    raise FailedPrecondition(
                        f"Request to assign label to version {version} of model {model.name}, "
                        "which is not currently available for inference"
                    )

    # -- polling and lifecycle ---------------------------------------------------------------
    def poll(self) -> None:
        for manager in list(self._models.values()):
            try:
                manager.refresh()
            except Exception:  # a poll must never kill the poller; the next one retries
                log.exception("polling model %s failed", manager.name)

    def stop(self) -> None:
        for manager in list(self._models.values()):
            manager.stop()
        self._load_pool.shutdown(wait=False, cancel_futures=True)
        self._unload_pool.shutdown(wait=True)
