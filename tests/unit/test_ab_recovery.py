"""Crash safety of the A/B evaluator: duplicate examples, the decision log, the checkpoint.

In memory: a label controller that keeps labels in a dict (and can fail as a crash would), labeled
examples built by hand. Each crash is a new ``AbEvaluator`` on the same output directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from serving.rollout.decision_log import DecisionLog, applied_decisions, read_records
from serving.rollout.evaluator import AbEvaluator
from serving.rollout.policy import PolicyConfig
from streamrec.core.events import LabeledExample

TOPIC = "labeled"
POLICY = PolicyConfig(min_trials=20)


class Crash(Exception):
    """The evaluator died here."""


@dataclass
class Labels:
    """The model server's labels; ``crash_on`` makes that move die before it happens."""

    current: dict[str, int] = field(default_factory=lambda: {"stable": 1, "canary": 2})
    crash_on: str | None = None
    moves: list[str] = field(default_factory=list)

    def labels(self) -> dict[str, int]:
        return dict(self.current)

    def promote(self, version: int | None = None) -> int:
        self._move("promote")
        assert version == self.current["canary"]
        self.current["stable"] = self.current["canary"]
        return self.current["stable"]

    def rollback(self, version: int | None = None) -> int:
        if version is not None and version != self.current["canary"]:  # as the model client: moved on
            return self.current["stable"]
        self._move("rollback")
        self.current["canary"] = self.current["stable"]
        return self.current["canary"]

    def _move(self, name: str) -> None:
        if self.crash_on == name:
            raise Crash(name)
        self.moves.append(name)


def example(request: str, position: int, *, arm: str = "canary", clicked: bool = False) -> LabeledExample:
    now = datetime.now(UTC)
    return LabeledExample(
        event_id=LabeledExample.id_for(request, f"item{position}"),
        event_time=now,
        user_id=f"user-{request}",
        request_id=request,
        item_id=f"item{position}",
        position=position,
        arm=arm,  # type: ignore[arg-type]
        model_version=1 if arm == "stable" else 2,
        score=1.0,
        clicked=clicked,
        impression_time=now,
    )


