"""``make demo``: the whole loop on the local stack, from a clean state, with a report at the end.

1. Kafka and Redis (supervisord), topics, the Feast repo set up for the dataset (``--dataset``,
   MovieLens-100K by default: its schema, views and attribute rows).
2. The feature worker; the first part of the dataset (by time) replayed as history; wait
   until the worker has caught up, printing a few users' online features as they change.
3. Bootstrap training through Feast's point-in-time join -> version 1, served as ``stable``.
4. Joiner, API, online trainer and evaluator start; the trainer begins at the end of history.
   Two-stage serving is on (the trainer starts the ranking model at version 1, which serves the
   retrieval order until it learns from the labeled examples) and stable's lists explore their
   last two positions, so the trainer's off-policy gate judges each candidate before its canary.
5. The simulator replays held-out interactions as visits (Recommend, click if the real item was
   shown, produce the interaction); the trainer publishes canaries, the evaluator promotes or
   rolls back.
6. Summary and report (``<state>/report/report.html`` and ``loop.png``).

Every process gets its settings through ``STREAMREC_*`` variables set here once (free ports, a
fresh state folder), so the demo never collides with a stack a user already runs.
"""

from __future__ import annotations

import os
import shutil
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import typer
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

if TYPE_CHECKING:
    from streamrec.ops.report import HealthPanels
    from streamrec.ops.stack.local_stack import LocalStack

from features.watch import ActivityWatch
from streamrec.core.settings import PROJECT_ROOT, CommonSettings, PathSettings
from streamrec.ops.stack.ports import free_port_block, free_ports


@dataclass(frozen=True)
class DemoOptions:
    dataset: str = "ml-100k"  # a preset, a description (.toml) or a log file
    history_fraction: float = 0.5
    # The share of the history the bootstrap model (stable) learns. The online trainer starts
    # there, so its first candidates also know the rest of the history, which stable never saw:
    # the evaluator has a real difference to find within the demo's visits, and the loop's first
    # decision comes in minutes (docs/design/ops.md#demo-bootstrap-share). 1.0: stable knows it all.
    bootstrap_share: float = 0.7
    visits: int = 7200
    rate: float = 30.0
    # Users whose lists include the canary line's picks (team-draft interleaved with stable's): most
    # users see the freshest model, a fifth keep plain stable lists for the guardrails.
    # See docs/design/ops.md#canary-share-08.
    canary_share: float = 0.8
    trainer_interval_s: float = 40.0
    label_window_s: float = 10.0
    state_dir: Path = PROJECT_ROOT / ".state" / "demo"
    keep_running: bool = False
    # ``stack up --secure``: every hop authenticated and encrypted, each process its own identity;
    # the demo's own steps (topics, feature setup, replay, bootstrap, simulator) act as "admin".
    secure: bool = False
    # Two-stage serving (the ranking model orders the retrieved candidates) and exploration on the
    # last positions of stable's lists, whose logged propensities feed the trainer's off-policy gate.
    ranking: bool = True
    exploration: str = "epsilon_greedy"


def demo_environment(options: DemoOptions) -> dict[str, str]:
    kafka, controller, redis_port, model_server, api, prometheus = free_ports(6)
    return {
        "STREAMREC_PATHS__STATE_DIR": str(options.state_dir),
        "STREAMREC_DATASET": options.dataset,
        "STREAMREC_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka}",
        "STREAMREC_STACK__KAFKA_PORT": str(kafka),
        "STREAMREC_STACK__KAFKA_CONTROLLER_PORT": str(controller),
        "STREAMREC_REDIS__PORT": str(redis_port),
        "STREAMREC_MODEL_SERVER__PORT": str(model_server),
        "STREAMREC_API__PORT": str(api),
        "STREAMREC_API__CANARY_SHARE": str(options.canary_share),
        "STREAMREC_SIMULATOR__API_TARGET": f"127.0.0.1:{api}",
        "STREAMREC_SIMULATOR__HOLDOUT_START_FRACTION": str(options.history_fraction),
        # every process's /metrics (scraped by the stack's Prometheus) in one block of free ports
        "STREAMREC_STACK__METRICS_PORT_BASE": str(free_port_block(8)),
        "STREAMREC_STACK__PROMETHEUS_PORT": str(prometheus),
        "STREAMREC_TRAINER__INTERVAL_S": str(options.trainer_interval_s),
        "STREAMREC_JOINER__LABEL_WINDOW_S": str(options.label_window_s),
        # Replayed events keep their own event times (MovieLens' are from 1997-98), so "fresh" must
        # reach back that far; with live traffic this stays at its default (24 h).
        "STREAMREC_FEATURES__MAX_FEATURE_AGE_S": str(40 * 365 * 24 * 3600),
        "STREAMREC_RANKING__ENABLED": "true" if options.ranking else "false",
        "STREAMREC_EXPLORATION__POLICY": options.exploration,
        "STREAMREC_EXPLORATION__EPSILON": "0.2",
        "STREAMREC_EXPLORATION__SLOTS": "2",
        # A demo's stable lists number in the hundreds, not the thousands of a day's traffic.
        "STREAMREC_TRAINER__OPE_GATE__MIN_LISTS": "50",
        **({"STREAMREC_STACK__SECURE": "true"} if options.secure else {}),
    }


