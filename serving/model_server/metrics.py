"""Prometheus metrics of the local model server, served on ``model_server.metrics_port`` (0 = off).

* ``streamrec_model_server_request_seconds{method}``: time inside a servicer (model lookup,
  inference, response), by RPC method, buckets dense below the API's 100 ms Predict budget;
* ``streamrec_model_server_errors_total{method,code}``: RPCs answered with a gRPC error;
* ``streamrec_model_server_batch_requests``: requests merged into one model call (request
  batching, ``serving.model_server.batching``).

TF Serving exports its own series (``:tensorflow:serving:request_count`` and friends, through
``--monitoring_config_file``); the compose stack scrapes those. These are the local server's.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

REQUEST_SECONDS = Histogram(
    "streamrec_model_server_request_seconds",
    "Time inside the servicer, by RPC method.",
    ("method",),
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0, 5.0),
)
BATCH_REQUESTS = Histogram(
    "streamrec_model_server_batch_requests",
    "Predict requests merged into one model call (request batching).",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
)
ERRORS = Counter("streamrec_model_server_errors_total", "RPCs answered with a gRPC error.", ("method", "code"))


def serve(port: int, host: str = "127.0.0.1") -> None:
    """Expose ``/metrics`` on ``port`` (a daemon thread); 0 means metrics are not served."""
    if port:
        start_http_server(port, addr=host)
