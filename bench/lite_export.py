"""Size and top-10 parity of ``streamrec export-lite``'s ``.tflite`` cold-start models on ml-100k.

The version converted is ``--model-dir`` (a published version directory, e.g. one the demo wrote)
or, by default, a bootstrap trained here on ``--dataset``'s frames up to ``--until`` (no Feast, as
``bench.trainer_throughput`` does: ``examples_from_interactions`` -> ``train`` for
``ModelConfig.epochs`` -> ``export.export_version``). The user contexts are the dataset's
point-in-time examples up to the end of the version's training data, as ``streamrec export-lite
--dataset`` draws them (``lite_inputs.dataset_contexts``).

:func:`online_trainer.export_lite.export_lite` then writes every variant (fp32, fp16, int8) and
its report; per variant this records:

* the file's size in bytes and its ratio to the SavedModel's (``saved_model.pb`` + ``variables/``);
* mean and min overlap@K (K = ``--top-k``, 10) of the variant's top K, run in the TF Lite
  interpreter, with the version's Keras model's exact top K for the same cold-start contexts (no
  user id, recent items excluded): ``--parity-users`` contexts held out from the
  ``--samples`` that calibrate int8.

Target: fp16 mean overlap@10 >= 0.9. The int8 figure is reported without a target.

Run: ``.venv/bin/python -m bench.lite_export`` (``--model-dir /tmp/demo-v4`` skips the training;
``--no-write`` to try it without touching bench/results).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import report
from online_trainer import export, export_lite, lite_inputs
from online_trainer.catalog import ItemCatalog
from online_trainer.cli import parse_until
from online_trainer.examples import examples_from_interactions, positive_examples
from online_trainer.model import TwoTowerModel, build_model
from online_trainer.model_config import ModelConfig
from online_trainer.settings import TrainerTuning
from online_trainer.training import train
from streamrec.core.attributes import read_schema
from streamrec.datasets.description import Dataset, load_dataset

TARGET_VARIANT = "fp16"
TARGET_OVERLAP = 0.9


def bootstrap_version(dataset: Dataset, until: str, epochs: int, base_path: Path) -> Path:
    """Version 1 under ``base_path``: a default ``ModelConfig`` trained on the examples up to ``until``."""
    cut = parse_until(until)
    history = dataset.interactions[dataset.interactions["event_time"] <= cut]
    tuning = TrainerTuning()
    examples = positive_examples(
        examples_from_interactions(history, dataset.users, dataset.schema), tuning.positive_kinds
    )
    catalog = ItemCatalog.for_dataset(dataset.items, dataset.interactions["item_id"].astype(str), dataset.schema)
    model = build_model(catalog, ModelConfig(attributes=dataset.schema))
    print(f"bootstrap: {epochs} epoch(s) on {len(examples):,} examples up to {cut.isoformat()} (not measured)")
    started = time.perf_counter()
    train(model, examples, epochs=epochs, kind_weights=tuning.kind_weights)
    print(f"trained in {time.perf_counter() - started:.0f} s")
    lineage = {"source": "bench.lite_export", "dataset": dataset.name, "bootstrap_until": cut.isoformat()}
    return export.export_version(model, base_path, 1, lineage=lineage, warmup_users=examples.head(16))


def figures(lite_report: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """The report's sizes and overlaps as flat ``lite.*`` metrics, with their units."""
    k, saved_model = lite_report["top_k"], lite_report["saved_model_bytes"]
    metrics: dict[str, float] = {"lite.saved_model_bytes": saved_model}
    units = {"lite.saved_model_bytes": "bytes"}
    for variant, found in lite_report["variants"].items():
        metrics[f"lite.{variant}.bytes"] = found["bytes"]
        metrics[f"lite.{variant}.size_ratio"] = round(found["bytes"] / saved_model, 4)
        metrics[f"lite.{variant}.mean_overlap_at_{k}"] = found[f"mean_overlap_at_{k}"]
        metrics[f"lite.{variant}.min_overlap_at_{k}"] = found[f"min_overlap_at_{k}"]
        units[f"lite.{variant}.bytes"] = "bytes"
        units[f"lite.{variant}.size_ratio"] = "x SavedModel"
        units[f"lite.{variant}.mean_overlap_at_{k}"] = "fraction"
        units[f"lite.{variant}.min_overlap_at_{k}"] = "fraction"
    return metrics, units


