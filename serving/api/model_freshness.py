"""Live model freshness: from an interaction's produce time to the first response served by a
model version that learned it (``streamrec_model_freshness_seconds``).

The trainer records in each version's lineage the produce times (whole seconds, with counts) of
the interactions it newly learned, and its parent version. When a version answers for the first
time, this observes ``first answer - produce time`` once per interaction for that version and for
every ancestor that never answered itself (a canary replaced before anyone asked it). Versions
written before this API started may have answered in an earlier API process and are not counted
again. The lineage is read on a background thread; a request only pays a set lookup.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

from prometheus_client import Histogram

from streamrec.core import contracts

log = logging.getLogger(__name__)

FRESHNESS_BUCKETS_S = (1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1800, 3600)


class ModelFreshness:
    """Observes ``histogram`` for the interactions a version brings, at its first answer."""

    def __init__(self, base_path: Path, histogram: Histogram, *, started_at: float | None = None) -> None:
        self._base_path = base_path
        self._histogram = histogram
        self._started_at = time.time() if started_at is None else started_at
        self._answered: set[int] = set()
        self._lock = threading.Lock()

    def answered(self, version: int) -> None:
        """Called with the version of every model answer; cheap after a version's first."""
        if version in self._answered or version <= 0:
            return
        with self._lock:
            if version in self._answered:
                return
            self._answered.add(version)
        threading.Thread(target=self.observe, args=(version, time.time()), daemon=True).start()

    def observe(self, version: int, first_answer: float) -> int:
        """Observe the interactions ``version`` and its never-answered ancestors learned; returns
        how many were observed."""
        with self._lock:
            self._answered.add(version)
        observed = 0
        current: int | None = version
        while current is not None and current > 0:
            lineage_path = self._base_path / str(current) / contracts.LINEAGE_PATH
            try:
                if lineage_path.parent.parent.stat().st_mtime < self._started_at:
                    break  # written before this API started: it may have answered already
                lineage = json.loads(lineage_path.read_text())
            except (OSError, ValueError) as exc:
                log.warning("model freshness of version %d not observed: %s", current, exc)
                break
            for second, count in (lineage.get("freshness") or {}).get("produced_counts", []):
                delay = max(0.0, first_answer - float(second))
                for _ in range(int(count)):
                    self._histogram.observe(delay)
                observed += int(count)
            parent = lineage.get("parent_version")
            current = int(parent) if parent is not None else None
            with self._lock:
                if current in self._answered:
                    break
                if current is not None:
                    self._answered.add(current)  # its interactions are counted here, at this answer
        return observed
