"""CLI commands of the closed loop: ``joiner``, ``evaluator`` and ``simulate`` (mounted by ``streamrec.ops.cli``)."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from streamrec.core.settings import load
from streamrec.ops.dataset_options import DatasetOption, load_announced
from streamrec.ops.settings import SimulatorSettings


def evaluator(
    max_seconds: Annotated[float | None, typer.Option(help="stop after this long (default: run until killed)")] = None,
) -> None:
    """The A/B evaluator: test canary against stable on labeled examples; promote or roll back."""
    from serving.rollout.process import run
    from serving.rollout.settings import EvaluatorSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load(EvaluatorSettings)
    if settings.evaluator.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(settings.evaluator.metrics_port)
    run(settings, max_seconds=max_seconds)


def joiner(
    loglevel: Annotated[str, typer.Option("--loglevel", "-l", help="Faust log level")] = "info",
    workers: Annotated[
        int, typer.Option(min=1, help="Joiner processes on this host; the group splits the partitions across them.")
    ] = 1,
) -> None:
    """The impression-click joiner (same as ``faust -A streams.joiner_app worker``): labeled
    examples to the labeled topic, unjoinable clicks to the dead-letter topic."""
    if workers > 1:
        from streams.worker_group import run_group, streamrec_command

        run_group("joiner", streamrec_command("joiner", "-l", loglevel), "joiner", workers)
    import faust

    from streams.joiner_app import main_joiner

    faust.Worker(main_joiner().app, loglevel=loglevel).execute_from_commandline()


def simulate(
    rate: Annotated[float | None, typer.Option(help="visits per second")] = None,
    speedup: Annotated[float | None, typer.Option(help="event-time speed-up factor")] = None,
    limit: Annotated[int | None, typer.Option(help="replay only the first N held-out events")] = None,
    dataset: DatasetOption = None,
) -> None:
    """Replay a dataset's held-out interactions as visits: Recommend, click if the real item was shown
    (and its kind is a success kind), and always produce the interaction."""
    from streamrec.ops.simulate import held_out
    from streamrec.ops.simulate import simulate as run_simulation

    settings = load(SimulatorSettings)
    interactions = load_announced(dataset or settings.dataset).interactions
    frame = held_out(interactions, settings.simulator.holdout_start_fraction)
    report = run_simulation(frame, settings, rate=rate, speedup=speedup, limit=limit)
    typer.echo(report.summary())
