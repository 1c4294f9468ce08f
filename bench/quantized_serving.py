"""Quality, size, model-server memory and ``Recommend`` latency of fp32 / fp16 / int8 table exports.

One trained model is exported three times with ``export.export_version(..., table_dtype=...)``
(float32, float16, int8 with a scale per row: :mod:`online_trainer.quantize`). The model is the
resume files of ``--model-dir`` (a published version, e.g. the demo's) or, by default, a bootstrap
trained here as ``bench.lite_export`` trains it (default ``ModelConfig``, ``--until``, no Feast).
Per variant:

1. **Quality**: Recall@10 / NDCG@10 (``online_trainer.ranking_metrics``) of the SavedModel's
   ``recommend`` signature, loaded in process, on ml-100k's held-out interactions: every user with
   an interaction after the cut (the end of the version's training data) is asked once, with the
   user inputs the stream would hold after their last event up to the cut (``examples_from_interactions``
   of a probe event just after it), and ``exclude_items`` = every item the user had before the cut;
   the relevant set is the user's next ``--horizon`` items after the cut. Overlap@10 with the float32
   export's top 10 for the same requests (mean, min). The notes also give Recall@10 with the API's
   own exclusion (``exclude_seen`` drops the ``recent_items`` only, at most 20).
2. **Size**: bytes of ``saved_model.pb`` + ``variables/`` (the resume files in ``assets.extra`` stay
   float32 and are not counted).
3. **Model-server RSS**: ``python -m serving.model_server.cli`` (what ``streamrec model-server``
   runs) serving the export alone: RSS once the version is available (warm-up replayed), then after
   ``--predicts`` single-user ``recommend`` Predicts (the held-out requests, cycled), and the peak
   (``VmHWM``). The served answers are checked against the in-process signature's.
4. **Recommend latency**: ``python -m bench.recommend_load --model-dir <export> --no-write`` (its
   stack, its phases; ``--load-duration`` s per fixed-rate phase): p99 at 100 and 200 rps and the
   saturation rate.

Parts 3 and 4 run fp32, fp16, int8 in that order, one process at a time, after parts 1 and 2.
Targets: the unit tests' overlap bounds (fp16 >= 0.95, int8 >= 0.8) and ``bench.recommend_load``'s
for a real export (p99 at 200 rps <= 10 ms, saturation >= 800 rps); quality, size and RSS are
reported without a target.

Run: ``.venv/bin/python -m bench.quantized_serving`` (``--model-dir /tmp/demo-v4`` skips the
training; ``--skip-timing --no-write`` checks parts 1 and 2 in a minute or two).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil

from bench.common import ROOT, write_result
from bench.lite_export import add_version_arguments, bootstrap_version
from bench.recommend_load import peak_rss_mb
from online_trainer import export, lite_inputs
from online_trainer.examples import examples_from_interactions, pad_recent_items, user_arrays
from online_trainer.model import TwoTowerModel
from online_trainer.model_config import ModelConfig
from online_trainer.ranking_metrics import overlap_at_k, ranking_metrics
from serving.model_client import ModelServerClient
from streamrec.core import contracts
from streamrec.core.attributes import read_schema
from streamrec.datasets.description import Dataset, load_dataset
from streamrec.ops.stack.ports import free_ports

K = 10
VARIANTS = {"fp32": "float32", "fp16": "float16", "int8": "int8"}
PROBE_ITEM = "__probe__"  # the item of the event added after the cut to read each user's inputs
TEST_BOUNDS = {"fp16": 0.95, "int8": 0.8}  # tests/unit/test_export_savedmodel.py's overlap bounds


def trained_model(args: argparse.Namespace, dataset: Dataset, scratch: Path) -> tuple[TwoTowerModel, Path, str]:
    """The float32 model every variant is exported from, the version it came from, and a description."""
    if args.model_dir is None:
        version_dir = bootstrap_version(dataset, args.until, args.epochs, scratch / "bootstrap")
        source = (
            f"a bootstrap trained here (default ModelConfig with {dataset.name}'s attributes, {args.epochs} "
            f"epoch(s) on the examples up to {args.until}, no Feast, as bench.lite_export trains it)"
        )
    else:
        if read_schema(args.model_dir / export.EXTRA_DIR).user != dataset.schema.user:
            raise SystemExit(f"{args.model_dir} reads other user attributes than {dataset.name}; pass its --dataset")
        version_dir = args.model_dir
        kind = export.read_lineage(version_dir).get("kind", "unknown")
        source = f"the resume files of {args.model_dir} (lineage kind: {kind})"
    return export.load_for_finetune(version_dir), version_dir, source


def held_out(dataset: Dataset, cut: pd.Timestamp, horizon: int) -> tuple[pd.DataFrame, list[list[str]], list[set[str]]]:
    """Users with an interaction after ``cut``: their inputs as of the cut, every item they had
    before it, and their next ``horizon`` items after it (time order)."""
    events = dataset.interactions.sort_values("event_time", kind="stable")
    events = events.assign(user_id=events["user_id"].astype(str), item_id=events["item_id"].astype(str))
    history, future = events[events["event_time"] <= cut], events[events["event_time"] > cut]
    users = future["user_id"].drop_duplicates().tolist()
    probes = pd.DataFrame(
        {
            "event_id": [f"probe-{user}" for user in users],
            "user_id": users,
            "item_id": PROBE_ITEM,
            "event_time": cut + pd.Timedelta(seconds=1),
        }
    )
    if "kind" in events:
        probes["kind"] = str(events["kind"].iloc[0])
    examples = examples_from_interactions(
        pd.concat([history, probes], ignore_index=True), dataset.users, dataset.schema
    )
    contexts = examples[examples["item_id"] == PROBE_ITEM].set_index("user_id").loc[users].reset_index()
    seen = history.groupby("user_id")["item_id"].agg(lambda items: list(dict.fromkeys(items)))
    relevant = future.groupby("user_id")["item_id"].agg(lambda items: set(list(dict.fromkeys(items))[:horizon]))
    return contexts, [seen.get(user, []) for user in users], [relevant[user] for user in users]


def served_top_k(signature: Any, inputs: dict[str, np.ndarray], exclude: list[list[str]]) -> np.ndarray:
    """[U, K] ids from a loaded SavedModel's ``recommend`` signature for ``inputs`` (``user_arrays``)."""
    import tensorflow as tf

    width = max(1, *(len(row) for row in exclude))
    chunks = []
    for start in range(0, len(exclude), 256):
        rows = slice(start, start + 256)
        batch = {name: tf.constant(values[rows]) for name, values in inputs.items()}
        outputs = signature(**batch, exclude_items=tf.constant(pad_recent_items(exclude[rows], width=width)))
        chunks.append(outputs["item_ids"].numpy().astype(str)[:, :K])
    return np.concatenate(chunks)


