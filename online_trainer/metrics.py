"""Prometheus metrics and TensorBoard summaries of the running trainer (ranking quality: ``ranking_metrics``).

Prometheus (``/metrics`` on ``trainer.metrics_port``, 0 = not served), module-level like every
streamrec process:

* ``trainer_examples_per_second``: fine-tuning throughput of the last interval (new + replayed
  examples x epochs / training seconds);
* ``trainer_publish_seconds``: from the end of an interval (the moment the trainer stops collecting
  and starts learning) to the version being published as canary (or written, when the model
  server is unreachable);
* ``trainer_gate_total{result, reason}``: gate passes (``result="passed", reason=""``) and
  rejections by reason; ``trainer_current_version``: the version the trainer fine-tunes from;
* ``trainer_records_total{outcome}``: what happened to each consumed record (``example``,
  ``invalid:<reason>``, ``duplicate``, ``already_trained``, ``not_clicked``, ``not_positive``: a kind
  the trainer does not learn, ``trainer.positive_kinds``).

TensorBoard (``tf.summary`` under ``tensorboard_dir/<run>``): one step per fine-tune interval, with
the loss, hold-out hit@k of candidate and serving model, example counts and timings. Scalars are
written with TensorFlow's own ``tf.summary.write`` and the metadata TensorBoard's scalar plugin
reads, so writing them does not need the ``tensorboard`` package (viewing them does:
``pip install tensorboard && tensorboard --logdir .state/tensorboard``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

EXAMPLES_PER_SECOND = Gauge("trainer_examples_per_second", "Fine-tuning throughput of the last interval.")
EXAMPLES_TRAINED = Counter("trainer_examples_trained_total", "Examples fed to fine-tuning (new + replayed) x epochs.")
PUBLISH_SECONDS = Histogram(
    "trainer_publish_seconds",
    "Interval end -> version published (fine-tune, gate, export, rename, label move).",
    buckets=(0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120),
)
GATE_RESULTS = Counter("trainer_gate_total", "Validation gate verdicts, by result and reason.", ("result", "reason"))
CURRENT_VERSION = Gauge("trainer_current_version", "The model version the trainer fine-tunes from.")
RECORDS = Counter("trainer_records_total", "Consumed records by outcome.", ("outcome",))
PUBLISH_FAILURES = Counter(
    "trainer_publish_failures_total", "Versions written but not labelled canary (model server unreachable)."
)


def serve(port: int) -> None:
    """Expose ``/metrics`` on ``port`` (in a daemon thread); 0 means metrics are not served."""
    if port:
        start_http_server(port)


def record_gate(reasons: list[str]) -> None:
    if not reasons:
        GATE_RESULTS.labels(result="passed", reason="").inc()
    for reason in reasons:
        GATE_RESULTS.labels(result="rejected", reason=reason).inc()


class SummaryWriter:
    """A ``tf.summary`` file writer that takes plain dicts; a no-op when ``log_dir`` is None."""

    def __init__(self, log_dir: Path | None) -> None:
        self._writer: Any = None
        if log_dir is not None:
            import tensorflow as tf

            log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = tf.summary.create_file_writer(str(log_dir))

    def scalars(self, step: int, values: dict[str, float | int | None]) -> None:
        if self._writer is None:
            return
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
            data_class=summary_pb2.DATA_CLASS_SCALAR,
        )
        with self._writer.as_default(step=step):
            for name, value in values.items():
                if value is not None:
                    tf.summary.write(name, tf.constant(float(value), tf.float32), metadata=metadata)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
