"""``streamrec``: one entry point for every project process.

Each command reads its typed settings (``streamrec.core.settings``); flags override them for one
run. ``streamrec settings`` lists every ``STREAMREC_*`` variable a process understands.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from tqdm import tqdm

from streamrec.core.errors import StreamrecError
from streamrec.core.settings import CommonSettings, known_env_names, load
from streamrec.ops.dataset_options import ColumnsOption, DatasetOption, load_announced
from streamrec.ops.settings import ReplaySettings, StackSettings, StackTuning, TailSettings

if TYPE_CHECKING:
    from streamrec.ops.stack.local_stack import LocalStack

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__, pretty_exceptions_show_locals=False)
stack_app = typer.Typer(no_args_is_help=True, help="The local stack (Kafka, Redis) under supervisord.")
topics_app = typer.Typer(no_args_is_help=True, help="Project topics.")
app.add_typer(stack_app, name="stack")
app.add_typer(topics_app, name="topics")
dataset_app = typer.Typer(no_args_is_help=True, help="Datasets: check a description, write an example one.")
app.add_typer(dataset_app, name="dataset")


@app.command("settings")
def settings_command() -> None:
    """List every STREAMREC_* environment variable that some process reads."""
    for name in sorted(known_env_names()):
        typer.echo(name)


@app.command()
def setup() -> None:
    """Fetch the Kafka jars and check that Java, Redis and MovieLens-100K are available."""
    import shutil

    from streamrec.datasets.movielens import ml100k_dir
    from streamrec.ops.stack import kafka_broker

    settings = load(StackSettings)
    libs = kafka_broker.fetch_jars(settings.paths.kafka_libs_dir)
    typer.echo(f"kafka jars:     {libs}")
    for binary in (settings.stack.java_bin, settings.stack.redis_server_bin):
        found = shutil.which(binary)
        if found is None:
            raise StreamrecError(f"`{binary}` is not on PATH; run `make setup` (it installs it with apt-get)")
        typer.echo(f"{binary + ':':15} {found}")
    typer.echo(f"ml-100k:        {ml100k_dir()}")


def _running_stack() -> LocalStack:
    """The running stack as it was started (its ports, brokers, security), in the settings' state
    folder or, from the default one, the stack ``streamrec demo --keep-running`` left."""
    from streamrec.ops.stack.local_stack import LocalStack

    return LocalStack.find(load(StackSettings))


@stack_app.command("up")
def stack_up(
    services: Annotated[
        str | None,
        typer.Option(
            "--with",
            help="processes to start too, comma-separated (e.g. prometheus,api), or 'all'; "
            "prometheus also starts the probe (consumer lag, Kafka and Redis reachability)",
        ),
    ] = None,
    brokers: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=5,
            help="Kafka nodes; 3 or more replicate topics 3 times with min.insync.replicas 2 "
            "(env STREAMREC_STACK__BROKERS, default 1).",
        ),
    ] = None,
    secure: Annotated[
        bool,
        typer.Option(
            "--secure",
            help="a local CA and one identity per service: Kafka SASL_SSL with ACLs, Redis TLS with ACL "
            "users, gRPC TLS (env STREAMREC_STACK__SECURE). `eval $(streamrec stack env)` gives a shell "
            "the admin identity.",
        ),
    ] = False,
) -> None:
    """Start Kafka and Redis (and, with --with, project processes), wait until they answer,
    and create the project topics (replicated across the nodes with --brokers 3)."""
    from streamrec.kafka.admin import ensure_topics
    from streamrec.ops.stack.local_stack import LocalStack
    from streamrec.ops.stack.programs import STACK_SERVICES

    settings = load(StackSettings)
    if brokers is not None or secure:
        chosen = {"brokers": brokers or settings.stack.brokers, "secure": secure or settings.stack.secure}
        tuning = StackTuning(**{**settings.stack.model_dump(), **chosen})
        settings = settings.model_copy(update={"stack": tuning})
    stack = LocalStack(settings)
    typer.echo(f"starting the stack in {settings.paths.state_dir} ...")
    stack.up()
    client = stack.client_settings()
    created = ensure_topics(client)
    topics = client.topics
    typer.echo(
        f"topics created (replication factor {topics.replication_factor}, min.insync.replicas "
        f"{topics.min_insync_replicas}): {', '.join(created) if created else 'none (all existed)'}"
    )
    names = list(STACK_SERVICES) if services == "all" else [n for n in (services or "").split(",") if n]
    if "prometheus" in names and "probe" not in names:
        names.insert(names.index("prometheus") + 1, "probe")
    for name in names:
        if name not in STACK_SERVICES:
            raise StreamrecError(f"unknown service {name!r}; choose from {', '.join(STACK_SERVICES)}")
        typer.echo(f"starting {name} ...")
        stack.start(name)
    _print_status(stack)
    if "prometheus" in names:
        typer.echo(f"Prometheus: {stack.prometheus_url()}  (alerts: {stack.prometheus_url()}/alerts)")


@stack_app.command("start")
def stack_start(name: Annotated[str, typer.Argument(help="a project process, e.g. api")]) -> None:
    """Start one program of the running stack (a project process, or a stopped or killed one) and
    wait until it is ready."""
    _running_stack().start(name)
    typer.echo(f"{name} started")


@stack_app.command("stop")
def stack_stop(name: Annotated[str, typer.Argument(help="a process of the stack")]) -> None:
    """Stop one process of the running stack (SIGTERM)."""
    _running_stack().stop(name)
    typer.echo(f"{name} stopped")


def _print_status(stack: LocalStack) -> None:
    health = stack.health()
    for info in stack.status():
        state = "-" if info["statename"] == "STOPPED" else "healthy" if health.get(info["name"]) else "NOT ready"
        typer.echo(f"{info['name']:10} {info['statename']:9} {state:14} {info['description']}")
    typer.echo(f"logs: {stack.log_dir}  (streamrec stack logs NAME)")


@stack_app.command("status")
def stack_status() -> None:
    """Process state and health of each stack service."""
    stack = _running_stack()
    if not stack.is_running():
        typer.echo("the stack is not running (streamrec stack up)")
        raise typer.Exit(1)
    _print_status(stack)


@stack_app.command("logs")
def stack_logs(
    name: Annotated[str, typer.Argument(help="program name, e.g. kafka or redis")],
    length: Annotated[int, typer.Option(help="bytes from the end of the log")] = 8000,
) -> None:
    """The end of one service's log."""
    typer.echo(_running_stack().logs(name, length))


