"""Prometheus metrics of the Faust feature worker, served on ``streams.metrics_port`` (0 = not served)
by ``streams.faust_app``; the joiner's are ``streams.joiner_metrics``.

Freshness is measured per event from its Kafka record timestamp (when it entered
``streamrec.interactions``) to the moment the push that carries its entity's new features
returns, i.e. when they are readable from the online store. Items are measured from the same
original timestamp: the repartition hop keeps it.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Fine below 0.5 s, where the freshness targets are (p50 < 100 ms, p99 < 500 ms).
_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5,
    0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

EVENTS_IN = Counter("streams_events_in_total", "Records read from the interactions topic.")
OFFSET_GAPS = Counter(
    "streams_offset_gaps_total",
    "Records the consumer skipped (an offset jump on a partition of the interactions or by-item topic); "
    "each jump rewinds the partition so they are read again (streams.pipeline).",
)
OPEN_GAPS = Gauge(
    "streams_offset_gaps_open",
    "Skipped records not read again yet (partitions being rewound); 0 once every gap is repaired.",
)
ABANDONED_GAPS = Counter(
    "streams_offset_gaps_abandoned_total",
    "Partitions revoked while a skipped record was still being read again (it may be lost: alert on it).",
)
DEAD_LETTERS = Counter(
    "streams_dead_letters_total", "Records sent to the dead-letter topic, by reason.", labelnames=("reason",)
)
LATE_EVENTS = Counter(
    "streams_late_events_total",
    "Events older than the allowed lateness for an entity: counted and dropped (not dead-lettered).",
    labelnames=("view",),
)
DUPLICATES = Counter(
    "streams_duplicate_events_total", "Redelivered events (event_id already counted): ignored.", labelnames=("view",)
)
ACCEPTED = Counter("streams_accepted_events_total", "Events that changed an entity's state.", labelnames=("view",))
PUSHES = Counter("streams_pushes_total", "Batched pushes to the feature store.", labelnames=("view",))
PUSHED_ROWS = Counter("streams_pushed_rows_total", "Feature rows pushed.", labelnames=("view",))
PUSH_FAILURES = Counter("streams_push_failures_total", "Pushes that raised (retried).", labelnames=("view",))
PUSH_SECONDS = Histogram(
    "streams_push_seconds", "Duration of one batched push (online + offline).", ("view",), buckets=_LATENCY_BUCKETS
)
FRESHNESS_SECONDS = Histogram(
    "streams_freshness_seconds",
    "Kafka record timestamp of an event -> its entity's features readable in the online store.",
    ("view",),
    buckets=_LATENCY_BUCKETS,
)

APPLIED_SAMPLE_EVERY = 4
APPLIED_SECONDS = Histogram(
    "streams_applied_seconds",
    "Kafka record timestamp of an event -> applied to its entity's state (before the push waits and runs); "
    "for items this includes the repartition hop. Freshness minus this is the push's share. Sampled: one "
    f"event in {APPLIED_SAMPLE_EVERY} of each batch or bundle.",
    ("view",),
    buckets=_LATENCY_BUCKETS,
)

# Bounded state (streams.windows, streams.expiry; docs/design/streams.md#bounded-state)
FOLDED_EVENTS = Counter(
    "streams_folded_events_total",
    "Exact events of a state over max_exact_events folded into count buckets (their ids forgotten).",
)
FOLD_COARSENINGS = Counter(
    "streams_fold_coarsenings_total",
    "Times a state's count buckets went over max_fold_buckets and merged at a coarser resolution.",
)
OVERSIZE_EVENTS = Counter(
    "streams_oversize_events_total",
    "Events at or before their entity's fold horizon: not applied, dead-lettered with reason oversize.",
)
EXPIRED_ENTITIES = Counter(
    "streams_expired_entities_total",
    "Idle entities deleted from a table (with a changelog tombstone); their feature rows stay.",
    labelnames=("view",),
)
TABLE_ENTITIES = Gauge("streams_table_entities", "Entities in a table at the last expiry sweep.", labelnames=("view",))

STORE_RESTARTS = Counter(
    "streams_feature_store_restarts_total",
    "Restarts of the online store seen by the worker (each makes it push its owned states again).",
)
