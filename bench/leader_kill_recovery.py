"""Recovery after a partition leader is SIGKILLed: lag, loss, duplicates and Recommend latency.

On a fresh three-node local cluster (topics with replication factor 3, ``min.insync.replicas``
2), one feature worker (``faust -A streams.app worker``) reads ``--warm-up`` events (half by a
first start, ``bench.cluster_ingest.first_start``, half by the measured worker, all committed
before the measurement starts), then a paced replay (``--rate`` events/s
for ``--duration`` s) while threads call Recommend back to back on an in-process API (tiny model,
as the fault suite runs it), each call's latency recorded. At ``--kill-at`` s the node leading the
most interactions partitions is SIGKILLed; ``--down-for`` s later it is started again.

Figures:

* ``recovery_s``: from the kill until the consumer lag (high watermark - the group's committed
  offset, interactions + by-item, sampled every second) is back at its pre-fault level for good:
  the median of the 10 s before the kill plus one second of input. A sample the cluster could
  not answer counts as not recovered.
* ``events_lost``: replay delivered - events the worker accepted or dropped as late (per view, the
  worse view); ``duplicate_updates``: accepted - delivered (an event applied twice; redeliveries
  the worker recognised and ignored are counted apart). Both have target 0, and the online
  features are compared with a reference computed from the input
  (``tests.integration.test_streams_worker``), which catches either on any feature it moves.
* Recommend p50/p99 before the kill (its 15 s) and in the fault window (the kill until the node is
  back and the lag recovered), failed calls, failed deliveries.

The API, the load threads, the replay and the sampler share this process (as in the fault suite):
their latency includes the GIL they share. A PNG of lag and Recommend p99 per second, with the
kill and the restart marked, goes beside the JSON.

Run: ``python -m bench.leader_kill_recovery`` (about 3 minutes). ``--duration 40 --kill-at 12
--down-for 8 --no-write`` is a smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pandas as pd

from bench.cluster_ingest import GroupLag, first_start, streams_settings, wait_all_brokers
from bench.common import RESULTS_DIR, report
from bench.ingest_throughput import looped_events
from serving.api.proto import generated
from serving.api.server import ApiServer
from streamrec.core.attributes import item_stats_features, read_schema, user_activity_features
from streamrec.kafka.admin import ensure_topics
from streamrec.ops.replay import ReplayReport, replay
from streamrec.ops.settings import ReplaySettings
from streamrec.ops.stack import kafka_broker
from streamrec.ops.stack.local_stack import LocalStack
from streamrec.ops.stack.ports import free_ports
from streams.settings import StreamsSettings
from tests.integration.test_api_server import FRESH_USER, make_settings, set_up_features, start_model_server
from tests.integration.test_streams_worker import online, prepare, reference
from tests.support.cluster import cluster_settings, running_cluster
from tests.support.worker_process import WorkerProcess

pb = generated()
VIEWS = ("user_activity", "item_stats")


@dataclass
class Call:
    started: float
    latency_s: float
    outcome: str  # "ok", "fallback:<reason>" or "error:<code>"


class LatencyLoad:
    """Threads calling Recommend back to back (5 ms apart), each call's start, latency and outcome kept."""

    def __init__(self, port: int, threads: int) -> None:
        self.port = port
        self.calls: list[Call] = []
        self.unmarked_fallbacks = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = pb.grpc.RecommenderStub(channel)
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    response = stub.Recommend(pb.pb2.RecommendRequest(user_id=FRESH_USER, k=3), timeout=10)
                    outcome = f"fallback:{response.fallback_reason}" if response.fallback else "ok"
                    unmarked = response.fallback and not response.degraded
                except grpc.RpcError as error:
                    outcome, unmarked = f"error:{error.code()}", False
                call = Call(started, time.monotonic() - started, outcome)
                with self._lock:
                    self.calls.append(call)
                    self.unmarked_fallbacks += unmarked
                time.sleep(0.005)

    def between(self, start: float, end: float) -> list[Call]:
        with self._lock:
            return [call for call in self.calls if start <= call.started < end]


@dataclass
class Sample:
    at: float
    lag: int | None  # interactions + by-item; None: the cluster did not answer within 2 s
    interactions_lag: int | None
    events_in: float
    error: str = ""


