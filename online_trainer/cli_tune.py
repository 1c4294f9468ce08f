"""``streamrec tune``: search the bootstrap model's hyperparameters, for ``streamrec train`` to start from.

Reads ``TrainerSettings`` like ``streamrec train`` (the ``trainer.search`` section:
``STREAMREC_TRAINER__SEARCH__*``); flags override a setting for one run. The lead mounts
:func:`tune_command` into the ``streamrec`` command.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from online_trainer.cli import (
    ColumnsOption,
    DatasetOption,
    configure_logging,
    load_training_dataset,
    parse_until,
    with_trainer_overrides,
)
from online_trainer.settings import CHOICES, RANGES, TrainerSettings
from streamrec.core.errors import SettingsError


def parse_space(entries: list[str]) -> dict[str, list[str]]:
    """``--space`` entries (``NAME=A,B,C`` choices, ``NAME=LOW:HIGH`` a log range, ``NAME=V`` one value)
    as the raw values of :class:`~online_trainer.settings.SearchSpace` fields; pydantic checks them."""
    space: dict[str, list[str]] = {}
    for entry in entries:
        name, sep, text = entry.partition("=")
        name, text = name.strip(), text.strip()
        if not sep or not name or not text:
            raise SettingsError(
                f"--space {entry!r} is not NAME=VALUES, e.g. embedding_dim=32,64,128 or learning_rate=0.001:0.02"
            )
        if ":" in text:
            if name in CHOICES:
                raise SettingsError(f"--space {entry!r}: {name} takes choices (NAME=A,B,C), not a range")
            space[name] = [part.strip() for part in text.split(":")]
        elif name in RANGES and "," not in text:
            space[name] = [text, text]  # one value: fixed
        else:
            space[name] = [part.strip() for part in text.split(",")]
    return space


def search_settings(overrides: dict[str, Any], space: list[str] | None) -> TrainerSettings:
    """The settings with this run's ``trainer.search`` flags applied (an invalid one names itself)."""
    from streamrec.core.settings import load

    settings = load(TrainerSettings)
    current = settings.trainer.search.model_dump()
    given = {name: value for name, value in overrides.items() if value is not None}
    merged = {**current, **given, "space": {**current["space"], **parse_space(space or [])}}
    return with_trainer_overrides(settings, search=merged)


def tune_command(
    until: Annotated[str, typer.Option(help="tune on interactions up to this time (ISO-8601 or epoch s), as train")],
    dataset: DatasetOption = None,
    columns: ColumnsOption = None,
    max_trials: Annotated[
        int | None, typer.Option(help="trials at most (env STREAMREC_TRAINER__SEARCH__MAX_TRIALS, default 8)")
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="training epochs per trial (env STREAMREC_TRAINER__SEARCH__EPOCHS, default 1)")
    ] = None,
    sample_users: Annotated[
        int | None,
        typer.Option(
            help="tune on this many users' interactions, drawn with --seed "
            "(env STREAMREC_TRAINER__SEARCH__SAMPLE_USERS; default: every user)"
        ),
    ] = None,
    space: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=A,B,C (choices) or NAME=LOW:HIGH (log range), repeatable; names: embedding_dim, "
            "batch_size, learning_rate, temperature (env STREAMREC_TRAINER__SEARCH__SPACE__<NAME>, a JSON list)"
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="the search's and the user sample's seed (env STREAMREC_TRAINER__SEARCH__SEED)")
    ] = None,
) -> None:
    """Random search (keras-tuner) of the bootstrap's hyperparameters on the gate's hold-out.

    Each trial trains the bootstrap model for --epochs on the rows `streamrec train --until` learns
    from and scores hit@k on the newest hold-out rows (the gate's metric). Every trial goes to
    trials.json; the best to best_config.json (STREAMREC_TRAINER__SEARCH__BEST_CONFIG_PATH, default
    <state_dir>/tuning/), which `streamrec train` then starts from; its own flags still win.
    """
    settings = search_settings(
        {"max_trials": max_trials, "epochs": epochs, "sample_users": sample_users, "seed": seed}, space
    )
    configure_logging()
    from online_trainer import tuning
    from online_trainer.tuned_config import write_best_config

    search = settings.trainer.search
    loaded = load_training_dataset(dataset or settings.dataset, columns, settings)
    typer.echo(loaded.summary())
    cutoff = parse_until(until)
    data = tuning.data_from_feast(
        settings, loaded.interactions, cutoff.to_pydatetime(), schema=loaded.schema, users=search.sample_users
    )
    k = settings.trainer.gate_k
    typer.echo(f"tuning on {data.description}")
    typer.echo(
        f"search: up to {search.max_trials} trials of {search.epochs} epoch(s), hit@{k} on the hold-out, "
        f"seed {search.seed}; space {search.space.model_dump()}"
    )
    best_path = settings.best_config_path
    trials_path = best_path.parent / "trials.json"
    result = tuning.run_search(
        data,
        search,
        k=k,
        directory=best_path.parent / "keras_tuner",
        kind_weights=settings.trainer.kind_weights,
        trials_path=trials_path,
        on_trial=lambda record: typer.echo(tuning.trial_line(record, search.max_trials, f"hit@{k}")),
    )
    best = tuning.best_config(result, dataset=loaded.name, until=cutoff.isoformat(), trials_path=trials_path)
    write_best_config(best_path, best)
    values = ", ".join(f"{name}={value:g}" for name, value in best.values.as_overrides().items())
    typer.echo(f"best: trial {best.trial} of {best.trials}, hit@{k} {best.metric_value:.4f}: {values}")
    typer.echo(f"trials: {trials_path}\nbest config: {best_path} (`streamrec train` starts from it)")
