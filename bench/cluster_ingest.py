"""Ingest on a Kafka cluster: 3 brokers (RF 3) against 1, and 2 feature workers against 1.

Three layouts, each on a fresh local stack (real Kafka + Redis on free ports):

* ``b1_w1``: one broker (replication factor 1) and one worker (``faust -A streams.app worker``);
* ``b3_w1``: three KRaft nodes, topics with replication factor 3 and ``min.insync.replicas`` 2
  (``tests.support.cluster``), one worker;
* ``b1_w2``: one broker, two workers in one group (``streams.worker_index`` 0 and 1, as
  ``--workers 2`` numbers them), the 4 partitions split between them.

Method, per layout: the worker(s) start and are warmed up (``warm_up``: batches of 250 events
until every worker has read some and the group has committed them all, so each is in the group
with its partitions and past its first pushes); then a backlog of ``--events`` looped
MovieLens-100K events is produced at once (``streamrec.ops.replay.replay``, acks=all with
idempotence, about a second; its delivered/s is the produce rate), and every half second the
benchmark samples the group's committed lag (interactions and by-item topics), the events the
workers read (``streams_events_in_total``) and the CPU seconds (psutil, user + system) of the
workers, the Kafka nodes and Redis. ``events_per_s`` and the CPU per 1,000 events run from just
before the backlog is produced to the group's lag 0: every event read, applied, pushed and
committed. ``--repeats`` runs per layout, layouts alternating; the figures are the medians.

On a 2-core machine two workers cannot show the scaling they would have on their own cores (the
brokers, Redis and both workers share two cores; one worker uses about one): the figures of
``b1_w2`` are the ratio to ``b1_w1`` and the CPU per event, which say what splitting the
partitions costs.

Run: ``python -m bench.cluster_ingest`` (about 12 minutes: 3 runs per layout). ``--events 6000
--repeats 1 --layouts b1_w1 --no-write`` is a smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import psutil
from confluent_kafka import Consumer, KafkaException, TopicPartition

from bench.common import report
from bench.ingest_throughput import looped_events
from streamrec.core.settings import CommonSettings, PathSettings
from streamrec.kafka.admin import ensure_topics
from streamrec.ops.replay import ReplayReport, replay
from streamrec.ops.settings import ReplaySettings
from streamrec.ops.stack import kafka_broker
from streamrec.ops.stack.local_stack import LocalStack
from streamrec.ops.stack.ports import free_port_block
from streams.settings import StreamsSettings
from tests.integration.test_streams_worker import prepare
from tests.support.cluster import cluster_settings, running_cluster
from tests.support.worker_process import WorkerProcess

LAYOUTS: dict[str, tuple[int, int]] = {"b1_w1": (1, 1), "b3_w1": (3, 1), "b1_w2": (1, 2)}  # (brokers, workers)
KAFKA_HEAP_MB = 512  # the stack's default, for every node of every layout
SAMPLE_EVERY_S = 0.5
WARM_UP_BATCH = 250  # events per warm-up batch (see warm_up)
WARM_UP_MAX = 5000


class GroupLag:
    """Committed lag of a consumer group: high watermark - committed offset, summed over topics.

    After a failed read the client is replaced: one that asked a dead node keeps asking it.
    """

    def __init__(self, settings: StreamsSettings) -> None:
        self.settings = settings
        self.topics = (settings.topics.interactions, settings.by_item_topic)
        self.last_error = ""
        self.consumer = self._consumer()

    def _consumer(self) -> Consumer:
        return Consumer(
            {
                **self.settings.kafka.client_config(),
                "group.id": self.settings.streams.app_id,
                "enable.auto.commit": False,
            }
        )

    def by_topic(self, timeout_s: float = 5.0) -> dict[str, int] | None:
        """Events not committed yet per topic; None while the cluster cannot answer (a failover)."""
        lags = dict.fromkeys(self.topics, 0)
        try:
            for topic in self.topics:
                partitions = [TopicPartition(topic, p) for p in range(self.settings.topics.partitions)]
                for committed in self.consumer.committed(partitions, timeout=timeout_s):
                    if committed.error is not None:
                        raise KafkaException(committed.error)
                    high = self.consumer.get_watermark_offsets(
                        TopicPartition(topic, committed.partition), timeout=timeout_s
                    )[1]
                    lags[topic] += high - max(committed.offset, 0)
        except KafkaException as exc:
            self.last_error = str(exc)
            self.consumer.close()
            self.consumer = self._consumer()
            return None
        return lags

    def lag(self, timeout_s: float = 5.0) -> int | None:
        lags = self.by_topic(timeout_s)
        return None if lags is None else sum(lags.values())

    def close(self) -> None:
        self.consumer.close()


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of the processes, their live descendants and their reaped children."""
    total = 0.0
    for pid in pids:
        try:
            process = psutil.Process(pid)
            for member in [process, *process.children(recursive=True)]:
                times = member.cpu_times()
                total += times.user + times.system + times.children_user + times.children_system
        except psutil.NoSuchProcess:
            continue
    return total


