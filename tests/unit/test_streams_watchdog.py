"""The worker watchdog: a crashed producer, producer buffer or consumer is found and named."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from streams import watchdog


def service(crashed: bool, reason: Exception | None = None, **extra: Any) -> SimpleNamespace:
    return SimpleNamespace(crashed=crashed, crash_reason=reason, **extra)


def test_crashed_services_names_each_crashed_part_with_its_reason() -> None:
    healthy = SimpleNamespace(producer=service(False, buffer=service(False)), consumer=service(False))
    assert watchdog.crashed_services(healthy) == []  # type: ignore[arg-type]
    broken = SimpleNamespace(
        producer=service(False, buffer=service(True, RuntimeError("message too large"))),
        consumer=service(True, RuntimeError("Cannot flush: Producer not Running")),
    )
    assert watchdog.crashed_services(broken) == [  # type: ignore[arg-type]
        "producer buffer: RuntimeError('message too large')",
        "consumer: RuntimeError('Cannot flush: Producer not Running')",
    ]


def test_install_checks_on_a_timer() -> None:
    timers: list[float] = []

    class App:
        producer = service(False)
        consumer = service(False)

        def timer(self, *, interval: float) -> Any:
            timers.append(interval)
            return lambda function: function

    watchdog.install(App(), interval_s=3.0)  # type: ignore[arg-type]
    assert timers == [3.0]
