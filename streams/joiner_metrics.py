"""Prometheus metrics of the impression-click joiner, served on ``joiner.metrics_port`` (0 = not served).

A module of their own, apart from the feature worker's ``streams.metrics``, so each process
exports only its own counters.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

CLICKS = Counter("streamrec_joiner_clicks_total", "Clicks by join outcome", ["outcome"])
IMPRESSIONS = Counter("streamrec_joiner_impressions_total", "Impressions read")
LABELED = Counter("streamrec_joiner_labeled_total", "Labeled examples emitted", ["clicked"])
INVALID = Counter("streamrec_joiner_invalid_total", "Undecodable or invalid records", ["topic"])
LABELED_EARLY = Counter(
    "streamrec_joiner_labeled_early_total", "Labeled examples of impressions labeled before their window closed"
)
# cap: "features" (an impression's features trimmed, the original dead-lettered), "impression"
# (one impression too large to hold: dead-lettered, not labeled), "state" (a user's state over
# max_state_bytes: oldest open impressions labeled early, then held clicks evicted).
OVERSIZE = Counter("streamrec_joiner_oversize_total", "Impressions or user states over a cap", ["cap"])
USERS = Gauge("streamrec_joiner_users", "Users with join state (open, held or remembered)")
LABEL_HOLD = Gauge(
    "streamrec_joiner_label_hold_seconds",
    "How far behind the wall clock the joiner's labeling runs: the largest wait, over partitions, for the "
    "joiner to read what its source topics held (high while it catches up)",
)
OFFSET_READS_FAILED = Counter(
    "streamrec_joiner_offset_reads_failed_total", "Ticks that could not read the source topics' offsets"
)
OFFSET_GAPS = Counter(
    "streamrec_joiner_offset_gaps_total",
    "Source records never handed to the joiner (an offset jump); each hole is read again",
    ["topic"],
)