def wait_all_brokers(stack: LocalStack, timeout_s: float = 60.0) -> None:
    """Until the cluster's metadata lists every node: right after ``up`` a node may still answer
    with a view that lacks another (measured: 2 of 3), and ``ensure_topics`` refuses replication 3."""
    admin = kafka_broker.admin_client(stack.bootstrap_servers())
    deadline = time.monotonic() + timeout_s
    while len(admin.list_topics(timeout=5).brokers) < stack.settings.stack.brokers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the cluster's metadata does not list {stack.settings.stack.brokers} nodes")
        time.sleep(0.5)


def stack_pids(stack: LocalStack, kafka: bool) -> list[int]:
    """The pids of the stack's Kafka nodes (``kafka``) or of its Redis servers."""
    names = set(stack.kafka_programs())
    return [
        int(info["pid"])
        for info in stack.status()
        if info["pid"] and (info["name"] in names) == kafka and info["name"].startswith(("kafka", "redis"))
    ]


def streams_settings(base: CommonSettings, state_dir: Path, app_id: str, metrics_port: int) -> StreamsSettings:
    """The worker's settings on ``base``'s cluster and topics; ``STREAMREC_STREAMS__*`` tunes it."""
    tuning = StreamsSettings().streams.model_copy(update={"app_id": app_id, "metrics_port": metrics_port})
    return StreamsSettings(
        **{name: getattr(base, name) for name in CommonSettings.model_fields if name != "paths"},
        paths=PathSettings(state_dir=state_dir),
        features={"project": app_id},
        streams=tuning,
    )


def worker_group(settings: StreamsSettings, count: int, log_dir: Path) -> list[WorkerProcess]:
    """``count`` worker processes of one group, numbered as ``--workers N`` numbers them."""
    return [
        WorkerProcess(
            settings.model_copy(update={"streams": settings.streams.model_copy(update={"worker_index": index})}),
            log_dir / f"worker-{index}.log",
        )
        for index in range(count)
    ]


def first_start(settings: StreamsSettings, events: pd.DataFrame, log_path: Path, timeout_s: float = 120.0) -> None:
    """One worker over ``events`` until they are committed, then stopped cleanly (SIGTERM).

    A worker's first start creates its tables' changelog topics while its consumer subscribes, so
    the subscription can see a changelog without partitions; the next metadata refresh (5 minutes
    later, or at the first broker error) then rebalances the group. The measured workers start
    onto topics that exist, as a deployed worker restarts.
    """
    worker = WorkerProcess(settings, log_path)
    lag = GroupLag(settings)
    try:
        worker.start()
        worker.wait_serving(timeout_s)
        replay(events, ReplaySettings(kafka=settings.kafka, topics=settings.topics), progress=False)
        deadline = time.monotonic() + timeout_s
        while not (lag.lag() == 0 and worker.metric("streams_events_in_total") >= len(events)):
            if not worker.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the first start did not commit {len(events)} events; see {log_path}")
            time.sleep(0.5)
    finally:
        lag.close()
        worker.stop()


@dataclass
class Sample:
    at: float
    lag: int | None
    events_in: float
    worker_cpu: float
    broker_cpu: float
    redis_cpu: float


