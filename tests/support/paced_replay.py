"""A paced replay in a background thread, for tests that break something while events arrive."""

from __future__ import annotations

import threading

import pandas as pd

from streamrec.core.settings import CommonSettings
from streamrec.ops.replay import ReplayReport, replay
from streamrec.ops.settings import ReplaySettings


class PacedReplay:
    """``replay(frame, rate=...)`` on ``settings``' brokers and topics, started by :meth:`start`."""

    def __init__(self, frame: pd.DataFrame, settings: CommonSettings, rate: float) -> None:
        self.frame = frame
        self.report: ReplayReport | None = None
        replay_settings = ReplaySettings(kafka=settings.kafka, topics=settings.topics)
        self._thread = threading.Thread(target=self._run, args=(replay_settings, rate), name="paced-replay")

    def _run(self, settings: ReplaySettings, rate: float) -> None:
        self.report = replay(self.frame, settings, rate=rate, progress=False)

    def start(self) -> None:
        self._thread.start()

    def assert_all_delivered(self, timeout_s: float) -> None:
        """Wait for the replay's end; every event acknowledged, none failed."""
        self._thread.join(timeout=timeout_s)
        report = self.report
        assert report is not None, f"the replay did not end within {timeout_s}s"
        assert (report.delivered, report.failed) == (len(self.frame), 0), report.summary()
