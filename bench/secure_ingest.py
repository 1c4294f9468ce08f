"""Ingest with Kafka SASL_SSL against plaintext: the feature worker draining a backlog, one broker.

Two modes, each on a fresh one-broker stack (real Kafka + Redis on free ports), by
``bench.cluster_ingest``'s method (``drain_backlog``: the worker is started and warmed up, a backlog
of ``--events`` looped MovieLens-100K events is produced at once, and events/s and CPU per 1,000
events run from just before the backlog to the group's committed lag 0):

* ``plain``: a plaintext stack, every client unauthenticated (``cluster_ingest``'s ``b1_w1``);
* ``secure``: a secure stack (``StackTuning(secure=True)``, as ``stack up --secure``): Kafka over
  SASL_SSL (SCRAM-SHA-512) with ACLs, Redis over TLS with ACL users. Each client connects as the
  stack's programs do (:func:`as_identity`: the variables of ``identities.service_environment``):
  the worker as ``streams``, the replay producing the backlog as ``replay``, the lag sampler and
  the set-up (topics, Feast registry) as ``admin``.

Both modes use the stack's own topic names and the worker's default app id, the ones the secure
stack's ACLs grant. ``--repeats`` runs per mode, modes alternating; the figures are the medians,
and the ratios secure / plain.

Run: ``python -m bench.secure_ingest`` (about 4 minutes: 3 runs per mode). ``--events 6000
--repeats 1 --no-write`` is a smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import TypeVar

from bench.cluster_ingest import (
    KAFKA_HEAP_MB,
    WARM_UP_MAX,
    GroupLag,
    LayoutRun,
    drain_backlog,
    per_run_counter,
    streams_settings,
    sum_accounted,
    worker_group,
)
from bench.common import report
from bench.ingest_throughput import looped_events
from streamrec.core.settings import ENV_NESTED_DELIMITER, ENV_PREFIX, CommonSettings
from streamrec.ops.stack import redis_server
from streamrec.ops.stack.identities import StackSecrets, service_environment
from streamrec.ops.stack.ports import free_port_block
from streams.settings import StreamsSettings
from tests.integration.test_streams_worker import prepare
from tests.support.cluster import running_cluster

MODES = ("plain", "secure")
Settings = TypeVar("Settings", bound=CommonSettings)


def as_identity(settings: Settings, secrets: StackSecrets | None, identity: str) -> Settings:
    """``settings`` connecting as ``identity`` on a secure stack: its sections updated with the
    variables the stack hands that identity's program (``service_environment``: Kafka SASL_SSL,
    Redis TLS and ACL user, gRPC TLS and token; file paths only); unchanged without ``secrets``."""
    if secrets is None:
        return settings
    sections: dict[str, dict[str, str]] = {}
    for key, value in service_environment(secrets, identity).items():
        section, field = key.removeprefix(ENV_PREFIX).lower().split(ENV_NESTED_DELIMITER)
        sections.setdefault(section, {})[field] = value
    updated = {
        name: type(getattr(settings, name)).model_validate({**getattr(settings, name).model_dump(), **fields})
        for name, fields in sections.items()
    }
    return settings.model_copy(update=updated)


def run_mode(mode: str, count: int, state_dir: Path, timeout_s: float) -> LayoutRun:
    """One mode on its own one-broker stack: one warm worker, a backlog, sampled until lag 0."""
    frame = looped_events(WARM_UP_MAX + count)
    secure = mode == "secure"
    with running_cluster(state_dir / "stack", brokers=1, secure=secure, kafka_heap_mb=KAFKA_HEAP_MB) as stack:
        # Kafka as admin on the stack's topics (their names are the ones its ACLs grant), Redis
        # as the stack itself reaches it (admin on a secure stack)
        base = stack.client_settings().model_copy(
            update={"redis": redis_server.stack_client_settings(stack.settings, stack.secrets)}
        )
        admin = streams_settings(base, state_dir / "worker", StreamsSettings().streams.app_id, free_port_block(2))
        # the app id has a hyphen, which Feast refuses in a project name
        admin = admin.model_copy(update={"features": admin.features.model_copy(update={"project": "bench"})})
        prepare(admin)  # topics (the by-item one too), the Feast registry, a warm idempotent producer
        group = worker_group(as_identity(admin, stack.secrets, "streams"), 1, state_dir)
        producer = as_identity(admin, stack.secrets, "replay")
        return drain_backlog(mode, group, producer, GroupLag(admin), stack, frame, count, timeout_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=60_000, help="backlog size (looped MovieLens-100K events)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode; the figures are their median")
    parser.add_argument("--timeout", type=float, default=300.0, help="max seconds for the worker to drain a backlog")
    parser.add_argument("--no-write", action="store_true", help="print the figures, write no result file")
    parser.add_argument("--keep-state", action="store_true", help="keep the stacks' and workers' folders (logs)")
    args = parser.parse_args()
    if args.events < 1000:
        parser.error("--events must be at least 1000: a shorter run is mostly its half-second sampling")
    load_at_start = os.getloadavg()

    runs: dict[str, list[LayoutRun]] = {mode: [] for mode in MODES}
    with contextlib.ExitStack() as cleanup:
        state = Path(tempfile.mkdtemp(prefix="bench-secure-ingest-"))
        if args.keep_state:
            print(f"state (logs) kept in {state}")
        else:
            cleanup.callback(shutil.rmtree, state, ignore_errors=True)
        for repeat in range(args.repeats):  # modes alternate (and swap order), so a slow minute hits both
            for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
                runs[mode].append(run_mode(mode, args.events, state / f"{mode}-{repeat}", args.timeout))
    each = {mode: [run.figures(args.events) for run in mode_runs] for mode, mode_runs in runs.items()}
    figures = {
        mode: {name: statistics.median(values[name] for values in rounds) for name in rounds[0]}
        for mode, rounds in each.items()
    }

    shown = {
        "events_per_s": ("events/s", 0),
        "worker_cpu_ms_per_1k": ("CPU ms / 1,000 events", 1),
        "broker_cpu_ms_per_1k": ("CPU ms / 1,000 events", 1),
        "redis_cpu_ms_per_1k": ("CPU ms / 1,000 events", 1),
        "produce_events_per_s": ("events/s", 0),
    }
    metrics: dict[str, float] = {}
    units: dict[str, str] = {}
    for mode, values in figures.items():
        for name, (unit, digits) in shown.items():
            metrics[f"secure_ingest.{mode}.{name}"], units[f"secure_ingest.{mode}.{name}"] = (
                round(values[name], digits),
                unit,
            )
    for name in shown:
        key = f"secure_ingest.ratio_secure_to_plain.{name}"
        metrics[key], units[key] = round(figures["secure"][name] / figures["plain"][name], 3), ""

    def per_run(mode: str, name: str, digits: int = 0) -> str:
        return "/".join(f"{values[name]:,.{digits}f}" for values in each[mode])

    checks = "; ".join(
        f"{mode}: accepted + late (dropped) = 2 views x the events read (warm-up + backlog) in "
        f"{sum(1 for run in mode_runs if sum_accounted(run) == 2 * (run.warm_up_events + args.events))} of "
        f"{len(mode_runs)} runs, offset gaps {per_run_counter(mode_runs, 'streams_offset_gaps_total')}, dead "
        f"letters {per_run_counter(mode_runs, 'streams_dead_letters_total')}; worker "
        f"{per_run(mode, 'worker_cores', 2)} cores and Kafka {per_run(mode, 'broker_cores', 2)} cores meanwhile"
        for mode, mode_runs in runs.items()
    )
    rates = "; ".join(
        f"{mode} {per_run(mode, 'events_per_s')} events/s, worker CPU {per_run(mode, 'worker_cpu_ms_per_1k')} ms, "
        f"Kafka CPU {per_run(mode, 'broker_cpu_ms_per_1k')} ms, produce {per_run(mode, 'produce_events_per_s')}/s"
        for mode in runs
    )
    load = os.getloadavg()
    notes = (
        "plain: a plaintext one-broker stack; secure: the same stack with stack.secure (Kafka SASL_SSL "
        "SCRAM-SHA-512 with ACLs, Redis TLS with ACL users), the worker connecting as identity streams, the "
        "backlog produced as replay, the lag sampled as admin. Method of bench.cluster_ingest (b1_w1): the worker "
        "started and warmed up (batches of 250 events until read and committed), then a backlog of "
        f"{args.events:,} looped MovieLens-100K events produced at once (replay, acks=all, idempotence); events/s "
        "and CPU per 1,000 events from just before the backlog to the group's committed lag 0 (interactions + "
        f"by-item). 4 partitions, Kafka {KAFKA_HEAP_MB} MiB heap; everything shares the machine's "
        f"{os.cpu_count()} cores. Figures: the median of {args.repeats} runs per mode (modes alternating, order "
        f"swapped each round); each run: {rates}. The produce rate is replay's delivered/s over a backlog of about "
        f"a second. Checks: {checks}. Load average (1, 5, 15 min) at the start: {load_at_start[0]:.2f}, "
        f"{load_at_start[1]:.2f}, {load_at_start[2]:.2f}; at the end: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}."
    )
    print(json.dumps(figures, indent=2))
    report(
        "secure-ingest",
        metrics,
        units,
        targets={},
        command=f"python -m bench.secure_ingest --events {args.events} --repeats {args.repeats}",
        notes=notes,
        write=not args.no_write,
    )


if __name__ == "__main__":
    main()