def traffic(requests: int, *, canary_hits_every: int, stable_hits_every: int) -> list[LabeledExample]:
    """Two examples per request, alternating arms; the clicked one (if any) at position 1."""
    examples = []
    for n in range(requests):
        arm = "canary" if n % 2 else "stable"
        every = canary_hits_every if arm == "canary" else stable_hits_every
        clicked = (n // 2) % every == 0  # the arm's own request count
        examples += [example(f"r{n}", 0, arm=arm), example(f"r{n}", 1, arm=arm, clicked=clicked)]
    return examples


def feed(evaluator: AbEvaluator, examples: list[LabeledExample], first_offset: int = 0) -> None:
    for offset, labeled in enumerate(examples, start=first_offset):
        evaluator.mark_read(0, offset)
        evaluator.handle(labeled)


def test_examples_labeled_twice_count_once(tmp_path: Path) -> None:
    once = AbEvaluator(Labels(), POLICY, tmp_path / "once", TOPIC)
    twice = AbEvaluator(Labels(), POLICY, tmp_path / "twice", TOPIC)
    examples = traffic(40, canary_hits_every=3, stable_hits_every=5)
    for evaluator in (once, twice):
        evaluator.refresh_labels()
    feed(once, examples)
    feed(twice, examples[:50] + examples[30:60] + examples[50:] + examples[:10])  # a joiner restart, and more
    assert twice.figures() == once.figures()
    assert once.figures()["canary"]["requests"] == 20 and once.figures()["canary"]["hits"] == 7


def test_a_clicked_copy_after_an_unclicked_one_still_counts_the_hit(tmp_path: Path) -> None:
    evaluator = AbEvaluator(Labels(), POLICY, tmp_path, TOPIC)
    evaluator.refresh_labels()
    feed(evaluator, [example("r1", 0), example("r1", 1), example("r1", 0), example("r1", 1, clicked=True)])
    assert (evaluator.figures()["canary"]["requests"], evaluator.figures()["canary"]["hits"]) == (1, 1)


def test_a_restarted_evaluator_rebuilds_the_experiment_from_where_it_began(tmp_path: Path) -> None:
    labels = Labels(current={"stable": 1, "canary": 1})
    before = traffic(10, canary_hits_every=1, stable_hits_every=1)  # no experiment yet: not evidence
    examples = traffic(30, canary_hits_every=3, stable_hits_every=5)
    first = AbEvaluator(labels, POLICY, tmp_path, TOPIC)
    assert first.recover() == {}  # nothing saved: every partition from its beginning
    feed(first, before)
    labels.current["canary"] = 2
    first.refresh_labels()
    assert first.experiment_start == {0: len(before)}
    feed(first, examples, first_offset=len(before))
    figures = first.figures()
    # killed here; the next process reads again from where the experiment began
    second = AbEvaluator(labels, POLICY, tmp_path, TOPIC)
    assert second.recover() == {0: len(before)}
    assert second.experiment is not None and second.figures()["canary"]["requests"] == 0
    feed(second, examples, first_offset=len(before))
    assert second.figures() == figures


def test_labels_moved_while_the_evaluator_was_down_start_a_new_experiment_where_it_stopped(tmp_path: Path) -> None:
    labels = Labels()
    first = AbEvaluator(labels, POLICY, tmp_path, TOPIC)
    first.recover()
    feed(first, traffic(10, canary_hits_every=2, stable_hits_every=2))
    first.save_checkpoint()
    labels.current = {"stable": 1, "canary": 3}  # someone rolled 2 back and published 3
    second = AbEvaluator(labels, PolicyConfig(min_trials=20, pool_canary_line=False), tmp_path, TOPIC)
    assert second.recover() == {0: 20}
    assert second.experiment is not None and second.experiment.canary_versions == [3]


def decide(evaluator: AbEvaluator, *, canary_hits_every: int, stable_hits_every: int) -> str:
    evaluator.recover()
    feed(evaluator, traffic(400, canary_hits_every=canary_hits_every, stable_hits_every=stable_hits_every))
    decision = evaluator.decide()
    assert decision is not None
    return decision.action


@pytest.mark.parametrize("action", ["promote", "rollback"])
def test_a_decision_is_written_before_it_acts_and_applied_once_after_a_crash(tmp_path: Path, action: str) -> None:
    better = action == "promote"
    hits = {"canary_hits_every": 2 if better else 20, "stable_hits_every": 20 if better else 2}
    labels = Labels(crash_on=action)
    with pytest.raises(Crash):
        decide(AbEvaluator(labels, POLICY, tmp_path, TOPIC), **hits)
    (intent,) = read_records(tmp_path / "decisions.jsonl")
    assert (intent["state"], intent["action"], intent["canary_version"]) == ("intent", action, 2)
    assert intent["figures"]["canary"]["requests"] == 200 and intent["positions"] == {"0": 800}
    assert labels.current == {"stable": 1, "canary": 2} and applied_decisions(tmp_path / "decisions.jsonl") == []
    labels.crash_on = None
    restarted = AbEvaluator(labels, POLICY, tmp_path, TOPIC)
    restarted.recover()
    assert labels.moves == [action]
    assert labels.current == ({"stable": 2, "canary": 2} if better else {"stable": 1, "canary": 1})
    (applied,) = applied_decisions(tmp_path / "decisions.jsonl")
    assert (applied["id"], applied["recovered"]) == (intent["id"], "applied at start")
    assert restarted.rejected_versions() == ([] if better else [2])
    restarted.recover()  # a second restart moves nothing
    assert labels.moves == [action] and len(applied_decisions(tmp_path / "decisions.jsonl")) == 1


def test_a_move_made_but_not_recorded_is_recorded_not_made_again(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path)
    log.intend({"action": "rollback", "stable_version": 1, "canary_version": 2, "reason": "worse"})
    labels = Labels(current={"stable": 1, "canary": 1})  # the rollback happened; rejected.json was not written
    AbEvaluator(labels, POLICY, tmp_path, TOPIC).recover()
    assert labels.moves == []
    assert [r["state"] for r in read_records(tmp_path / "decisions.jsonl")] == ["intent", "applied"]
    assert json.loads((tmp_path / "rejected.json").read_text()) == [2]


def test_an_intent_overtaken_by_other_label_moves_is_abandoned(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path)
    log.intend({"action": "promote", "stable_version": 1, "canary_version": 2, "reason": "better"})
    labels = Labels(current={"stable": 1, "canary": 3})
    evaluator = AbEvaluator(labels, POLICY, tmp_path, TOPIC)
    evaluator.recover()
    assert labels.moves == [] and applied_decisions(tmp_path / "decisions.jsonl") == []
    (_, abandoned) = read_records(tmp_path / "decisions.jsonl")
    assert abandoned["state"] == "abandoned" and "stable 1, canary 3" in abandoned["recovered"]
    assert evaluator.experiment is not None and evaluator.experiment.canary.version == 3


def test_a_line_torn_by_a_crash_does_not_swallow_the_next_record(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path)
    log.path.write_text('{"id": "a", "state": "intent", "action": "prom')
    log.intend({"action": "rollback", "stable_version": 1, "canary_version": 2, "reason": "worse"})
    assert [r["action"] for r in read_records(log.path)] == ["rollback"]
