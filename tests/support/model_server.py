"""A local model server running in the test process, on a free loopback port.

``running_model_server(base_path)`` starts ``serving.model_server.server.ModelServer`` (the same
server ``streamrec model-server`` runs), waits for the first versions under ``base_path`` to load
and yields its address; it stops the server on exit. Other components' tests (the API, the
end-to-end loop) use it to get a real gRPC model server without a subprocess.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from serving.model_server.core import CoreOptions
from serving.model_server.server import ModelServer, ServerOptions
from streamrec.core import contracts


@dataclass(frozen=True)
class RunningModelServer:
    target: str
    port: int
    server: ModelServer


@contextmanager
def running_model_server(
    base_path: Path | None = None,
    *,
    model_name: str = contracts.MODEL_NAME,
    config_file: Path | None = None,
    poll_s: float = 0.1,
    config_poll_s: float = 0.0,
    allow_version_labels_for_unavailable_models: bool = False,
    max_num_load_retries: int = 0,
) -> Iterator[RunningModelServer]:
    """Serve ``base_path`` as ``model_name`` (latest version), or the models of ``config_file``."""
    options = ServerOptions(
        host="127.0.0.1",
        port=0,
        model_config_file=config_file,
        model_name=None if config_file is not None else model_name,
        model_base_path=None if config_file is not None else base_path,
        file_system_poll_wait_seconds=poll_s,
        model_config_file_poll_wait_seconds=config_poll_s,
        grpc_workers=8,
        core=CoreOptions(
            max_num_load_retries=max_num_load_retries,
            load_retry_interval_s=0.2,
            allow_version_labels_for_unavailable_models=allow_version_labels_for_unavailable_models,
            initial_load_timeout_s=60.0,
        ),
    )
    server = ModelServer(options).start()
    try:
        yield RunningModelServer(target=f"127.0.0.1:{server.port}", port=server.port, server=server)
    finally:
        server.stop(grace_s=1.0)
