"""``streamrec features ...``: set up the feature store and look into it.

Every command reads ``FeaturesSettings`` (``STREAMREC_*`` variables; ``streamrec settings``
lists them), so it works on whatever Redis and data dir the rest of the stack uses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, cast

import typer

from features.errors import FeaturesError
from features.settings import FeaturesSettings
from streamrec.core import contracts
from streamrec.core.settings import load

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__, pretty_exceptions_show_locals=False)


def _redis_down(settings: FeaturesSettings, exc: Exception) -> FeaturesError:
    return FeaturesError(
        f"Redis at {settings.redis.host}:{settings.redis.port} does not answer ({exc}); "
        "start the stack (`streamrec stack up`) or fix STREAMREC_REDIS__HOST/PORT (a secure stack speaks "
        'TLS only: `eval "$(streamrec stack env)"` sets STREAMREC_REDIS__TLS and the credentials).'
    )


def _redis_refused(settings: FeaturesSettings, exc: Exception) -> FeaturesError:
    user = settings.redis.username or "default"
    return FeaturesError(
        f"Redis at {settings.redis.host}:{settings.redis.port} refused user {user!r} ({exc}); set "
        "STREAMREC_REDIS__USERNAME and STREAMREC_REDIS__PASSWORD_FILE to an identity that may do this "
        '(`eval "$(streamrec stack env)"` gives the operator\'s, admin).'
    )


@contextmanager
def _redis_errors(settings: FeaturesSettings) -> Iterator[None]:
    """Check Redis once, without retries (Feast's client retries for ~10 s), and turn a
    connection error into one line naming the fix.

    The check talks to the configured node alone, in both modes: it must answer, run in the mode
    ``redis.cluster`` says (a plain client on a cluster node would meet MOVED replies, a cluster
    client on a plain server fails), and, for a cluster, see the cluster whole.
    """
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    redis_settings = settings.redis
    client = redis.Redis(
        host=redis_settings.host,
        port=redis_settings.port,
        db=redis_settings.db,
        socket_connect_timeout=5,
        retry=Retry(NoBackoff(), 0),
        **redis_settings.client_options(),
    )
    try:
        # redis-py's sync client returns parsed replies; its stubs also allow the async client's
        cluster_enabled = bool(int(cast(dict[str, Any], client.info("cluster"))["cluster_enabled"]))
        cluster_state = cast(dict[str, Any], client.cluster("INFO"))["cluster_state"] if cluster_enabled else None
    except (redis.exceptions.AuthenticationError, redis.exceptions.NoPermissionError) as exc:
        raise _redis_refused(settings, exc) from exc
    except redis.exceptions.ConnectionError as exc:
        raise _redis_down(settings, exc) from exc
    finally:
        client.close()
    where = f"Redis at {redis_settings.host}:{redis_settings.port}"
    if cluster_enabled != redis_settings.cluster:
        raise FeaturesError(
            f"{where} is {'a node of a Redis Cluster' if cluster_enabled else 'not a cluster node'}; "
            f"set STREAMREC_REDIS__CLUSTER={str(cluster_enabled).lower()} to match it."
        )
    if cluster_state not in (None, "ok"):
        raise FeaturesError(
            f"{where} reports cluster_state:{cluster_state} (a node is down or the slots are not all "
            "served); see `streamrec stack status` and the nodes' logs."
        )
    try:
        yield
    except (redis.exceptions.AuthenticationError, redis.exceptions.NoPermissionError) as exc:
        raise _redis_refused(settings, exc) from exc
    except (redis.exceptions.ConnectionError, redis.exceptions.ClusterDownError) as exc:
        raise _redis_down(settings, exc) from exc


@app.command()
def setup(
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset",
            "-d",
            help="PRESET (ml-100k, synthetic[:options]) or PATH (a .toml description or a log file); "
            "default: STREAMREC_DATASET, else ml-100k",
            show_default=False,
        ),
    ] = None,
    columns: Annotated[
        str | None,
        typer.Option(help="a bare log file's column mapping, e.g. user=who,item=what,timestamp=ts"),
    ] = None,
) -> None:
    """Set the feature store up for a dataset: its attribute schema and profile files, every Feast
    object generated from the schema, and the profiles in Redis.

    Idempotent for one dataset. Switching to another dataset clears every online row and push-log
    row of the previous one first (stop the stream workers meanwhile), so its ids never keep
    another dataset's attributes or activity.
    """
    from features import store as feature_store
    from streamrec.datasets.description import load_dataset

    settings = load(FeaturesSettings)
    loaded = load_dataset(dataset or settings.dataset, columns=columns)
    typer.echo(loaded.summary())
    store = feature_store.open_store(settings)
    with _redis_errors(settings):
        report = feature_store.setup_dataset(store, loaded.name, loaded.schema, loaded.users, loaded.items)
    if report.switched:
        typer.echo("another dataset (or none) was set up before: cleared its online rows and push logs")
    typer.echo(f"profile rows: {report.profile_rows or 'none (no attributes declared)'}")
    typer.echo(f"{report.objects} objects registered")
    typer.echo(f"registry: {settings.registry_path}\ndata:     {settings.data_dir}")


def _show(service_name: str, entity_id: str) -> None:
    """Every feature the service holds (the dataset's declared attributes and the stream features)."""
    from features import profiles
    from features import store as feature_store

    settings = load(FeaturesSettings)
    store = feature_store.open_store(settings)
    with _redis_errors(settings):
        row = feature_store.read_online(store, service_name, [entity_id], include_event_timestamps=True).iloc[0]
    now = datetime.now(UTC).timestamp()
    stamp = profiles.read_stamp(settings.data_dir)
    typer.echo(f"{'dataset':>15}: {stamp.name if stamp else '(none set up: run `streamrec features setup`)'}")
    for name, value in row.items():
        name = str(name)
        if name.endswith("__ts"):
            continue
        written_s = row.get(f"{name}__ts")
        age = ""
        if written_s and value is not None:
            written = datetime.fromtimestamp(int(written_s), UTC)
            age = f"  (event time {written:%Y-%m-%d %H:%M:%S}Z, {now - int(written_s):,.0f} s ago)"
        typer.echo(f"{name:>15}: {value}{age}")


@app.command()
def show(user_id: Annotated[str, typer.Argument(help="a user id, e.g. 42")]) -> None:
    """Print a user's online features, read through the recommender_user_v1 feature service."""
    _show(contracts.USER_FEATURE_SERVICE, user_id)


@app.command("show-item")
def show_item(item_id: Annotated[str, typer.Argument(help="an item id, e.g. 50")]) -> None:
    """Print an item's online features, read through the recommender_item_v1 feature service."""
    _show(contracts.ITEM_FEATURE_SERVICE, item_id)


@app.command()
def compact() -> None:
    """Merge each stream view's offline push log into one file (reads open every file)."""
    from features import push_log, views
    from streamrec.core.attributes import read_schema

    settings = load(FeaturesSettings)
    for view in views.stream_views(read_schema(settings.data_dir)):
        typer.echo(f"{view.view_name}: merged {push_log.compact(settings.data_dir, view)} files")


def render_feature_store_yaml(settings: FeaturesSettings) -> str:
    """``feature_store.yaml`` with every value from settings (for the Feast CLI)."""
    from features import store as feature_store

    # JSON strings are YAML double-quoted scalars: a password with a quote or colon stays one value
    online = feature_store.online_store_config(settings)
    online_store = "".join(f"  {key}: {json.dumps(value)}\n" for key, value in online.items())
    return (
        f"project: {settings.features.project}\n"
        "provider: local\n"
        f"registry:\n  registry_type: file\n  path: {settings.registry_path.resolve()}\n"
        f"online_store:\n{online_store}"
        "offline_store:\n  type: file\n"
        f"entity_key_serialization_version: {feature_store.ENTITY_KEY_SERIALIZATION_VERSION}\n"
    )


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def feast(ctx: typer.Context) -> None:
    """Run the Feast CLI on this repo with a feature_store.yaml rendered from settings.

    Example: `streamrec features feast -- feature-views list`.
    """
    settings = load(FeaturesSettings)
    feast_bin = shutil.which("feast", path=str(Path(sys.executable).parent)) or shutil.which("feast")
    if feast_bin is None:
        raise FeaturesError("The `feast` command is not installed in this environment; run `make setup`.")
    settings.registry_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="streamrec-feast-") as tmp:
        config = Path(tmp) / "feature_store.yaml"
        config.touch(mode=0o600)  # holds the Redis password while feast runs; the folder is 0700 too
        config.write_text(render_feature_store_yaml(settings))
        command = [feast_bin, "-c", str(settings.features.repo_dir), "-f", str(config), *ctx.args]
        completed = subprocess.run(command, check=False, env=os.environ.copy())  # noqa: S603  # our own feast binary
    raise typer.Exit(completed.returncode)
