"""Events through the real broker: replay, consume back, validate, third-party producers."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections import defaultdict

from confluent_kafka import Producer

from streamrec.core.events import Interaction
from streamrec.core.settings import CommonSettings
from streamrec.datasets import movielens
from streamrec.kafka.consume import consume_decoded
from streamrec.ops.replay import replay
from streamrec.ops.settings import ReplaySettings
from tests.support.tools import require_tool


def as_replay_settings(settings: CommonSettings) -> ReplaySettings:
    return ReplaySettings(**{name: getattr(settings, name) for name in CommonSettings.model_fields})


def test_replayed_events_come_back_exactly_and_in_per_user_order(fresh_settings: CommonSettings) -> None:
    frame = movielens.load_interactions().head(10_000)
    report = replay(frame, as_replay_settings(fresh_settings), progress=False)
    assert (report.delivered, report.failed) == (10_000, 0)

    consumed_by_user: dict[str, list[str]] = defaultdict(list)
    records = consume_decoded(
        fresh_settings,
        fresh_settings.topics.interactions,
        Interaction,
        group_id=f"roundtrip-{uuid.uuid4().hex}",
        max_records=10_000,
        idle_timeout_s=30,
    )
    for record in records:
        assert record.error is None, record.error
        assert record.event is not None
        assert record.key == record.event.user_id.encode()
        consumed_by_user[record.event.user_id].append(record.event.event_id)

    expected_by_user = frame.groupby("user_id", sort=False)["event_id"].apply(list).to_dict()
    assert sum(map(len, consumed_by_user.values())) == 10_000
    assert consumed_by_user == expected_by_user


def test_rate_limited_replay_is_paced(fresh_settings: CommonSettings) -> None:
    frame = movielens.load_interactions().head(300)
    report = replay(frame, as_replay_settings(fresh_settings), rate=200, progress=False)
    assert report.delivered == 300
    assert report.elapsed_s >= 1.2  # 300 events at 200/s cannot finish in much less than 1.5 s


def test_malformed_records_are_reported_with_their_reason(fresh_settings: CommonSettings) -> None:
    topic = fresh_settings.topics.interactions
    producer = Producer(fresh_settings.kafka.client_config())
    good = Interaction(event_id="ok-1", event_time="2026-01-01T00:00:00Z", user_id="u1", item_id="i1")  # type: ignore[arg-type]
    producer.produce(topic, key=b"u1", value=b"\x89PNG not an event")
    producer.produce(topic, key=b"u1", value=json.dumps({"event_id": "bad-1", "user_id": "u1"}).encode())
    producer.produce(topic, key=b"u1", value=good.to_bytes())
    producer.flush(10)

    records = list(
        consume_decoded(
            fresh_settings,
            topic,
            Interaction,
            group_id=f"bad-{uuid.uuid4().hex}",
            max_records=3,
            idle_timeout_s=30,
        )
    )
    assert [r.error.reason if r.error else "valid" for r in records] == ["undecodable", "schema", "valid"]
    schema_error = records[1].error
    assert schema_error is not None and "item_id" in str(schema_error) and "event_time" in str(schema_error)
    assert records[0].value == b"\x89PNG not an event"  # the original bytes are kept for the dead-letter path
    assert records[2].event == good


def test_a_json_line_from_kcat_is_a_valid_interaction(fresh_settings: CommonSettings) -> None:
    kcat = require_tool("kcat")
    topic = fresh_settings.topics.interactions
    line = '{"event_id":"kcat-1","event_time":1767225600,"user_id":"42","item_id":"7","kind":"click"}'
    subprocess.run(
        [kcat, "-P", "-b", fresh_settings.kafka.bootstrap_servers, "-t", topic, "-K", "|"],
        input=f"42|{line}\n".encode(),
        check=True,
        timeout=30,
    )
    [record] = list(
        consume_decoded(
            fresh_settings,
            topic,
            Interaction,
            group_id=f"kcat-{uuid.uuid4().hex}",
            max_records=1,
            idle_timeout_s=30,
        )
    )
    assert record.error is None
    assert record.event is not None and (record.event.user_id, record.event.kind, record.key) == (
        "42",
        "click",
        b"42",
    )
