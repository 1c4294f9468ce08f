from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from streamrec.core.errors import EventValidationError
from streamrec.core.events import Click, DeadLetter, Impression, Interaction, LabeledExample, decode_event

VALID = {
    "event_id": "e1",
    "event_time": "2026-01-01T00:00:00Z",
    "user_id": "u1",
    "item_id": "i1",
    "kind": "view",
}


def encode(payload: object) -> bytes:
    return json.dumps(payload).encode()


def test_round_trip_keeps_every_field_and_keys_by_user() -> None:
    event = decode_event(encode({**VALID, "rating": 4.5, "source": "app"}), Interaction)
    assert decode_event(event.to_bytes(), Interaction) == event
    assert event.key() == b"u1"
    assert event.event_time == datetime(2026, 1, 1, tzinfo=UTC)


def test_epoch_seconds_and_offsets_become_utc() -> None:
    from_epoch = decode_event(encode({**VALID, "event_time": 1767225600}), Interaction)
    from_offset = decode_event(encode({**VALID, "event_time": "2026-01-01T01:00:00+01:00"}), Interaction)
    assert from_epoch.event_time == from_offset.event_time == datetime(2026, 1, 1, tzinfo=UTC)
    assert from_offset.event_time.tzinfo == UTC


@pytest.mark.parametrize(
    ("raw", "reason", "fragment"),
    [
        (b"\xff\xfe not json", "undecodable", "not UTF-8 JSON"),
        (b"[1, 2]", "schema", "expected a JSON object"),
        (encode({k: v for k, v in VALID.items() if k != "item_id"}), "schema", "item_id"),
        (encode({**VALID, "event_time": "2026-01-01T00:00:00"}), "schema", "event_time"),
        (encode({**VALID, "kind": "teleport"}), "schema", "kind"),
        (encode({**VALID, "colour": "red"}), "schema", "colour"),
        (encode({**VALID, "user_id": ""}), "schema", "user_id"),
        (encode({**VALID, "schema_version": 2}), "schema_version", "not supported"),
        (None, "undecodable", "tombstone"),
    ],
)
def test_invalid_records_are_reported_with_their_reason(raw: bytes | None, reason: str, fragment: str) -> None:
    with pytest.raises(EventValidationError) as caught:
        decode_event(raw, Interaction)
    assert caught.value.reason == reason
    assert fragment in str(caught.value)


def test_far_future_event_time_is_rejected_only_past_the_allowed_skew() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    near = encode({**VALID, "event_time": (now + timedelta(seconds=30)).isoformat()})
    far = encode({**VALID, "event_time": (now + timedelta(days=365)).isoformat()})
    decode_event(near, Interaction, now=now, max_future_skew=timedelta(minutes=5))
    with pytest.raises(EventValidationError) as caught:
        decode_event(far, Interaction, now=now, max_future_skew=timedelta(minutes=5))
    assert caught.value.reason == "event_time"


def test_dead_letter_keeps_original_bytes_and_source_position() -> None:
    raw = b"\x00garbage"
    try:
        decode_event(raw, Interaction)
    except EventValidationError as error:
        letter = DeadLetter.for_raw(value=raw, key=b"u1", topic="t", partition=2, offset=41, error=error)
    restored = decode_event(letter.to_bytes(), DeadLetter)
    assert restored.original_value() == raw
    assert (restored.source_topic, restored.source_partition, restored.source_offset) == ("t", 2, 41)
    assert restored.reason == "undecodable"


def test_serving_side_records_validate() -> None:
    now = "2026-01-01T00:00:00Z"
    impression = Impression.model_validate(
        {
            "event_id": "r1",
            "event_time": now,
            "user_id": "u",
            "request_id": "r1",
            "arm": "canary",
            "model_version": 3,
            "items": [{"item_id": "i", "score": 0.5, "position": 0}],
        }
    )
    assert impression.key() == b"u"
    with pytest.raises(EventValidationError):
        decode_event(encode({**json.loads(impression.to_bytes()), "arm": "blue"}), Impression)
    with pytest.raises(EventValidationError):
        decode_event(encode({**json.loads(impression.to_bytes()), "items": []}), Impression)
    click = Click(event_id="c1", event_time=datetime.now(UTC), user_id="u", request_id="r1", item_id="i")
    labeled = LabeledExample(
        event_id="l1",
        event_time=datetime.now(UTC),
        user_id="u",
        request_id="r1",
        item_id="i",
        position=0,
        arm="stable",
        model_version=1,
        score=0.1,
        clicked=True,
        impression_time=datetime.now(UTC),
    )
    assert decode_event(click.to_bytes(), Click) == click
    assert decode_event(labeled.to_bytes(), LabeledExample) == labeled


CLICK = {"event_id": "c1", "event_time": "2026-01-01T00:00:00Z", "user_id": "u", "request_id": "r1", "item_id": "i"}
LABELED = {
    **CLICK,
    "event_id": "label:r1:i",
    "position": 0,
    "arm": "canary",
    "model_version": 2,
    "score": 0.5,
    "clicked": True,
    "impression_time": "2026-01-01T00:00:00Z",
    "click_time": "2026-01-01T00:00:05Z",
}


@pytest.mark.parametrize(("event_type", "payload"), [(Click, CLICK), (LabeledExample, LABELED)])
def test_the_kind_of_a_click_round_trips_and_records_without_it_still_decode(
    event_type: type[Click] | type[LabeledExample], payload: dict[str, object]
) -> None:
    old = decode_event(encode(payload), event_type)  # written before the field existed
    assert old.kind is None and old.schema_version == 1
    assert decode_event(old.to_bytes(), event_type) == old
    purchase = decode_event(encode({**payload, "kind": "purchase"}), event_type)
    assert purchase.kind == "purchase" and json.loads(purchase.to_bytes())["kind"] == "purchase"
    assert decode_event(purchase.to_bytes(), event_type) == purchase
    with pytest.raises(EventValidationError) as caught:
        decode_event(encode({**payload, "kind": "teleport"}), event_type)
    assert caught.value.reason == "schema" and "kind" in str(caught.value)
