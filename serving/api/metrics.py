"""Prometheus metrics of the recommendation API, on a registry of their own.

One ``ApiMetrics`` per server, on its own ``CollectorRegistry`` rather than the global one, so
``/metrics`` shows exactly the API's series. Importing Feast turns on prometheus_client's
multiprocess mode, where a series' value is kept per process by name and labels: a second server
in one process (the tests) starts from what the first counted, so tests read counters as
differences (see docs/design/serving.md#api-metrics-in-one-test-process). Names follow
Prometheus conventions (``_seconds``, ``_total``).

* ``streamrec_api_request_seconds{arm}``: end-to-end handler latency, by arm (``none`` for
  requests refused before an arm was chosen). Buckets are dense around the 30 ms target.
* ``streamrec_api_fallbacks_total{reason}``: answers not from the personalised model path
  (``cold_start``, ``model_unavailable``, ``model_error``, ``cold_start_trending``, ...).
* ``streamrec_api_degraded_total{dependency}``: a dependency failed or was too slow.
* ``streamrec_api_errors_total{code}``: calls answered with a gRPC error, by status code.
* ``streamrec_api_model_version{arm}``: the model version that last served each arm.
* ``streamrec_api_impressions_total{outcome}``: impressions ``queued``, ``delivered``,
  ``dropped`` (queue full) or ``failed`` (Kafka delivery error).
* ``streamrec_api_trending_age_seconds`` / ``streamrec_api_trending_refresh_failures_total``.
* ``streamrec_model_freshness_seconds``: interaction produced -> first response by a version that
  learned it (``serving.api.model_freshness``).

``SimilarItems`` has series of its own, so Recommend's keep their meaning (and their labels):

* ``streamrec_api_similar_request_seconds``: end-to-end SimilarItems handler latency.
* ``streamrec_api_similar_fallbacks_total{reason}``: trending answers (``item_unknown``,
  ``model_unavailable``, ``model_error``, ``deadline``).
* ``streamrec_api_similar_errors_total{code}``: SimilarItems calls answered with a gRPC error.

A model failure on either RPC is also counted in ``streamrec_api_degraded_total{dependency="model_server"}``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from serving.api.model_freshness import FRESHNESS_BUCKETS_S

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 1.0)


class ApiMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.latency = Histogram(
            "streamrec_api_request_seconds",
            "Recommend handler latency, by experiment arm.",
            ["arm"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.fallbacks = Counter(
            "streamrec_api_fallbacks_total",
            "Answers not from the personalised model path.",
            ["reason"],
            registry=self.registry,
        )
        self.ranker_fallbacks = Counter(
            "streamrec_api_ranker_fallbacks_total",
            "Two-stage answers served in retrieval order because the ranking model could not order them, by reason.",
            ("reason",),
            registry=self.registry,
        )
        self.degraded = Counter(
            "streamrec_api_degraded_total",
            "A dependency failed or was too slow.",
            ["dependency"],
            registry=self.registry,
        )
        self.errors = Counter(
            "streamrec_api_errors_total", "Calls answered with a gRPC error.", ["code"], registry=self.registry
        )
        self.model_version = Gauge(
            "streamrec_api_model_version", "Model version that last served each arm.", ["arm"], registry=self.registry
        )
        self.impressions = Counter(
            "streamrec_api_impressions_total", "Impression log outcomes.", ["outcome"], registry=self.registry
        )
        self.trending_age = Gauge(
            "streamrec_api_trending_age_seconds",
            "Seconds since the in-memory trending list was last refreshed.",
            registry=self.registry,
        )
        self.trending_failures = Counter(
            "streamrec_api_trending_refresh_failures_total",
            "Background refreshes of the trending list that failed (the previous list is kept).",
            registry=self.registry,
        )

        self.model_freshness = Histogram(
            "streamrec_model_freshness_seconds",
            "Interaction produced -> first response by a model version that learned it (serving.api.model_freshness).",
            buckets=FRESHNESS_BUCKETS_S,
            registry=self.registry,
        )

        self.similar_latency = Histogram(
            "streamrec_api_similar_request_seconds",
            "SimilarItems handler latency.",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.similar_fallbacks = Counter(
            "streamrec_api_similar_fallbacks_total",
            "SimilarItems answers from the trending list, by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.similar_errors = Counter(
            "streamrec_api_similar_errors_total",
            "SimilarItems calls answered with a gRPC error.",
            ["code"],
            registry=self.registry,
        )

    def serve_http(self, port: int, host: str = "127.0.0.1") -> None:
        """Expose ``/metrics`` on ``port`` (a daemon thread; nothing to stop)."""
        start_http_server(port, addr=host, registry=self.registry)
