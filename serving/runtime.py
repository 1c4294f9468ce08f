"""Process-level tuning shared by the long-running serving processes (the API, the model server).

Why the heap is frozen after start-up: both processes import TensorFlow (the API through the
``tensorflow_serving`` protos), Feast and gRPC, which leaves a few hundred thousand long-lived
objects on the heap. CPython's full (generation 2) collection walks every one of them while
holding the GIL, so every in-flight request stalls for the whole walk. ``gc.freeze()`` after
start-up moves everything that exists then into a permanent generation the collector never
scans, so later collections only see objects made while serving (requests, snapshots), and a
larger generation-0 threshold makes young collections rare: request garbage is mostly acyclic
and freed by reference counting anyway. See docs/design/serving.md#the-start-up-heap-is-frozen.
"""

from __future__ import annotations

import gc
import logging
import sys

from serving.settings import ProcessTuning

log = logging.getLogger(__name__)


def freeze_startup_heap(gen0_threshold: int) -> None:
    """Collect once, freeze what survives, then collect young objects every ``gen0_threshold``.

    Call it once the process is ready to serve (everything imported, models loaded); anything
    allocated later is collected normally. ``gen0_threshold`` 0 keeps CPython's thresholds.
    """
    gc.collect()
    gc.freeze()
    if gen0_threshold > 0:
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(gen0_threshold, gen1, gen2)
    log.info("froze %d start-up objects; gc thresholds %s", gc.get_freeze_count(), gc.get_threshold())


def tune_serving_process(tuning: ProcessTuning) -> None:
    """Once the process is ready to serve (everything imported, first models loaded)."""
    freeze_startup_heap(tuning.gc_gen0_threshold)
    set_gil_switch_interval(tuning.gil_switch_interval_s)


def set_gil_switch_interval(interval_s: float) -> None:
    """How long a thread that wants the GIL waits before it makes the running thread hand it over.

    Why shorter than CPython's 5 ms: both processes serve each request on a pool thread that takes
    the GIL back after every network call (Redis, the model server, gRPC's completion queue). When
    another thread is busy in Python at that moment (a version loading in the model server, the
    trending refresh in the API), each of those hand-backs waits out the whole interval, so a
    request that should take 5 ms takes tens of milliseconds. A shorter interval bounds each wait;
    the cost is more frequent forced switches, which only happen while threads contend.

    See docs/design/serving.md#the-gil-switch-interval.
    """
    sys.setswitchinterval(interval_s)
    log.info("GIL switch interval %.2f ms", interval_s * 1000)
