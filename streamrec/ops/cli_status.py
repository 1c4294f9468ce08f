"""CLI commands that watch the running system: ``streamrec status`` and ``streamrec stack probe``
(mounted by ``streamrec.ops.cli``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from streamrec.core.settings import CommonSettings, PathSettings, load
from streamrec.ops.settings import StackSettings


def stack_probe(
    port: Annotated[int, typer.Option(min=1, max=65535, help="port of its /metrics endpoint")],
    host: Annotated[str, typer.Option(help="interface to listen on")] = "127.0.0.1",
) -> None:
    """Serve the stack's consumer-group lag and Kafka/Redis reachability on /metrics (the stack
    runs it beside Prometheus); computed at each scrape."""
    import signal
    import threading

    from prometheus_client import CollectorRegistry, start_http_server

    from streamrec.ops.probe import StackProbe, watched_groups

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    registry = CollectorRegistry()
    probe = StackProbe(load(CommonSettings), watched_groups())
    registry.register(probe)
    start_http_server(port, addr=host, registry=registry)
    typer.echo(f"probe serving /metrics on {host}:{port}", err=True)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    stopping.wait()
    probe.close()


def status_command(
    state_dir: Annotated[
        Path | None, typer.Option(help="the stack's state folder (default: the running stack, or the demo's)")
    ] = None,
) -> None:
    """One view of the running system: processes, consumer lag, feature and model freshness, model
    versions and labels, the experiment, recent decisions and firing alerts."""
    from streamrec.ops.stack.local_stack import LocalStack
    from streamrec.ops.status import print_status

    settings = load(StackSettings)
    if state_dir is not None:
        settings = settings.model_copy(update={"paths": PathSettings(state_dir=state_dir)})
    stack = LocalStack.find(settings)
    if not stack.is_running():
        typer.echo(
            f"no stack runs in {settings.paths.state_dir} (streamrec stack up, or streamrec demo --keep-running)"
        )
        raise typer.Exit(1)
    print_status(stack)


def dashboards(
    out_dir: Annotated[Path | None, typer.Option(help="where to write them (default: infra/grafana/dashboards)")] = (
        None
    ),
) -> None:
    """Write the Grafana dashboards (generated as code with grafana-foundation-sdk; compose's Grafana
    loads them read-only from infra/grafana/dashboards)."""
    from streamrec.ops.dashboards import DEFAULT_OUT_DIR, write_dashboards

    for path in write_dashboards(out_dir or DEFAULT_OUT_DIR):
        typer.echo(path)