def server_memory(
    version_dir: Path, scratch: Path, requests: list[dict[str, np.ndarray]], expected: np.ndarray, calls: int
) -> dict[str, float]:
    """RSS of a model server serving ``version_dir`` alone: loaded, after ``calls`` Predicts (the
    ``requests`` cycled; ``expected``: each one's in-process top K), peak (MiB)."""
    base = scratch / "streamrec"
    base.mkdir(parents=True)
    (base / "1").symlink_to(version_dir.resolve(), target_is_directory=True)
    (port,) = free_ports(1)
    env = {key: value for key, value in os.environ.items() if not key.upper().startswith("STREAMREC_")}
    env["STREAMREC_PATHS__STATE_DIR"] = str(scratch / "state")  # no models.config of another run
    command = [
        sys.executable, "-m", "serving.model_server.cli", "--port", str(port), "--host", "127.0.0.1",
        "--model_name", contracts.MODEL_NAME, "--model_base_path", str(base),
        "--file_system_poll_wait_seconds", "0",
    ]  # fmt: skip
    with open(scratch / "server.log", "w") as log:
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    client = ModelServerClient(f"127.0.0.1:{port}", contracts.MODEL_NAME, timeout_s=10.0)
    try:
        client.wait_until_available(1, timeout_s=180)
        time.sleep(2.0)  # let the load's transient buffers go before reading the loaded figure
        process = psutil.Process(server.pid)
        loaded = process.memory_info().rss
        agree = 0
        for n in range(calls):
            _, outputs = client.predict(requests[n % len(requests)])
            answer = [item.decode() if isinstance(item, bytes) else str(item) for item in outputs["item_ids"][0][:K]]
            agree += answer == list(expected[n % len(requests)])
        after = process.memory_info().rss
        peak = peak_rss_mb(server.pid)
    finally:
        client.close()
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    return {
        "rss_loaded_mb": round(loaded / 2**20, 1),
        "rss_after_calls_mb": round(after / 2**20, 1),
        "peak_rss_mb": round(peak, 1),
        "served_equal_share": agree / calls,
    }


