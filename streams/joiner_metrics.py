"""Prometheus metrics of the impression-click joiner, served on ``joiner.metrics_port`` (0 = not served).

A module of their own, apart from the feature worker's ``streams.metrics``, so each process
exports only its own counters.
"""

from __future__ import annotations

from prometheus_client import Counter

CLICKS = Counter("streamrec_joiner_clicks_total", "Clicks by join outcome", ["outcome"])
IMPRESSIONS = Counter("streamrec_joiner_impressions_total", "Impressions read")
LABELED = Counter("streamrec_joiner_labeled_total", "Labeled examples emitted", ["clicked"])
INVALID = Counter("streamrec_joiner_invalid_total", "Undecodable or invalid records", ["topic"])
LABELED_EARLY = Counter(
    "streamrec_joiner_labeled_early_total", "Labeled examples of impressions labeled before their window closed"
)
