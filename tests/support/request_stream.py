"""A background stream of Predict calls that records every answer and every failure."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from serving.model_client import ModelServerClient, ModelServerRpcError
from tests.support.tiny_model import example_inputs


@dataclass
class RequestStream:
    """Call ``predict`` in a loop (optionally by label) until stopped; use as a context manager."""

    client: ModelServerClient
    label: str | None = None
    timeout_s: float = 5.0
    pause_s: float = 0.002
    answers: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, version)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RequestStream:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        inputs = example_inputs(["stream-user"])
        while not self._stop.is_set():
            try:
                version, _ = self.client.predict(inputs, label=self.label, timeout_s=self.timeout_s)
                self.answers.append((time.monotonic(), version))
            except ModelServerRpcError as exc:
                self.failures.append(str(exc))
            time.sleep(self.pause_s)

    def first_answer_from(self, version: int) -> float | None:
        return next((at for at, served in list(self.answers) if served == version), None)

    def wait_for_version(self, version: int, timeout_s: float) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            at = self.first_answer_from(version)
            if at is not None:
                return at
            time.sleep(0.01)
        raise AssertionError(f"version {version} did not answer within {timeout_s} s; failures: {self.failures[:3]}")
