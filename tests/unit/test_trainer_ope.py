"""The off-policy gate inside the online loop (no Kafka: ``OnlineTrainer.ingest`` and the logged
lists given to ``trainer.logged``): stable's lists, shown with exploration, judge each candidate;
one that would show worse items is rejected before it is ever written where a canary label could
reach it, and the verdict is in the lineage of a version that passes."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from online_trainer import export
from online_trainer import finetune as finetune_module
from online_trainer.catalog import ItemCatalog
from online_trainer.loop import OnlineTrainer
from online_trainer.model import TwoTowerModel, build_model
from online_trainer.model_config import ModelConfig
from online_trainer.ope_gate import LoggedList
from online_trainer.ope_rankings import two_tower_rankings
from online_trainer.settings import OpeGateTuning, TrainerSettings, TrainerTuning
from streamrec.core.attributes import AttributeSchema, write_schema
from streamrec.core.events import Interaction, LabeledExample
from streamrec.core.exploration import explore
from streamrec.core.settings import ExplorationTuning, PathSettings, RankingTuning
from tests.unit.test_ranker_line import planted
from tests.unit.test_trainer_freshness import NoAttributes

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
SCHEMA = AttributeSchema()
K = 5
EXPLORATION = ExplorationTuning(policy="epsilon_greedy", epsilon=0.5, slots=2, pool_size=10)


def _trainer(tmp_path: Path, *, ranking: bool = False) -> OnlineTrainer:
    tuning = TrainerTuning(
        holdout_size=2,
        gate_margin=1.0,  # hit@k never rejects here: the off-policy gate is the one judging
        replay_fraction=0.0,
        publish=False,
        gate_k=5,
        ope_gate=OpeGateTuning(min_lists=100),
    )
    settings = TrainerSettings(
        paths=PathSettings(state_dir=tmp_path),
        trainer=tuning,
        exploration=EXPLORATION,
        ranking=RankingTuning(enabled=ranking),
    )
    write_schema(settings.data_dir, SCHEMA)
    trainer = OnlineTrainer(settings, schema=SCHEMA, lookup=NoAttributes())
    catalog = ItemCatalog(tuple(str(i) for i in range(20)), (), {})
    trainer.model = build_model(catalog, ModelConfig(attributes=SCHEMA, embedding_dim=8, batch_size=8, epochs=1))
    return trainer


def log_stable_lists(trainer: OnlineTrainer, requests: int, seed: int = 0) -> None:
    """Stable (the trainer's current model) serves with exploration; users click its top items
    (0.5) far more than the rest (0.05): the truth agrees with stable's ranking."""
    assert trainer.model is not None
    rng, draws = random.Random(seed), np.random.default_rng(seed)
    users = [f"u{user}" for user in range(60)]
    contexts = [
        LoggedList(f"ctx{u}", u, 1, {"recent_items": [], "count_1h": 0, "count_24h": 0}, (), (), ()) for u in users
    ]
    rankings = two_tower_rankings(trainer.model)(contexts, K + EXPLORATION.pool_size)
    for request in range(requests):
        user = request % len(users)
        ranked = rankings[user]
        best = {item for item, _ in ranked[:K]}
        shown = explore(ranked, K, EXPLORATION.rules(), rng)
        for position, ((item, score), propensity) in enumerate(zip(shown.items, shown.propensities, strict=True)):
            trainer.logged.add(
                LabeledExample(
                    event_id=LabeledExample.id_for(f"r{request}", item),
                    event_time=T0,
                    user_id=users[user],
                    request_id=f"r{request}",
                    item_id=item,
                    position=position,
                    arm="stable",
                    model_version=1,
                    score=score,
                    clicked=bool(draws.random() < (0.5 if item in best else 0.05)),
                    impression_time=T0,
                    features=dict(contexts[user].features),
                    propensity=propensity,
                    explored=shown.explored[position],
                )
            )


def _interval(trainer: OnlineTrainer, offsets: range) -> Any:
    for offset in offsets:
        event = Interaction(
            event_id=f"e{offset}",
            event_time=T0 + timedelta(minutes=offset),
            user_id=f"u{offset % 3}",
            item_id=str(offset % 20),
        )
        trainer.ingest(event, position=(0, offset), produced_s=1000 + offset)
    return trainer.run_interval()


def _unchanged(model: TwoTowerModel, examples: pd.DataFrame, **kwargs: Any) -> dict[str, float]:
    """A fine-tune that leaves the weights as they are: the candidate ranks exactly like stable."""
    return {"loss": 1.0, "gradient_norm_mean": 1.0, "gradient_norm_max": 1.0, "examples": float(len(examples))}


def _reversed(model: TwoTowerModel, examples: pd.DataFrame, **kwargs: Any) -> dict[str, float]:
    """A fine-tune that turns the item vectors around: the candidate ranks stable's list upside down."""
    kernel, bias = model.item_projection.get_weights()
    model.item_projection.set_weights([-kernel, -bias])
    return _unchanged(model, examples)


def test_a_candidate_that_would_show_worse_items_never_becomes_a_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = _trainer(tmp_path)
    base = trainer.writer.base_path
    log_stable_lists(trainer, 1_500)

    monkeypatch.setattr(finetune_module, "train", _reversed)
    rejected = _interval(trainer, range(0, 10))
    gate = rejected.outcome.gate
    assert rejected.version is None and gate.reasons == ["ope_regression"], (gate.summary(), gate.ope)
    assert gate.ope["verdict"] == "blocked" and gate.ope["support"] >= 0.3
    assert float(gate.ope["difference"]["high"]) < 0
    assert export.list_versions(base) == [] and not any(trainer.writer.staging_path.glob("*"))

    monkeypatch.setattr(finetune_module, "train", _unchanged)
    published = _interval(trainer, range(10, 20))
    assert published.version == 1, published.outcome.gate.summary()
    ope = export.read_lineage(base / "1")["gate"]["ope"]
    assert ope["verdict"] == "passed" and ope["support"] == pytest.approx(1.0)
    assert ope["lists"] == 1_500 and ope["stable_versions"] == [1]
    assert set(ope["candidate"]) == {"ips", "snips", "dr"}


def test_without_logged_lists_the_gate_abstains_and_the_candidate_goes_on_with_a_ranking_canary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No list was logged with propensities (a one-stage stack without exploration): the gate
    abstains. The labeled examples still teach the ranking model, whose version joins the
    published retrieval version."""
    trainer = _trainer(tmp_path, ranking=True)
    assert trainer.ranker is not None
    trainer.ranker.resume()
    for example in planted(100):
        trainer.logged.add(example.model_copy(update={"propensity": None}))
    monkeypatch.setattr(finetune_module, "train", _reversed)
    report = _interval(trainer, range(0, 10))
    assert report.version == 1, report.outcome.gate.summary()
    ope = export.read_lineage(trainer.writer.base_path / "1")["gate"]["ope"]
    assert ope["verdict"] == "abstained" and "min_lists" in ope["reason"]
    assert report.ranker is not None and report.ranker.version == 2, report.ranker
    assert export.list_versions(trainer.ranker.base_path) == [1, 2]