@dataclass
class LayoutRun:
    layout: str
    produce: ReplayReport
    samples: list[Sample] = field(default_factory=list)
    started: float = 0.0
    warm_up_events: int = 0
    counters: dict[str, float] = field(default_factory=dict)

    def figures(self, count: int) -> dict[str, float]:
        """From just before the backlog to the group's lag 0: every event read, applied, pushed, committed.

        Not a window on events read: a worker reads up to ``streams.max_held_events`` ahead of its
        pushes, so its read rate says little about what it finishes.
        """
        first, end = self.samples[0], self.samples[-1]
        events = count
        seconds = end.at - first.at
        return {
            "events_per_s": events / seconds,
            "worker_cpu_ms_per_1k": 1e6 * (end.worker_cpu - first.worker_cpu) / events,
            "broker_cpu_ms_per_1k": 1e6 * (end.broker_cpu - first.broker_cpu) / events,
            "redis_cpu_ms_per_1k": 1e6 * (end.redis_cpu - first.redis_cpu) / events,
            # the share of the cores the workers and the Kafka nodes used meanwhile
            "worker_cores": (end.worker_cpu - first.worker_cpu) / seconds,
            "broker_cores": (end.broker_cpu - first.broker_cpu) / seconds,
            "drain_s": seconds,
            "produce_events_per_s": self.produce.events_per_s,
        }


def warm_up(group: list[WorkerProcess], settings: StreamsSettings, lag: GroupLag, frame: pd.DataFrame) -> int:
    """Feed the group small batches until every worker has read events and all are committed.

    Every worker is then in the group with its partitions and past its first pushes (Feast
    registry, connections), so the backlog measures the steady state. Returns the events used.
    """
    used = 0
    deadline = time.monotonic() + 180
    while True:
        batch = frame.iloc[used : used + WARM_UP_BATCH]
        if len(batch) < WARM_UP_BATCH or time.monotonic() > deadline:
            raise RuntimeError(f"the workers did not all read and commit within {used} warm-up events")
        replay(batch, ReplaySettings(kafka=settings.kafka, topics=settings.topics), progress=False)
        used += len(batch)
        while not (lag.lag() == 0 and sum(worker.metric("streams_events_in_total") for worker in group) >= used):
            if time.monotonic() > deadline or not all(worker.alive() for worker in group):
                raise RuntimeError(f"warm-up not committed; see {', '.join(str(w.log_path) for w in group)}")
            time.sleep(0.5)
        if all(worker.metric("streams_events_in_total") > 0 for worker in group):
            return used


def run_layout(layout: str, count: int, state_dir: Path, timeout_s: float) -> LayoutRun:
    """One layout on its own stack: warm workers, then a backlog produced at once, sampled until lag 0."""
    brokers, workers = LAYOUTS[layout]
    frame = looped_events(WARM_UP_MAX + count)
    with running_cluster(state_dir / "stack", brokers=brokers, kafka_heap_mb=KAFKA_HEAP_MB) as stack:
        name = layout.replace("_", "")
        wait_all_brokers(stack)
        base = cluster_settings(stack, prefix=name)
        settings = streams_settings(base, state_dir / "worker", f"bench{name}", free_port_block(2))
        prepare(settings)
        # as `streamrec streams worker` does before Faust starts (streams/cli.py): a by-item topic
        # the consumer subscribes to before it exists is ignored until the next metadata refresh
        ensure_topics(settings, extra=[settings.by_item_topic])
        group = worker_group(settings, workers, state_dir)
        return drain_backlog(layout, group, settings, GroupLag(settings), stack, frame, count, timeout_s)


