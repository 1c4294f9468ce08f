"""Exit a Faust worker whose producer or consumer has crashed, so its supervisor restarts it.

Why: when a send fails for good (e.g. a message over Kafka's 1 MiB limit), Faust logs ``Crashed``
for the producer (or its buffer) and may never exit, or may hang while stopping, leaving a
process that is up and does nothing. An exit lets the supervisor restart the worker. Nothing is
lost: offsets are committed only after an event is handled, and the tables come back from their
changelog; events after the last commit are handled again (at least once).

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


def _exit_process() -> None:
    logging.shutdown()
    os._exit(EXIT_CODE)


def watch(
    app: faust.App,
    *,
    interval_s: float,
    grace_s: float,
    exit_process: Callable[[], None] = _exit_process,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Check every ``interval_s``; once a part has been crashed for ``grace_s``, log why and exit."""
    crashed_since: float | None = None
    while True:
        sleep(interval_s)
        crashed = crashed_services(app)
        if not crashed:
            crashed_since = None
            continue
        now = clock()
        crashed_since = now if crashed_since is None else crashed_since
        if now - crashed_since >= grace_s:
            log.critical("exiting so the supervisor restarts this worker; crashed: %s", "; ".join(crashed))
            exit_process()
            return


def install(app: faust.App, *, interval_s: float = 2.0, grace_s: float = 10.0) -> None:
    """Start :func:`watch` in a daemon thread when the worker starts (not at import: the app module
    is also imported by commands that run no worker)."""

    async def start_watchdog() -> None:
        threading.Thread(
            target=watch,
            args=(app,),
            kwargs={"interval_s": interval_s, "grace_s": grace_s, "exit_process": _exit_process},
            name="streamrec-watchdog",
            daemon=True,
        ).start()

    app.task(start_watchdog)
