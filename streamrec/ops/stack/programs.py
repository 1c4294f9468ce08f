"""``Program`` (one supervised process) and the project's own processes as stack programs.

The project's processes, Prometheus, the probe and the skew checker are known to supervisord but
start only on request (``streamrec stack start NAME``, ``stack up --with``). Each is the same
command a user would run by hand; its settings come from the ``STREAMREC_*`` environment the stack
passes on (``LocalStack.program_environment``). Readiness: the model server and the API answer the
standard gRPC health check at the stack's addresses (over TLS when the ``grpc`` settings given, or
this process's, say so; health needs no caller identity), Prometheus its ``/-/ready``; the other
processes count as ready once supervisord sees them running past their start time. This module
does not import ``local_stack`` (which imports it), so there is no cycle.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
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
# What watches the loop: Prometheus, the probe (consumer lag, Kafka and Redis reachable), the
# train/serve skew checker. ``stack up --with prometheus`` starts the first two.
OBSERVERS: tuple[str, ...] = ("prometheus", "probe", "skew")
STACK_SERVICES: tuple[str, ...] = (*OBSERVERS, *PROJECT_SERVICES)


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


def _own_grpc() -> GrpcSecurity:
    """This process's ``grpc`` settings (a stack not started ``--secure`` may still be given TLS)."""
    from streamrec.core.settings import CommonSettings, load

    return load(CommonSettings).grpc


def _configured(environment: Mapping[str, str], variable: str, default: object) -> str:
    return environment.get(f"STREAMREC_{variable}", str(default))


def service_targets(environment: Mapping[str, str]) -> dict[str, str]:
    """The gRPC address of the model server and of the API in a stack with this environment (the
    stack's, not this process's: ``stack status`` from a plain shell finds the demo's ports)."""
    from serving.api.settings import ApiSection
    from serving.settings import ModelServerSection

    model_server, api = ModelServerSection(), ApiSection()
    return {
        "model-server": f"{_configured(environment, 'MODEL_SERVER__HOST', model_server.host)}:"
        f"{_configured(environment, 'MODEL_SERVER__PORT', model_server.port)}",
        "api": f"{_configured(environment, 'API__HOST', api.host)}:{_configured(environment, 'API__PORT', api.port)}",
    }


def project_programs(settings: StackSettings, root: Path, environment: Mapping[str, str]) -> list[Program]:
    """The project's processes, Prometheus and the probe, each started on request."""
    from streamrec.ops.stack import observability

    cli = _streamrec_cli()
    checks = project_health_checks(settings, environment)
    probe_port = observability.metrics_port(settings, "probe", environment)
    commands: dict[str, list[str]] = {
        "prometheus": observability.prometheus_command(settings, root),
        "probe": [cli, "stack", "probe", "--port", str(probe_port)],
        "model-server": [cli, "model-server"],
        "streams": [cli, "streams", "worker"],
        "joiner": [cli, "joiner"],
        "api": [cli, "api", "serve"],
        "trainer": [cli, "trainer"],
        "evaluator": [cli, "evaluator"],
        "skew": [cli, "skew-check"],
    }
    return [Program(name, commands[name], checks[name], 30, (0, 143), autostart=False) for name in STACK_SERVICES]


def project_health_checks(
    settings: StackSettings, environment: Mapping[str, str], security: GrpcSecurity | None = None
) -> dict[str, Callable[[], bool] | None]:
    """A probe per process; ``None``: supervisord's RUNNING state (after startsecs) is the signal.
    The gRPC probes dial the stack's addresses with ``security`` (a secure stack's CA)."""
    from streamrec.ops.stack import observability

    targets = service_targets(environment)
    return {
        "prometheus": lambda: observability.prometheus_ready(settings),
        "probe": None,
        "model-server": lambda: grpc_serving(targets["model-server"], security=security or _own_grpc()),
        "api": lambda: grpc_serving(targets["api"], security=security or _own_grpc()),
        "streams": None,
        "joiner": None,
        "trainer": None,
        "evaluator": None,
        "skew": None,
    }
