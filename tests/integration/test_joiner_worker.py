"""The joiner as a real Faust worker on the real broker: labeled examples and dead letters."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from streamrec.core.events import Click, DeadLetter, Impression, ImpressionItem, LabeledExample
from streamrec.core.settings import CommonSettings
from streamrec.kafka.consume import consume_decoded
from tests.support.impression_burst import produce_one_users_burst
from tests.support.processes import faust_worker, settings_env


def joiner_env(settings: CommonSettings, tmp_path: Path, *, window_s: float) -> dict[str, str]:
    """The joiner worker's environment: a fresh app id, a short label window, 1 s grace."""
    return settings_env(
        settings,
        STREAMREC_JOINER__APP_ID=f"joiner-{uuid.uuid4().hex[:8]}",
        STREAMREC_JOINER__LABEL_WINDOW_S=str(window_s),
        STREAMREC_JOINER__GRACE_S="1",
        STREAMREC_JOINER__STATE_DIR=str(tmp_path / "joiner"),
    )


def read_topic(settings: CommonSettings, topic: str, kind: Any, *, count: int, idle_timeout_s: float) -> list[Any]:
    """Up to ``count`` decoded events of ``topic``, from its start, in a new consumer group."""
    return [
        r.event
        for r in consume_decoded(
            settings, topic, kind, group_id=f"t-{uuid.uuid4().hex}", max_records=count, idle_timeout_s=idle_timeout_s
        )
    ]


def test_the_joiner_labels_impressions_and_dead_letters_unjoinable_clicks(
    fresh_settings: CommonSettings, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    impressions = [
        Impression(
            event_id=f"r{n}",
            event_time=now,
            user_id=f"u{n}",
            request_id=f"r{n}",
            arm="stable",
            model_version=1,
            items=[
                ImpressionItem(item_id=f"i{j}", score=1.0, position=j, propensity=(0.9 if j == 2 else 1.0))
                for j in range(3)
            ],
        )
        for n in range(4)
    ]
    clicks = [
        Click(event_id="c1", event_time=now + timedelta(seconds=1), user_id="u0", request_id="r0", item_id="i1"),
        Click(event_id="c2", event_time=now + timedelta(seconds=1), user_id="u0", request_id="r0", item_id="i1"),
        Click(event_id="c3", event_time=now + timedelta(seconds=30), user_id="u1", request_id="r1", item_id="i0"),
        Click(event_id="c4", event_time=now, user_id="u2", request_id="nothing-shown", item_id="i0"),
    ]
    producer = Producer(fresh_settings.kafka.client_config())
    for impression in impressions:
        producer.produce(fresh_settings.topics.impressions, key=impression.key(), value=impression.to_bytes())
    for click in clicks:
        producer.produce(fresh_settings.topics.clicks, key=click.key(), value=click.to_bytes())
    producer.produce(fresh_settings.topics.clicks, key=b"u3", value=b"not json")
    producer.flush(10)

    env = joiner_env(fresh_settings, tmp_path, window_s=3)
    with faust_worker("streams.joiner_app", env, tmp_path / "joiner.log"):
        labeled = read_topic(fresh_settings, fresh_settings.topics.labeled, LabeledExample, count=12, idle_timeout_s=60)
        dead = read_topic(fresh_settings, fresh_settings.topics.deadletter, DeadLetter, count=3, idle_timeout_s=30)
    log = (tmp_path / "joiner.log").read_text()
    assert len(labeled) == 12, log[-3000:]
    clicked = {(e.request_id, e.item_id) for e in labeled if e is not None and e.clicked}
    assert clicked == {("r0", "i1")}  # the duplicate counted once, the late click not at all
    propensities = {e.item_id: e.propensity for e in labeled if e is not None}
    assert propensities == {"i0": 1.0, "i1": 1.0, "i2": 0.9}  # each shown item's, from its impression
    reasons = sorted(d.reason for d in dead if d is not None)
    assert reasons == ["click_late", "click_no_impression", "undecodable"], reasons


def test_a_user_bursting_past_kafkas_message_limit_is_labeled_in_full(
    fresh_settings: CommonSettings, tmp_path: Path
) -> None:
    """1,200 open impressions of one user would make a ~1.5 MB state message, which Kafka refuses
    (the joiner's producer crashed on one in a 50,000-visit loop); the cap labels the oldest early."""
    produce_one_users_burst(fresh_settings, 1_200)
    env = joiner_env(fresh_settings, tmp_path, window_s=30)
    with faust_worker("streams.joiner_app", env, tmp_path / "joiner.log"):
        labeled = read_topic(
            fresh_settings, fresh_settings.topics.labeled, LabeledExample, count=3_600, idle_timeout_s=90
        )
    log = (tmp_path / "joiner.log").read_text()
    assert "Crashed" not in log, log[-3000:]
    assert len({(e.request_id, e.item_id) for e in labeled if e is not None}) == 3_600, log[-3000:]
