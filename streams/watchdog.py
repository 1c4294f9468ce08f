"""Exit a Faust worker whose producer or consumer has crashed, so its supervisor restarts it.

Why: when a send fails for good (the joiner's producer hit Kafka's 1 MiB message limit on
2026-11-30), Faust logs ``Crashed`` for the producer and then the consumer, and the process stays
up doing nothing: supervisord saw it running for the next 15 minutes while no labeled example
was written and the A/B evaluator starved. An exit lets the supervisor restart the worker. Nothing
is lost: offsets are committed only after an event is handled, and the tables come back from their
changelog; events after the last commit are handled again (at least once, as always).
"""

from __future__ import annotations

import logging
import os

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


def install(app: faust.App, *, interval_s: float = 2.0) -> None:
    """Check every ``interval_s``; on a crash log the reasons and exit the process."""

    async def exit_when_crashed() -> None:
        crashed = crashed_services(app)
        if crashed:
            log.critical("exiting so the supervisor restarts this worker; crashed: %s", "; ".join(crashed))
            logging.shutdown()
            os._exit(EXIT_CODE)

    app.timer(interval=interval_s)(exit_when_crashed)
