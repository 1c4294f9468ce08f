"""The project's own processes as stack programs (started on request, not with supervisord).

Each one is the same command a user would run by hand; its settings come from the
``STREAMREC_*`` environment the stack passes on (see ``LocalStack.client_environment``).
Readiness: the model server and the API answer the standard gRPC health check; the stream
workers, trainer and evaluator count as ready once supervisord sees them running past their
start time (they have no request port to probe).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streamrec.infra.stack import Program
    from streamrec.settings import StackSettings

# Start order of the whole loop: serving before the workers that call it.
PROJECT_SERVICES: tuple[str, ...] = ("model-server", "streams", "joiner", "api", "trainer", "evaluator")


def _streamrec_cli() -> str:
    return str(Path(sys.executable).with_name("streamrec"))


def grpc_serving(target: str, service: str = "") -> bool:
    """The standard health check of a gRPC server answers SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(target) as channel:
            # The stub's methods are set in __init__, which the type stubs do not describe.
            response = health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(service=service), timeout=1.0
            )
    except grpc.RpcError:
        return False
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def _model_server_target() -> str:
    from serving.settings import ServingSettings
    from streamrec.settings import load

    return load(ServingSettings).model_server.target


def _api_target() -> str:
    from serving.api.settings import ApiSettings
    from streamrec.settings import load

    api = load(ApiSettings).api
    return f"{api.host}:{api.port}"


def project_programs(settings: StackSettings) -> list[Program]:
    from streamrec.infra.stack import Program

    cli = _streamrec_cli()
    checks = project_health_checks()
    commands: dict[str, list[str]] = {
        "model-server": [cli, "model-server"],
        "streams": [cli, "streams", "worker"],
        "joiner": [cli, "joiner"],
        "api": [cli, "api", "serve"],
        "trainer": [cli, "trainer"],
        "evaluator": [cli, "evaluator"],
    }
    return [Program(name, commands[name], checks[name], 30, (0, 143), autostart=False) for name in PROJECT_SERVICES]


def project_health_checks() -> dict[str, Callable[[], bool] | None]:
    """A probe per process; ``None``: supervisord's RUNNING state (after startsecs) is the signal."""
    return {
        "model-server": lambda: grpc_serving(_model_server_target()),
        "api": lambda: grpc_serving(_api_target()),
        "streams": None,
        "joiner": None,
        "trainer": None,
        "evaluator": None,
    }
