"""CLI commands that watch the running loop: ``skew-check`` (mounted by ``streamrec.ops.cli``)."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from streamrec.core.settings import load


def skew_check(
    once: Annotated[
        bool, typer.Option("--once", help="read the impressions topic to its end, check one window and exit")
    ] = False,
    max_seconds: Annotated[float | None, typer.Option(help="stop after this long (default: run until killed)")] = None,
) -> None:
    """Train/serve skew and drift: compare the features each impression served with the features
    the point-in-time join recomputes for the same user and time, every skew.interval_s over the
    last skew.window_s (env STREAMREC_SKEW__*); metrics on skew.metrics_port."""
    from features.skew_checker import run
    from features.skew_settings import SkewSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load(SkewSettings)
    if settings.skew.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.skew.metrics_port)
    reports = run(settings, once=once, max_seconds=max_seconds)
    if once and not any(reports):
        typer.echo("no impressions in the window; nothing was checked")
