"""``Program`` (one supervised process) and the project's own processes as stack programs.

The project's processes are known to supervisord but start only on request (``streamrec stack
start NAME``, ``stack up --with``). Each is the same command a user would run by hand; its
settings come from the ``STREAMREC_*`` environment the stack passes on
(``LocalStack.client_environment``). Readiness: the model server and the API answer the standard
gRPC health check (over TLS when the ``grpc`` settings given, or this process's, say so; health
needs no caller identity); the stream workers, trainer and evaluator count as ready once
supervisord sees them running past their start time (they have no request port to probe). This
module does not import ``local_stack`` (which imports it), so there is no cycle.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streamrec.core.settings import GrpcSecurity
    from streamrec.ops.settings import StackSettings


@dataclass(frozen=True)
class Program:
    """One process the stack runs; ``healthy`` answers whether it serves requests yet."""

    name: str
    command: list[str]
    healthy: Callable[[], bool] | None
    stop_wait_s: int = 30
    # The JVM exits with 143 (128 + SIGTERM) after a clean shutdown hook run.
    exit_codes: tuple[int, ...] = (0,)
    # Base services start with supervisord; project processes start on request (``start``).
    autostart: bool = True


# Start order of the whole loop: serving before the workers that call it.
PROJECT_SERVICES: tuple[str, ...] = ("model-server", "streams", "joiner", "api", "trainer", "evaluator")


def _streamrec_cli() -> str:
    return str(Path(sys.executable).with_name("streamrec"))


def grpc_serving(target: str, service: str = "", security: GrpcSecurity | None = None) -> bool:
    """The standard health check of a gRPC server answers SERVING (over TLS with ``security.tls``:
    a probe needs no identity, but it must trust the server's certificate)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from serving.grpc_security import open_channel

    try:
        with open_channel(target, security) as channel:
            # The stub's methods are set in __init__, which the type stubs do not describe.
            response = health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]
                health_pb2.HealthCheckRequest(service=service), timeout=1.0
            )
    except grpc.RpcError:
        return False
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def _model_server_serving(security: GrpcSecurity | None) -> bool:
    from serving.settings import ServingSettings
    from streamrec.core.settings import load

    settings = load(ServingSettings)
    return grpc_serving(settings.model_server.target, security=security or settings.grpc)


def _api_serving(security: GrpcSecurity | None) -> bool:
    from serving.api.settings import ApiSettings
    from streamrec.core.settings import load

    settings = load(ApiSettings)
    return grpc_serving(f"{settings.api.host}:{settings.api.port}", security=security or settings.grpc)


def project_programs(settings: StackSettings) -> list[Program]:
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


def project_health_checks(security: GrpcSecurity | None = None) -> dict[str, Callable[[], bool] | None]:
    """A probe per process; ``None``: supervisord's RUNNING state (after startsecs) is the signal.
    The gRPC probes dial with ``security`` (a secure stack's CA), else this process's ``grpc`` settings."""
    return {
        "model-server": lambda: _model_server_serving(security),
        "api": lambda: _api_serving(security),
        "streams": None,
        "joiner": None,
        "trainer": None,
        "evaluator": None,
    }