@dataclass
class Timeline:
    """Samples the committed lag and the worker's events read every second, in a thread."""

    lag: GroupLag
    worker: WorkerProcess
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            at = time.monotonic()
            lags = self.lag.by_topic(timeout_s=2.0)
            self.samples.append(
                Sample(
                    at,
                    None if lags is None else sum(lags.values()),
                    None if lags is None else lags[self.lag.topics[0]],
                    self.worker.metric("streams_events_in_total"),
                    self.lag.last_error if lags is None else "",
                )
            )
            if self._stop.wait(max(0.0, 1.0 - (time.monotonic() - at))):
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


def by_view(worker: WorkerProcess, name: str) -> dict[str, float]:
    """A counter of the worker's /metrics per ``view`` label."""
    values = dict.fromkeys(VIEWS, 0.0)
    for line in (worker.metrics_text() or "").splitlines():
        if line.startswith(f"{name}{{"):
            view = line.split('view="', 1)[1].split('"', 1)[0]
            values[view] = values.get(view, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def leaders(stack: LocalStack, topic: str, partitions: int) -> dict[int, int]:
    """Partition -> leader node id (-1: none) as the cluster's metadata says now."""
    admin = kafka_broker.admin_client(stack.bootstrap_servers())
    described = admin.list_topics(topic, timeout=5).topics[topic]
    return {p: described.partitions[p].leader if p in described.partitions else -1 for p in range(partitions)}


def busiest_leader(stack: LocalStack, topic: str, partitions: int) -> tuple[str, int, int]:
    """(program, node id, partitions led) of the node leading the most partitions of ``topic``."""
    led = Counter(leaders(stack, topic, partitions).values())
    node_id, count = min(led.items(), key=lambda item: (-item[1], item[0]))
    program = next(node.program for node in kafka_broker.nodes(stack.settings) if node.node_id == node_id)
    return program, node_id, count


def wait_failover(stack: LocalStack, topics: tuple[str, ...], partitions: int, dead: int, timeout_s: float) -> float:
    """Seconds until no partition of ``topics`` is led by node ``dead`` or has no leader (NaN: not within timeout)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            led = [leader for topic in topics for leader in leaders(stack, topic, partitions).values()]
        except Exception:  # noqa: BLE001 -- metadata unavailable during the failover: not yet
            led = [-1]
        if all(leader not in (dead, -1) for leader in led):
            return time.monotonic() - started
        time.sleep(0.2)
    return float("nan")


def mismatched_features(settings: StreamsSettings, events: pd.DataFrame, timeout_s: float) -> tuple[int, int]:
    """(users, items) whose online features differ from the reference, polled until equal or ``timeout_s``."""
    schema = read_schema(settings.data_dir)
    want_users, want_items = reference(events, schema.counted_kinds)
    deadline = time.monotonic() + timeout_s
    while True:
        got_users = online(settings, "user_activity", "user_id", user_activity_features(schema), sorted(want_users))
        got_items = online(settings, "item_stats", "item_id", item_stats_features(schema), sorted(want_items))
        bad = (
            sum(got_users[key] != want for key, want in want_users.items()),
            sum(got_items[key] != want for key, want in want_items.items()),
        )
        if bad == (0, 0) or time.monotonic() > deadline:
            return bad
        time.sleep(2.0)


def percentile_ms(calls: list[Call], q: float) -> float:
    latencies = [call.latency_s for call in calls if not call.outcome.startswith("error")]
    return 1000 * float(np.percentile(latencies, q)) if latencies else float("nan")


def recovery(samples: list[Sample], killed_at: float, threshold: float) -> tuple[float, float]:
    """(seconds from the kill until the lag is at or under ``threshold`` for good, max lag after the kill)."""
    after = [sample for sample in samples if sample.at >= killed_at]
    if not after:
        return float("nan"), float("nan")
    peak = max((sample.lag for sample in after if sample.lag is not None), default=float("nan"))
    above = [index for index, sample in enumerate(after) if sample.lag is None or sample.lag > threshold]
    if not above:
        return 0.0, peak
    if above[-1] + 1 == len(after):
        return float("nan"), peak
    return after[above[-1] + 1].at - killed_at, peak


@dataclass
class Marks:
    """Monotonic times of the scenario's steps."""

    replay_started: float = 0.0
    killed: float = 0.0
    failed_over: float = float("nan")
    restart_asked: float = 0.0
    restarted: float = 0.0
    replay_done: float = 0.0
    recovered: float = float("nan")


def plot(path: Path, timeline: Timeline, load: LatencyLoad, marks: Marks) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    zero = marks.replay_started
    shown = [sample for sample in timeline.samples if sample.at >= zero]
    seconds: dict[int, list[float]] = {}
    for call in load.calls:
        if call.started >= zero and not call.outcome.startswith("error"):
            seconds.setdefault(int(call.started - zero), []).append(1000 * call.latency_s)
    p99_t = sorted(seconds)
    p99_v = [float(np.percentile(seconds[second], 99)) for second in p99_t]
    figure, lag_axis = plt.subplots(figsize=(10, 4.5))
    # NaN breaks the line where the cluster did not answer; those stretches are shaded
    lags = [np.nan if sample.lag is None else sample.lag for sample in shown]
    lag_axis.plot([sample.at - zero for sample in shown], lags, ".-", color="tab:blue", markersize=3, label="lag")
    for sample, after in zip(shown, [*shown[1:], None], strict=True):
        if sample.lag is None:
            until = after.at if after is not None else sample.at + 1
            lag_axis.axvspan(sample.at - zero, until - zero, color="tab:blue", alpha=0.12, linewidth=0)
    lag_axis.set_xlabel("seconds since the paced replay started (shaded: lag unreadable)")
    lag_axis.set_ylabel("committed lag (events)", color="tab:blue")
    latency_axis = lag_axis.twinx()
    latency_axis.plot([t + 0.5 for t in p99_t], p99_v, color="tab:red", linewidth=1)
    latency_axis.set_ylabel("Recommend p99 per second (ms, log)", color="tab:red")
    latency_axis.set_yscale("log")
    for at, label, color, style in (
        (marks.killed, "leader SIGKILL", "black", "-"),
        (marks.failed_over, "new leaders", "black", ":"),
        (marks.restarted, "node back (healthy)", "green", "-"),
        (marks.recovered, "lag recovered", "green", ":"),
        (marks.replay_done, "input ends", "grey", "--"),
    ):
        if not np.isnan(at):
            lag_axis.axvline(at - zero, color=color, linestyle=style, label=label)
    lag_axis.legend(loc="upper right", fontsize="small")
    figure.suptitle("Leader kill on a 3-node cluster: consumer lag and Recommend p99")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


@dataclass
class Outcome:
    """What the scenario left: counts read from the worker and the store, and the timelines."""

    marks: Marks
    timeline: Timeline
    load: LatencyLoad
    delivered: int
    worker_delivered: int  # delivered after the first start: what the measured worker had to read
    failed_deliveries: int
    replay_summary: str
    program: str
    led: int
    failover_s: float
    accepted: dict[str, float]
    ignored: dict[str, float]
    late: dict[str, float]
    gaps: float
    open_gaps: float
    bad_users: int
    bad_items: int
    worker_alive: bool


def run_scenario(args: argparse.Namespace, state: Path) -> Outcome:
    """Cluster, worker, API and load up; warm-up; paced replay with the kill and the restart; drain; checks."""
    frame = looped_events(args.warm_up + int(args.rate * args.duration))
    warm, paced_frame = frame.iloc[: args.warm_up], frame.iloc[args.warm_up :]
    first_half = len(warm) // 2
    marks = Marks()
    with running_cluster(state / "stack", brokers=3, kafka_heap_mb=512) as stack:
        wait_all_brokers(stack)
        base = cluster_settings(stack, prefix="lk")
        (metrics_port,) = free_ports(1)
        settings = streams_settings(base, state / "worker", "benchleaderkill", metrics_port)
        prepare(settings)
        ensure_topics(settings, extra=[settings.by_item_topic])  # as `streamrec streams worker` does
        replay_settings = ReplaySettings(kafka=settings.kafka, topics=settings.topics)
        models = start_model_server(state / "models" / "streamrec", {1: 0.0})
        api_settings = make_settings(
            stack.settings, state / "api", f"api{uuid.uuid4().hex[:6]}", models.target
        ).model_copy(update={"kafka": base.kafka, "topics": base.topics})
        set_up_features(api_settings)
        api = ApiServer(api_settings)
        api_port = api.start()
        worker = WorkerProcess(settings, state / "worker.log")
        lag = GroupLag(settings)
        timeline = Timeline(lag, worker)
        load = LatencyLoad(api_port, args.threads)
        reports: list[ReplayReport] = []

        def paced_replay() -> None:
            reports.append(replay(paced_frame, replay_settings, rate=args.rate, progress=False))
            marks.replay_done = time.monotonic()

        paced = threading.Thread(target=paced_replay)
        try:
            # a first start creates the topics Faust owns (see first_start); the measured worker
            # restarts onto them and does its first pushes before the paced replay
            first_start(settings, warm.iloc[:first_half], state / "first-start.log")
            worker.start()
            worker.wait_serving(120)
            reports.append(replay(warm.iloc[first_half:], replay_settings, progress=False))
            load.start()
            deadline = time.monotonic() + 120
            while not (lag.lag() == 0 and worker.metric("streams_events_in_total") >= len(warm) - first_half):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the warm-up was not committed within 120 s; see {worker.log_path}")
                time.sleep(0.5)
            timeline.start()
            marks.replay_started = time.monotonic()
            paced.start()
            time.sleep(max(0.0, marks.replay_started + args.kill_at - time.monotonic()))
            program, node_id, led = busiest_leader(stack, settings.topics.interactions, settings.topics.partitions)
            marks.killed = time.monotonic()
            stack.kill(program)
            topics = (settings.topics.interactions, settings.by_item_topic)
            failover_s = wait_failover(stack, topics, settings.topics.partitions, node_id, args.down_for)
            marks.failed_over = marks.killed + failover_s
            time.sleep(max(0.0, marks.killed + args.down_for - time.monotonic()))
            marks.restart_asked = time.monotonic()
            stack.start(program)
            marks.restarted = time.monotonic()
            paced.join(timeout=args.duration + 300)
            load.stop()
            delivered = first_half + sum(report.delivered for report in reports)
            deadline = time.monotonic() + args.drain_timeout
            while time.monotonic() < deadline and not (
                timeline.samples[-1].lag == 0 and worker.metric("streams_events_in_total") >= delivered - first_half
            ):
                time.sleep(1.0)
            timeline.stop()
            outcome = Outcome(
                marks=marks,
                timeline=timeline,
                load=load,
                delivered=delivered,
                worker_delivered=delivered - first_half,
                failed_deliveries=sum(report.failed for report in reports),
                replay_summary=reports[-1].summary() if len(reports) == 2 else "the paced replay did not finish",
                program=program,
                led=led,
                failover_s=failover_s,
                accepted=by_view(worker, "streams_accepted_events_total"),
                ignored=by_view(worker, "streams_duplicate_events_total"),
                late=by_view(worker, "streams_late_events_total"),
                gaps=worker.metric("streams_offset_gaps_total"),
                open_gaps=worker.metric("streams_offset_gaps_open")
                + worker.metric("streams_offset_gaps_abandoned_total"),
                bad_users=0,
                bad_items=0,
                worker_alive=worker.alive(),
            )
            outcome.bad_users, outcome.bad_items = mismatched_features(settings, frame.head(delivered), 30)
            (state / "timeline.json").write_text(
                json.dumps(
                    {
                        "marks": asdict(marks),
                        "samples": [asdict(sample) for sample in timeline.samples],
                        "accepted": outcome.accepted,
                        "late": outcome.late,
                    }
                )
            )
            return outcome
        finally:
            load.stop()
            timeline.stop()
            lag.close()
            worker.stop()
            api.stop(0)
            models.server.stop(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=800.0, help="replay events/s")
    parser.add_argument("--duration", type=float, default=75.0, help="seconds of paced replay")
    parser.add_argument("--warm-up", type=int, default=2000, help="events replayed (and committed) before")
    parser.add_argument("--kill-at", type=float, default=20.0, help="seconds into the paced replay of the SIGKILL")
    parser.add_argument("--down-for", type=float, default=15.0, help="seconds the killed node stays down")
    parser.add_argument("--threads", type=int, default=2, help="Recommend load threads")
    parser.add_argument("--drain-timeout", type=float, default=180.0, help="max seconds to lag 0 after the input")
    parser.add_argument("--name", default="leader-kill-recovery", help="result name (bench/results/<name>.json)")
    parser.add_argument("--no-write", action="store_true", help="print the figures, write no result file")
    parser.add_argument("--keep-state", action="store_true", help="keep the stack's and worker's folder (logs)")
    args = parser.parse_args()
    load_at_start = os.getloadavg()
    if not 10 <= args.kill_at < args.duration - args.down_for:
        parser.error("need 10 <= --kill-at and --kill-at + --down-for < --duration (a pre-fault and a post-restart)")

    with contextlib.ExitStack() as cleanup:
        state = Path(tempfile.mkdtemp(prefix="bench-leader-kill-"))
        if args.keep_state:
            print(f"state (logs, timeline.json) kept in {state}")
        else:
            cleanup.callback(shutil.rmtree, state, ignore_errors=True)
        result = run_scenario(args, state)
    marks, load = result.marks, result.load

    before = [s.lag for s in result.timeline.samples if marks.killed - 10 <= s.at < marks.killed and s.lag is not None]
    pre_fault = statistics.median(before)
    recovery_s, peak_lag = recovery(result.timeline.samples, marks.killed, pre_fault + args.rate)
    marks.recovered = marks.killed + recovery_s
    window_end = max(marks.restarted, marks.recovered) if not np.isnan(recovery_s) else marks.replay_done
    calls_before = load.between(marks.killed - 15, marks.killed)
    calls_fault = load.between(marks.killed, window_end)
    outcomes = Counter(call.outcome for call in load.calls)
    failed_calls = sum(count for outcome, count in outcomes.items() if outcome.startswith("error"))
    fallbacks = sum(count for outcome, count in outcomes.items() if outcome.startswith("fallback"))
    accepted, late = result.accepted, result.late
    # Loss: every delivered event accepted or dropped as late (the item side drops, by design,
    # events more than allowed_lateness behind an item's newest; a redelivered late event counts
    # as late again, so the item side's figure is a lower bound: the features check is the full one).
    lost = max(0.0, *(result.worker_delivered - accepted[view] - late[view] for view in VIEWS))
    doubled = max(0.0, *(accepted[view] - result.worker_delivered for view in VIEWS))
    unreadable = sum(1 for s in result.timeline.samples if s.lag is None)

    metrics = {
        "leader_kill.recovery_s": round(recovery_s, 1),
        "leader_kill.failover_s": round(result.failover_s, 1),
        "leader_kill.pre_fault_lag_events": round(pre_fault),
        "leader_kill.peak_lag_events": peak_lag,
        "leader_kill.events_lost": lost,
        "leader_kill.duplicate_updates": doubled,
        "leader_kill.features_mismatched": result.bad_users + result.bad_items,
        "leader_kill.failed_deliveries": result.failed_deliveries,
        "leader_kill.recommend_p50_before_ms": round(percentile_ms(calls_before, 50), 1),
        "leader_kill.recommend_p99_before_ms": round(percentile_ms(calls_before, 99), 1),
        "leader_kill.recommend_p50_fault_ms": round(percentile_ms(calls_fault, 50), 1),
        "leader_kill.recommend_p99_fault_ms": round(percentile_ms(calls_fault, 99), 1),
        "leader_kill.recommend_failed": failed_calls,
        "leader_kill.recommend_calls": len(load.calls),
    }
    units = {
        "leader_kill.recovery_s": "s",
        "leader_kill.failover_s": "s",
        "leader_kill.pre_fault_lag_events": "events",
        "leader_kill.peak_lag_events": "events",
        "leader_kill.events_lost": "events",
        "leader_kill.duplicate_updates": "events",
        "leader_kill.features_mismatched": "entities",
        "leader_kill.failed_deliveries": "events",
        "leader_kill.recommend_p50_before_ms": "ms",
        "leader_kill.recommend_p99_before_ms": "ms",
        "leader_kill.recommend_p50_fault_ms": "ms",
        "leader_kill.recommend_p99_fault_ms": "ms",
        "leader_kill.recommend_failed": "calls",
        "leader_kill.recommend_calls": "calls",
    }
    after_input = not np.isnan(recovery_s) and marks.recovered > marks.replay_done
    load_avg = os.getloadavg()
    notes = (
        "Three KRaft nodes (replication factor 3, min.insync.replicas 2, 512 MiB heap each), 4 partitions, one "
        f"feature worker (default tuning); {args.warm_up:,} events replayed and committed first (half of them by a "
        "first worker start that created the topics Faust owns, stopped, then the measured worker), then "
        f"{args.rate:,.0f} events/s of looped MovieLens-100K for {args.duration:.0f} s ({result.replay_summary}); "
        f"{args.threads} threads calling Recommend back to back on an in-process API (tiny model) that logs "
        f"impressions to the cluster. At {args.kill_at:.0f} s the node leading the most interactions partitions "
        f"({result.program}, {result.led} of 4) was SIGKILLed; every partition of interactions and by-item had a "
        f"live leader on another node {result.failover_s:.1f} s later (KRaft fences a node that stops heart-beating "
        f"after broker.session.timeout.ms, 9 s by default); the node was started {args.down_for:.0f} s after the "
        f"kill and was healthy {marks.restarted - marks.killed:.1f} s after it. Recovery: the committed lag "
        "(interactions + by-item, sampled every second; a sample the cluster did not answer within 2 s counts as "
        f"not recovered, {unreadable} such) back at or under the median of the 10 s before the kill "
        f"({pre_fault:.0f}) plus one second of input ({args.rate:.0f}) for good"
        f"{', only after the input had ended' if after_input else ''}"
        f"{'; NOT recovered before the drain timeout' if np.isnan(recovery_s) else ''}. Accepted per view "
        f"{', '.join(f'{view} {accepted[view]:.0f}' for view in VIEWS)} of the {result.worker_delivered:,} delivered "
        "after the first start; "
        f"dropped as late {', '.join(f'{view} {late[view]:.0f}' for view in VIEWS)}; redelivered and ignored "
        f"{', '.join(f'{view} {result.ignored[view]:.0f}' for view in VIEWS)}; offset gaps {result.gaps:.0f} "
        f"(left open or abandoned: {result.open_gaps:.0f}); online features differing from the reference: "
        f"{result.bad_users} users, {result.bad_items} items; worker {'alive' if result.worker_alive else 'DEAD'} "
        f"at the end. Recommend: {len(load.calls):,} calls, {fallbacks} marked fallbacks "
        f"({load.unmarked_fallbacks} unmarked), {failed_calls} failed; p50/p99 over the 15 s before the kill "
        f"({len(calls_before)} calls) and in the fault window, the kill until the node was back and the lag "
        f"recovered ({window_end - marks.killed:.0f} s, {len(calls_fault)} calls). The API, the load, the replay "
        "producer and this sampler share one Python process (as in the fault suite), and everything shares the "
        f"machine's {os.cpu_count()} cores. Load average (1, 5, 15 min) at the start: {load_at_start[0]:.2f}, "
        f"{load_at_start[1]:.2f}, {load_at_start[2]:.2f}; at the end: {load_avg[0]:.2f}, {load_avg[1]:.2f}, "
        f"{load_avg[2]:.2f}. Plot: bench/results/{args.name}.png."
    )
    plot_dir = Path(tempfile.gettempdir()) if args.no_write else RESULTS_DIR
    plot_dir.mkdir(parents=True, exist_ok=True)
    plot(plot_dir / f"{args.name}.png", result.timeline, load, marks)
    print(f"plot: {plot_dir / f'{args.name}.png'}")
    report(
        args.name,
        metrics,
        units,
        targets={
            "leader_kill.events_lost": "<= 0",
            "leader_kill.duplicate_updates": "<= 0",
            "leader_kill.features_mismatched": "<= 0",
            "leader_kill.failed_deliveries": "<= 0",
            "leader_kill.recommend_failed": "<= 0",
        },
        command=(
            f"python -m bench.leader_kill_recovery --rate {args.rate:.0f} --duration {args.duration:.0f} "
            f"--kill-at {args.kill_at:.0f} --down-for {args.down_for:.0f}"
        ),
        notes=notes,
        write=not args.no_write,
    )


if __name__ == "__main__":
    main()