def reach_lines(stack: LocalStack) -> list[str]:
    """How to reach what the demo left running: the API (a ``grpcurl`` line with its real address),
    Prometheus, ``streamrec status`` and how to stop it."""
    from streamrec.ops.stack.programs import service_targets

    api = service_targets(stack.stack_environment())["api"]
    if stack.secrets is not None:
        token = stack.secrets.identities["admin"].grpc_token_file
        grpcurl = (
            f'grpcurl -cacert {stack.secrets.ca_file} -rpc-header "authorization: Bearer $(cat {token})" '
            f'-d \'{{"user_id": "1", "k": 5}}\' {api} streamrec.v1.Recommender/Recommend'
        )
    else:
        grpcurl = f'grpcurl -plaintext -d \'{{"user_id": "1", "k": 5}}\' {api} streamrec.v1.Recommender/Recommend'
    return [
        "left running:",
        f"  API:        {grpcurl}",
        f"  Prometheus: {stack.prometheus_url()}  (targets: {stack.prometheus_url()}/targets, "
        f"alerts: {stack.prometheus_url()}/alerts)",
        "  status:     streamrec status",
        "  stop:       streamrec stack down"
        + (
            ""
            if stack.root == PathSettings().state_dir / "demo"
            else f" (with STREAMREC_PATHS__STATE_DIR={stack.root})"
        ),
    ]


def _health_panels(stack: LocalStack, started: float, options: DemoOptions) -> HealthPanels | None:
    """The dashboard's panels over the run, drawn from the stack's Prometheus; None without data."""
    from streamrec.ops.health_panels import draw_panels, fetch_panels, summarize
    from streamrec.ops.report import HealthPanels

    end = time.time()
    panels = fetch_panels(stack.prometheus_url(), started, end)
    if panels is None:
        return None
    png = draw_panels(panels, started, end, options.state_dir / "report" / "health.png")
    return HealthPanels(png, [(panel.spec.title, summarize(panel)) for panel in panels])


def _wait_for_lag(
    settings: object, group: str, topics: list[str], watch: ActivityWatch, timeout_s: float = 300.0
) -> None:
    """Wait for the worker to catch up, printing the watched users' features whenever they change."""
    from streamrec.core.settings import CommonSettings
    from streamrec.kafka.consume import group_lag

    assert isinstance(settings, CommonSettings)  # noqa: S101 -- narrow for mypy
    deadline = time.monotonic() + timeout_s
    with tqdm(desc="feature worker catching up", unit="poll") as bar:
        while time.monotonic() < deadline:
            lag = sum(group_lag(settings, group, topic) for topic in topics)
            bar.set_postfix(lag=lag)
            for line, changed in watch.read():
                if changed:
                    bar.write(f"    {time.strftime('%H:%M:%S')} {line}")
            if lag == 0:
                return
            bar.update()
            time.sleep(1)
    raise TimeoutError(f"the feature worker still lags after {timeout_s:.0f}s; see {settings.paths.state_dir}/logs")


def _wait_for_trainer(url: str, timeout_s: float = 300.0) -> None:
    """Wait until the online trainer has loaded its version (``trainer_current_version`` >= 1):
    visits before that would only feed an interval nobody trains on yet."""
    deadline = time.monotonic() + timeout_s
    with tqdm(desc="online trainer starting", unit="poll") as bar:
        while time.monotonic() < deadline:
            try:
                if gauge_value(scrape_metrics(url), "trainer_current_version") >= 1:
                    return
            except OSError:
                pass  # not listening yet (TensorFlow still importing)
            bar.update()
            time.sleep(1)
    raise TimeoutError(f"the online trainer did not start within {timeout_s:.0f}s; see its log under logs/")