def drain_backlog(
    layout: str,
    group: list[WorkerProcess],
    producer: StreamsSettings,
    lag: GroupLag,
    stack: LocalStack,
    frame: pd.DataFrame,
    count: int,
    timeout_s: float,
) -> LayoutRun:
    """Start and warm up ``group``, produce the backlog (``frame`` after the warm-up events, with
    ``producer``'s Kafka client and topics) and sample until ``lag`` is 0; the workers are stopped
    and ``lag`` closed at the end."""
    broker_pids, redis_pids = stack_pids(stack, kafka=True), stack_pids(stack, kafka=False)
    try:
        for worker in group:
            worker.start()
        for worker in group:
            worker.wait_serving(120)
        warm = warm_up(group, producer, lag, frame.iloc[:WARM_UP_MAX])
        pids = [worker.pid for worker in group]

        def sample() -> Sample:
            read = sum(worker.metric("streams_events_in_total") for worker in group) - warm
            cpu = (cpu_seconds(pids), cpu_seconds(broker_pids), cpu_seconds(redis_pids))
            return Sample(time.monotonic(), lag.lag(), read, *cpu)

        first = sample()
        backlog = frame.iloc[WARM_UP_MAX : WARM_UP_MAX + count]
        produced = replay(backlog, ReplaySettings(kafka=producer.kafka, topics=producer.topics), progress=False)
        if produced.failed or produced.delivered != count:
            raise RuntimeError(f"{layout}: the backlog was not produced: {produced.summary()}")
        print(f"{layout}: backlog {produced.summary()}")
        run = LayoutRun(layout, produced, samples=[first], started=first.at, warm_up_events=warm)
        while True:
            run.samples.append(latest := sample())
            if latest.lag == 0 and latest.events_in >= count:
                break
            dead = [worker.log_path for worker in group if not worker.alive()]
            if dead or time.monotonic() > run.started + timeout_s:
                raise RuntimeError(
                    f"{layout}: lag {latest.lag}, {latest.events_in:.0f} of {count} read after "
                    f"{latest.at - run.started:.0f}s; workers exited: {dead or 'none'}; offset gaps "
                    f"{sum(worker.metric('streams_offset_gaps_total') for worker in group):.0f} (see "
                    f"{', '.join(str(worker.log_path) for worker in group)})"
                )
            time.sleep(SAMPLE_EVERY_S)
        run.counters = {
            name: sum(worker.metric(name) for worker in group)
            for name in (
                "streams_accepted_events_total",
                "streams_duplicate_events_total",
                "streams_late_events_total",
                "streams_offset_gaps_total",
                "streams_dead_letters_total",
            )
        }
    finally:
        lag.close()
        for worker in group:
            worker.stop()
        gc.collect()  # the replays' producers, before their brokers go away
    return run


def sum_accounted(run: LayoutRun) -> float:
    """Events both views accepted or dropped as late: 2 x the backlog when nothing is lost or doubled."""
    return run.counters["streams_accepted_events_total"] + run.counters["streams_late_events_total"]