@stack_app.command("down")
def stack_down() -> None:
    """Stop every service cleanly (SIGTERM) and the process runner."""
    _running_stack().down()
    typer.echo("stack stopped")


@stack_app.command("env")
def stack_env() -> None:
    """Shell exports that point a process run by hand at the running stack (its brokers, topic
    replication, Redis and state folder): eval "$(streamrec stack env)"."""
    import shlex

    stack = _running_stack()
    if not stack.is_running():
        typer.echo("the stack is not running (streamrec stack up)", err=True)
        raise typer.Exit(1)
    for key, value in sorted(stack.client_environment().items()):
        typer.echo(f"export {key}={shlex.quote(value)}")


@stack_app.command("renew-certificates")
def stack_renew_certificates(
    restart: Annotated[bool, typer.Option(help="restart each running program, one at a time, to load them")] = True,
) -> None:
    """Issue every service of the running secure stack a new certificate from the same CA (peers
    keep trusting it), then restart the running programs one by one so each loads its own."""
    from streamrec.ops.stack.identities import StackSecrets

    stack = _running_stack()
    if not stack.settings.stack.secure:
        raise StreamrecError("the stack here is not secure (streamrec stack up --secure); it has no certificates")
    StackSecrets.ensure(stack.secrets_dir, renew=True)
    typer.echo(f"new certificates in {stack.secrets_dir}")
    if not restart:
        return
    for info in stack.status():
        if info["statename"] == "RUNNING":
            typer.echo(f"restarting {info['name']} ...")
            stack.stop(info["name"])
            stack.start(info["name"])
    _print_status(stack)


@stack_app.command("compose-secrets")
def stack_compose_secrets(
    directory: Annotated[Path, typer.Argument(help="where to write them (created 0700); then SECRETS_DIR=<it>")],
    renew: Annotated[bool, typer.Option(help="issue new certificates (passwords are kept)")] = False,
) -> None:
    """The secret files infra/docker-compose.yml reads: every identity's credentials (0600), the
    Redis ACL file (passwords only as hashes) and a random Grafana admin password. Kept when they
    exist, so running it again changes nothing."""
    import secrets

    from streamrec.ops.stack.certs import write_private
    from streamrec.ops.stack.identities import StackSecrets
    from streamrec.ops.stack.redis_server import write_acl_file

    stack_secrets = StackSecrets.ensure(directory, renew=renew)
    acl = write_acl_file(stack_secrets)
    grafana = directory / "grafana-admin-password"
    if not grafana.is_file():
        write_private(grafana, (secrets.token_urlsafe(24) + "\n").encode())
    typer.echo(f"wrote the identities, {acl.name} and {grafana.name} to {directory}")
    typer.echo(f"export SECRETS_DIR={directory.resolve()}  # then: docker-compose -f infra/docker-compose.yml up -d")


