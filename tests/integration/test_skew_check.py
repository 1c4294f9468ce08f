"""The skew checker on real Kafka and Redis: served features as of the request match the
point-in-time join; a stale feature path (a cache filled two events earlier) crosses the alert
thresholds, and the exported metrics carry the figures.

Feature history is written through the feature store (``push_user_activity``: Redis and the
offline log), the served values are read by the API's own ``UserFeatureReader``, and the
impressions go through Kafka to ``features.skew_checker.run``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from confluent_kafka import Producer
from prometheus_client import CollectorRegistry

from features import skew_stats
from features import store as feature_store
from features.settings import FeatureStoreTuning
from features.skew import SkewReport
from features.skew_checker import SkewMetrics, run
from features.skew_settings import SkewSettings, SkewThresholds, SkewTuning
from serving.api.user_features import UserFeatureReader
from streamrec.core import contracts
from streamrec.core.attributes import user_model_inputs
from streamrec.core.events import Impression, ImpressionItem
from streamrec.core.settings import CommonSettings, PathSettings
from streamrec.datasets.description import load_dataset
from streamrec.ops.settings import StackSettings

USERS = 30
STALE_EVENTS = 2  # the stale path serves what a user had this many events ago
ACTIVITY = ("recent_items", "count_1h", "count_24h")


@dataclass(frozen=True)
class History:
    """The store's settings, and each user's served features: as of now, and two events stale."""

    state_dir: Path
    features: FeatureStoreTuning
    fresh: dict[str, dict[str, Any]]
    stale: dict[str, dict[str, Any]]


def states(user_id: str, events: int, first: int, base: pd.Timestamp) -> list[dict[str, Any]]:
    """The ``user_activity`` rows after each of the user's events ``first .. events - 1``."""
    rows = []
    for i in range(first, events):
        when = base + pd.Timedelta(seconds=10 * i, microseconds=int(user_id))
        rows.append(
            {
                "user_id": user_id,
                "recent_items": [f"{user_id}-{j}" for j in range(i, -1, -1)][: contracts.RECENT_ITEMS_MAX],
                "count_1h": i + 1,
                "count_24h": i + 1,
                "last_event_ts": int(when.timestamp()),
                "event_timestamp": when,
            }
        )
    return rows


def push(store: Any, rows: list[dict[str, Any]]) -> None:
    """One push per step (every user's i-th state together), in event-time order."""
    frame = pd.DataFrame(rows)
    for _, step in frame.groupby("event_timestamp", sort=True):
        feature_store.push_user_activity(store, step.reset_index(drop=True), online=True, offline=True)


@pytest.fixture(scope="module")
def history(local_stack: object, stack_settings: StackSettings, tmp_path_factory: pytest.TempPathFactory) -> History:
    state_dir = Path(tmp_path_factory.mktemp("skew"))
    tuning = FeatureStoreTuning(project=f"t{uuid.uuid4().hex[:10]}")
    settings = SkewSettings(redis=stack_settings.redis, paths=PathSettings(state_dir=state_dir), features=tuning)
    ml100k = load_dataset("ml-100k")
    store = feature_store.open_store(settings)
    feature_store.setup_dataset(store, "ml-100k", ml100k.schema, ml100k.users.head(USERS), ml100k.items.head(50))
    users = [str(user_id) for user_id in ml100k.users["user_id"].head(USERS)]
    events = {user_id: 4 + index % 5 for index, user_id in enumerate(users)}  # 4 to 8 events each
    base = pd.Timestamp.now(tz="UTC").floor("s") - pd.Timedelta(minutes=30)
    reader = UserFeatureReader(store, inputs=user_model_inputs(ml100k.schema), max_age_s=24 * 3600.0)
    push(store, [row for user in users for row in states(user, events[user] - STALE_EVENTS, 0, base)])
    stale = {user: reader.read(user).raw() for user in users}  # the cache that stops here
    push(store, [row for user in users for row in states(user, events[user], events[user] - STALE_EVENTS, base)])
    fresh = {user: reader.read(user).raw() for user in users}
    assert all(fresh[user]["count_1h"] == events[user] for user in users)  # the online rows are the newest
    return History(state_dir, tuning, fresh, stale)


def produce_impressions(settings: CommonSettings, served: dict[str, dict[str, Any]]) -> None:
    producer = Producer(settings.kafka.client_config())
    now = datetime.now(UTC)
    for index, (user_id, features) in enumerate(served.items()):
        impression = Impression(
            event_id=f"imp:{uuid.uuid4().hex}",
            event_time=now,
            user_id=user_id,
            request_id=f"r{index}",
            arm="stable",
            model_version=1,
            items=[ImpressionItem(item_id="1", score=0.5, position=0)],
            features=features,
            degraded=index == 0,  # its features were not read: the checker skips it
        )
        producer.produce(settings.topics.impressions, key=impression.key(), value=impression.to_bytes())
    assert producer.flush(30) == 0


