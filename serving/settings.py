"""Settings of the model server and of every client that talks to it.

The ``model_server`` section is shared by three kinds of process: the local model server
(``streamrec model-server``), the recommendation API (which predicts through it) and the trainer
and evaluator (which publish versions and move labels through ``HandleReloadConfigRequest``).
They must agree on the address, the model name and the ``models.config`` file, so all of it is
read from one place. Flag names mirror ``tensorflow_model_server`` where they overlap, so a
deployment can switch to the real TF Serving by passing the same values as its flags.

Imports nothing heavy: ``streamrec.core.settings`` imports this module to know its variables.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from streamrec.core import contracts
from streamrec.core.settings import CommonSettings


class ProcessTuning(BaseModel):
    """Interpreter tuning shared by the long-running serving processes (the API, the model server);
    ``serving.runtime.tune_serving_process`` applies it once the process is ready to serve."""

    # Generation-0 threshold of the garbage collector once serving (the start-up heap is frozen
    # first, see ``serving.runtime``); 0 keeps CPython's 700.
    gc_gen0_threshold: int = Field(default=20_000, ge=0)
    # sys.setswitchinterval once serving: how long a request thread waits for the GIL held by a
    # busy thread before it is handed over (see ``serving.runtime``).
    gil_switch_interval_s: float = Field(default=0.0005, gt=0, le=0.1)


class ModelServerSection(ProcessTuning):
    """Where the model server listens, what it serves, and the budgets clients use with it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    # TF Serving's default gRPC port.
    port: int = Field(default=8500, ge=1, le=65535)
    model_name: str = contracts.MODEL_NAME
    # None: ``<paths.state_dir>/models/<model_name>`` (see ``ServingSettings.model_base_path``).
    # With docker-compose the server sees the volume under another path: set ``server_base_path``.
    model_base_path: Path | None = None
    # The base path as the *server* sees it, written into models.config; None: model_base_path.
    server_base_path: str | None = None
    # None: ``<paths.state_dir>/models/models.config``.
    model_config_file: Path | None = None
    file_system_poll_wait_seconds: float = Field(default=1.0, ge=0)
    # 0 turns config-file polling off (TF Serving's default); clients also send the config by RPC.
    model_config_file_poll_wait_seconds: float = Field(default=0.0, ge=0)
    # TF Serving checks labels before it loads anything, so a config that already holds labels
    # (the one the model client keeps) only starts with this on. It allows NEW labels only; an
    # existing label still moves only to an AVAILABLE version.
    allow_version_labels_for_unavailable_models: bool = True
    num_load_threads: int = Field(default=2, ge=1)
    max_num_load_retries: int = Field(default=5, ge=0)
    load_retry_interval_s: float = Field(default=60.0, ge=0)
    # Where HandleReloadConfigRequest may point models (their base paths must lie under it);
    # None: the folder that holds model_base_path (``<paths.state_dir>/models`` by default).
    model_root: Path | None = None
    # TF Serving's --ssl_config_file: an SSLConfig text proto (PEM text of key, certificate and
    # CA, and client_verify) the local server listens with instead of the ``grpc`` section's files.
    ssl_config_file: Path | None = None
    # Largest message either way (requests above it: RESOURCE_EXHAUSTED, before any work).
    grpc_max_message_mb: int = Field(default=64, ge=1)
    # Calls in flight beyond this are refused at once with RESOURCE_EXHAUSTED; 0: no limit.
    max_concurrent_rpcs: int = Field(default=256, ge=0)
    # Budget of one Predict from the API (the API falls back when it runs out).
    request_timeout_ms: int = Field(default=100, ge=1)
    # Budget of admin calls (status, metadata, reload config).
    admin_timeout_s: float = Field(default=30.0, gt=0)
    # How long a publish waits for a new version to become AVAILABLE before giving up.
    load_timeout_s: float = Field(default=120.0, gt=0)
    # Versions kept loaded by the label moves (stable + canary); older ones are unloaded.
    max_versions_loaded: int = Field(default=2, ge=1)
    # TensorFlow's thread pools in the local model server (TF Serving's
    # --tensorflow_intra_op_parallelism / --tensorflow_inter_op_parallelism; 0: one per core).
    # One request is a batch of one over a small model, so splitting an op across threads only
    # adds hand-offs, and on the 2-core target the pools' spinning workers take CPU from the API
    # next to them. Raise them for a big model on a machine of its own.
    tf_intra_op_threads: int = Field(default=1, ge=0)
    tf_inter_op_threads: int = Field(default=1, ge=0)
    # Request batching in the local model server (TF Serving's --enable_batching and its
    # batching parameters): concurrent Predicts of one signature are merged into one model call
    # of at most ``max_batch_size`` rows; ``batch_timeout_micros`` 0 merges only what queued behind
    # a running call (a lone request never waits). Off by default, as in TF Serving: with a
    # small model a call's cost is mostly per request, so merging saved nothing here
    # (docs/design/serving.md#request-batching).
    enable_batching: bool = False
    max_batch_size: int = Field(default=32, ge=1)
    batch_timeout_micros: int = Field(default=0, ge=0)
    pad_variable_length_inputs: bool = True
    # Prometheus /metrics of the local model server (``serving.model_server.metrics``); 0: off.
    metrics_port: int = Field(default=0, ge=0, le=65535)

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"


class ServingSettings(CommonSettings):
    model_server: ModelServerSection = ModelServerSection()

    @property
    def model_base_path(self) -> Path:
        configured = self.model_server.model_base_path
        return configured if configured is not None else self.paths.state_dir / "models" / self.model_server.model_name

    @property
    def model_config_file(self) -> Path:
        configured = self.model_server.model_config_file
        return configured if configured is not None else self.paths.state_dir / "models" / "models.config"

    @property
    def model_root(self) -> Path:
        configured = self.model_server.model_root
        return configured if configured is not None else self.model_base_path.parent

    @property
    def server_base_path(self) -> str:
        return self.model_server.server_base_path or str(self.model_base_path)

    @property
    def ranker_base_path(self) -> Path:
        """The ranking model's versions: beside the retrieval model's, named ``ranking.model_name``."""
        return self.model_base_path.parent / self.ranking.model_name

    @property
    def ranker_server_base_path(self) -> str:
        """The ranking model's base path as the model server sees it (beside the retrieval model's)."""
        configured = self.model_server.server_base_path
        return str(Path(configured).parent / self.ranking.model_name) if configured else str(self.ranker_base_path)


SETTINGS_CLASSES = (ServingSettings,)
