"""The worker watchdog: a crashed producer, producer buffer or consumer is found and named."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
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
    monkeypatch.setattr(watchdog, "exit_for_restart", exited.set)
    watchdog.install(App(), interval_s=0.01, grace_s=0.0)  # type: ignore[arg-type]
    assert len(tasks) == 1 and not exited.is_set()  # nothing runs until the worker starts
    asyncio.run(tasks[0]())
    assert exited.wait(timeout=30)


def _producer_holding(*created_at: float) -> SimpleNamespace:
    """A Faust producer whose aiokafka accumulator holds batches created at these monotonic times."""
    batches = [SimpleNamespace(_ctime=at) for at in created_at]
    accumulator = SimpleNamespace(_pending_batches=batches[:1], _batches={"tp": deque(batches[1:])})
    return service(False, buffer=service(False), _producer=SimpleNamespace(_message_accumulator=accumulator))


def test_stalled_sends_names_a_producer_holding_a_record_past_the_stall_limit() -> None:
    idle = SimpleNamespace(producer=service(False, buffer=service(False)))  # no Kafka producer yet
    assert watchdog.stalled_sends(idle, stall_s=60.0, now=1000.0) == []  # type: ignore[arg-type]
    empty = SimpleNamespace(producer=_producer_holding())
    assert watchdog.stalled_sends(empty, stall_s=60.0, now=1000.0) == []  # type: ignore[arg-type]
    busy = SimpleNamespace(producer=_producer_holding(990.0, 995.0))
    assert watchdog.stalled_sends(busy, stall_s=60.0, now=1000.0) == []  # type: ignore[arg-type]
    stuck = SimpleNamespace(producer=_producer_holding(930.0, 995.0))
    assert watchdog.stalled_sends(stuck, stall_s=60.0, now=1000.0) == [  # type: ignore[arg-type]
        "producer: 2 batches unconfirmed, the oldest for 70s (stall limit 60s)"
    ]


def test_watch_exits_a_worker_whose_producer_stalled() -> None:
    now = [1000.0]
    app = SimpleNamespace(producer=_producer_holding(1000.0), consumer=service(False))
    exits: list[float] = []

    def sleep(seconds: float) -> None:
        now[0] += seconds

    watchdog.watch(
        app,  # type: ignore[arg-type]
        interval_s=5.0,
        grace_s=10.0,
        stall_s=60.0,
        exit_process=lambda: exits.append(now[0]),
        sleep=sleep,
        clock=lambda: now[0],
    )
    assert exits == [1070.0]  # unconfirmed for 60 s at 1060, then 10 s of grace