def gauge_value(families: list[Metric], metric: str) -> float:
    """A gauge's value summed over its label sets; 0 if the process has none."""
    return sum(float(sample.value) for family in families for sample in family.samples if sample.name == metric)


def scrape_metrics(url: str) -> list[Metric]:
    """Every metric family a /metrics endpoint exposes (parsed by prometheus_client)."""
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 -- our own loopback endpoint
        return list(text_string_to_metric_families(response.read().decode()))


def histogram_buckets(families: list[Metric], metric: str) -> dict[float, float]:
    """Cumulative buckets of one histogram, summed over its label sets."""
    buckets: dict[float, float] = {}
    for family in families:
        for sample in family.samples:
            if sample.name == f"{metric}_bucket":
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + float(sample.value)
    return buckets


def counter_total(families: list[Metric], metric: str) -> float:
    """A counter (its name with ``_total``) summed over its label sets; 0 if the process has none."""
    return sum(float(sample.value) for family in families for sample in family.samples if sample.name == metric)


def _labeled(settings: CommonSettings) -> pd.DataFrame:
    """The run's labeled examples (for the off-policy table), read back from their topic."""
    from streamrec.core.events import LabeledExample
    from streamrec.kafka.consume import consume_decoded
    from streamrec.ops.report_ope import labeled_frame

    read = consume_decoded(
        settings,
        settings.topics.labeled,
        LabeledExample,
        group_id=f"streamrec-demo-report-{time.time_ns()}",
        idle_timeout_s=5.0,
    )
    return labeled_frame([record.event for record in read if record.event is not None])


