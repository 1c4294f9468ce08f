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
* ``trainer_loss``: the fine-tune's mean loss over the last interval's final epoch;
  ``trainer_loss_nonfinite_total``: intervals whose loss or gradient norm was NaN/inf (the gate
  rejects such a candidate, reason ``nonfinite``); ``trainer_gradient_norm{stat="mean"|"max"}``:
  the global L2 norm of each step's gradients over the last interval;
* ``trainer_gate_consecutive_rejections``: verdicts in a row that rejected (0 after a pass);
  ``trainer_gate_slice_hit_at_k{segment, model="candidate"|"serving"}``: the last gate's hit@k per
  segment of its hold-out (``streamrec.core.segments``; NaN for a segment absent from it: series
  are not removed, which prometheus_client cannot do in the multiprocess mode Feast's import turns on);
  ``trainer_gate_slice_flags_total{segment}``: candidates flagged for losing that segment badly;
* ``trainer_records_total{outcome}``: what happened to each consumed record (``example``,
  ``invalid:<reason>``, ``duplicate``, ``already_trained``, ``not_clicked``, ``not_positive``: a kind
  the trainer does not learn, ``trainer.positive_kinds``).

TensorBoard (``tf.summary`` under ``tensorboard_dir/<run>``): one step per fine-tune interval, with
the loss, gradient norm (mean, max), hold-out hit@k of candidate and serving model, example counts
and timings. Scalars are written with TensorFlow's own ``tf.summary.write`` and the metadata
TensorBoard's scalar plugin reads, so writing them does not need the ``tensorboard`` package (viewing them does:
``pip install tensorboard && tensorboard --logdir .state/tensorboard``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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
LOSS = Gauge("trainer_loss", "Mean fine-tune loss of the last interval (its final epoch).")
LOSS_NONFINITE = Counter("trainer_loss_nonfinite_total", "Intervals whose fine-tune loss or gradient norm was NaN/inf.")
GRADIENT_NORM = Gauge(
    "trainer_gradient_norm", "Global L2 norm of the gradients over the last interval's steps.", ("stat",)
)
CONSECUTIVE_REJECTIONS = Gauge("trainer_gate_consecutive_rejections", "Gate verdicts in a row that rejected.")
SLICE_HIT_AT_K = Gauge(
    "trainer_gate_slice_hit_at_k", "The last gate's hold-out hit@k per segment and model.", ("segment", "model")
)
SLICE_FLAGS = Counter(
    "trainer_gate_slice_flags_total", "Candidates that won overall but lost this segment badly.", ("segment",)
)
_sliced: set[tuple[str, str]] = set()  # the label pairs SLICE_HIT_AT_K holds a figure for

OPE_VERDICTS = Counter("trainer_ope_gate_total", "Off-policy gate verdicts (passed, blocked, abstained).", ("verdict",))
OPE_SECONDS = Histogram("trainer_ope_gate_seconds", "Time to judge one candidate off-policy.")


def record_ope(verdict: str, seconds: float) -> None:
    OPE_VERDICTS.labels(verdict).inc()
    OPE_SECONDS.observe(seconds)


def serve(port: int) -> None:
    """Expose ``/metrics`` on ``port`` (in a daemon thread); 0 means metrics are not served."""
    if port:
        start_http_server(port)


def record_gate(reasons: list[str]) -> None:
    if not reasons:
        GATE_RESULTS.labels(result="passed", reason="").inc()
        CONSECUTIVE_REJECTIONS.set(0)
    else:
        CONSECUTIVE_REJECTIONS.inc()
    for reason in reasons:
        GATE_RESULTS.labels(result="rejected", reason=reason).inc()


def record_training(stats: Mapping[str, float]) -> None:
    """Loss and gradient norm of one interval's fine-tune (``training.train``'s stats)."""
    figures = [stats[name] for name in ("loss", "gradient_norm_mean", "gradient_norm_max") if name in stats]
    if any(not math.isfinite(value) for value in figures):
        LOSS_NONFINITE.inc()
    if "loss" in stats:
        LOSS.set(stats["loss"])
    for stat in ("mean", "max"):
        if f"gradient_norm_{stat}" in stats:
            GRADIENT_NORM.labels(stat=stat).set(stats[f"gradient_norm_{stat}"])


def record_slices(slices: Mapping[str, Mapping[str, Any]]) -> None:
    """One gate's figures per segment (``GateResult.slices``); segments it lacked read NaN."""
    current: set[tuple[str, str]] = set()
    for segment, figures in slices.items():
        for model in ("candidate", "serving"):
            if figures.get(model) is not None:
                SLICE_HIT_AT_K.labels(segment=segment, model=model).set(figures[model])
                current.add((segment, model))
        if figures.get("flagged"):
            SLICE_FLAGS.labels(segment=segment).inc()
    for segment, model in _sliced - current:
        SLICE_HIT_AT_K.labels(segment=segment, model=model).set(math.nan)
    _sliced.clear()
    _sliced.update(current)


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
