"""``streamrec export-lite``: a published version as ``.tflite`` cold-start models for devices.

Reads ``TrainerSettings`` for the model base path, the trainer's checkpoints (where the int8
calibration contexts come from by default) and the state folder; :mod:`online_trainer.export_lite`
says what the device model is. The lead mounts :func:`export_lite_command` into ``streamrec``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, cast

import typer

from online_trainer.cli import ColumnsOption
from online_trainer.settings import TrainerSettings
from streamrec.core.errors import DatasetError
from streamrec.core.settings import load

if TYPE_CHECKING:
    import pandas as pd

    from online_trainer.export_lite import Variant
    from online_trainer.model import TwoTowerModel


def _contexts(
    settings: TrainerSettings, version_path: Path, model: TwoTowerModel, dataset: str | None, columns: str | None
) -> tuple[pd.DataFrame, str]:
    """Real users' contexts: ``--dataset``'s interactions up to the version's data, else the
    examples the version learned from (its trainer checkpoint)."""
    from online_trainer import lite_inputs
    from online_trainer.export import read_lineage

    lineage = read_lineage(version_path)
    version = int(lineage["version"])
    if dataset is None:
        found = lite_inputs.trained_contexts(settings.trainer_state_path, version)
        if found is None or found.empty:
            raise DatasetError(
                f"version {version} has no trainer checkpoint under {settings.trainer_state_path} to draw user "
                "contexts from; pass --dataset with the data it was trained on (e.g. --dataset ml-100k)"
            )
        return found, f"trainer checkpoint of version {version}"
    from streamrec.datasets.description import load_dataset

    loaded = load_dataset(dataset, columns=columns)
    if loaded.schema.user != model.schema.user:
        raise DatasetError(
            f"--dataset {dataset} declares other user attributes than version {version} was trained with; "
            "pass the dataset the version was trained on"
        )
    return lite_inputs.dataset_contexts(loaded.interactions, loaded.users, model, lineage), f"dataset {dataset}"


def export_lite_command(
    version: Annotated[
        int | None, typer.Option(help="the model version to convert (default: the latest under the model base path)")
    ] = None,
    output_dir: Annotated[
        Path | None,
        typer.Option(help="where to write the files (default: <STREAMREC_PATHS__STATE_DIR>/lite/<version>)"),
    ] = None,
    variants: Annotated[str, typer.Option(help="comma-separated: fp32 (reference), fp16, int8")] = "fp32,fp16,int8",
    top_k: Annotated[int, typer.Option(help="items each answer holds (capped at the catalog size)")] = 20,
    samples: Annotated[int, typer.Option(help="user contexts that calibrate the int8 variant")] = 200,
    parity_users: Annotated[int, typer.Option(help="held-out user contexts the parity figures are measured on")] = 256,
    dataset: Annotated[
        str | None,
        typer.Option(
            help="draw user contexts from this dataset (as `streamrec train --dataset`) instead of the version's "
            "trainer checkpoint"
        ),
    ] = None,
    columns: ColumnsOption = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output dir")] = False,
) -> None:
    """Convert a published version into .tflite cold-start models (user tower + catalog, top K on device).

    Writes one .tflite per variant, items.txt (the catalog, one id per row the model returns),
    inputs.json (the inputs and the attribute vocabularies) and report.json (sizes, and each
    variant's top-K overlap with the version's own answers for held-out users).
    """
    from online_trainer import export_lite, lite_inputs

    settings = load(TrainerSettings)
    options = export_lite.LiteOptions(
        variants=tuple(cast("Variant", name) for name in dict.fromkeys(v.strip() for v in variants.split(",")) if name),
        k=top_k,
        representative_samples=samples,
        parity_contexts=parity_users,
        overwrite=overwrite,
    )
    path = export_lite.version_dir(settings.model_base_path, version)
    target = output_dir or settings.paths.state_dir / "lite" / path.name
    typer.echo(f"version {path.name} from {path}")
    model = export_lite.load_version(path)
    contexts, source = _contexts(settings, path, model, dataset, columns)
    typer.echo(f"user contexts: {len(contexts):,} from the {source}")
    report = export_lite.export_lite(path, target, contexts, options, model=model, progress=typer.echo)
    typer.echo(f"SavedModel: {report['saved_model_bytes']:,} bytes")
    for variant, figures in report["variants"].items():
        overlap = figures[f"mean_overlap_at_{report['top_k']}"]
        typer.echo(f"{variant:>5}: {figures['bytes']:>12,} bytes, mean overlap@{report['top_k']} {overlap:.3f}")
    typer.echo(f"written to {target} ({export_lite.REPORT_FILE}, {export_lite.INPUTS_FILE}, {lite_inputs.ITEMS_FILE})")
