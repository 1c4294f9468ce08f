"""``streamrec streams``: the Faust feature worker and a live view of what it writes.

* ``worker`` runs the worker (the same as ``faust -A streams.app worker -l info``), configured by
  ``STREAMREC_*`` variables (``streamrec settings`` lists them; ``STREAMREC_STREAMS__*`` are its
  own: app id, lateness, batch size and wait, metrics port).
* ``watch USER_ID...`` prints those users' online ``user_activity`` features every interval,
  read through Feast exactly as serving reads them: run it beside a replay to see them move.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated

import typer

from features.watch import ActivityWatch
from streamrec.core.settings import load
from streams.settings import StreamsSettings

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__, pretty_exceptions_show_locals=False)


@app.command()
def worker(
    loglevel: Annotated[
        str | None, typer.Option("--loglevel", "-l", help="Default: STREAMREC_STREAMS__LOG_LEVEL.")
    ] = None,
    workers: Annotated[
        int, typer.Option(min=1, help="Worker processes on this host; the group splits the partitions across them.")
    ] = 1,
) -> None:
    """Consume interactions, keep windowed state, push features to Feast until stopped (Ctrl-C)."""
    import mode.loop

    settings = load(StreamsSettings)
    if workers > 1:
        from streams.worker_group import run_group, streamrec_command

        level = loglevel or settings.streams.log_level
        run_group("streams-worker", streamrec_command("streams", "worker", "-l", level), "streams", workers)
    # Before the app exists: the policy decides the loop the Faust worker creates.
    mode.loop.use("aio" if settings.streams.event_loop == "asyncio" else settings.streams.event_loop)

    import faust

    from streamrec.kafka.admin import ensure_topics
    from streams.app import main_worker

    # The by-item repartition topic must exist before the consumer subscribes: Faust declares its
    # internal topics while the consumer starts, and a subscription made before the topic is in
    # the broker's metadata ignores it ("Ignoring missing topic") until the next rebalance, so
    # the item side would never see its first bundles (a lag stuck at their count).
    ensure_topics(settings, extra=[settings.by_item_topic])

    built = main_worker()
    level = loglevel or built.settings.streams.log_level
    faust.Worker(built.app, loglevel=level).execute_from_commandline()


@app.command()
def watch(
    user_ids: Annotated[list[str], typer.Argument(help="Users to show.")],
    interval: Annotated[float, typer.Option(help="Seconds between reads.")] = 1.0,
    iterations: Annotated[int, typer.Option(help="Reads before exiting; 0 = until Ctrl-C.")] = 0,
) -> None:
    """Print the users' online activity features (Feast get_online_features) as they change."""
    from features.store import open_store

    settings = load(StreamsSettings)
    watcher = ActivityWatch(open_store(settings), list(user_ids))
    done = 0
    while iterations == 0 or done < iterations:
        stamp = datetime.now(UTC).strftime("%H:%M:%S")
        for line, changed in watcher.read():
            typer.echo(f"{stamp} {'*' if changed else ' '} {line}")
        done += 1
        if iterations == 0 or done < iterations:
            time.sleep(interval)
