"""Process-level tuning shared by the long-running serving processes (the API, the model server).

Why the heap is frozen after start-up: both processes import TensorFlow (the API through the
``tensorflow_serving`` protos), Feast and gRPC, which leaves a few hundred thousand long-lived
objects on the heap. CPython's full (generation 2) collection walks every one of them while
holding the GIL, so every in-flight request stalls for the whole walk. Measured in the API with
``gc.callbacks`` timing (start-up plus one 20 s phase of ghz at 100 rps, shared 2-core machine
under load): 17 full collections of up to 355 ms, 217 generation-1 collections of up to 65 ms
and 2,385 young ones of up to 28 ms, the same order as the Recommend p99. ``gc.freeze()`` after
start-up moves everything that exists then into a permanent generation the collector never
scans, so later collections only see objects made while serving (requests, snapshots), and a
larger generation-0 threshold makes young collections rare: request garbage is mostly acyclic
and freed by reference counting anyway. With both, neither process ran a single collection in
20 s phases at 100 rps, 200 rps and saturation, and the API's peak RSS was unchanged (~910 MiB).
"""

from __future__ import annotations

import gc
import logging

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
