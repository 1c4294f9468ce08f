"""Exit a Faust worker whose producer or consumer has crashed, or whose producer has stalled, so
its supervisor restarts it.

Why: when a send fails for good (e.g. a message over Kafka's 1 MiB limit), Faust logs ``Crashed``
for the producer (or its buffer) and may never exit, or may hang while stopping, leaving a
process that is up and does nothing. The idempotent producer never gives up on a record, and
after a broker restart it was seen holding a batch it never sent again: every push waited for
its changelog records and every offset commit for the producer's flush. An exit lets the
supervisor restart the worker. Nothing is lost: offsets are committed only after an event is
handled, and the tables come back from their changelog; events after the last commit are
handled again (at least once).

Why a thread and not an app timer: a timer is a task of the app, stopped when the app starts
stopping, so a stuck stop silences it; the thread runs outside the event loop. It gives Faust
``grace_s`` to exit on its own first (its own exit logs the whole shutdown).
See docs/design/streams.md#watchdog.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import faust

log = logging.getLogger(__name__)

EXIT_CODE = 70  # EX_SOFTWARE; supervisord restarts on any code but 0 (``autorestart = unexpected``)


def crashed_services(app: faust.App) -> list[str]:
    """Names of the app's producer, its buffer and consumer that have crashed, with the reason."""
    producer = app.producer
    services = {"producer": producer, "producer buffer": getattr(producer, "buffer", None), "consumer": app.consumer}
    return [
        f"{name}: {service.crash_reason!r}"
        for name, service in services.items()
        if service is not None and service.crashed
    ]


def stalled_sends(app: faust.App, stall_s: float, now: float) -> list[str]:
    """The producer, when the oldest record it holds unconfirmed (queued or sent) is older than
    ``stall_s`` at ``now`` (``time.monotonic``, the clock of aiokafka's batches)."""
    accumulator = getattr(getattr(app.producer, "_producer", None), "_message_accumulator", None)
    if accumulator is None:
        return []
    pending, queued = getattr(accumulator, "_pending_batches", ()), getattr(accumulator, "_batches", {})
    try:  # read from outside the event loop: a set or deque changed while read is read next time
        batches = [*pending, *(batch for queue in list(queued.values()) for batch in queue)]
    except RuntimeError:
        return []
    if not batches:
        return []
    age_s = now - min(getattr(batch, "_ctime", now) for batch in batches)
    if age_s < stall_s:
        return []
    return [f"producer: {len(batches)} batches unconfirmed, the oldest for {age_s:.0f}s (stall limit {stall_s:.0f}s)"]


def exit_for_restart() -> None:
    """End the process with ``EXIT_CODE`` at once (no shutdown hooks, no commit): the supervisor
    restarts it, and the restart starts from the committed offsets and the changelog."""
    logging.shutdown()
    os._exit(EXIT_CODE)


def watch(
    app: faust.App,
    *,
    interval_s: float,
    grace_s: float,
    stall_s: float = float("inf"),
    exit_process: Callable[[], None] = exit_for_restart,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Check every ``interval_s``; once a part has been crashed (or the producer stalled,
    :func:`stalled_sends`) for ``grace_s``, log why and exit."""
    crashed_since: float | None = None
    while True:
        sleep(interval_s)
        now = clock()
        crashed = crashed_services(app) + stalled_sends(app, stall_s, now)
        if not crashed:
            crashed_since = None
            continue
        crashed_since = now if crashed_since is None else crashed_since
        if now - crashed_since >= grace_s:
            log.critical("exiting so the supervisor restarts this worker; crashed: %s", "; ".join(crashed))
            exit_process()
            return


def install(app: faust.App, *, interval_s: float = 2.0, grace_s: float = 10.0, stall_s: float = float("inf")) -> None:
    """Start :func:`watch` in a daemon thread when the worker starts (not at import: the app module
    is also imported by commands that run no worker)."""

    async def start_watchdog() -> None:
        threading.Thread(
            target=watch,
            args=(app,),
            kwargs={"interval_s": interval_s, "grace_s": grace_s, "stall_s": stall_s, "exit_process": exit_for_restart},
            name="streamrec-watchdog",
            daemon=True,
        ).start()

    app.task(start_watchdog)
