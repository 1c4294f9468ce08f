"""``Recommend`` end to end under load from ``ghz``: Feast read + model server + response.

Everything is co-located, as on the target 2-core machine: Kafka and Redis (``LocalStack``, on
free ports), the local model server (``python -m serving.model_server.cli``) and the API
(``python -m serving``), each its own process, and ``ghz --cpus 1`` as the client. The feature
store is set up for ``--dataset`` (default ml-100k; ``bench.recommend_setup``): its profiles
(materialized) plus fresh ``user_activity`` (every user's last 20 items) and ``item_stats`` rows,
so every request reads a real row; requests cycle through all the dataset's users plus 5% unknown
ones (cold start). The model (``--model``): ``tiny``, the tests' tiny model over the dataset's
catalog (the default for ml-100k: 1,682 items); ``export``, the trainer's model exported by its
real export path, untrained (the default for any other dataset); or any exported SavedModel given
with ``--model-dir``.

Results: the default (ml-100k, tiny model) writes ``bench/results/recommend.json``; anything else
writes ``recommend-<N>k.json`` with every figure named ``..._<N>k_items`` by the catalog size,
e.g. ``--dataset synthetic:items=100000,events=200000`` (a real export over 100,000 items) writes
``recommend-100k.json`` with ``recommend.p99_ms_200rps_100k_items``.

Phases (each reported from ghz's own percentiles; non-OK statuses are errors):

1. warm-up, not reported;
2. 100 rps and 200 rps, ``--duration`` each: p50/p99 and errors;
3. saturation: rate uncapped at ``--saturation-concurrency`` in-flight calls: achieved rps;
4. swap: 200 rps for ``--swap-duration`` while a new model version appears in the base path
   (exported before the phase, renamed into place) and is published
   (``ModelServerClient.publish_stable``: load, wait, move labels, unload) every
   ``--swap-every`` s: failed requests and p99.

Degraded answers (the API's trending fallback when the model is slower than its budget, or the
model's answer without user features when the feature read failed or passed
``api.feature_timeout_ms``) are OK for ghz, so the API's ``/metrics`` counters are read before
and after each phase and the share of each kind is written to the notes: a low p99 bought with
fallbacks would show there.
Peak RSS (``VmHWM``) of the API (and, in the notes, of the model server) is read from ``/proc``
at the end.

The notes give the CPU time per answered request of the API and of the model server in each
phase (``/proc/<pid>/stat``), and ``--profile DIR`` writes py-spy profiles (``--gil``: Python CPU,
collapsed stacks) of both processes during the 200 rps phase.

Run: ``.venv/bin/python -m bench.recommend_load`` (about 4 minutes; ``--tiny --no-write`` checks
the wiring in about a minute, two with the 100k-item export). Needs ``ghz``: ``make bench-tools``
installs the pinned version.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.common import ROOT, write_result
from bench.recommend_setup import ModelKind, ServedModel, served_model, set_up_features
from serving.model_client import ModelServerClient
from streamrec.core import contracts
from streamrec.core.attributes import AttributeSchema
from streamrec.core.settings import PROJECT_ROOT, KafkaSettings, PathSettings, RedisSettings
from streamrec.ops.settings import StackSettings, StackTuning
from streamrec.ops.stack.ports import free_ports

PROTO = ROOT / "serving" / "proto"
CALL = "streamrec.v1.Recommender/Recommend"
COLD_SHARE = 0.05
# Written as "<= N" / ">= N" so bench/common.py's table can mark each met or MISSED; the swap p99
# target is relative, so its bound is filled in from the same run (see ``targets``).
TARGETS = {
    "recommend.p99_ms_200rps": "<= 30 ms",
    "recommend.errors_200rps": "<= 0 requests",
    "recommend.saturation_rps": ">= 400 rps",
    "recommend.swap_failed_requests": "<= 0 requests",
}
# A large catalog (any run but the default) is held to the same latency and zero errors; its
# saturation is reported without a target (the 400 rps one is the tiny model's).
LARGE_CATALOG_TARGETS = ("recommend.p99_ms_200rps", "recommend.errors_200rps", "recommend.swap_failed_requests")
SWAP_P99_FACTOR = 2.0


def targets(steady_p99_ms: float, suffix: str = "") -> dict[str, str]:
    """The targets with the swap bound as a number: 2 x the steady-state p99 at 200 rps.

    The table's verdict reads the first number after the operator, so a target written as
    "<= 2 x recommend.p99_ms_200rps" was judged against 2 ms (a 73 ms swap p99 next to a 98 ms
    steady p99 showed as MISSED). ``suffix``: the large-catalog names (``_100k_items``).
    """
    bound = SWAP_P99_FACTOR * steady_p99_ms
    chosen = {name: target for name, target in TARGETS.items() if not suffix or name in LARGE_CATALOG_TARGETS}
    chosen["recommend.swap_p99_ms"] = f"<= {bound:.2f} ms (2 x recommend.p99_ms_200rps{suffix})"
    return {name + suffix: target for name, target in chosen.items()}


def write_ranker(base_path: Path, schema: AttributeSchema) -> None:
    """Version 1 of a new ranking model (the trainer's start: it serves the retrieval order, with
    the full per-request work of the ranking stage)."""
    from online_trainer.ranker_export import export_ranker
    from online_trainer.ranker_model import build_ranker

    export_ranker(build_ranker(schema), base_path / "1", schema)


def catalog_label(size: int) -> str:
    """``100000`` -> ``"100k"``: how result files and figures of a non-default run name the catalog."""
    return f"{size / 1000:.0f}k" if size >= 1000 else str(size)


def ghz_binary() -> str:
    from tests.support.tools import find_tool, missing_tool_message

    found = find_tool("ghz")
    if found is None:
        sys.exit(missing_tool_message("ghz"))
    return found


@dataclass
class GhzRun:
    count: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    error_kinds: dict[str, int]

    @classmethod
    def parse(cls, report: dict[str, Any]) -> GhzRun:
        percentiles = {
            int(item["percentage"]): item["latency"] / 1e6 for item in report.get("latencyDistribution") or []
        }
        statuses = report.get("statusCodeDistribution") or {}
        errors = sum(count for status, count in statuses.items() if status != "OK")
        return cls(
            int(report["count"]),
            errors,
            float(report["rps"]),
            percentiles.get(50, 0.0),
            percentiles.get(99, 0.0),
            dict(report.get("errorDistribution") or {}),
        )


def run_ghz(
    address: str,
    data_file: Path,
    *,
    rps: int,
    duration_s: float,
    concurrency: int,
    transport: Sequence[str] = ("--insecure",),
) -> GhzRun:
    """One ghz run; ``transport``: plaintext, or ghz's TLS options (``bench.secure_recommend``)."""
    command = [
        ghz_binary(),
        *transport,
        "--proto", str(PROTO / "streamrec/v1/recommender.proto"),
        "--import-paths", str(PROTO),
        "--call", CALL,
        "--data-file", str(data_file),
        "--cpus", "1",
        "--connections", "1",
        "--concurrency", str(concurrency),
        "--rps", str(rps),
        "--duration", f"{duration_s:g}s",
        "--timeout", "2s",
        # calls in flight when the duration ends finish and count (the default cancels them
        # and reports them as errors)
        "--duration-stop", "wait",
        "--format", "json",
        address,
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode not in (0, 1) or not result.stdout.strip():  # ghz exits 1 when some calls failed
        raise RuntimeError(f"ghz failed ({result.returncode}): {result.stderr[-2000:]}")
    return GhzRun.parse(json.loads(result.stdout))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (``/proc/<pid>/stat``, all threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    match = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else 0.0


def api_counters(metrics_port: int) -> dict[str, float]:
    """Requests and degraded answers so far, from the API's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()  # noqa: S310
    totals = {"requests": 0.0, "feature_store": 0.0, "model_server": 0.0}
    for line in text.splitlines():
        if line.startswith("streamrec_api_request_seconds_count"):
            totals["requests"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("streamrec_api_degraded_total"):
            dependency = re.search(r'dependency="([^"]*)"', line)
            if dependency is not None and dependency.group(1) in totals:
                totals[dependency.group(1)] += float(line.rsplit(" ", 1)[1])
    return totals


def stop_process(process: subprocess.Popen[str]) -> None:
    process.terminate()
    process.wait(30)


def wait_for_line(process: subprocess.Popen[str], needle: str, timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if needle in log.read_text(errors="replace"):
            return
        if process.poll() is not None:
            raise RuntimeError(f"process exited ({process.returncode}); see {log}")
        time.sleep(0.2)
    raise RuntimeError(f"no {needle!r} in {log} after {timeout_s} s")


def start_profilers(folder: Path, phase: str, pids: dict[str, int], duration_s: float) -> list[subprocess.Popen[bytes]]:
    """py-spy samplers (100 Hz, collapsed stacks) on each process for one phase's duration.

    ``--gil`` samples only the thread holding the GIL: Python CPU time, not threads parked in
    gRPC's C core waiting for a reply (which dominate a plain sample and hide the work).
    """
    folder.mkdir(parents=True, exist_ok=True)
    py_spy = str(Path(sys.executable).with_name("py-spy"))
    commands = {
        name: [py_spy, "record", "--pid", str(pid), "--duration", str(int(duration_s)), "--rate", "100",
               "--format", "raw", "--output", str(folder / f"{name}-{phase}.txt"), "--gil"]
        for name, pid in pids.items()
    }  # fmt: skip
    return [
        subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for command in commands.values()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per fixed-rate phase")
    parser.add_argument("--swap-duration", type=float, default=95.0, help="seconds of the swap phase")
    parser.add_argument("--swap-every", type=float, default=30.0, help="seconds between published versions")
    parser.add_argument("--saturation-concurrency", type=int, default=16)
    parser.add_argument(
        "--dataset", default="ml-100k", help="preset or path (streamrec.datasets.description): users, items, features"
    )
    parser.add_argument(
        "--model",
        choices=["tiny", "export"],
        default=None,
        help="the tests' tiny model, or the trainer's model through its real export (untrained); "
        "default: tiny for ml-100k, export for any other dataset",
    )
    parser.add_argument("--model-dir", type=Path, default=None, help="an exported SavedModel to serve instead")
    parser.add_argument(
        "--two-stage",
        action="store_true",
        help="serve with the ranking stage on: a new ranking model (version 1) orders ranking.candidates items",
    )
    parser.add_argument(
        "--batching",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="the model server with request batching (--enable_batching; off by default, as in TF Serving)",
    )
    parser.add_argument(
        "--result-name", default=None, help="write bench/results/<name>.json (default: by dataset and model)"
    )
    parser.add_argument("--tiny", action="store_true", help="3-second phases: check the wiring only")
    parser.add_argument("--no-write", action="store_true", help="print the figures, do not write results")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="write py-spy profiles (collapsed stacks) of the API and the model server during the 200 rps "
        "phase to this folder",
    )
    args = parser.parse_args()
    if args.tiny:
        args.duration, args.swap_duration, args.swap_every = 3.0, 7.0, 3.0
    ghz_binary()

    from features.settings import FeaturesSettings, FeatureStoreTuning
    from streamrec.datasets.description import load_dataset
    from streamrec.ops.stack.local_stack import LocalStack

    dataset = load_dataset(args.dataset)
    print(dataset.summary(), file=sys.stderr)
    kind: ModelKind = (
        "dir" if args.model_dir is not None else args.model or ("tiny" if dataset.name == "ml-100k" else "export")
    )

    kafka_port, controller_port, redis_port, model_port, api_port, metrics_port = free_ports(6)
    with ExitStack() as cleanup:
        state = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="bench-recommend-")))
        stack = LocalStack(
            StackSettings(
                redis=RedisSettings(port=redis_port),
                paths=PathSettings(state_dir=state / "stack"),
                stack=StackTuning(kafka_port=kafka_port, kafka_controller_port=controller_port),
            )
        )
        print("starting Kafka and Redis ...", file=sys.stderr)
        stack.up()
        cleanup.callback(stack.down)
        features = FeaturesSettings(
            kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{kafka_port}"),
            redis=RedisSettings(port=redis_port),
            paths=PathSettings(state_dir=state),
            features=FeatureStoreTuning(project="bench"),
        )
        from streamrec.kafka.admin import ensure_topics

        ensure_topics(features)
        activity = set_up_features(features, dataset)
        users = activity["user_id"].tolist()
        print(f"writing the model ({kind}) ...", file=sys.stderr)
        served: ServedModel = served_model(kind, dataset, activity, state / "export", args.model_dir)
        base_path = state / "models" / "streamrec"
        base_path.mkdir(parents=True)
        served.write(base_path, 1)

        env = {key: value for key, value in os.environ.items() if not key.upper().startswith("STREAMREC_")}
        env.update(
            {
                "STREAMREC_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka_port}",
                "STREAMREC_REDIS__PORT": str(redis_port),
                "STREAMREC_PATHS__STATE_DIR": str(state),
                "STREAMREC_FEATURES__PROJECT": "bench",
                "STREAMREC_MODEL_SERVER__PORT": str(model_port),
            }
        )
        model_log, api_log = state / "model-server.log", state / "api.log"
        model_server = subprocess.Popen(
            [sys.executable, "-m", "serving.model_server.cli", "--port", str(model_port), "--host", "127.0.0.1",
             "--model_name", "streamrec", "--model_base_path", str(base_path),
             "--file_system_poll_wait_seconds", "1", "--enable_batching" if args.batching else "--noenable_batching"],
            cwd=PROJECT_ROOT, env=env, stdout=model_log.open("w"), stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        cleanup.callback(stop_process, model_server)
        # one models.config for every client: a reload names the whole server config, so a client
        # that only knew its own model would unload the other (the stack's processes share the file)
        config_file = state / "models" / "models.config"
        client = ModelServerClient(
            f"127.0.0.1:{model_port}", server_base_path=str(base_path), admin_timeout_s=60, config_file=config_file
        )
        client.wait_until_available(1, timeout_s=120)
        client.publish_stable(1)
        if args.two_stage:
            ranker_base = state / "models" / contracts.RANKER_MODEL_NAME
            write_ranker(ranker_base, dataset.schema)
            env["STREAMREC_RANKING__ENABLED"] = "true"
            with ModelServerClient(
                f"127.0.0.1:{model_port}",
                contracts.RANKER_MODEL_NAME,
                server_base_path=str(ranker_base),
                admin_timeout_s=60,
                config_file=config_file,
            ) as ranking_client:
                ranking_client.publish_stable(1)
        api = subprocess.Popen(
            [sys.executable, "-m", "serving", "--port", str(api_port), "--metrics-port", str(metrics_port)],
            cwd=PROJECT_ROOT, env=env, stdout=api_log.open("w"), stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        cleanup.callback(stop_process, api)
        wait_for_line(api, "listening on", 180, api_log)

        data_file = state / "requests.json"
        cold = [f"cold-{i}" for i in range(int(len(users) * COLD_SHARE))]
        requests = [{"user_id": user, "k": 10, "exclude_seen": True} for user in users + cold]
        np.random.default_rng(11).shuffle(requests)
        data_file.write_text(json.dumps(requests))
        address = f"127.0.0.1:{api_port}"

        degraded: dict[str, tuple[float, float]] = {}
        runs: dict[str, GhzRun] = {}
        # CPU ms per answered request, API and model server, per phase
        cpu_per_request: dict[str, tuple[float, float]] = {}

        def phase(name: str, **kwargs: Any) -> GhzRun:
            before = api_counters(metrics_port)
            cpu_before = (cpu_seconds(api.pid), cpu_seconds(model_server.pid))
            profilers = (
                start_profilers(args.profile, name, {"api": api.pid, "model-server": model_server.pid},
                                kwargs["duration_s"])
                if args.profile is not None and name == "200rps"
                else []
            )  # fmt: skip
            result = run_ghz(address, data_file, **kwargs)
            for profiler in profilers:
                profiler.wait(60)
            after = api_counters(metrics_port)
            cpu_after = (cpu_seconds(api.pid), cpu_seconds(model_server.pid))
            served = after["requests"] - before["requests"]
            cpu_per_request[name] = (
                1000 * (cpu_after[0] - cpu_before[0]) / max(served, 1),
                1000 * (cpu_after[1] - cpu_before[1]) / max(served, 1),
            )
            model, features = (
                (after[dependency] - before[dependency]) / served if served else 0.0
                for dependency in ("model_server", "feature_store")
            )
            degraded[name] = (model, features)
            runs[name] = result
            return result

        steps = tqdm(total=5, desc="phases")
        phase("warmup", rps=100, duration_s=min(5.0, args.duration), concurrency=20)
        steps.update()
        at_100 = phase("100rps", rps=100, duration_s=args.duration, concurrency=20)
        steps.update()
        at_200 = phase("200rps", rps=200, duration_s=args.duration, concurrency=40)
        steps.update()
        saturation = phase("saturation", rps=0, duration_s=args.duration, concurrency=args.saturation_concurrency)
        steps.update()

        # The versions are exported before the phase, as a trainer on its own machine would, and
        # each publish moves one into the base path (an atomic rename, as the trainer's export
        # does): the phase measures serving while versions change, not TensorFlow exporting a
        # model on the same two cores (that took ~2 s of CPU per version and was in earlier runs).
        staged = state / "staged"
        staged.mkdir()
        staged_versions = list(range(2, 3 + int(args.swap_duration // args.swap_every)))
        for version in staged_versions:
            served.write(staged, version)
        published: list[int] = []
        stop = threading.Event()

        def publisher() -> None:
            for version in staged_versions:
                if stop.wait(args.swap_every):
                    return
                os.rename(staged / str(version), base_path / str(version))
                client.publish_stable(version)
                published.append(version)

        thread = threading.Thread(target=publisher, daemon=True)
        thread.start()
        swap = phase("swap", rps=200, duration_s=args.swap_duration, concurrency=40)
        stop.set()
        thread.join(timeout=120)
        steps.update()
        steps.close()
        api_rss, server_rss = peak_rss_mb(api.pid), peak_rss_mb(model_server.pid)

    # The default run (ml-100k, the tiny model or a given SavedModel) keeps its names; any other
    # names every figure and its result file by the catalog size.
    default_run = dataset.name == "ml-100k" and kind != "export"
    label = catalog_label(len(served.item_ids))
    suffix = "" if default_run else f"_{label}_items"
    if args.two_stage:  # the default catalog's two-stage run: recommend-two-stage.json, *_two_stage figures
        label, suffix = ("two-stage", "_two_stage") if default_run else (f"{label}-two-stage", f"{suffix}_two_stage")
        default_run = False
    figures = {
        "recommend.p50_ms_100rps": round(at_100.p50_ms, 2),
        "recommend.p99_ms_100rps": round(at_100.p99_ms, 2),
        "recommend.p50_ms_200rps": round(at_200.p50_ms, 2),
        "recommend.p99_ms_200rps": round(at_200.p99_ms, 2),
        "recommend.errors_200rps": at_200.errors,
        "recommend.saturation_rps": round(saturation.rps, 1),
        "recommend.swap_failed_requests": swap.errors,
        "recommend.swap_p99_ms": round(swap.p99_ms, 2),
        "recommend.api_rss_mb": round(api_rss, 1),
    }
    units = {name: "ms" for name in figures if name.endswith("_ms") or "_ms_" in name}
    units.update({"recommend.saturation_rps": "req/s", "recommend.errors_200rps": "requests",
                  "recommend.swap_failed_requests": "requests", "recommend.api_rss_mb": "MiB"})  # fmt: skip
    metrics = {name + suffix: value for name, value in figures.items()}
    units = {name + suffix: unit for name, unit in units.items()}
    notes = (
        f"Dataset {dataset.name}: {len(users):,} users with fresh features + {len(cold):,} unknown (cold start); "
        f"ghz --cpus 1, one connection; k=10, exclude_seen. Model: {served.describe()}; model server request "
        f"batching {'on' if args.batching else 'off'}"
        + (
            "; two-stage: ranking.candidates=100 retrieved, ordered by a new ranking model (version 1)"
            if args.two_stage
            else ""
        )
        + f". Phases of "
        f"{args.duration:g} s; saturation at {args.saturation_concurrency} in flight ({saturation.errors} errors); "
        f"swap phase {args.swap_duration:g} s with versions {published} (exported before the phase) moved into the "
        f"base path and published every {args.swap_every:g} s. Share of degraded answers per phase, "
        "model server failed or past its budget (trending fallback) / feature read failed or past "
        "api.feature_timeout_ms (model answer without user features): "
        + ", ".join(f"{name} {share:.1%} / {features:.1%}" for name, (share, features) in degraded.items())
        + ". "
        "CPU ms per request, API / model server: "
        + ", ".join(f"{name} {api_ms:.2f} / {server_ms:.2f}" for name, (api_ms, server_ms) in cpu_per_request.items())
        + ". "
        f"Peak RSS of the model server under this load: {server_rss:.0f} MiB (model.server_rss_mb is "
        "bench/model_swap.py's figure). "
        f"Errors at 100 rps: {at_100.errors}. Error kinds: "
        + "; ".join(f"{name} {run.error_kinds}" for name, run in runs.items() if run.error_kinds)
        + "."
    )
    print(json.dumps({"metrics": metrics, "notes": notes}, indent=2))
    if not args.no_write:
        met = (
            at_200.p99_ms <= 30
            and at_200.errors == 0
            and (saturation.rps >= 400 or not default_run)
            and swap.errors == 0
            and swap.p99_ms <= SWAP_P99_FACTOR * at_200.p99_ms
        )
        defaults = parser.parse_args([])
        command = ["python -m bench.recommend_load"]
        command += [f"--dataset {args.dataset}"] if args.dataset != defaults.dataset else []
        command += [f"--model {args.model}"] if args.model is not None else []
        command += [f"--model-dir {args.model_dir}"] if args.model_dir is not None else []
        command += ["--two-stage"] if args.two_stage else []
        command += ["--batching"] if args.batching else []
        command += [f"--result-name {args.result_name}"] if args.result_name is not None else []
        goals = targets(at_200.p99_ms, suffix)
        if kind != "tiny" and not args.two_stage:  # issue 25's targets hold for a real exported version
            goals[f"recommend.p99_ms_200rps{suffix}"] = "<= 10 ms"
            goals[f"recommend.saturation_rps{suffix}"] = ">= 800 rps"
            met = met and at_200.p99_ms <= 10 and saturation.rps >= 800
        path = write_result(
            args.result_name or ("recommend" if default_run else f"recommend-{label}"),
            metrics,
            units,
            targets=goals,
            command=" ".join(command),
            notes=notes + (" All targets met." if met else " Not every target was met; see the table."),
        )
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
