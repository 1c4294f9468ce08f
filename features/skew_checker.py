"""The skew checker process (``streamrec skew-check``): impressions in, skew and drift metrics out.

1. It reads every partition of ``topics.impressions`` by assignment (no group membership, no
   commits), starting at the first record of the last ``window_s + settle_s`` seconds
   (``offsets_for_times``), so a restarted checker has its window at once. Each valid,
   non-degraded impression (a degraded one read no features) goes into a bounded sample of the
   window (``features.skew_window``); an undecodable one is logged and skipped.
2. Every ``interval_s`` it takes up to ``max_rows`` impressions of ``(now - window_s - settle_s,
   now - settle_s]``, recomputes their features point-in-time and compares
   (``features.skew.check``); drift is against a reference sample of the offline log drawn at the
   first run that finds one.
3. It sets the metrics below and logs one summary line. A failing run (Redis or the log
   unreadable) is logged and retried at the next interval; the process keeps running.

Metrics (``/metrics`` on ``skew.metrics_port``, 0 = not served):
``streamrec_skew_statistic{feature,statistic}`` (``linf``, ``js``, ``ks``, ``mismatch_share``),
``streamrec_drift_statistic{feature,statistic}``, ``streamrec_skew_rows_checked_total`` and
``streamrec_skew_last_run_timestamp_seconds`` (set after every completed run, also one that
found no impressions). See docs/design/skew.md.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from confluent_kafka import OFFSET_END, Consumer, TopicPartition
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge

from features import skew, skew_stats
from features.errors import FeaturesError
from features.skew_settings import SkewSettings
from features.skew_window import WindowSample
from features.store import open_store
from streamrec.core.errors import EventValidationError
from streamrec.core.events import Impression, decode_event

log = logging.getLogger(__name__)
_BUCKETS_PER_WINDOW = 10


class SkewMetrics:
    """The checker's series, on ``registry`` (the process-wide one by default)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.skew = Gauge(
            "streamrec_skew_statistic",
            "Served vs point-in-time recomputed features of the last window, per feature and statistic.",
            ["feature", "statistic"],
            registry=registry,
        )
        self.drift = Gauge(
            "streamrec_drift_statistic",
            "Served features of the last window vs the offline log's reference sample, per feature and statistic.",
            ["feature", "statistic"],
            registry=registry,
        )
        self.rows_checked = Counter(
            "streamrec_skew_rows_checked", "Served rows recomputed and compared.", registry=registry
        )
        self.last_run = Gauge(
            "streamrec_skew_last_run_timestamp_seconds", "When the last check completed (epoch s).", registry=registry
        )

    def export(self, report: skew.SkewReport, now: float) -> None:
        for gauge, statistics in ((self.skew, report.skew), (self.drift, report.drift or [])):
            for feature in statistics:
                for name, value in feature.values.items():
                    gauge.labels(feature.feature, name).set(value)
        self.rows_checked.inc(report.rows)
        self.last_run.set(now)


class ImpressionReader:
    """All partitions of the impressions topic by assignment, from a point in time on."""

    def __init__(self, settings: SkewSettings, since_s: float) -> None:
        topic = settings.topics.impressions
        self._consumer = Consumer(
            {
                **settings.kafka.client_config(),
                "group.id": settings.skew.group_id,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": False,
            }
        )
        metadata = self._consumer.list_topics(topic, timeout=30).topics.get(topic)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            self._consumer.close()
            raise FeaturesError(
                f"the impressions topic {topic!r} does not exist; create it with `streamrec topics create`"
            )
        wanted = [TopicPartition(topic, partition, int(since_s * 1000)) for partition in metadata.partitions]
        starts = self._consumer.offsets_for_times(wanted, timeout=30)
        # Where the topic ends now; a start past every record of the range (OFFSET_END) begins there.
        self._ends = {tp.partition: self._consumer.get_watermark_offsets(tp, timeout=30)[1] for tp in wanted}
        self._next = {tp.partition: tp.offset if tp.offset >= 0 else self._ends[tp.partition] for tp in starts}
        self._consumer.assign([TopicPartition(topic, partition, offset) for partition, offset in self._next.items()])
        self.invalid = 0

    def read(self, timeout_s: float) -> list[Impression]:
        """The impressions that arrived within ``timeout_s`` (invalid records logged and skipped)."""
        impressions = []
        for message in self._consumer.consume(num_messages=1000, timeout=timeout_s):
            if message.error() is not None:
                log.warning("consumer error: %s", message.error())
                continue
            partition, offset = int(message.partition() or 0), int(message.offset() or 0)
            self._next[partition] = offset + 1
            try:
                impressions.append(decode_event(message.value(), Impression))
            except EventValidationError as error:
                self.invalid += 1
                log.warning("invalid impression at %s/%s: %s", partition, offset, error)
        return impressions

    def caught_up(self) -> bool:
        """Every partition read up to where it ended when the reader started."""
        return all(self._next[partition] >= end for partition, end in self._ends.items() if end != OFFSET_END)

    def close(self) -> None:
        self._consumer.close()


