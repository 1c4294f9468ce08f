"""Fault 6: SIGKILL the joiner and the evaluator mid-experiment, start them again.

The loop of ``tests.support.ab_scenario`` with the evaluator as its own process: version 2
("better": every liked item in its top 10, so the canary's team wins every credited click) is
the canary. Once the evaluator has counted part of the evidence, both processes are killed,
visits go on for a while, and both start again: the joiner catches up on a backlog whose windows
have all closed, and re-labels what its changelog had not yet recorded; the evaluator settles
its decision log and rebuilds the experiment from its checkpoint. Then, against references
computed from what the scripted users were shown and clicked:

* every shown item is labeled, and clicked exactly when the user clicked it (duplicates allowed:
  same id, counted once);
* the decision's request and click counts equal the distinct requests in the labeled topic up to
  the decision's read positions (recounted here independently);
* ``decisions.jsonl`` agrees with ``models.config``: one applied promote of version 2, no intent
  left open, nothing rejected;
* the decision is the crash-free run's: the better canary is promoted (``tests/e2e/test_ab_loop.py``).
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from serving.rollout.decision_log import applied_decisions, read_records
from serving.rollout.policy import PolicyConfig
from streamrec.core.events import LabeledExample, decode_event
from streamrec.core.settings import CommonSettings
from streamrec.kafka.consume import consumer_config, end_offsets
from tests.support.ab_scenario import Scenario, ab_scenario

# Enough credited clicks that both kills land before the decision; guardrails that a loaded
# machine could trip (latency) out of the way, so the decision is the evidence's alone.
POLICY = PolicyConfig(interleave_min_credits=50, latency_budget_ms=10_000)
RATE = 25.0  # visits per second


def test_killed_joiner_and_evaluator_count_each_request_once(fresh_settings: CommonSettings, tmp_path: Path) -> None:
    with ab_scenario(
        fresh_settings, tmp_path, policy=POLICY, evaluator_process=True, joiner_session_timeout_s=6
    ) as scenario:
        assert scenario.evaluator_process is not None
        scenario.write_version(2, "better")
        scenario.admin.publish_canary(2)
        scenario.evaluator_process.start()
        wait_for(lambda: (scenario.evaluator_dir / "checkpoint.json").exists(), "the evaluator to start", 90)
        visit(scenario, until=lambda: credited(scenario) >= 12, timeout_s=60)
        assert scenario.decisions() == [], "decided before the kills: raise interleave_min_credits"
        scenario.joiner.kill()
        scenario.evaluator_process.kill()
        resume_at = time.monotonic() + 3
        visit(scenario, until=lambda: time.monotonic() > resume_at, timeout_s=10)
        scenario.joiner.start()
        scenario.evaluator_process.start()
        visit(scenario, until=lambda: scenario.admin.labels().get("stable") == 2, timeout_s=90)
        labeled = read_labeled(fresh_settings, expected=expected_labels(scenario), timeout_s=30)
        assert scenario.joiner.alive() and scenario.evaluator_process.alive()
    log = (tmp_path / "evaluator.log").read_text()
    assert "rebuilding the evidence" in log, log[-3000:]

    # every shown item labeled, clicked exactly when the user clicked it
    ids = Counter((e.request_id, e.item_id) for _, _, e in labeled)
    clicked = {(e.request_id, e.item_id) for _, _, e in labeled if e.clicked}
    assert set(ids) == expected_labels(scenario), f"{len(set(ids) ^ expected_labels(scenario))} labels differ"
    assert clicked == scenario.clicked
    assert all(e.event_id == LabeledExample.id_for(e.request_id, e.item_id) for _, _, e in labeled)

    # decisions.jsonl agrees with models.config; the decision is the crash-free run's
    decisions_path = tmp_path / "evaluator" / "decisions.jsonl"
    (decision,) = applied_decisions(decisions_path)
    assert (decision["action"], decision["stable_version"], decision["canary_version"]) == ("promote", 1, 2)
    assert {record["state"] for record in read_records(decisions_path)} == {"intent", "applied"}
    assert scenario.admin.labels() == {"stable": 2, "canary": 2}
    assert not (tmp_path / "evaluator" / "rejected.json").exists()

    # its counts are the distinct requests it had read, recounted from the topic
    positions = {int(partition): offset for partition, offset in decision["positions"].items()}
    read = [e for partition, offset, e in labeled if offset < positions.get(partition, 0)]
    figures = decision["figures"]
    for arm, version in (("stable", 1), ("canary", 2)):
        mine = [e for e in read if (e.arm, e.model_version) == (arm, version)]
        requests = {e.request_id for e in mine if e.position == 0}
        hits = {e.request_id for e in mine if e.clicked}
        assert (figures[arm]["requests"], figures[arm]["hits"]) == (len(requests), len(hits)), (arm, figures)
        shown = {request for request, (shown_arm, shown_version, _) in scenario.shown.items() if shown_arm == arm}
        assert requests <= shown and hits <= {request for request, _ in scenario.clicked}


def visit(scenario: Scenario, *, until: Any, timeout_s: float) -> None:
    scenario.run_until(until, timeout_s=timeout_s, visits_per_round=10, rate=RATE)


def wait_for(condition: Any, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout_s}s for {what}")
        time.sleep(0.2)


def credited(scenario: Scenario) -> int:
    """Credited interleaved clicks in the evaluator's latest timeline snapshot."""
    path = scenario.evaluator_dir / "timeline.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return int(json.loads(lines[-1]).get("interleaving", {}).get("credited", 0)) if lines else 0


def expected_labels(scenario: Scenario) -> set[tuple[str, str]]:
    return {(request, item) for request, (_, _, items) in scenario.shown.items() for item in items}


def read_labeled(
    settings: CommonSettings, *, expected: set[tuple[str, str]], timeout_s: float
) -> list[tuple[int, int, LabeledExample]]:
    """(partition, offset, example) of the whole labeled topic, once every expected id is in it."""
    topic = settings.topics.labeled
    deadline = time.monotonic() + timeout_s
    while True:
        ends = end_offsets(settings, topic)
        consumer = Consumer(consumer_config(settings, f"check-{uuid.uuid4().hex}", from_beginning=True))
        consumer.assign([TopicPartition(topic, partition, OFFSET_BEGINNING) for partition in ends])
        records: list[tuple[int, int, LabeledExample]] = []
        try:
            while len(records) < sum(ends.values()) and time.monotonic() < deadline:
                for message in consumer.consume(num_messages=5000, timeout=1.0):
                    partition, offset = int(message.partition() or 0), int(message.offset() or 0)
                    if offset < ends[partition]:
                        records.append((partition, offset, decode_event(message.value(), LabeledExample)))
        finally:
            consumer.close()
        if expected <= {(e.request_id, e.item_id) for _, _, e in records} or time.monotonic() > deadline:
            return records
        time.sleep(1)
