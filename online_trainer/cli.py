"""``streamrec train`` (bootstrap from history) and ``streamrec trainer`` (the online loop).

Both read ``TrainerSettings`` (``STREAMREC_TRAINER__*``, ``STREAMREC_MODEL_SERVER__*``,
``STREAMREC_FEATURES__*``, Kafka and paths); flags override a setting for one run and say which.
The lead mounts ``app`` into the ``streamrec`` command.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from online_trainer.settings import TrainerSettings
from streamrec.core.errors import SettingsError
from streamrec.core.settings import load

if TYPE_CHECKING:
    import pandas as pd

    from online_trainer.publish import Publisher

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__, pretty_exceptions_show_locals=False)


def parse_until(value: str) -> pd.Timestamp:
    """ISO-8601 (naive means UTC) or epoch seconds -> a UTC timestamp."""
    import pandas as pd

    try:
        stamp = pd.Timestamp(float(value), unit="s") if value.replace(".", "", 1).isdigit() else pd.Timestamp(value)
    except ValueError as exc:
        raise SettingsError(f"--until {value!r} is neither ISO-8601 nor epoch seconds") from exc
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def load_interactions(dataset: str, columns: str | None) -> pd.DataFrame:
    """The same datasets as ``streamrec replay``: ml-100k, synthetic, or a CSV/Parquet log."""
    from streamrec.datasets import generic, movielens, synthetic

    if dataset == "ml-100k":
        return movielens.load_interactions()
    if dataset == "synthetic":
        return synthetic.generate()
    mapping = generic.ColumnMapping.parse(columns) if columns else generic.ColumnMapping()
    return generic.load_interaction_log(Path(dataset), mapping)


def _settings(**trainer_overrides: Any) -> TrainerSettings:
    settings = load(TrainerSettings)
    overrides = {key: value for key, value in trainer_overrides.items() if value is not None}
    if not overrides:
        return settings
    tuning = settings.trainer.model_validate({**settings.trainer.model_dump(), **overrides})
    return settings.model_copy(update={"trainer": tuning})


def _publisher(settings: TrainerSettings) -> Publisher | None:
    if not settings.trainer.publish:
        return None
    from serving.model_client import ModelServerClient

    return ModelServerClient.from_settings(settings)


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("feast").setLevel(logging.WARNING)  # registry cache refreshes on every read


@app.command("train")
def train_command(
    until: Annotated[str, typer.Option(help="learn from interactions up to this time (ISO-8601 or epoch s)")],
    dataset: Annotated[str, typer.Option(help="ml-100k, synthetic, or a CSV/Parquet path")] = "ml-100k",
    columns: Annotated[str | None, typer.Option(help="column mapping for a PATH (see `streamrec replay`)")] = None,
    epochs: Annotated[
        int | None, typer.Option(help="training epochs (env STREAMREC_TRAINER__BOOTSTRAP_EPOCHS)")
    ] = None,
    embedding_dim: Annotated[int | None, typer.Option(help="model embedding size (default: ModelConfig's)")] = None,
    publish: Annotated[
        bool | None, typer.Option(help="label the version canary on the model server (env STREAMREC_TRAINER__PUBLISH)")
    ] = None,
) -> None:
    """Bootstrap: train on history through Feast's point-in-time join and publish the next version."""
    import dataclasses

    from online_trainer.bootstrap import bootstrap
    from online_trainer.model_config import ModelConfig

    _logging()
    settings = _settings(bootstrap_epochs=epochs, publish=publish)
    config = ModelConfig() if embedding_dim is None else dataclasses.replace(ModelConfig(), embedding_dim=embedding_dim)
    publisher = _publisher(settings)
    result = bootstrap(
        settings, load_interactions(dataset, columns), parse_until(until), config=config, publisher=publisher
    )
    typer.echo(f"dataset: {result.dataset.rows:,} examples, features from {result.dataset.features_source}")
    typer.echo(f"         {result.dataset.note}")
    typer.echo(result.outcome.gate.summary())
    if result.version is None:
        raise typer.Exit(1)
    labelled = "labelled canary" if result.outcome.labelled else "not labelled (model server off or unreachable)"
    typer.echo(f"version {result.version} written to {settings.model_base_path / str(result.version)}, {labelled}")


@app.command("trainer")
def trainer_command(
    interval_s: Annotated[
        float | None, typer.Option(help="seconds per fine-tune interval (env STREAMREC_TRAINER__INTERVAL_S)")
    ] = None,
    max_examples: Annotated[
        int | None, typer.Option(help="fine-tune early at this many new examples (env STREAMREC_TRAINER__MAX_EXAMPLES)")
    ] = None,
    max_intervals: Annotated[int | None, typer.Option(help="stop after this many intervals (default: run on)")] = None,
    publish: Annotated[
        bool | None, typer.Option(help="label versions canary on the model server (env STREAMREC_TRAINER__PUBLISH)")
    ] = None,
) -> None:
    """The online loop: consume, fine-tune every interval, gate, publish as canary, then commit."""
    import time

    from online_trainer import metrics
    from online_trainer.loop import OnlineTrainer

    _logging()
    settings = _settings(interval_s=interval_s, max_examples=max_examples, publish=publish)
    metrics.serve(settings.trainer.metrics_port)
    summaries = metrics.SummaryWriter(settings.tensorboard_dir / f"trainer-{int(time.time())}")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    trainer = OnlineTrainer(settings, publisher=_publisher(settings), summaries=summaries)
    trainer.start()
    try:
        trainer.run(stop=stop, max_intervals=max_intervals)
    finally:
        trainer.close()
