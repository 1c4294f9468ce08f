"""Which produced records each published version newly covers (``lineage["freshness"]``): the
ledger on its own, then the online loop (no Kafka: ``OnlineTrainer.ingest`` with positions and
produce times) over a published, a rejected and a published interval."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from prometheus_client import REGISTRY

from online_trainer import checkpoint, export
from online_trainer import finetune as finetune_module
from online_trainer.catalog import ItemCatalog
from online_trainer.freshness import CoverageLedger
from online_trainer.loop import OnlineTrainer
from online_trainer.model import TwoTowerModel, build_model
from online_trainer.model_config import ModelConfig
from online_trainer.settings import TrainerSettings, TrainerTuning
from streamrec.core.attributes import AttributeSchema, write_schema
from streamrec.core.events import Interaction
from streamrec.core.settings import PathSettings

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
SCHEMA = AttributeSchema()


def test_a_version_takes_the_records_below_its_trained_offsets_counted_per_second() -> None:
    ledger = CoverageLedger(100, covered={0: 10})
    ledger.add([(0, 9, 500), (0, 10, 1000), (0, 11, 1000), (0, 12, 1001), (1, 3, 1000), (1, 4, 1002)])
    ledger.add([(0, 11, 1000)])  # a record seen again changes nothing
    assert len(ledger) == 5  # (0, 9) was covered by the parent already
    # partition 0 covered below 12, partition 1 below 4; a partition not named is not covered
    assert ledger.produced_counts({0: 12, 1: 4}) == [[1000, 3]]
    assert ledger.produced_counts({0: 13}) == [[1000, 2], [1001, 1]]
    assert len(ledger) == 5  # counting alone takes nothing
    saved = ledger.to_json(settled={0: 12, 1: 4})  # what a checkpoint saved with that version holds
    ledger.settle({0: 12, 1: 4})
    assert ledger.produced_counts({0: 100, 1: 100}) == [[1001, 1], [1002, 1]]
    restored = CoverageLedger.from_json(saved, 100)
    assert restored.covered == ledger.covered == {0: 12, 1: 4}
    assert restored.produced_counts({0: 100, 1: 100}) == [[1001, 1], [1002, 1]]
    assert CoverageLedger.from_json(None, 100).produced_counts({0: 100}) == []


def test_the_ledger_drops_the_oldest_produce_times_beyond_its_bound() -> None:
    ledger = CoverageLedger(3)
    ledger.add([(0, offset, 1000 - offset) for offset in range(5)])  # offset 4 was produced first
    assert ledger.dropped == 2 and ledger.produced_counts({0: 10}) == [[998, 1], [999, 1], [1000, 1]]
    off = CoverageLedger(0)
    off.add([(0, 1, 1000)])
    assert len(off) == 0 and off.dropped == 0


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class NoAttributes:
    """The dataset declares no attributes: nothing is ever read."""

    def user_attributes(self, user_ids: Sequence[str]) -> dict[str, dict[str, object]]:
        return {}

    def item_attributes(self, item_ids: Sequence[str]) -> dict[str, dict[str, object]]:
        return {}


def _trainer(tmp_path: Path) -> OnlineTrainer:
    tuning = TrainerTuning(holdout_size=2, gate_margin=1.0, replay_fraction=0.0, publish=False, gate_k=5)
    settings = TrainerSettings(paths=PathSettings(state_dir=tmp_path), trainer=tuning)
    write_schema(settings.data_dir, SCHEMA)
    trainer = OnlineTrainer(settings, schema=SCHEMA, lookup=NoAttributes())
    catalog = ItemCatalog(tuple(str(i) for i in range(20)), (), {})
    trainer.model = build_model(catalog, ModelConfig(attributes=SCHEMA, embedding_dim=4, batch_size=8, epochs=1))
    return trainer


def _interval(trainer: OnlineTrainer, offsets: range) -> Any:
    """Ten events of three users in offset order, produced two per second (offset o at 1000 + o // 2)."""
    for offset in offsets:
        event = Interaction(
            event_id=f"e{offset}",
            event_time=T0 + timedelta(minutes=offset),
            user_id=f"u{offset % 3}",
            item_id=str(offset % 20),
        )
        assert trainer.ingest(event, position=(0, offset), produced_s=1000 + offset // 2) == "example"
    return trainer.run_interval()


def test_each_published_version_counts_the_records_it_newly_covers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = _trainer(tmp_path)
    base = trainer.writer.base_path
    first = _interval(trainer, range(0, 10))
    assert first.version == 1, first.outcome.gate.summary()
    lineage = export.read_lineage(base / "1")
    # the two newest rows (offsets 8, 9) are held out for the gate: covered by the next version
    assert lineage["kafka"]["trained_offsets"] == {"0": 8}
    assert lineage["freshness"] == {"produced_counts": [[1000, 2], [1001, 2], [1002, 2], [1003, 2]]}
    assert any(segment.startswith("user_tenure=") for segment in lineage["slices"])

    # a diverged fine-tune (finite weights, NaN loss): rejected, its records wait for the next version
    real_train = finetune_module.train
    nonfinite_before = sample("trainer_loss_nonfinite_total")

    def diverged(model: TwoTowerModel, examples: pd.DataFrame, **kwargs: Any) -> dict[str, float]:
        return {**real_train(model, examples, **kwargs), "loss": math.nan}

    monkeypatch.setattr(finetune_module, "train", diverged)
    second = _interval(trainer, range(10, 20))
    assert second.version is None and second.outcome.gate.reasons == ["nonfinite"]
    assert sample("trainer_loss_nonfinite_total") == nonfinite_before + 1
    assert export.list_versions(base) == [1]
    kept = checkpoint.load_latest(trainer.writer.state_path, 1, 100)
    assert kept is not None and [row[1] for row in kept.meta["freshness"]["uncovered"]] == list(range(8, 20))

    monkeypatch.setattr(finetune_module, "train", real_train)
    third = _interval(trainer, range(20, 30))
    assert third.version == 2, third.outcome.gate.summary()
    lineage = export.read_lineage(base / "2")
    assert lineage["parent_version"] == 1 and lineage["kafka"]["trained_offsets"] == {"0": 28}
    # offsets 8..27: the first version's hold-out, the rejected interval, and this one's learned rows
    assert lineage["freshness"]["produced_counts"] == [[second, 2] for second in range(1004, 1014)]
    saved = checkpoint.load_latest(trainer.writer.state_path, 2, 100)
    assert saved is not None
    assert saved.meta["freshness"] == {"covered": {"0": 28}, "uncovered": [[0, 28, 1014], [0, 29, 1014]]}
    assert sample("trainer_gate_consecutive_rejections") == 0
    assert sample("trainer_loss") == pytest.approx(third.train_stats["loss"])
    assert sample("trainer_gradient_norm", stat="max") == pytest.approx(third.train_stats["gradient_norm_max"])
