"""Fault 8, the joiner's half: one user's 120 requests with 15 KiB contexts inside one label window.

Open together, those impressions would make the user's join state ~2 MB, one changelog message
that Kafka refuses (the producer crashes). The real joiner process gets them, with other users'
impressions and clicks around them; against references computed from the input:

* it neither crashes nor stops: every shown item of every user is labeled, and clicked exactly
  when a click was produced for it;
* the hot user's contexts are over ``joiner.max_features_bytes``: each impression is counted
  (``streamrec_joiner_oversize_total{cap="features"}``) and dead-lettered whole with its reason,
  and its labels carry the rest of its features;
* the 20 oldest of its requests are labeled early (``max_open_per_user`` = 100), the rest when
  their window closes, with their clicks.
"""

from __future__ import annotations

import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from streamrec.core.events import Click, DeadLetter, EventT, Impression, ImpressionItem, LabeledExample
from streamrec.core.settings import CommonSettings
from streamrec.kafka.consume import consume_decoded
from streamrec.ops.stack.ports import free_ports
from tests.support.impression_burst import one_users_burst, produce
from tests.support.processes import faust_worker, settings_env

HOT_REQUESTS, CONTEXT_BYTES, ITEMS = 120, 15 * 1024, 10


def test_a_hot_user_with_large_contexts_crashes_nothing(fresh_settings: CommonSettings, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    hot = one_users_burst(HOT_REQUESTS, "hot", items=ITEMS, context_bytes=CONTEXT_BYTES, start=now)
    others = [
        Impression(
            event_id=f"u{user}-r{n}",
            event_time=now + timedelta(milliseconds=10 * n),
            user_id=f"u{user}",
            request_id=f"u{user}-r{n}",
            arm="canary",
            model_version=2,
            items=[ImpressionItem(item_id=f"i{j}", score=1.0, position=j) for j in range(ITEMS)],
            features={"recent_items": ["i42"]},
        )
        for user in range(30)
        for n in range(3)
    ]
    # clicks on every other user's request, and on the hot user's newest 50 (never labeled early)
    clicked = [(shown, f"i{index % ITEMS}") for index, shown in enumerate(others) if index % 2 == 0]
    clicked += [(shown, f"i{index % ITEMS}") for index, shown in enumerate(hot) if index >= HOT_REQUESTS - 50]
    clicks = [
        Click(
            event_id=f"c-{shown.request_id}",
            event_time=shown.event_time + timedelta(milliseconds=500),
            user_id=shown.user_id,
            request_id=shown.request_id,
            item_id=item,
        )
        for shown, item in clicked
    ]
    produce(fresh_settings, fresh_settings.topics.impressions, [*hot, *others])
    produce(fresh_settings, fresh_settings.topics.clicks, clicks)
    expected = {(shown.request_id, item.item_id) for shown in [*hot, *others] for item in shown.items}

    (metrics_port,) = free_ports(1)
    env = settings_env(
        fresh_settings,
        STREAMREC_JOINER__APP_ID=f"joiner-{uuid.uuid4().hex[:8]}",
        STREAMREC_JOINER__LABEL_WINDOW_S="5",
        STREAMREC_JOINER__GRACE_S="1",
        STREAMREC_JOINER__EXPIRE_INTERVAL_S="0.2",
        STREAMREC_JOINER__METRICS_PORT=str(metrics_port),
        STREAMREC_JOINER__STATE_DIR=str(tmp_path / "joiner"),
    )
    for name in ("PROMETHEUS_MULTIPROC_DIR", "PROMETHEUS_MULTIPROCESS_DIR", "prometheus_multiproc_dir"):
        env.pop(name, None)  # a parent that imported Feast carries it
    with faust_worker("streams.joiner_app", env, tmp_path / "joiner.log") as worker:
        labeled = read(fresh_settings, fresh_settings.topics.labeled, LabeledExample, count=len(expected))
        letters = read(fresh_settings, fresh_settings.topics.deadletter, DeadLetter, count=HOT_REQUESTS)
        oversize = metric(metrics_port, 'streamrec_joiner_oversize_total{cap="features"}')
        early = metric(metrics_port, "streamrec_joiner_labeled_early_total")
        alive = worker.poll() is None
    log = (tmp_path / "joiner.log").read_text()
    assert alive and "Crashed" not in log, log[-3000:]

    assert {(e.request_id, e.item_id) for e in labeled} == expected, log[-3000:]
    assert {(e.request_id, e.item_id) for e in labeled if e.clicked} == {(s.request_id, i) for s, i in clicked}
    hot_examples = [e for e in labeled if e.user_id == "hot"]
    assert all(e.features == {"recent_items": hot[0].features["recent_items"]} for e in hot_examples)
    assert all(e.features == {"recent_items": ["i42"]} for e in labeled if e.user_id != "hot")

    assert oversize == HOT_REQUESTS and early == (HOT_REQUESTS - 100) * ITEMS
    assert sorted(letter.reason for letter in letters) == ["impression_features_oversize"] * HOT_REQUESTS
    originals = sorted((Impression.model_validate_json(letter.original_value()) for letter in letters), key=str)
    assert originals == sorted(hot, key=str)


def read(settings: CommonSettings, topic: str, kind: type[EventT], *, count: int) -> list[EventT]:
    group = f"t-{uuid.uuid4().hex}"
    records = consume_decoded(settings, topic, kind, group_id=group, max_records=count, idle_timeout_s=45)
    return [record.event for record in records if record.event is not None]


def metric(port: int, sample: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:  # noqa: S310 -- loopback
        for line in response.read().decode().splitlines():
            if line.startswith(sample + " "):
                return float(line.rsplit(" ", 1)[1])
    return 0.0
