"""``Recommend`` with TLS against plaintext: p99 at 200 rps and saturation, both modes in one run.

Two sets of the processes ``bench.recommend_load`` runs (Kafka and Redis under ``LocalStack``, the
local model server and the API as their own processes, the ml-100k feature rows and the tiny model,
``ghz --cpus 1`` over one connection as the client), side by side:

* ``plain``: a plaintext stack, plaintext gRPC (``recommend_load``'s setup);
* ``tls``: a secure stack (``StackTuning(secure=True)``, as ``stack up --secure``) whose programs
  get their identity's variables (``LocalStack.program_environment``): ghz -> API over TLS with the
  ``admin`` identity's bearer token (ghz ``--cacert`` and ``--metadata-file``, a 0600 file), API ->
  model server over TLS with the ``api`` identity's token, API -> Redis over TLS as its ACL user,
  the API's impressions to Kafka over SASL_SSL. The benchmark publishes the model as ``admin``.

Method: a warm-up per mode (not reported), then ``--rounds`` rounds; each round runs, per mode
(the order swapped every round), 200 rps for ``--duration`` and then saturation (rate uncapped at
``--saturation-concurrency`` calls in flight). The figures are the medians over the rounds (from
ghz's own percentiles; non-OK statuses are errors), the ratios tls / plain of those medians. The
idle mode's processes stay up while the other is measured, the same for both. CPU per answered
request of the API, the model server, Redis, Kafka and ghz is read per phase (``/proc``); after the
rounds one more saturation phase per mode, not reported, runs with the API under py-spy (``--gil``:
Python time), and the notes say where TLS costs: the CPU added per process and the frames that grew.

Targets (issue 22): tls / plain p99 at 200 rps <= 1.2, tls / plain saturation >= 0.85.

Run: ``python -m bench.secure_recommend`` (about 6 minutes; ``--tiny --no-write`` checks the wiring
in about 1.5). Needs ``ghz`` (``make bench-tools``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bench.cluster_ingest import cpu_seconds as tree_cpu_seconds
from bench.cluster_ingest import stack_pids
from bench.common import report
from bench.recommend_load import (
    COLD_SHARE,
    GhzRun,
    api_counters,
    cpu_seconds,
    ghz_binary,
    run_ghz,
    start_profilers,
    stop_process,
    wait_for_line,
)
from bench.recommend_setup import ServedModel, served_model, set_up_features
from bench.secure_ingest import as_identity
from serving.model_client import ModelServerClient
from streamrec.core.settings import ENV_NESTED_DELIMITER, ENV_PREFIX, PROJECT_ROOT, PathSettings
from streamrec.datasets.description import Dataset
from streamrec.ops.settings import StackTuning
from streamrec.ops.stack import redis_server
from streamrec.ops.stack.certs import write_private
from streamrec.ops.stack.local_stack import LocalStack
from streamrec.ops.stack.ports import free_ports
from tests.support.cluster import running_cluster

MODES = ("plain", "tls")
P99_FACTOR = 1.2
SATURATION_FACTOR = 0.85
TARGETS = {
    "secure_recommend.ratio_tls_to_plain.p99_ms_200rps": f"<= {P99_FACTOR}",
    "secure_recommend.ratio_tls_to_plain.saturation_rps": f">= {SATURATION_FACTOR}",
    "secure_recommend.tls.errors_200rps": "<= 0 requests",
    "secure_recommend.plain.errors_200rps": "<= 0 requests",
}
CPU_SOURCES = ("api", "model_server", "redis", "kafka", "ghz")


@dataclass
class Serving:
    """One mode's stack, model server and API, and how ghz reaches the API."""

    mode: str
    stack: LocalStack
    model_server: subprocess.Popen[str]
    api: subprocess.Popen[str]
    address: str
    metrics_port: int
    transport: list[str]

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each process a request touches (ghz: this process's reaped children)."""
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return {
            "api": cpu_seconds(self.api.pid),
            "model_server": cpu_seconds(self.model_server.pid),
            "redis": tree_cpu_seconds(stack_pids(self.stack, kafka=False)),
            "kafka": tree_cpu_seconds(stack_pids(self.stack, kafka=True)),
            "ghz": children.ru_utime + children.ru_stime,
        }


@dataclass
class Phase:
    run: GhzRun
    cpu_ms_per_request: dict[str, float]
    degraded: float  # share of answers that were not the model's with features (fallbacks)


def start_serving(mode: str, state: Path, cleanup: ExitStack, dataset: Dataset) -> tuple[Serving, pd.DataFrame]:
    """The stack of ``mode``, the dataset's features and the tiny model, the model server and the API."""
    from features.settings import FeaturesSettings, FeatureStoreTuning
    from streamrec.kafka.admin import ensure_topics

    secure = mode == "tls"
    stack = cleanup.enter_context(
        running_cluster(state / "stack", brokers=1, secure=secure, kafka_heap_mb=StackTuning().kafka_heap_mb)
    )
    secrets = stack.secrets
    base = stack.client_settings()  # Kafka as admin
    features = FeaturesSettings(
        kafka=base.kafka,
        topics=base.topics,
        redis=redis_server.stack_client_settings(stack.settings, secrets),  # Redis as admin
        paths=PathSettings(state_dir=state),
        features=FeatureStoreTuning(project="bench"),
    )
    ensure_topics(features)
    activity = set_up_features(features, dataset)
    served: ServedModel = served_model("tiny", dataset, activity, state / "export", None)
    base_path = state / "models" / "streamrec"
    base_path.mkdir(parents=True)
    served.write(base_path, 1)

    model_port, api_port, metrics_port = free_ports(3)

    def environment(program: str) -> dict[str, str]:
        """What the stack hands ``program`` (on a secure stack, its identity's files), with this
        benchmark's state folder, feature project and model server port."""
        env = {key: value for key, value in os.environ.items() if not key.upper().startswith(ENV_PREFIX)}
        env.update(stack.program_environment(program))
        env.update(
            {
                f"{ENV_PREFIX}PATHS{ENV_NESTED_DELIMITER}STATE_DIR": str(state),
                f"{ENV_PREFIX}FEATURES{ENV_NESTED_DELIMITER}PROJECT": "bench",
                f"{ENV_PREFIX}MODEL_SERVER{ENV_NESTED_DELIMITER}PORT": str(model_port),
            }
        )
        return env

    model_log, api_log = state / "model-server.log", state / "api.log"
    model_server = subprocess.Popen(
        [sys.executable, "-m", "serving.model_server.cli", "--port", str(model_port), "--host", "127.0.0.1",
         "--model_name", "streamrec", "--model_base_path", str(base_path), "--file_system_poll_wait_seconds", "1"],
        cwd=PROJECT_ROOT, env=environment("model-server"), stdout=model_log.open("w"), stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    cleanup.callback(stop_process, model_server)
    admin_grpc = as_identity(base, secrets, "admin").grpc if secrets is not None else None
    with ModelServerClient(
        f"127.0.0.1:{model_port}", server_base_path=str(base_path), admin_timeout_s=60, security=admin_grpc
    ) as client:
        client.wait_until_available(1, timeout_s=120)
        client.publish_stable(1)
    api = subprocess.Popen(
        [sys.executable, "-m", "serving", "--port", str(api_port), "--metrics-port", str(metrics_port)],
        cwd=PROJECT_ROOT, env=environment("api"), stdout=api_log.open("w"), stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    cleanup.callback(stop_process, api)
    wait_for_line(api, "listening on", 180, api_log)

    transport = ["--insecure"]
    if secrets is not None:
        # the token in a 0600 file, never on ghz's command line
        metadata = state / "ghz-metadata.json"
        token = secrets.identities["admin"].grpc_token()
        write_private(metadata, json.dumps({"authorization": f"Bearer {token}"}).encode())
        transport = ["--cacert", str(secrets.ca_file), "--metadata-file", str(metadata)]
    serving = Serving(mode, stack, model_server, api, f"127.0.0.1:{api_port}", metrics_port, transport)
    return serving, activity


def measure(serving: Serving, data_file: Path, *, rps: int, duration_s: float, concurrency: int) -> Phase:
    before, cpu_before = api_counters(serving.metrics_port), serving.cpu()
    run = run_ghz(
        serving.address, data_file, rps=rps, duration_s=duration_s, concurrency=concurrency,
        transport=serving.transport,
    )  # fmt: skip
    after, cpu_after = api_counters(serving.metrics_port), serving.cpu()
    answered = max(after["requests"] - before["requests"], 1)
    degraded = sum(after[name] - before[name] for name in ("model_server", "feature_store")) / answered
    return Phase(
        run,
        {name: 1000 * (cpu_after[name] - cpu_before[name]) / answered for name in CPU_SOURCES},
        degraded,
    )


PROFILE_RATE_HZ = 100  # start_profilers' sampling rate: one sample is 10 ms holding the GIL
PROJECT_PACKAGES = ("serving/", "features/", "streams/", "streamrec/")


@dataclass
class Profile:
    """Python time holding the GIL per answered request, in all and per frame (``function (file)``)."""

    ms_per_request: float
    inclusive: dict[str, float]  # ms per request in the frame and below it
    own: dict[str, float]  # ms per request in the frame itself

    def growth(self, other: Profile, by: str, count: int, *, project_only: bool = False) -> str:
        """The ``count`` frames (of both profiles) whose ms per request grew most from ``other`` to this one."""
        mine, theirs = getattr(self, by), getattr(other, by)
        grown = {frame: mine[frame] - theirs[frame] for frame in mine if frame in theirs}
        chosen = [
            (frame, ms) for frame, ms in sorted(grown.items(), key=lambda item: -item[1])
            if ms > 0 and (not project_only or frame.split(" (")[-1].startswith(PROJECT_PACKAGES))
        ][:count]  # fmt: skip
        return ", ".join(f"{frame} +{ms:.3f}" for frame, ms in chosen) or "none"

    def new_frames(self, other: Profile, count: int) -> str:
        """The ``count`` frames only this profile has, by inclusive ms per request, leaving out those
        that wrap most of the request (an interceptor around the handler)."""
        new = [
            (frame, ms)
            for frame, ms in sorted(self.inclusive.items(), key=lambda item: -item[1])
            if frame not in other.inclusive and ms < self.ms_per_request / 2
        ]
        return ", ".join(f"{frame} {ms:.3f}" for frame, ms in new[:count]) or "none"


def read_profile(path: Path, answered: int) -> Profile | None:
    """py-spy's collapsed stacks (``--gil``) as ms per request; None when py-spy wrote nothing."""
    if not path.is_file() or answered == 0:
        return None
    per_sample = 1000 / PROFILE_RATE_HZ / answered
    inclusive: defaultdict[str, float] = defaultdict(float)
    own: defaultdict[str, float] = defaultdict(float)
    total = 0.0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        ms = int(count) * per_sample
        frames = [frame.rsplit(":", 1)[0] + ")" for frame in stack.split(";")]  # "name (file:line)" -> "name (file)"
        total += ms
        for frame in set(frames):
            inclusive[frame] += ms
        own[frames[-1]] += ms
    return Profile(total, inclusive, own)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per measured phase")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both modes; the figures are medians")
    parser.add_argument("--saturation-concurrency", type=int, default=16)
    parser.add_argument("--tiny", action="store_true", help="3-second phases, one round: check the wiring only")
    parser.add_argument("--no-write", action="store_true", help="print the figures, do not write results")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="keep the py-spy profiles (collapsed stacks) of the API in the profiled phases in this folder",
    )
    args = parser.parse_args()
    if args.tiny:
        args.duration, args.rounds = 3.0, 1
    ghz_binary()
    from streamrec.datasets.description import load_dataset

    dataset = load_dataset("ml-100k")
    load_at_start = os.getloadavg()

    phases: dict[tuple[str, str], list[Phase]] = {(mode, kind): [] for mode in MODES for kind in ("200rps", "sat")}
    profiles: dict[str, Profile | None] = {}
    with ExitStack() as cleanup:
        state = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="bench-secure-recommend-")))
        servings: dict[str, Serving] = {}
        users: list[str] = []
        for mode in MODES:
            print(f"starting {mode}: stack, features, model server, API ...", file=sys.stderr)
            servings[mode], activity = start_serving(mode, state / mode, cleanup, dataset)
            users = activity["user_id"].tolist()
        data_file = state / "requests.json"
        cold = [f"cold-{i}" for i in range(int(len(users) * COLD_SHARE))]
        requests = [{"user_id": user, "k": 10, "exclude_seen": True} for user in users + cold]
        np.random.default_rng(11).shuffle(requests)
        data_file.write_text(json.dumps(requests))

        for mode in MODES:
            measure(servings[mode], data_file, rps=100, duration_s=min(5.0, args.duration), concurrency=20)
        for round_index in range(args.rounds):
            for mode in MODES if round_index % 2 == 0 else MODES[::-1]:
                print(f"round {round_index + 1}: {mode}", file=sys.stderr)
                phases[mode, "200rps"].append(
                    measure(servings[mode], data_file, rps=200, duration_s=args.duration, concurrency=40)
                )
                phases[mode, "sat"].append(
                    measure(
                        servings[mode], data_file, rps=0, duration_s=args.duration,
                        concurrency=args.saturation_concurrency,
                    )
                )  # fmt: skip
        # after the measured rounds (py-spy takes CPU): one saturation phase per mode with the API profiled
        profile_dir = args.profile or state / "profiles"
        for mode in MODES:
            serving = servings[mode]
            profilers = start_profilers(profile_dir, f"{mode}-saturation", {"api": serving.api.pid}, args.duration)
            phase = measure(
                serving, data_file, rps=0, duration_s=args.duration, concurrency=args.saturation_concurrency
            )
            for profiler in profilers:
                profiler.wait(60)
            profiles[mode] = read_profile(profile_dir / f"api-{mode}-saturation.txt", phase.run.count)

    def median(mode: str, kind: str, figure: str) -> float:
        """The median over rounds of a ghz figure (``p99_ms``, ``rps``) or of a CPU source's ms per request."""
        return statistics.median(
            phase.cpu_ms_per_request[figure] if figure in CPU_SOURCES else getattr(phase.run, figure)
            for phase in phases[mode, kind]
        )

    metrics: dict[str, float] = {}
    units: dict[str, str] = {}
    for mode in MODES:
        prefix = f"secure_recommend.{mode}."
        rows = {
            "p50_ms_200rps": (round(median(mode, "200rps", "p50_ms"), 2), "ms"),
            "p99_ms_200rps": (round(median(mode, "200rps", "p99_ms"), 2), "ms"),
            "errors_200rps": (sum(phase.run.errors for phase in phases[mode, "200rps"]), "requests"),
            "saturation_rps": (round(median(mode, "sat", "rps"), 1), "req/s"),
            "api_cpu_ms_per_request_200rps": (round(median(mode, "200rps", "api"), 3), "CPU ms"),
            "api_cpu_ms_per_request_saturation": (round(median(mode, "sat", "api"), 3), "CPU ms"),
        }
        for name, (value, unit) in rows.items():
            metrics[prefix + name], units[prefix + name] = value, unit
    ratios = {
        "p99_ms_200rps": median("tls", "200rps", "p99_ms") / median("plain", "200rps", "p99_ms"),
        "saturation_rps": median("tls", "sat", "rps") / median("plain", "sat", "rps"),
        "api_cpu_ms_per_request_saturation": median("tls", "sat", "api") / median("plain", "sat", "api"),
    }
    for name, value in ratios.items():
        key = f"secure_recommend.ratio_tls_to_plain.{name}"
        metrics[key], units[key] = round(value, 3), ""

    def per_round(mode: str, kind: str, value: str, digits: int) -> str:
        return "/".join(f"{getattr(phase.run, value):,.{digits}f}" for phase in phases[mode, kind])

    def cpu_breakdown(mode: str, kind: str) -> str:
        return ", ".join(f"{name} {median(mode, kind, name):.2f}" for name in CPU_SOURCES)

    load = os.getloadavg()
    met = ratios["p99_ms_200rps"] <= P99_FACTOR and ratios["saturation_rps"] >= SATURATION_FACTOR
    added = {name: median("tls", "sat", name) - median("plain", "sat", name) for name in CPU_SOURCES}
    total = {mode: sum(median(mode, "sat", name) for name in CPU_SOURCES) for mode in MODES}
    largest = max(added, key=lambda name: added[name])
    where = (
        f"Where the time goes: at saturation TLS adds {sum(added.values()):.2f} CPU ms per request ("
        + ", ".join(f"{name} {ms:+.2f}" for name, ms in added.items())
        + f"); all share the {os.cpu_count()} cores, so were saturation bound by CPU alone, tls / plain would be "
        f"{total['plain']:.2f} / {total['tls']:.2f} ms = {total['plain'] / total['tls']:.3f} (measured "
        f"{ratios['saturation_rps']:.3f}). "
    )
    plain_profile, tls_profile = profiles.get("plain"), profiles.get("tls")
    if plain_profile is not None and tls_profile is not None:
        gil_added = tls_profile.ms_per_request - plain_profile.ms_per_request
        where += (
            "Profile of the API (one more saturation phase per mode after the rounds, not reported; py-spy --gil at "
            f"{PROFILE_RATE_HZ} Hz): Python holding the GIL {plain_profile.ms_per_request:.3f} ms per request plain, "
            f"{tls_profile.ms_per_request:.3f} tls, so about {added['api'] - gil_added:.2f} of the API's "
            f"{added['api']:+.2f} ms is outside the GIL (TLS records in gRPC's C core, Python's ssl to Redis, "
            "librdkafka's SASL_SSL). Largest growth in ms per request, project code with what it calls: "
            f"{tls_profile.growth(plain_profile, 'inclusive', 6, project_only=True)}; any frame, own time: "
            f"{tls_profile.growth(plain_profile, 'own', 5)}; frames only the tls profile has, with what they call: "
            f"{tls_profile.new_frames(plain_profile, 4)}. "
        )
    else:
        where += "Profile: py-spy wrote nothing (it needs ptrace rights on the API). "
    next_step = (
        ""
        if met
        else f"Next step: the largest added cost is the {largest}'s ({added[largest]:+.2f} CPU ms per request): "
        "cut it where the profile shows growth, then re-measure. "
    )
    notes = (
        "Same processes in both modes (recommend_load's: one-broker Kafka and Redis under LocalStack, the local "
        "model server, the API; ml-100k features, the tiny model; ghz --cpus 1, one connection, k=10, "
        f"exclude_seen, {COLD_SHARE:.0%} unknown users). plain: plaintext stack and gRPC. tls: the secure stack "
        "(stack.secure) with each program's identity as the stack hands it: ghz -> API TLS with the admin "
        "token (metadata file), API -> model server TLS with the api token, API -> Redis TLS + ACL user, "
        "impressions to Kafka SASL_SSL; so Redis and Kafka differ between the modes as the stack does. Both "
        "sets of processes run side by side on the machine's "
        f"{os.cpu_count()} cores, the idle one idle. After a warm-up per mode, {args.rounds} rounds, the modes' "
        f"order swapped each round; per mode 200 rps for {args.duration:g} s (40 in flight), then saturation "
        f"({args.saturation_concurrency} in flight, rate uncapped) for {args.duration:g} s; figures are the "
        "medians over rounds, ratios tls / plain of the medians. Per round: p99 at 200 rps plain "
        f"{per_round('plain', '200rps', 'p99_ms', 2)} ms, tls {per_round('tls', '200rps', 'p99_ms', 2)} ms; "
        f"saturation plain {per_round('plain', 'sat', 'rps', 0)}, tls {per_round('tls', 'sat', 'rps', 0)} req/s; "
        f"saturation errors plain {sum(p.run.errors for p in phases['plain', 'sat'])}, tls "
        f"{sum(p.run.errors for p in phases['tls', 'sat'])}. CPU ms per answered request at saturation "
        f"(median): plain {cpu_breakdown('plain', 'sat')}; tls {cpu_breakdown('tls', 'sat')}; at 200 rps: plain "
        f"{cpu_breakdown('plain', '200rps')}; tls {cpu_breakdown('tls', '200rps')}. Degraded answers (fallbacks) "
        + ", ".join(
            f"{mode} {kind} {max(phase.degraded for phase in phases[mode, kind]):.1%}"
            for mode in MODES
            for kind in ("200rps", "sat")
        )
        + f" at most. Load average (1, 5, 15 min) at the start: {load_at_start[0]:.2f}, {load_at_start[1]:.2f}, "
        f"{load_at_start[2]:.2f}; at the end: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}. "
        + where
        + next_step
        + ("Both targets met." if met else "Not every target was met; see the table.")
    )
    defaults = parser.parse_args([])
    command = ["python -m bench.secure_recommend"]
    command += [f"--duration {args.duration:g}"] if args.duration != defaults.duration else []
    command += [f"--rounds {args.rounds}"] if args.rounds != defaults.rounds else []
    report(
        "secure-recommend",
        metrics,
        units,
        targets=TARGETS,
        command=" ".join(command),
        notes=notes,
        write=not args.no_write,
    )


if __name__ == "__main__":
    main()
