"""The demo's summary reads the feature worker's Prometheus metrics: parsing of the real exposition format."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from streamrec.ops.demo import counter_total, histogram_buckets


def test_counters_and_histograms_are_summed_over_label_sets() -> None:
    registry = CollectorRegistry()
    rows = Counter("streams_pushed_rows_total", "rows", labelnames=("view",), registry=registry)
    rows.labels("user_activity").inc(7)
    rows.labels("item_stats").inc(5)
    freshness = Histogram("streams_freshness_seconds", "s", buckets=(0.1, 1.0), registry=registry)
    for seconds in (0.05, 0.5, 0.7, 3.0):
        freshness.observe(seconds)
    families = list(text_string_to_metric_families(generate_latest(registry).decode()))

    assert counter_total(families, "streams_pushed_rows_total") == 12.0
    assert counter_total(families, "streams_dead_letters_total") == 0.0  # not exposed yet: none sent
    assert histogram_buckets(families, "streams_freshness_seconds") == {0.1: 1.0, 1.0: 3.0, float("inf"): 4.0}
