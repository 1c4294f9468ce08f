"""``streamrec train`` (bootstrap from history) and ``streamrec trainer`` (the online loop).

Both read ``TrainerSettings`` (``STREAMREC_TRAINER__*``, ``STREAMREC_MODEL_SERVER__*``,
``STREAMREC_FEATURES__*``, Kafka and paths); flags override a setting for one run and say which.
The lead mounts ``app`` into the ``streamrec`` command; ``python -m online_trainer.cli`` runs it
too (how ``streamrec train --workers N`` starts its local workers, :mod:`online_trainer.distributed`).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import TYPE_CHECKING, Annotated, Any

import typer

from online_trainer.settings import TrainerSettings
from streamrec.core.errors import SettingsError, StreamrecError
from streamrec.core.settings import load

if TYPE_CHECKING:
    import pandas as pd

    from online_trainer.publish import Publisher
    from streamrec.datasets.description import Dataset

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__, pretty_exceptions_show_locals=False)


# The dataset options of every command that trains or reads a dataset (train, tune, export-lite).
DatasetOption = Annotated[
    str | None,
    typer.Option(
        help="a preset (ml-100k, synthetic[:options]), a description .toml or a log file; "
        "default: the STREAMREC_DATASET setting (ml-100k)"
    ),
]
ColumnsOption = Annotated[str | None, typer.Option(help="column mapping of a bare log file (see `streamrec replay`)")]


def parse_until(value: str) -> pd.Timestamp:
    """ISO-8601 (naive means UTC) or epoch seconds -> a UTC timestamp."""
    import pandas as pd

    try:
        stamp = pd.Timestamp(float(value), unit="s") if value.replace(".", "", 1).isdigit() else pd.Timestamp(value)
    except ValueError as exc:
        raise SettingsError(f"--until {value!r} is neither ISO-8601 nor epoch seconds") from exc
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def load_training_dataset(spec: str, columns: str | None, settings: TrainerSettings) -> Dataset:
    """The ``--dataset`` (``streamrec.datasets.description.load_dataset``), checked against the feature repo.

    The model reads the attributes through Feast, so the repo must have been set up for this
    dataset: another dataset's schema would give these ids another dataset's attributes.
    """
    from features.profiles import read_stamp
    from streamrec.datasets.description import load_dataset

    dataset = load_dataset(spec, columns=columns)
    stamp = read_stamp(settings.data_dir)
    if stamp is None or stamp.name != dataset.name or stamp.schema != dataset.schema:
        held = "nothing" if stamp is None else f"dataset {stamp.name!r}"
        raise SettingsError(
            f"the feature repo ({settings.data_dir}) holds {held}, not dataset {dataset.name!r} with its attributes "
            f"and event kinds; run `streamrec features setup --dataset {spec}` first"
        )
    return dataset


def trainer_settings(**trainer_overrides: Any) -> TrainerSettings:
    """The trainer's settings from the environment, with the ``trainer`` section's flags given."""
    return with_trainer_overrides(load(TrainerSettings), **trainer_overrides)


def with_trainer_overrides(settings: TrainerSettings, **trainer_overrides: Any) -> TrainerSettings:
    """``settings`` with the ``trainer`` fields given (None: unchanged), validated; an invalid one names itself."""
    from pydantic import ValidationError

    overrides = {key: value for key, value in trainer_overrides.items() if value is not None}
    if not overrides:
        return settings
    try:
        tuning = settings.trainer.model_validate({**settings.trainer.model_dump(), **overrides})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'trainer'}: {e['msg']}" for e in exc.errors())
        raise SettingsError(f"invalid option(s): {problems}") from exc
    return settings.model_copy(update={"trainer": tuning})


def _publisher(settings: TrainerSettings) -> Publisher | None:
    if not settings.trainer.publish:
        return None
    from serving.model_client import ModelServerClient

    return ModelServerClient.from_settings(settings)


def configure_logging(worker: str = "") -> None:
    """``worker``: e.g. ``"worker 1/2 "``, so the interleaved logs of local workers say whose line is whose."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {worker}%(levelname)s %(name)s: %(message)s")
    logging.getLogger("feast").setLevel(logging.WARNING)  # registry cache refreshes on every read