def recommend_load(version_dir: Path, duration_s: float, swap_duration_s: float) -> dict[str, Any]:
    """``bench.recommend_load`` serving ``version_dir``; its printed metrics and notes (nothing written)."""
    command = [
        sys.executable, "-m", "bench.recommend_load", "--model-dir", str(version_dir), "--no-write",
        "--duration", f"{duration_s:g}", "--swap-duration", f"{swap_duration_s:g}",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=True)
    start = result.stdout.index('{\n  "metrics"')
    printed: dict[str, Any] = json.loads(result.stdout[start:])
    return printed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_version_arguments(parser)
    parser.add_argument("--horizon", type=int, default=10, help="each user's next items after the cut: relevant")
    parser.add_argument("--predicts", type=int, default=300, help="Predict calls per variant for the RSS figure")
    parser.add_argument("--load-duration", type=float, default=30.0, help="recommend_load's --duration")
    parser.add_argument("--load-swap-duration", type=float, default=95.0, help="recommend_load's --swap-duration")
    parser.add_argument("--skip-timing", action="store_true", help="quality and size only (parts 1 and 2)")
    parser.add_argument("--no-write", action="store_true", help="print the figures, do not write bench/results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    dataset = load_dataset(args.dataset)
    print(dataset.summary(), flush=True)
    metrics: dict[str, float] = {}
    units: dict[str, str] = {}

    def record(name: str, value: float, unit: str) -> None:
        metrics[f"quantized.{name}"] = value
        units[f"quantized.{name}"] = unit

    with tempfile.TemporaryDirectory(prefix="bench-quantized-") as work:
        scratch = Path(work)
        model, version_dir, source = trained_model(args, dataset, scratch)
        cut = lite_inputs.training_end(export.read_lineage(version_dir))
        if cut is None:
            raise SystemExit("the version's lineage names no end of its training data (data.end, bootstrap_until)")
        contexts, seen, relevant = held_out(dataset, cut, args.horizon)
        print(f"held out: {len(contexts)} users with interactions after {cut.isoformat()}", flush=True)
        lineage = {"source": "bench.quantized_serving", "dataset": dataset.name, "data": {"end": cut.isoformat()}}
        exports = {
            name: export.export_version(
                model, scratch / name, 1, lineage=lineage, warmup_users=contexts.head(16), table_dtype=dtype
            )
            for name, dtype in VARIANTS.items()
        }
        recent = [list(items) for items in contexts["recent_items"]]
        tops: dict[str, np.ndarray] = {}
        api_recall: dict[str, float] = {}
        import tensorflow as tf

        inputs = user_arrays(contexts, model.schema)
        fp32_bytes = export.serving_bytes(exports["fp32"])
        for name, version_dir_of in exports.items():
            signature = tf.saved_model.load(str(version_dir_of)).signatures[contracts.RECOMMEND_SIGNATURE]
            tops[name] = served_top_k(signature, inputs, seen)
            quality = ranking_metrics(tops[name], relevant, K)
            api_top = served_top_k(signature, inputs, recent)
            api_recall[name] = ranking_metrics(api_top, relevant, K).recall
            shared = overlap_at_k(tops["fp32"], tops[name])
            size = export.serving_bytes(version_dir_of)
            record(f"{name}.saved_model_bytes", size, "bytes")
            record(f"{name}.size_ratio", round(size / fp32_bytes, 4), "x fp32")
            record(f"{name}.recall_at_10", round(quality.recall, 4), "fraction")
            record(f"{name}.ndcg_at_10", round(quality.ndcg, 4), "fraction")
            if name != "fp32":
                for figure, value in (("recall", quality.recall), ("ndcg", quality.ndcg)):
                    change = round(value - metrics[f"quantized.fp32.{figure}_at_10"], 4) + 0.0  # no "-0"
                    record(f"{name}.{figure}_at_10_delta", change, "fraction vs fp32")
                record(f"{name}.mean_overlap_at_10", round(float(shared.mean()), 4), "fraction")
                record(f"{name}.min_overlap_at_10", round(float(shared.min()), 4), "fraction")
            print(f"{name}: {size:,} bytes, recall {quality.recall:.4f}, ndcg {quality.ndcg:.4f}, "
                  f"overlap {shared.mean():.4f}", flush=True)  # fmt: skip

        load_notes: dict[str, str] = {}
        served_equal: dict[str, float] = {}
        if not args.skip_timing:
            requests = [
                {
                    **{name: values[row : row + 1] for name, values in inputs.items()},
                    "exclude_items": pad_recent_items([seen[row]], width=max(1, len(seen[row]))),
                }
                for row in range(len(contexts))
            ]
            for name, version_dir_of in exports.items():
                memory = server_memory(version_dir_of, scratch / f"server-{name}", requests, tops[name], args.predicts)
                served_equal[name] = memory.pop("served_equal_share")
                for figure, value in memory.items():
                    record(f"{name}.server_{figure}", value, "MiB")
                print(f"{name}: model server {memory}", flush=True)
            for name, version_dir_of in exports.items():
                printed = recommend_load(version_dir_of, args.load_duration, args.load_swap_duration)
                found = printed["metrics"]
                record(f"{name}.recommend_p99_ms_100rps", found["recommend.p99_ms_100rps"], "ms")
                record(f"{name}.recommend_p99_ms_200rps", found["recommend.p99_ms_200rps"], "ms")
                record(f"{name}.recommend_saturation_rps", found["recommend.saturation_rps"], "req/s")
                record(f"{name}.recommend_errors_200rps", found["recommend.errors_200rps"], "requests")
                load_notes[name] = printed["notes"]
                print(f"{name}: recommend_load {found}", flush=True)

    targets = {f"quantized.{name}.mean_overlap_at_10": f">= {bound}" for name, bound in TEST_BOUNDS.items()}
    if not args.skip_timing:
        for name in VARIANTS:
            targets[f"quantized.{name}.recommend_p99_ms_200rps"] = "<= 10 ms"
            targets[f"quantized.{name}.recommend_saturation_rps"] = ">= 800 rps"
    notes = describe(args, dataset, source, cut, contexts, model.config, api_recall, served_equal, load_notes)
    print(notes)
    for key, value in metrics.items():
        print(f"{key:48s} {value:>14,.6g} {units[key]}")
    if not args.no_write:
        path = write_result(
            "quantized-serving",
            metrics,
            units,
            targets=targets,
            command=" ".join(["python -m bench.quantized_serving", *sys.argv[1:]]),
            notes=notes,
            extra={"recommend_load_notes": load_notes} if load_notes else None,
        )
        print(f"wrote {path}")


def load_summary(note: str) -> str:
    """The model server's peak RSS under load and the largest degraded share, from recommend_load's notes."""
    rss = re.search(r"Peak RSS of the model server under this load: (\d+) MiB", note)
    shares = [float(share) for share in re.findall(r"(\d+\.\d)%", note)]
    return (
        f"model server peak RSS under load {rss.group(1) if rss else '?'} MiB, "
        f"largest degraded share of a phase {max(shares, default=0.0):.1f} %"
    )


def describe(
    args: argparse.Namespace,
    dataset: Dataset,
    source: str,
    cut: pd.Timestamp,
    contexts: pd.DataFrame,
    config: ModelConfig,
    api_recall: dict[str, float],
    served_equal: dict[str, float],
    load_notes: dict[str, str],
) -> str:
    cold = int((contexts["recent_items"].map(len) == 0).sum())
    text = (
        f"{source}; dim {config.embedding_dim}, {config.item_id_buckets:,} item / {config.user_id_buckets:,} user "
        f"id buckets. Exported three times from the same weights (export_version table_dtype float32 / float16 / "
        f"int8). Quality: the recommend signature of each SavedModel, in process, for the {len(contexts)} "
        f"{dataset.name} users with an interaction after {cut.isoformat()} (the version's data end; {cold} of them "
        f"had none before it), inputs as of their last event up to then, every item they had before it excluded; "
        f"relevant = their next {args.horizon} items. With the API's exclusion (exclude_seen: the at most "
        f"{contracts.RECENT_ITEMS_MAX} recent items only) Recall@10 is "
        + " / ".join(f"{name} {value:.4f}" for name, value in api_recall.items())
        + ". Overlap@10 = share of the fp32 export's top 10 the variant also returns. Size = saved_model.pb + "
        "variables/ (the resume files stay float32)."
    )
    if not load_notes:
        return text + " Parts 3 and 4 (RSS, Recommend latency) were skipped (--skip-timing)."
    text += (
        f" RSS: python -m serving.model_server.cli serving one export alone; loaded = 2 s after the version became "
        f"available (warm-up replayed), then {args.predicts} single-user recommend Predicts (the held-out "
        "requests, cycled), peak = VmHWM; share of served answers equal to the in-process signature's: "
        + " / ".join(f"{name} {share:.3f}" for name, share in served_equal.items())
        + f". Latency: python -m bench.recommend_load --model-dir <export> --no-write --duration "
        f"{args.load_duration:g} --swap-duration {args.load_swap_duration:g}, one run per variant in the order "
        f"{', '.join(VARIANTS)} after the RSS runs (same order), nothing else running; from its notes (all of "
        "them are in this file's recommend_load_notes): "
        + "; ".join(f"{name} {load_summary(note)}" for name, note in load_notes.items())
        + "."
    )
    return text


if __name__ == "__main__":
    main()