@topics_app.command("create")
def topics_create() -> None:
    """Create the project topics (partitions and retention from settings) if missing."""
    from streamrec.kafka.admin import ensure_topics

    created = ensure_topics(load(CommonSettings))
    typer.echo(f"created: {', '.join(created) if created else 'none (all existed)'}")


@dataset_app.command("show")
def dataset_show(dataset: DatasetOption = None, columns: ColumnsOption = None) -> None:
    """Load and validate a dataset and print its summary (rows, users, items, time range, kinds, attributes)."""
    load_announced(dataset or load(CommonSettings).dataset, columns)


@dataset_app.command("generate-shop")
def dataset_generate_shop(
    folder: Annotated[Path, typer.Argument(help="folder for events.csv, items.csv and shop.toml")],
    events: Annotated[int, typer.Option(help="events in the log")] = 60_000,
    items: Annotated[int, typer.Option(help="items in the catalog")] = 3_000,
    users: Annotated[int, typer.Option(help="visitors")] = 2_000,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
) -> None:
    """Write a synthetic shop (UUID ids, ms timestamps, view/addtocart/transaction, an item file) and
    its description: an example of describing your own log."""
    from streamrec.datasets.shop import ShopShape, write_shop

    path = write_shop(folder, ShopShape(n_events=events, n_items=items, n_users=users, seed=seed))
    typer.echo(f"wrote {path}; try `streamrec dataset show --dataset {path}`")


@app.command("replay")
def replay_command(
    dataset: DatasetOption = None,
    rate: Annotated[float | None, typer.Option(help="events per second (evenly spaced)")] = None,
    speedup: Annotated[float | None, typer.Option(help="event-time speed-up factor")] = None,
    limit: Annotated[int | None, typer.Option(help="replay only the first N events")] = None,
    columns: ColumnsOption = None,
) -> None:
    """Produce a dataset's interactions to Kafka in event-time order (acks=all, idempotent)."""
    from streamrec.ops.replay import replay

    settings = load(ReplaySettings)
    frame = load_announced(dataset or settings.dataset, columns).interactions
    report = replay(frame, settings, rate=rate, speedup=speedup, limit=limit)
    typer.echo(report.summary())
    if report.failed:
        raise typer.Exit(1)


@app.command("tail")
def tail_command(
    max_records: Annotated[int | None, typer.Option(help="stop after N records")] = None,
    idle_timeout: Annotated[float | None, typer.Option(help="stop after this many idle seconds")] = None,
    from_beginning: Annotated[bool, typer.Option(help="read the topic from its start")] = True,
) -> None:
    """Consume the interactions topic, validate every record and show a live count."""
    settings = load(TailSettings)
    counts = count_interactions(
        settings, max_records=max_records, idle_timeout_s=idle_timeout, from_beginning=from_beginning
    )
    invalid = sum(counts.values()) - counts["valid"]
    typer.echo(f"valid {counts['valid']:,}, invalid {invalid:,} {dict(counts)}")


def count_interactions(
    settings: TailSettings,
    *,
    max_records: int | None,
    idle_timeout_s: float | None,
    from_beginning: bool,
) -> Counter[str]:
    from streamrec.core.events import Interaction
    from streamrec.kafka.consume import consume_decoded

    counts: Counter[str] = Counter()
    topic = settings.topics.interactions
    with tqdm(total=max_records, unit="ev", desc=f"consumed <- {topic}") as bar:
        for record in consume_decoded(
            settings,
            topic,
            Interaction,
            group_id=settings.group_id,
            from_beginning=from_beginning,
            max_records=max_records,
            idle_timeout_s=idle_timeout_s,
        ):
            if record.error is None:
                counts["valid"] += 1
            else:
                counts[record.error.reason] += 1
                tqdm.write(f"invalid record at {record.topic}[{record.partition}]@{record.offset}: {record.error}")
            bar.update(1)
    return counts


