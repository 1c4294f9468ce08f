"""Live model freshness (``serving.api.model_freshness``): each interaction a version learned is
observed once, at the first answer of the first version that learned it."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

from prometheus_client import CollectorRegistry, Histogram

from serving.api.model_freshness import FRESHNESS_BUCKETS_S, ModelFreshness
from streamrec.core import contracts


def _version(base: Path, version: int, parent: int | None, counts: list[list[int]], written: float) -> None:
    path = base / str(version) / contracts.LINEAGE_PATH
    path.parent.mkdir(parents=True)
    lineage = {"parent_version": parent, "freshness": {"produced_counts": counts}}
    path.write_text(json.dumps(lineage))
    os.utime(base / str(version), (written, written))


def _histogram() -> Histogram:
    # a name of its own: once Feast is imported, prometheus_client keeps values per process by name
    return Histogram(f"freshness_{uuid.uuid4().hex}", "test", buckets=FRESHNESS_BUCKETS_S, registry=CollectorRegistry())


def _observed(histogram: Histogram) -> dict[float, float]:
    samples = histogram.collect()[0].samples
    return {float(s.labels["le"]): s.value for s in samples if s.name.endswith("_bucket")}


def test_each_interaction_counts_once_at_the_first_answer_that_covers_it(tmp_path: Path) -> None:
    start = time.time()
    _version(tmp_path, 1, None, [], start - 100)  # bootstrap, before the API started
    _version(tmp_path, 2, 1, [[1000, 2]], start + 1)  # replaced as canary before anyone asked it
    _version(tmp_path, 3, 2, [[1030, 1], [1035, 3]], start + 2)
    histogram = _histogram()
    freshness = ModelFreshness(tmp_path, histogram, started_at=start)
    assert freshness.observe(1, 2000.0) == 0
    # version 3 answers first at t=1040: its own 4 interactions and version 2's 2
    assert freshness.observe(3, 1040.0) == 6
    buckets = _observed(histogram)
    assert buckets[5.0] == 3  # 1040 - 1035
    assert buckets[10.0] == 4  # + 1040 - 1030
    assert buckets[45.0] == 6  # + 2 x (1040 - 1000)
    # version 2 answering later (a rollback to it) does not count its interactions again
    freshness.answered(3)
    freshness.answered(2)
    time.sleep(0.2)
    assert _observed(histogram)[float("inf")] == 6


def test_a_version_written_before_the_api_started_is_not_counted(tmp_path: Path) -> None:
    start = time.time()
    _version(tmp_path, 5, 4, [[1000, 7]], start - 30)  # an earlier API process may have served it
    histogram = _histogram()
    assert ModelFreshness(tmp_path, histogram, started_at=start).observe(5, 2000.0) == 0
    assert _observed(histogram)[float("inf")] == 0


def test_answered_observes_in_the_background_once_per_version(tmp_path: Path) -> None:
    start = time.time() - 5
    _version(tmp_path, 2, None, [[int(start), 3]], start + 1)
    histogram = _histogram()
    freshness = ModelFreshness(tmp_path, histogram, started_at=start)
    for _ in range(5):
        freshness.answered(2)
    deadline = time.monotonic() + 5
    while _observed(histogram)[float("inf")] < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    assert _observed(histogram)[float("inf")] == 3