def run(options: DemoOptions) -> Path:
    from features.settings import FeaturesSettings
    from features.store import open_store, setup_dataset
    from online_trainer.bootstrap import bootstrap
    from online_trainer.settings import TrainerSettings
    from serving.model_client import ModelServerClient
    from serving.rollout.settings import EvaluatorSettings
    from streamrec.core.settings import PathSettings, load
    from streamrec.datasets.description import load_dataset
    from streamrec.kafka.admin import ensure_topics
    from streamrec.kafka.consume import commit_group_offsets, end_offsets
    from streamrec.ops.replay import replay
    from streamrec.ops.report import LoopRecord, write_report
    from streamrec.ops.report_ope import ope_table
    from streamrec.ops.settings import ReplaySettings, SimulatorSettings, StackSettings
    from streamrec.ops.simulate import held_out, simulate
    from streamrec.ops.stack.local_stack import LocalStack
    from streams.settings import StreamsSettings

    previous = LocalStack(StackSettings(paths=PathSettings(state_dir=options.state_dir)))
    previous.down()
    shutil.rmtree(options.state_dir, ignore_errors=True)
    os.environ.update(demo_environment(options))
    stack_settings = load(StackSettings)
    stack = LocalStack(stack_settings)

    run_started = time.time()
    dataset = load_dataset(options.dataset)
    typer.echo(dataset.summary())
    typer.secho("1/6 Kafka + Redis + Prometheus, topics, feature repo", bold=True)
    stack.up()
    for name in ("prometheus", "probe"):
        stack.start(name)
    # the stack's client settings (on a secure stack: the admin identity's credential files)
    os.environ.update(stack.client_environment())
    ensure_topics(load(StackSettings))
    features = load(FeaturesSettings)
    store = open_store(features)
    setup_dataset(store, dataset.name, dataset.schema, dataset.users, dataset.items)

    try:
        interactions = dataset.interactions
        history_rows = int(len(interactions) * options.history_fraction)
        history = interactions.head(history_rows)
        bootstrap_rows = max(1, int(history_rows * options.bootstrap_share))
        until = history["event_time"].iloc[bootstrap_rows - 1].to_pydatetime()
        typer.secho(
            f"2/6 feature worker; replaying {history_rows:,} history events (up to "
            f"{history['event_time'].iloc[-1]:%Y-%m-%d}; stable learns the first {bootstrap_rows:,})",
            bold=True,
        )
        stack.start("streams")
        replay_settings = load(ReplaySettings)
        report = replay(history.head(bootstrap_rows), replay_settings)
        # where the online trainer starts: the history stable does not know comes first
        trainer_start = end_offsets(replay_settings, replay_settings.topics.interactions)
        if bootstrap_rows < history_rows:
            report = report.plus(replay(history.iloc[bootstrap_rows:], replay_settings))
        typer.echo(f"    {report.summary()}")
        streams = load(StreamsSettings)
        # The most active users of the history: their features move the most while it streams in.
        watched = [str(user) for user in history["user_id"].value_counts().index[:3]]
        typer.echo(f"    features of users {', '.join(watched)} (Feast online store), printed as they change:")
        _wait_for_lag(
            streams,
            streams.streams.app_id,
            [streams.topics.interactions, streams.by_item_topic],
            ActivityWatch(store, watched),
        )

        typer.secho("3/6 model server; bootstrap training through Feast -> version 1 (stable)", bold=True)
        stack.start("model-server")
        trainer_settings = load(TrainerSettings)
        with ModelServerClient.from_settings(trainer_settings) as client:
            result = bootstrap(trainer_settings, interactions, until, publisher=client, schema=dataset.schema)
            if result.version is None:
                raise RuntimeError(f"bootstrap model rejected by the gate: {result.outcome.gate.summary()}")
            client.publish_stable(result.version)
        typer.echo(f"    version {result.version}: {result.outcome.gate.summary()}")
        if trainer_settings.ranking.enabled:
            from online_trainer.ranker_line import RankerLine, ranker_publisher

            with ranker_publisher(trainer_settings) as ranking_client:
                RankerLine(trainer_settings, dataset.schema, ranking_client).resume()
            typer.echo("    ranking model version 1 (the retrieval order until it learns from labeled examples)")

        typer.secho(
            f"4/6 joiner, API, online trainer (from history event {bootstrap_rows:,}, where stable's knowledge "
            "ends), evaluator",
            bold=True,
        )
        commit_group_offsets(
            trainer_settings, trainer_settings.trainer.group_id, trainer_start, trainer_settings.topics.interactions
        )
        for name in ("joiner", "api", "trainer", "evaluator", "skew"):
            stack.start(name)
        metrics_targets = stack.metrics_targets()
        _wait_for_trainer(f"http://{metrics_targets['trainer']}/metrics")

        typer.secho(f"5/6 simulating {options.visits:,} held-out visits at {options.rate:g}/s", bold=True)
        metrics_url = f"http://{metrics_targets['streams']}/metrics"
        # Freshness of live traffic only: the history replay above ran far faster than the worker.
        freshness_before = histogram_buckets(scrape_metrics(metrics_url), "streams_freshness_seconds")
        simulator = load(SimulatorSettings)
        visits = held_out(interactions, options.history_fraction)
        outcome = simulate(visits, simulator, rate=options.rate, limit=options.visits)
        typer.echo(f"    {outcome.summary()}")
        time.sleep(options.label_window_s + 5)  # let the last label windows close

        typer.secho("6/6 report", bold=True)
        evaluator = load(EvaluatorSettings)
        record = LoopRecord.load(simulator.simulator_dir, evaluator.evaluator_dir, trainer_settings.model_base_path)
        worker_metrics = scrape_metrics(metrics_url)
        freshness_after = histogram_buckets(worker_metrics, "streams_freshness_seconds")
        record.freshness_s = {
            bound: count - freshness_before.get(bound, 0.0) for bound, count in freshness_after.items()
        }
        record.counters["history_events"] = float(report.delivered)
        record.counters["simulated_visits"] = float(outcome.requests)
        # History and live traffic together: every feature row the worker pushed to Feast.
        record.counters["features_written"] = counter_total(worker_metrics, "streams_pushed_rows_total")
        record.counters["dead_letters"] = counter_total(worker_metrics, "streams_dead_letters_total")
        record.ope = ope_table(
            trainer_settings.model_base_path, _labeled(trainer_settings), trainer_settings.exploration.slots
        )
        page = write_report(record, options.state_dir / "report", _health_panels(stack, run_started, options))
        if options.keep_running:
            for line in reach_lines(stack):
                typer.echo(line)
        return page
    finally:
        if not options.keep_running:
            stack.down()