class SkewChecker:
    """The window sample, the reference sample and one :meth:`check` per interval."""

    def __init__(self, settings: SkewSettings, metrics: SkewMetrics, clock: Callable[[], float] = time.time) -> None:
        tuning = settings.skew
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.store = open_store(settings)
        self.inputs = skew.model_inputs(self.store)
        self.window: WindowSample[skew.ServedRow] = WindowSample(
            (tuning.window_s + tuning.settle_s) / _BUCKETS_PER_WINDOW, tuning.max_rows, tuning.seed
        )
        self.reference: list[dict[str, Any]] = []
        self.degraded = 0

    def add(self, impression: Impression) -> None:
        if impression.degraded:  # its features were not read (the store failed): nothing to compare
            self.degraded += 1
            return
        row = skew.ServedRow(impression.user_id, impression.event_time, impression.features)
        self.window.add(impression.event_time.timestamp(), row)

    def check(self) -> skew.SkewReport | None:
        """One run over the current window; None when it held no impression."""
        tuning = self.settings.skew
        now = self.clock()
        end = now - tuning.settle_s
        self.window.prune(end - tuning.window_s)
        rows, in_window = self.window.take(end - tuning.window_s, end, tuning.max_rows)
        if not rows:
            self.metrics.last_run.set(now)
            log.info("skew: no impressions in the last %.0f s (degraded skipped: %d)", tuning.window_s, self.degraded)
            return None
        if not self.reference:
            cut = self.settings.reference_cut(datetime.fromtimestamp(now, tz=UTC))
            self.reference = skew.reference_sample(
                self.store, self.inputs, until=cut, n=tuning.reference_rows, seed=tuning.seed
            )
        report = skew.check(
            self.store,
            rows,
            self.inputs,
            self.reference,
            bins=tuning.bins,
            rel_tol=tuning.rel_tol,
            abs_tol=tuning.abs_tol,
            # serving's age rule, so a row serving treats as missing is missing in the recomputation too
            max_age=timedelta(seconds=self.settings.features.max_feature_age_s),
        )
        self.metrics.export(report, self.clock())
        log.info("%s", summary(report, in_window, tuning.thresholds.as_dict()))
        return report


def _worst(statistics: list[skew_stats.FeatureStatistics], names: tuple[str, ...]) -> str:
    parts = []
    for name in names:
        values = [(stats.values[name], stats.feature) for stats in statistics if stats.values.get(name, -1) >= 0]
        if values:
            value, feature = max(values)
            parts.append(f"{name} {value:.3f} ({feature})" if value > 0 else f"{name} 0")
    return ", ".join(parts) or "-"


def summary(report: skew.SkewReport, in_window: int, thresholds: dict[str, float]) -> str:
    """The run's one log line: rows, the worst feature per statistic, what is over its threshold."""
    names = ("mismatch_share", "linf", "js", "ks")
    over = skew_stats.over_thresholds(report.skew, thresholds)
    drift = _worst(report.drift, names[1:]) if report.drift is not None else "no reference yet"
    return (
        f"skew: {report.rows} rows checked (of ~{in_window} in the window); worst {_worst(report.skew, names)}; "
        f"drift worst {drift}; over thresholds: {', '.join(over) if over else 'none'}"
    )


def run(
    settings: SkewSettings,
    *,
    once: bool = False,
    max_seconds: float | None = None,
    metrics: SkewMetrics | None = None,
) -> list[skew.SkewReport | None]:
    """Check every ``skew.interval_s`` until stopped (or ``max_seconds``), the first time as soon
    as the window is read; ``once``: read the topic up to its current end, check once and return.
    Returns the reports of the last 100 runs (None: a run that found no impression)."""
    tuning = settings.skew
    checker = SkewChecker(settings, metrics or SkewMetrics())
    started = time.monotonic()
    reader = ImpressionReader(settings, checker.clock() - tuning.window_s - tuning.settle_s)
    reports: deque[skew.SkewReport | None] = deque(maxlen=100)
    next_run, checked = started + tuning.interval_s, False
    try:
        while max_seconds is None or time.monotonic() - started < max_seconds:
            for impression in reader.read(timeout_s=0.5):
                checker.add(impression)
            caught_up = reader.caught_up()
            if not (caught_up and not checked) and (once or time.monotonic() < next_run):
                continue
            checked, next_run = True, time.monotonic() + tuning.interval_s
            try:
                reports.append(checker.check())
            except Exception:  # Redis, the offline log or the registry: try again next interval
                if once:
                    raise
                log.exception("skew check failed; retrying in %.0f s", tuning.interval_s)
            if once:
                break
    finally:
        reader.close()
    return list(reports)
