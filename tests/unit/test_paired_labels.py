"""Two-stage arms: a decision moves the ranking model's labels with the retrieval model's, and
the decision record carries the off-policy estimate made before the canary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.model_rpc import ModelLoadError
from serving.rollout.decision_log import DecisionLog, applied_decisions
from serving.rollout.evaluator import AbEvaluator
from serving.rollout.paired_labels import PairedLabels
from serving.rollout.process import version_ope
from streamrec.core import contracts
from tests.unit.test_ab_recovery import POLICY, TOPIC, Labels, decide

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("action", "after"), [("promote", {"stable": 6, "canary": 6}), ("rollback", {"stable": 5, "canary": 5})]
)
def test_a_decision_moves_both_models_labels(tmp_path: Path, action: str, after: dict[str, int]) -> None:
    retrieval, ranking = Labels(), Labels(current={"stable": 5, "canary": 6})
    better = action == "promote"
    hits = {"canary_hits_every": 2 if better else 20, "stable_hits_every": 20 if better else 2}
    estimate = {"verdict": "passed", "difference": {"candidate": 0.11, "baseline": 0.1}}
    evaluator = AbEvaluator(
        PairedLabels(retrieval, ranking),
        POLICY,
        tmp_path,
        TOPIC,
        off_policy_estimate=lambda v: estimate if v == 2 else None,
    )
    assert decide(evaluator, **hits) == action
    assert retrieval.moves == [action] and ranking.moves == [action]
    assert ranking.current == after
    (record,) = applied_decisions(tmp_path / "decisions.jsonl")
    assert record["off_policy_estimate"] == estimate and record["canary_version"] == 2


def test_a_ranking_model_without_its_own_canary_or_that_fails_is_left_alone(tmp_path: Path) -> None:
    ranking = Labels(current={"stable": 5, "canary": 5})
    paired = PairedLabels(Labels(), ranking)
    assert paired.promote(2) == 2 and ranking.moves == []

    class Down(Labels):
        def labels(self) -> dict[str, int]:
            raise ModelLoadError("the model server is down")

    retrieval = Labels()
    PairedLabels(retrieval, Down()).rollback()  # the retrieval decision stands, the failure is logged
    assert retrieval.current == {"stable": 1, "canary": 1}


def test_a_rollback_leaves_a_canary_published_after_the_decision(tmp_path: Path) -> None:
    """The evaluator decided to roll version 2 back; before it moved the labels, the trainer
    published version 3 as the canary. Version 3 was never judged: neither model's labels move,
    and only version 2 is marked rejected (a demo run rolled back such a version unseen)."""
    retrieval, ranking = Labels(current={"stable": 1, "canary": 3}), Labels(current={"stable": 1, "canary": 3})
    log = DecisionLog(tmp_path)
    intent = log.intend({"action": "rollback", "stable_version": 1, "canary_version": 2, "reason": "collapsed"})
    log.apply(intent, PairedLabels(retrieval, ranking))
    assert retrieval.current == ranking.current == {"stable": 1, "canary": 3}
    assert retrieval.moves == ranking.moves == [] and log.rejected_versions() == [2]
    # the same decision on the version still in the canary moves both
    intent = log.intend({"action": "rollback", "stable_version": 1, "canary_version": 3, "reason": "collapsed"})
    log.apply(intent, PairedLabels(retrieval, ranking))
    assert retrieval.current == ranking.current == {"stable": 1, "canary": 1}
    assert log.rejected_versions() == [2, 3]

    class PublishedDuringTheRollback(Labels):
        def rollback(self, version: int | None = None) -> int:
            self.current["canary"] = 5  # the trainer's publish wins the race for the config lock
            return super().rollback(version)

    racing = PublishedDuringTheRollback(current={"stable": 1, "canary": 4})
    ranking = Labels(current={"stable": 1, "canary": 4})
    PairedLabels(racing, ranking).rollback(4)
    assert racing.current == {"stable": 1, "canary": 5} and ranking.moves == []  # the ranking model stays paired


def test_version_ope_reads_the_gate_figures_of_a_versions_lineage(tmp_path: Path) -> None:
    lineage = tmp_path / "3" / contracts.LINEAGE_PATH
    lineage.parent.mkdir(parents=True)
    lineage.write_text(json.dumps({"gate": {"ope": {"verdict": "abstained"}}}))
    assert version_ope(tmp_path, 3) == {"verdict": "abstained"}
    assert version_ope(tmp_path, 4) is None
