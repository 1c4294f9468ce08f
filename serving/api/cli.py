"""``streamrec api serve`` (and ``python -m serving``): run the recommendation API until SIGTERM.

Every option falls back to its ``STREAMREC_API__*`` variable (``streamrec settings`` lists them);
the model server's address is ``STREAMREC_MODEL_SERVER__HOST``/``__PORT`` and the model budget
``STREAMREC_MODEL_SERVER__REQUEST_TIMEOUT_MS``; the feature store is ``STREAMREC_FEATURES__*``
and ``STREAMREC_REDIS__*``; impressions go to ``STREAMREC_TOPICS__IMPRESSIONS``.

Before the first start: ``streamrec stack up`` (Kafka, Redis), ``streamrec features setup``
(the FeatureServices and profiles) and a model server with a ``stable`` label.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import threading
from types import FrameType
from typing import Annotated, Any

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__, pretty_exceptions_show_locals=False)


@app.callback()
def _group() -> None:
    """The gRPC recommendation API (streamrec.v1.Recommender)."""


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Listen address (env STREAMREC_API__HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="gRPC port, 0 for any free one (env STREAMREC_API__PORT).")] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Prometheus /metrics port, 0 for none (env STREAMREC_API__METRICS_PORT).")
    ] = None,
    canary_share: Annotated[
        float | None, typer.Option(help="Share of users in the canary arm, 0..1 (env STREAMREC_API__CANARY_SHARE).")
    ] = None,
    log_level: Annotated[str, typer.Option(help="Python logging level.")] = "INFO",
) -> None:
    """Serve Recommend with health and reflection; SIGTERM/SIGINT stop it gracefully."""
    from serving.api.server import ApiServer
    from serving.api.settings import ApiSettings
    from serving.runtime import tune_serving_process
    from streamrec.core.settings import load

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load(ApiSettings)
    overrides: dict[str, Any] = {
        name: value
        for name, value in (
            ("host", host),
            ("port", port),
            ("metrics_port", metrics_port),
            ("canary_share", canary_share),
        )
        if value is not None
    }
    if overrides:
        api = type(settings.api).model_validate({**settings.api.model_dump(), **overrides})
        settings = settings.model_copy(update={"api": api})

    stop_requested = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger(__name__).info("%s received: shutting down", signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    server = ApiServer(settings)
    bound = server.start()
    tune_serving_process(settings.api)
    typer.echo(f"streamrec.v1.Recommender listening on {settings.api.host}:{bound}", err=True)
    try:
        stop_requested.wait()
    finally:
        # A stop that hangs (a blocked flush, a stuck thread) must not outlive the supervisor's
        # patience silently: the stacks say where it hung, and the exit code says it did.
        faulthandler.dump_traceback_later(settings.api.grace_period_s + settings.api.shutdown_timeout_s, exit=True)
        server.stop()


def main() -> None:
    """``python -m serving``: the ``serve`` command on its own."""
    typer.run(serve)