def add_version_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the measured version comes from: --model-dir, else a bootstrap trained here
    (--dataset, --until, --epochs; :func:`bootstrap_version`)."""
    parser.add_argument("--model-dir", type=Path, help="a published version directory (default: train one here)")
    parser.add_argument("--dataset", default="ml-100k", help="preset or path (streamrec.datasets.description)")
    parser.add_argument("--until", default="1998-01-02T00:00:00Z", help="the bootstrap's cut-off (README's)")
    parser.add_argument("--epochs", type=int, default=ModelConfig.epochs, help="bootstrap epochs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_arguments(parser)
    parser.add_argument("--top-k", type=int, default=10, help="K of overlap@K (the target is on K = 10)")
    parser.add_argument("--samples", type=int, default=200, help="contexts that calibrate int8")
    parser.add_argument("--parity-users", type=int, default=1000, help="held-out contexts the overlap is measured on")
    parser.add_argument("--seed", type=int, default=0, help="the split of contexts into parity and calibration")
    parser.add_argument("--no-write", action="store_true", help="print the figures, do not write bench/results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    dataset = load_dataset(args.dataset)
    print(dataset.summary())
    options = export_lite.LiteOptions(
        k=args.top_k, representative_samples=args.samples, parity_contexts=args.parity_users, seed=args.seed
    )
    with tempfile.TemporaryDirectory(prefix="bench-lite-") as work:
        scratch = Path(work)
        if args.model_dir is None:
            version_path = bootstrap_version(dataset, args.until, args.epochs, scratch / "models")
            source = (
                f"a bootstrap trained here (default ModelConfig with {dataset.name}'s attributes, {args.epochs} "
                f"epoch(s) on the examples up to {args.until}, no Feast)"
            )
        else:
            if read_schema(args.model_dir / export.EXTRA_DIR).user != dataset.schema.user:
                raise SystemExit(
                    f"{args.model_dir} reads other user attributes than {dataset.name}; pass its --dataset"
                )
            version_path = args.model_dir
        lineage = export.read_lineage(version_path)
        if args.model_dir is not None:
            kind = lineage.get("kind", "unknown")
            source = f"version {lineage['version']} at {args.model_dir} (lineage kind: {kind})"
        model: TwoTowerModel = export_lite.load_version(version_path)
        contexts = lite_inputs.dataset_contexts(dataset.interactions, dataset.users, model, lineage)
        print(f"user contexts: {len(contexts):,} from {dataset.name} up to the version's data")
        started = time.perf_counter()
        exported = export_lite.export_lite(
            version_path,
            scratch / "lite",
            contexts,
            options,
            model=model,
            progress=lambda line: print(line, flush=True),
        )
        elapsed = time.perf_counter() - started

    k = exported["top_k"]
    metrics, units = figures(exported)
    target_key = f"lite.{TARGET_VARIANT}.mean_overlap_at_{k}"
    targets = {f"lite.int8.mean_overlap_at_{k}": "none (reported only)"}
    if k == 10:
        targets[target_key] = f">= {TARGET_OVERLAP}"
    parity = exported["contexts"]
    config = model.config
    notes = (
        f"{source}: {exported['catalog_items']:,} items, dim {config.embedding_dim}; SavedModel "
        f"{exported['saved_model_bytes']:,} bytes (saved_model.pb + variables/; the whole version directory with "
        f"its resume files {exported['version_dir_bytes']:,}). `export_lite` (fp32 reference, fp16 weights, int8 "
        f"post-training quantization calibrated on {parity['representative']} contexts), each file run in the TF "
        f"Lite interpreter against the Keras model's exact top {k} for {parity['parity']} held-out {dataset.name} "
        f"contexts (point-in-time examples up to the end of the version's training data, sampled with seed "
        f"{args.seed}; held out from the int8 calibration contexts, disjoint: {parity['disjoint']}, not from "
        "training), cold start: no user id, recent items excluded. "
        f"overlap@{k} = share of the reference's {k} items the variant also returns; mean and min over the "
        f"contexts. Target: fp16 mean overlap@10 >= {TARGET_OVERLAP}; int8 has no target. Device tower vs Keras "
        f"user tower max abs error {exported['tower_max_abs_error']:.1e}; the export took {elapsed:.0f} s."
    )
    report(
        "lite-export" if dataset.name == "ml-100k" else f"lite-export-{dataset.name}",
        metrics,
        units,
        targets=targets,
        command=" ".join(["python -m bench.lite_export", *sys.argv[1:]]),
        notes=notes,
        write=not args.no_write,
    )


if __name__ == "__main__":
    main()