@app.command("train")
def train_command(
    until: Annotated[str, typer.Option(help="learn from interactions up to this time (ISO-8601 or epoch s)")],
    dataset: DatasetOption = None,
    columns: ColumnsOption = None,
    epochs: Annotated[
        int | None, typer.Option(help="training epochs (env STREAMREC_TRAINER__BOOTSTRAP_EPOCHS)")
    ] = None,
    embedding_dim: Annotated[
        int | None, typer.Option(help="model embedding size (default: the tuned config's, else ModelConfig's)")
    ] = None,
    learning_rate: Annotated[
        float | None, typer.Option(help="Adam's step (default: the tuned config's, else ModelConfig's)")
    ] = None,
    temperature: Annotated[
        float | None,
        typer.Option(help="softmax temperature of the loss (default: the tuned config's, else ModelConfig's)"),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="examples per step (default: the tuned config's, else ModelConfig's)")
    ] = None,
    best_config: Annotated[
        bool | None,
        typer.Option(
            "--best-config/--no-best-config",
            help="start from `streamrec tune`'s best config when it exists (env "
            "STREAMREC_TRAINER__SEARCH__USE_BEST_CONFIG, default on; its path: "
            "STREAMREC_TRAINER__SEARCH__BEST_CONFIG_PATH, default <state_dir>/tuning/best_config.json)",
        ),
    ] = None,
    publish: Annotated[
        bool | None, typer.Option(help="label the version canary on the model server (env STREAMREC_TRAINER__PUBLISH)")
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="train in this many local worker processes under MultiWorkerMirroredStrategy, each on 1/N of "
            "every global batch (env STREAMREC_TRAINER__WORKERS; default 1: no tf.distribute)"
        ),
    ] = None,
    worker_hosts: Annotated[
        str | None,
        typer.Option(
            help="several machines: every worker's host:port, comma-separated, the chief first, the same on each "
            "machine (env STREAMREC_TRAINER__WORKER_HOSTS); a TF_CONFIG variable works too"
        ),
    ] = None,
    task_index: Annotated[
        int | None,
        typer.Option(help="this machine's place in --worker-hosts, 0 = the chief (env STREAMREC_TRAINER__TASK_INDEX)"),
    ] = None,
) -> None:
    """Bootstrap: train on history through Feast's point-in-time join and publish the next version.

    The towers are built from the dataset's declared attributes; the feature repo must have been
    set up for the same dataset (`streamrec features setup --dataset ...`). The model's
    hyperparameters: ModelConfig's, then `streamrec tune`'s best config when present, then the
    flags given here; the `model config:` line says which. With several workers
    each one reads the same feature repo and dataset, trains on its shard of every batch, and the
    chief (worker 0) publishes.
    """
    from online_trainer import distributed

    settings = trainer_settings(
        bootstrap_epochs=epochs, publish=publish, workers=workers, worker_hosts=worker_hosts, task_index=task_index
    )
    tuning = settings.trainer
    # the model hyperparameters given here, which win over a tuned config (train_config)
    explicit = {
        "embedding_dim": embedding_dim,
        "learning_rate": learning_rate,
        "temperature": temperature,
        "batch_size": batch_size,
    }
    if tuning.workers > 1 and not tuning.worker_hosts:
        configure_logging()
        options = {
            "--dataset": dataset,
            "--columns": columns,
            "--epochs": epochs,
            **{f"--{name.replace('_', '-')}": value for name, value in explicit.items()},
        }
        train_args = ["--until", until, *(f"{flag}={value}" for flag, value in options.items() if value is not None)]
        if publish is not None:
            train_args.append("--publish" if publish else "--no-publish")
        if best_config is not None:
            train_args.append("--best-config" if best_config else "--no-best-config")
        raise typer.Exit(distributed.run_local_workers(train_args, tuning.workers))
    cluster = distributed.configured_cluster(tuning)
    configure_logging(f"worker {cluster.task_index}/{cluster.workers} " if cluster is not None else "")
    distribution = distributed.start(cluster) if cluster is not None else None  # before any TensorFlow op

    from online_trainer.bootstrap import bootstrap
    from online_trainer.tuned_config import train_config

    chief = cluster is None or cluster.is_chief
    loaded = load_training_dataset(dataset or settings.dataset, columns, settings)
    config, config_source = train_config(settings, loaded.name, explicit, use_best=best_config)
    if chief:
        typer.echo(loaded.summary())
        typer.echo(config_source)
    result = bootstrap(
        settings,
        loaded.interactions,
        parse_until(until),
        config=config,
        publisher=_publisher(settings) if chief else None,
        schema=loaded.schema,
        progress=chief,
        distribution=distribution,
    )
    if not result.is_chief:
        published = f"version {result.version}" if result.version is not None else "nothing (gate rejected it)"
        typer.echo(f"worker {cluster.task_index if cluster else 0}: trained its shards; chief published {published}")
        if result.version is None:
            raise typer.Exit(1)
        return
    typer.echo(f"examples: {result.dataset.rows:,}, features from {result.dataset.features_source}")
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
    from online_trainer.publish import stop_at

    configure_logging()
    settings = trainer_settings(interval_s=interval_s, max_examples=max_examples, publish=publish)
    metrics.serve(settings.trainer.metrics_port)
    summaries = metrics.SummaryWriter(settings.tensorboard_dir / f"trainer-{int(time.time())}")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    fault = stop_at(settings.trainer.fault_stop_at) if settings.trainer.fault_stop_at else None  # fault tests only
    ranker_publisher = None
    if settings.ranking.enabled and settings.trainer.publish:
        from online_trainer.ranker_line import ranker_publisher as make_ranker_publisher

        ranker_publisher = make_ranker_publisher(settings)
    trainer = OnlineTrainer(
        settings, publisher=_publisher(settings), summaries=summaries, fault=fault, ranker_publisher=ranker_publisher
    )
    trainer.start()
    try:
        trainer.run(stop=stop, max_intervals=max_intervals)
    finally:
        trainer.close()


def main() -> None:
    """``python -m online_trainer.cli``: a StreamrecError is one line naming the fix, as in ``streamrec``."""
    try:
        app()
    except StreamrecError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