@app.command("demo")
def demo_command(
    dataset: DatasetOption = None,
    visits: Annotated[int, typer.Option(help="held-out visits to simulate (more = longer, clearer A/B)")] = 7200,
    rate: Annotated[float, typer.Option(help="visits per second")] = 30.0,
    history_fraction: Annotated[float, typer.Option(help="share of the dataset (by time) used as history")] = 0.5,
    bootstrap_share: Annotated[
        float,
        typer.Option(
            help="share of the history the bootstrap (stable) model learns; the online trainer starts there",
            min=0.01,
            max=1.0,
        ),
    ] = 0.7,
    canary_share: Annotated[float, typer.Option(help="share of users in the canary arm")] = 0.8,
    trainer_interval: Annotated[float, typer.Option(help="seconds between trainer candidates")] = 40.0,
    keep_running: Annotated[bool, typer.Option(help="leave the stack up at the end")] = False,
    secure: Annotated[
        bool, typer.Option("--secure", help="run it on a secure stack (stack up --secure: TLS, identities, ACLs)")
    ] = False,
    ranking: Annotated[
        bool, typer.Option(help="two-stage serving: the ranking model orders the retrieved candidates")
    ] = True,
    exploration: Annotated[
        str, typer.Option(help="exploration policy of the served lists: none, epsilon_greedy or softmax")
    ] = "epsilon_greedy",
) -> None:
    """The whole loop from a clean state: stack, features, bootstrap model, API, trainer,
    evaluator, simulated visits; then a summary and a report (HTML + PNG)."""
    import json
    from typing import get_args

    from serving.rollout.decision_log import applied_decisions
    from streamrec.core.exploration import ExplorationPolicy
    from streamrec.ops.demo import DemoOptions, run

    if exploration not in get_args(ExplorationPolicy):
        raise typer.BadParameter(f"{exploration!r}: use one of {', '.join(get_args(ExplorationPolicy))}")
    page = run(
        DemoOptions(
            dataset=dataset or load(CommonSettings).dataset,
            visits=visits,
            rate=rate,
            history_fraction=history_fraction,
            bootstrap_share=bootstrap_share,
            canary_share=canary_share,
            trainer_interval_s=trainer_interval,
            keep_running=keep_running,
            secure=secure,
            ranking=ranking,
            exploration=exploration,
        )
    )
    typer.secho("summary", bold=True)
    figures = json.loads((page.parent / "summary.json").read_text())
    width = max(map(len, figures), default=0)
    for key, value in figures.items():
        typer.echo(f"  {key:{width}} {value}")
    decisions = applied_decisions(page.parent.parent / "evaluator" / "decisions.jsonl")
    typer.secho("decisions", bold=True)
    for decision in decisions:
        typer.echo(
            f"  {decision['time']}  {decision['action']} of version {decision['canary_version']} "
            f"(stable {decision['stable_version']}): {decision['reason']}"
        )
    if not decisions:
        typer.echo("  none: the evaluator's evidence did not reach its bound within these visits")
    typer.echo(f"report: {page}")


def _mount_components() -> None:
    """Commands that live beside their components; each module imports heavy libraries lazily."""
    from features.cli import app as features_app
    from online_trainer.cli import train_command, trainer_command
    from online_trainer.cli_lite import export_lite_command
    from online_trainer.cli_tune import tune_command
    from serving.api.cli import app as api_app
    from serving.model_server.cli import model_server_command
    from streamrec.ops import cli_loop, cli_observe, cli_status
    from streams.cli import app as streams_app

    app.add_typer(features_app, name="features", help="The Feast feature repo: setup, show, compact, feast CLI.")
    app.add_typer(streams_app, name="streams", help="The Faust feature worker and a live feature view.")
    app.add_typer(api_app, name="api", help="The gRPC recommendation API.")
    app.command("model-server")(model_server_command)
    app.command("train")(train_command)
    app.command("trainer")(trainer_command)
    app.command("export-lite")(export_lite_command)
    app.command("tune")(tune_command)
    app.command("joiner")(cli_loop.joiner)
    app.command("evaluator")(cli_loop.evaluator)
    app.command("simulate")(cli_loop.simulate)
    app.command("status")(cli_status.status_command)
    app.command("dashboards")(cli_status.dashboards)
    app.command("skew-check")(cli_observe.skew_check)
    stack_app.command("probe")(cli_status.stack_probe)


_mount_components()


def main() -> None:
    """Entry point: a StreamrecError is shown as one line naming the fix, not a traceback."""
    try:
        app()
    except StreamrecError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