def check_once(history: History, fresh_settings: CommonSettings) -> tuple[SkewReport, CollectorRegistry, float]:
    settings = SkewSettings(
        kafka=fresh_settings.kafka,
        redis=fresh_settings.redis,
        topics=fresh_settings.topics,
        paths=PathSettings(state_dir=history.state_dir),
        features=history.features,
        skew=SkewTuning(window_s=600, settle_s=0, interval_s=1),
    )
    registry = CollectorRegistry()
    metrics = SkewMetrics(registry)
    # prometheus_client runs in multiprocess mode under Feast: a counter starts from this process's last value
    checked_before = registry.get_sample_value("streamrec_skew_rows_checked_total") or 0.0
    started = time.monotonic()
    (report,) = run(settings, once=True, max_seconds=60, metrics=metrics)
    assert report is not None and time.monotonic() - started < 30
    assert registry.get_sample_value("streamrec_skew_rows_checked_total") == checked_before + USERS - 1
    return report, registry, checked_before


def exported(registry: CollectorRegistry, report: SkewReport) -> None:
    """Every statistic of the report is the value of its series."""
    for series, statistics in (("streamrec_skew_statistic", report.skew), ("streamrec_drift_statistic", report.drift)):
        assert statistics is not None
        for stats in statistics:
            for name, value in stats.values.items():
                labels = {"feature": stats.feature, "statistic": name}
                assert registry.get_sample_value(series, labels) == pytest.approx(value, nan_ok=True)
    assert time.time() - (registry.get_sample_value("streamrec_skew_last_run_timestamp_seconds") or 0) < 60


def by_feature(report: SkewReport) -> dict[str, dict[str, float]]:
    return {stats.feature: dict(stats.values) for stats in report.skew}


def test_features_served_as_of_the_request_show_no_skew(history: History, fresh_settings: CommonSettings) -> None:
    produce_impressions(fresh_settings, history.fresh)
    report, registry, _ = check_once(history, fresh_settings)
    assert report.rows == USERS - 1
    stats = by_feature(report)
    assert set(stats) == {"recent_items", "count_1h", "count_24h", "age", "gender", "occupation", "zip_prefix"}
    assert all(values["mismatch_share"] == 0.0 for values in stats.values())
    assert skew_stats.over_thresholds(report.skew, SkewThresholds().as_dict()) == []
    # drift: the reference is every logged state (counts 1 to 8); the window sees each user's newest
    assert report.drift is not None and {s.feature: s.values for s in report.drift}["count_1h"]["js"] > 0.1
    exported(registry, report)


def test_a_stale_feature_path_crosses_the_alert_thresholds(history: History, fresh_settings: CommonSettings) -> None:
    produce_impressions(fresh_settings, history.stale)
    report, registry, _ = check_once(history, fresh_settings)
    stats = by_feature(report)
    thresholds = SkewThresholds()
    for name in ACTIVITY:  # every user's activity is two events behind
        assert stats[name]["mismatch_share"] == 1.0 > thresholds.mismatch_share
    for name in ("count_1h", "count_24h"):
        assert stats[name]["js"] > thresholds.js and stats[name]["ks"] > thresholds.ks
    for name in ("age", "gender", "occupation", "zip_prefix"):  # the profile path is not stale
        assert stats[name]["mismatch_share"] == 0.0
    crossed = {entry.split("=")[0] for entry in skew_stats.over_thresholds(report.skew, thresholds.as_dict())}
    assert {"recent_items.mismatch_share", "count_1h.js", "count_1h.mismatch_share"} <= crossed
    labels = {"feature": "count_1h", "statistic": "js"}
    assert registry.get_sample_value("streamrec_skew_statistic", labels) == stats["count_1h"]["js"] > thresholds.js
    exported(registry, report)


def test_the_long_running_checker_checks_every_interval(history: History, fresh_settings: CommonSettings) -> None:
    produce_impressions(fresh_settings, history.fresh)
    settings = SkewSettings(
        kafka=fresh_settings.kafka,
        topics=fresh_settings.topics,
        paths=PathSettings(state_dir=history.state_dir),
        features=history.features,
        skew=SkewTuning(window_s=600, settle_s=0, interval_s=1.5),
    )
    reports = run(settings, max_seconds=4.5, metrics=SkewMetrics(CollectorRegistry()))
    assert len(reports) >= 2  # the first as soon as the window was read, then one per interval
    assert all(report is not None and report.rows == USERS - 1 for report in reports)
