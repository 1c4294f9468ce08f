"""The worker watchdog: a crashed producer, producer buffer or consumer is found and named."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

import pytest

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


def test_watch_exits_once_a_part_has_been_crashed_for_the_grace_period() -> None:
    producer = service(False, buffer=service(False))
    app = SimpleNamespace(producer=producer, consumer=service(False))
    now = [0.0]
    exits: list[float] = []

    def sleep(seconds: float) -> None:
        now[0] += seconds
        if now[0] == 6.0:  # the buffer crashes between the third and fourth check
            producer.buffer = service(True, RuntimeError("message too large"))

    watchdog.watch(
        app,  # type: ignore[arg-type]
        interval_s=2.0,
        grace_s=10.0,
        exit_process=lambda: exits.append(now[0]),
        sleep=sleep,
        clock=lambda: now[0],
    )
    assert exits == [16.0]  # first seen crashed at 6 s, then 10 s of grace for Faust's own exit


def test_install_starts_the_watch_in_a_thread_when_the_worker_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    tasks: list[Any] = []

    class App:
        producer = service(True, RuntimeError("gone"))
        consumer = service(False)

        def task(self, function: Any) -> Any:
            tasks.append(function)
            return function

    exited = threading.Event()
    monkeypatch.setattr(watchdog, "_exit_process", exited.set)
    watchdog.install(App(), interval_s=0.01, grace_s=0.0)  # type: ignore[arg-type]
    assert len(tasks) == 1 and not exited.is_set()  # nothing runs until the worker starts
    asyncio.run(tasks[0]())
    assert exited.wait(timeout=30)