def per_run_counter(runs: list[LayoutRun], counter: str) -> str:
    return "/".join(f"{run.counters[counter]:,.0f}" for run in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=60_000, help="backlog size (looped MovieLens-100K events)")
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--timeout", type=float, default=300.0, help="max seconds for the workers to drain a backlog")
    parser.add_argument("--name", default="cluster-ingest", help="result file name (bench/results/<name>.json)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per layout; the figures are their median")
    parser.add_argument("--no-write", action="store_true", help="print the figures, write no result file")
    parser.add_argument("--keep-state", action="store_true", help="keep the stacks' and workers' folders (logs)")
    args = parser.parse_args()
    load_at_start = os.getloadavg()
    if args.events < 1000:
        parser.error("--events must be at least 1000: a shorter run is mostly its half-second sampling")

    runs: dict[str, list[LayoutRun]] = {layout: [] for layout in args.layouts}
    with contextlib.ExitStack() as cleanup:
        state = Path(tempfile.mkdtemp(prefix="bench-cluster-ingest-"))
        if args.keep_state:
            print(f"state (logs, samples.json) kept in {state}")
        else:
            cleanup.callback(shutil.rmtree, state, ignore_errors=True)
        for repeat in range(args.repeats):  # layouts alternate, so a slow minute of the machine hits all
            for layout in args.layouts:
                folder = state / f"{layout}-{repeat}"
                run = run_layout(layout, args.events, folder, args.timeout)
                runs[layout].append(run)
                (folder / "samples.json").write_text(
                    json.dumps({"started": run.started, "samples": [asdict(sample) for sample in run.samples]})
                )
    each = {layout: [run.figures(args.events) for run in layout_runs] for layout, layout_runs in runs.items()}
    figures = {
        layout: {name: statistics.median(values[name] for values in rounds) for name in rounds[0]}
        for layout, rounds in each.items()
    }

    metrics: dict[str, float] = {}
    units: dict[str, str] = {}
    shown = {
        "events_per_s": ("events/s", 0),
        "worker_cpu_ms_per_1k": ("CPU ms / 1,000 events", 1),
        "broker_cpu_ms_per_1k": ("CPU ms / 1,000 events", 1),
        "redis_cpu_ms_per_1k": ("CPU ms / 1,000 events", 1),
    }
    for layout, values in figures.items():
        for name, (unit, digits) in shown.items():
            metrics[f"cluster_ingest.{layout}.{name}"] = round(values[name], digits)
            units[f"cluster_ingest.{layout}.{name}"] = unit
    for layout in ("b1_w1", "b3_w1"):
        if layout in figures:
            key = f"cluster_ingest.{layout}.produce_events_per_s"
            metrics[key], units[key] = round(figures[layout]["produce_events_per_s"]), "events/s"
    if "b1_w1" in figures:
        reference = figures["b1_w1"]
        for layout in ("b3_w1", "b1_w2"):
            if layout not in figures:
                continue
            for name in ("events_per_s", "worker_cpu_ms_per_1k"):
                key = f"cluster_ingest.ratio_{layout}_to_b1_w1.{name}"
                metrics[key], units[key] = round(figures[layout][name] / reference[name], 3), ""
        if "b3_w1" in figures:
            key = "cluster_ingest.ratio_b3_to_b1.produce_events_per_s"
            ratio = figures["b3_w1"]["produce_events_per_s"] / reference["produce_events_per_s"]
            metrics[key], units[key] = round(ratio, 3), ""

    load = os.getloadavg()

    def total(layout: str, counter: str) -> float:
        return sum(run.counters[counter] for run in runs[layout])

    def per_run(layout: str, name: str, digits: int = 0) -> str:
        return "/".join(f"{values[name]:,.{digits}f}" for values in each[layout])

    checks = "; ".join(
        f"{layout}: accepted + late (dropped) = 2 views x the events read (warm-up + backlog) in "
        f"{sum(1 for run in layout_runs if sum_accounted(run) == 2 * (run.warm_up_events + args.events))} of "
        f"{len(layout_runs)} runs (warm-up {'/'.join(str(run.warm_up_events) for run in layout_runs)}, late "
        f"{per_run_counter(layout_runs, 'streams_late_events_total')}), redelivered and ignored "
        f"{total(layout, 'streams_duplicate_events_total'):.0f}, offset gaps "
        f"{total(layout, 'streams_offset_gaps_total'):.0f}, dead letters "
        f"{total(layout, 'streams_dead_letters_total'):.0f}; workers {per_run(layout, 'worker_cores', 2)} cores "
        f"and Kafka {per_run(layout, 'broker_cores', 2)} cores meanwhile"
        for layout, layout_runs in runs.items()
    )
    rates = "; ".join(
        f"{layout} {per_run(layout, 'events_per_s')} events/s, worker CPU {per_run(layout, 'worker_cpu_ms_per_1k')} "
        f"ms, produce {per_run(layout, 'produce_events_per_s')}/s"
        for layout in runs
    )
    notes = (
        "The worker(s) started and were warmed up (batches of 250 events until each had read some and all were "
        f"committed); then a backlog of {args.events:,} looped MovieLens-100K events was produced at once "
        "(replay, acks=all, idempotence); events/s and CPU per 1,000 events from just before the backlog to the "
        "group's committed lag 0 (interactions + by-item: every event read, applied, pushed and committed). "
        f"4 partitions; Kafka {KAFKA_HEAP_MB} MiB heap per node; b3 = three KRaft nodes, replication factor 3, "
        "min.insync.replicas 2; w2 = two worker processes in one group (worker_index 0 and 1). Everything "
        f"(Kafka nodes, Redis, workers, the producer, this sampler) shares the machine's {os.cpu_count()} cores, "
        "so two workers cannot show the scaling they would have on cores of their own: the figures of b1_w2 are "
        "the ratio to one worker and the CPU per event (what splitting the partitions costs); what ratio there "
        "is comes from the part of the second core one worker (one Python process, about one core) leaves idle. "
        "b3 pays the replication's CPU on the same cores. Late (dropped): item-side events more than "
        "allowed_lateness (24 h of event time) behind their item's newest; over a backlog the partitions are "
        "read at different paces, so the item side sees events out of order, and such an event lies outside "
        "every window of the item's later states (no feature changes; StreamsTuning). "
        f"Figures: the median of {args.repeats} runs per layout (layouts alternating); each run: {rates}. The "
        f"produce rate is replay's delivered/s over a backlog of about a second. Checks: {checks}. "
        f"Load average (1, 5, 15 min) at the start: {load_at_start[0]:.2f}, {load_at_start[1]:.2f}, "
        f"{load_at_start[2]:.2f}; at the end: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}."
    )
    print(json.dumps(figures, indent=2))
    report(
        args.name,
        metrics,
        units,
        targets={},
        command=f"python -m bench.cluster_ingest --events {args.events} --repeats {args.repeats}",
        notes=notes,
        write=not args.no_write,
    )


if __name__ == "__main__":
    main()
