"""The ranking model's version line in the trainer: version 1 on start, fine-tuned candidates
gated on held-out labeled examples, published beside the retrieval canary, and resumed after a
restart without learning the same examples twice."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from online_trainer import export
from online_trainer import ranker_line as ranker_line_module
from online_trainer.ranker_line import RankerLine
from online_trainer.settings import RankerTuning, TrainerSettings, TrainerTuning
from streamrec.core import contracts
from streamrec.core.attributes import AttributeSchema
from streamrec.core.events import LabeledExample
from streamrec.core.settings import PathSettings, RankingTuning

pytestmark = pytest.mark.unit

T0 = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
SCHEMA = AttributeSchema()


class FakePublisher:
    def __init__(self) -> None:
        self.current: dict[str, int] = {}

    def publish_canary(self, version: int) -> None:
        self.current.setdefault(contracts.STABLE_LABEL, version)
        self.current[contracts.CANARY_LABEL] = version

    def labels(self) -> dict[str, int]:
        return dict(self.current)


def _line(tmp_path: Path, publisher: FakePublisher) -> RankerLine:
    tuning = TrainerTuning(ranker=RankerTuning(min_examples=200, epochs=3, batch_size=64))
    settings = TrainerSettings(
        paths=PathSettings(state_dir=tmp_path), trainer=tuning, ranking=RankingTuning(enabled=True)
    )
    return RankerLine(settings, SCHEMA, publisher)


def planted(requests: int, *, start: int = 0, seed: int = 0) -> list[LabeledExample]:
    """Users of group g click items of group g (0.6) far more than others (0.05); five items per list."""
    rng = np.random.default_rng(seed)
    examples = []
    for request in range(start, start + requests):
        user = int(rng.integers(40))
        items = rng.choice(40, size=5, replace=False)
        for position, item in enumerate(items):
            clicked = bool(rng.random() < (0.6 if item % 2 == user % 2 else 0.05))
            when = T0 + timedelta(seconds=request)
            examples.append(
                LabeledExample(
                    event_id=LabeledExample.id_for(f"r{request}", f"i{item}"),
                    event_time=when,
                    user_id=f"u{user}",
                    request_id=f"r{request}",
                    item_id=f"i{item}",
                    position=position,
                    arm="stable",
                    model_version=1,
                    score=float(5 - position),
                    clicked=clicked,
                    impression_time=when,
                    features={"recent_items": [], "count_1h": 1, "count_24h": 3},
                )
            )
    return examples


def test_a_new_line_starts_at_version_1_then_publishes_what_it_learned(tmp_path: Path) -> None:
    publisher = FakePublisher()
    line = _line(tmp_path, publisher)
    line.resume()
    assert export.list_versions(line.base_path) == [1] and publisher.current == {"stable": 1, "canary": 1}
    assert line.run_interval() is None  # nothing to learn yet
    for example in planted(600):
        line.add(example)
    outcome = line.run_interval()
    assert outcome is not None and outcome.version == 2, outcome
    assert publisher.current == {"stable": 1, "canary": 2}
    lineage = export.read_lineage(line.base_path / "2")
    assert lineage["parent_version"] == 1 and lineage["data"]["new_examples"] == 2_400
    holdout = lineage["gate"]["holdout"]
    assert holdout["candidate"]["auc"] > holdout["serving"]["auc"] + 0.1, holdout
    assert holdout["candidate"]["logloss"] < holdout["serving"]["logloss"]

    publisher.current = {"stable": 1, "canary": 1}  # the evaluator rolled version 2 back
    restarted = _line(tmp_path, publisher)
    restarted.resume()
    assert restarted.version == 2 and restarted.learned_until == line.learned_until
    assert publisher.current == {"stable": 1, "canary": 1}  # a restart does not bring it back
    for example in planted(600):  # read again after the restart: learned already
        restarted.add(example)
    assert len(restarted.pending) == 600  # only the held-out newest fifth was never learned
    for example in planted(600, start=600, seed=1):
        restarted.add(example)
    assert restarted.run_interval() is not None and export.list_versions(line.base_path) == [1, 2, 3]
    assert publisher.current == {"stable": 1, "canary": 3}


def test_a_candidate_that_predicts_worse_is_never_published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    publisher = FakePublisher()
    line = _line(tmp_path, publisher)
    line.resume()
    for example in planted(600):
        line.add(example)
    assert line.run_interval() is not None  # version 2 knows the groups

    real_train = ranker_line_module.train_ranker

    def unlearn(model: Any, examples: Any, **kwargs: Any) -> dict[str, float]:
        stats = real_train(model, examples, **kwargs)
        model.output_logit.set_weights([w * -3.0 for w in model.output_logit.get_weights()])  # turned around
        return stats

    monkeypatch.setattr(ranker_line_module, "train_ranker", unlearn)
    for example in planted(600, start=600, seed=2):
        line.add(example)
    outcome = line.run_interval()
    assert outcome is not None and outcome.version is None
    assert any(reason.startswith("logloss_regression") for reason in outcome.reasons), outcome.reasons
    assert any(reason.startswith("ranking_regression") for reason in outcome.reasons), outcome.reasons
    assert export.list_versions(line.base_path) == [1, 2] and publisher.current["canary"] == 2
    assert not any(line.staging_path.glob("*"))


def test_one_stage_rows_get_their_score_relative_to_the_best_of_their_request() -> None:
    import pandas as pd

    from online_trainer.ranker_line import relative_to_request

    frame = pd.DataFrame(
        {
            "request_id": ["a", "a", "b", "b"],
            "score": [5.0, 3.0, float("nan"), float("nan")],  # b was ordered by the ranking model
            "retrieval_score": [float("nan"), float("nan"), 0.0, -1.5],  # logged relative by the API
        }
    )
    assert relative_to_request(frame)["retrieval_score"].tolist() == [0.0, -2.0, 0.0, -1.5]


def test_within_request_auc_counts_the_pairs_of_one_list_only() -> None:
    from online_trainer.ranker_training import within_request_auc

    requests = np.array(["r1", "r1", "r2", "r2", "r3"])
    clicked = np.array([True, False, True, False, True])
    scores = np.array([2.0, 1.0, 0.0, 3.0, -9.0])  # r3 has no unclicked item: no pair
    assert within_request_auc(requests, clicked, scores) == (0.5, 2)
    assert np.isnan(within_request_auc(requests[4:], clicked[4:], scores[4:])[0])


def test_the_intervals_alternate_two_model_objects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each candidate is the spare model object (the one that served before, or a rejected
    candidate) with the current weights assigned, so its traced training step and serving module
    are reused: after the first interval no model is built again."""
    built = []
    build = ranker_line_module.build_ranker

    def counting_build(*args: Any, **kwargs: Any) -> Any:
        built.append(build(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(ranker_line_module, "build_ranker", counting_build)
    line = _line(tmp_path, FakePublisher())
    line.resume()
    first = line.model
    outcomes = []
    for interval in range(3):
        for example in planted(300, start=300 * interval, seed=interval):
            line.add(example)
        outcomes.append(line.run_interval())
    assert len(built) == 2, outcomes  # the first version's model and one spare
    assert {id(line.model), id(line._spare)} == {id(model) for model in built}
    assert first is built[0]
    published = [outcome.version for outcome in outcomes if outcome is not None and outcome.version is not None]
    assert published, outcomes  # the planted preference is learned: at least one candidate serves
