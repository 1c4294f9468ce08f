"""`streamrec tune`: a small search records every trial, its best is the recorded argmax, and
`streamrec train` starts from it (its own flags still win); bad input is refused by name."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from online_trainer import tuning
from online_trainer.cli_tune import parse_space, search_settings
from online_trainer.gate import hits
from online_trainer.model import build_model
from online_trainer.model_config import ModelConfig
from online_trainer.settings import SEARCHED, HyperparameterSearch, SearchSpace, TrainerSettings, TrainerTuning
from online_trainer.training import train
from online_trainer.tuned_config import read_best_config, train_config, write_best_config
from streamrec.core.errors import SettingsError
from streamrec.core.settings import PathSettings
from streamrec.datasets.description import load_dataset

DATASET = "synthetic:users=60,items=80,events=1500,categories=5,seed=3"
TINY = ModelConfig(item_id_buckets=256, user_id_buckets=128, attribute_buckets=16, profile_dim=4, content_dim=4)
SPACE = SearchSpace(embedding_dim=(8, 16), batch_size=(64, 128), learning_rate=(0.005, 0.05), temperature=(0.05, 0.3))


@pytest.fixture(scope="module")
def data() -> tuning.TuningData:
    return tuning.data_from_frames(load_dataset(DATASET), None, TrainerTuning(holdout_size=200))


def test_a_small_search_records_every_trial_and_train_starts_from_its_best(
    data: tuning.TuningData, tmp_path: Path
) -> None:
    settings = TrainerSettings(paths=PathSettings(state_dir=tmp_path))
    trials_path = settings.best_config_path.parent / "trials.json"
    seen: list[tuning.TrialRecord] = []
    search = HyperparameterSearch(max_trials=3, epochs=1, space=SPACE)
    result = tuning.run_search(
        data, search, k=10, directory=tmp_path / "kt", base=TINY, trials_path=trials_path, on_trial=seen.append
    )

    assert [record.trial for record in result.trials] == [1, 2, 3] and seen == result.trials
    # trial 1 is keras-tuner's defaults: TINY's values where the space holds them, else the low end
    assert result.trials[0].values == {
        "embedding_dim": 8,
        "batch_size": 64,
        "learning_rate": 0.005,
        "temperature": 0.05,
    }
    assert len({tuple(record.values.values()) for record in result.trials}) == 3
    for record in result.trials:
        assert record.error is None and record.seconds > 0
        assert record.metric is not None and 0.0 <= record.metric <= 1.0
        assert record.ndcg is not None and 0.0 <= record.ndcg <= record.metric
    written = json.loads(trials_path.read_text())
    assert [trial["metric"] for trial in written["trials"]] == [record.metric for record in result.trials]
    best_metric = max(trial["metric"] for trial in written["trials"])
    best = next(trial for trial in written["trials"] if trial["metric"] == best_metric)
    assert written["best_trial"] == result.best.trial == best["trial"]
    # seeded: the same search proposes the same values again
    again = tuning.run_search(data, search, k=10, directory=tmp_path / "kt2", base=TINY)
    assert [record.values for record in again.trials] == [record.values for record in result.trials]

    write_best_config(
        settings.best_config_path,
        tuning.best_config(result, dataset="synthetic", until="2024-01-01T00:00:00+00:00", trials_path=trials_path),
    )
    stored = read_best_config(settings.best_config_path)
    assert stored is not None and stored.metric_value == best_metric and stored.values.as_overrides() == best["values"]

    config, line = train_config(settings, "synthetic", {"embedding_dim": None})
    assert config == dataclasses.replace(ModelConfig(), **best["values"])
    assert f"from tuned config {settings.best_config_path} (trial {best['trial']} of 3" in line
    # an explicit flag wins over the file for its field only
    config, line = train_config(settings, "synthetic", {"embedding_dim": 24, "learning_rate": None})
    assert config == dataclasses.replace(ModelConfig(), **{**best["values"], "embedding_dim": 24})
    assert line.endswith("set on the command line: embedding_dim")
    config, line = train_config(settings, "synthetic", {}, use_best=False)
    assert config == ModelConfig() and "tuned config not used" in line
    with pytest.raises(SettingsError, match="tuned on dataset 'synthetic', not 'ml-100k'.*--no-best-config"):
        train_config(settings, "ml-100k", {})


def test_a_failed_trial_is_recorded_and_the_search_goes_on(
    data: tuning.TuningData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def build_small_only(catalog: Any, config: ModelConfig) -> Any:
        if config.embedding_dim == 16:
            raise MemoryError("no room for 16 dimensions")
        return build_model(catalog, config)

    monkeypatch.setattr(tuning, "build_model", build_small_only)
    search = HyperparameterSearch(max_trials=3, epochs=1, space=SPACE)
    result = tuning.run_search(data, search, k=10, directory=tmp_path / "kt", base=TINY)
    failed = [record for record in result.trials if record.metric is None]
    assert len(result.trials) == 3 and failed and len(failed) < 3
    assert all(record.values["embedding_dim"] == 16 and "no room" in (record.error or "") for record in failed)
    assert result.best.values["embedding_dim"] == 8

    monkeypatch.setattr(
        tuning, "build_model", lambda catalog, config: build_small_only(catalog, replace(config, embedding_dim=16))
    )
    with pytest.raises(SettingsError, match="every trial failed .*no room.*narrow the search space"):
        tuning.run_search(data, search, k=10, directory=tmp_path / "kt2", base=TINY)


def test_the_search_metric_is_the_gates_hit_at_k(data: tuning.TuningData) -> None:
    model = build_model(data.catalog, dataclasses.replace(TINY, attributes=data.schema, embedding_dim=8))
    train(model, data.fit, epochs=1, progress=False)
    hit, ndcg = tuning.evaluate(model, data.holdout, k=10)
    assert hit == pytest.approx(float(hits(model, data.holdout, k=10).mean()))
    assert 0.0 < ndcg <= hit


def test_without_a_tuned_config_train_uses_modelconfig_and_its_flags(tmp_path: Path) -> None:
    settings = TrainerSettings(paths=PathSettings(state_dir=tmp_path))
    config, line = train_config(settings, "ml-100k", {"batch_size": 512})
    assert config == dataclasses.replace(ModelConfig(), batch_size=512)
    assert "ModelConfig defaults (no tuned config at" in line
    settings.best_config_path.parent.mkdir(parents=True)
    settings.best_config_path.write_text('{"values": {"dropout": 0.1}}')
    with pytest.raises(SettingsError, match="not a best configuration written by `streamrec tune`"):
        train_config(settings, "ml-100k", {})


def test_sample_users_keeps_whole_histories_of_that_many_users() -> None:
    interactions = load_dataset(DATASET).interactions
    sampled = tuning.sample_users(interactions, 10, seed=1)
    assert sampled["user_id"].nunique() == 10
    kept = interactions[interactions["user_id"].isin(sampled["user_id"].unique())]
    assert len(sampled) == len(kept)
    assert sampled.equals(tuning.sample_users(interactions, 10, seed=1))


@pytest.mark.parametrize(
    ("overrides", "space", "message"),
    [
        ({"max_trials": 0}, [], "search.max_trials: Input should be greater than or equal to 1"),
        ({"epochs": 0}, [], "search.epochs"),
        ({"seed": 0}, [], "search.seed"),
        ({}, ["dropout=0.1,0.2"], "unknown hyperparameter 'dropout'; the search space has"),
        ({}, ["replay_fraction=0.1:0.3"], "'replay_fraction' cannot be searched: .*online fine-tunes only"),
        ({}, ["learning_rate=0.02:0.001"], "LOW:HIGH with 0 < LOW <= HIGH"),
        ({}, ["embedding_dim=0,8"], "each >= 1"),
        ({}, ["embedding_dim"], "is not NAME=VALUES"),
    ],
)
def test_bad_search_input_is_refused_by_name(overrides: dict[str, int], space: list[str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        search_settings(overrides, space)


def test_space_flags_become_the_search_space() -> None:
    assert parse_space(["embedding_dim=16,32", "learning_rate=0.001:0.01", "temperature=0.1"]) == {
        "embedding_dim": ["16", "32"],
        "learning_rate": ["0.001", "0.01"],
        "temperature": ["0.1", "0.1"],
    }
    search = search_settings({"max_trials": 4}, ["embedding_dim=16,32", "temperature=0.1"]).trainer.search
    assert search.max_trials == 4
    assert search.space == SearchSpace(embedding_dim=(16, 32), temperature=(0.1, 0.1))
    with pytest.raises(SettingsError, match="embedding_dim takes choices"):
        parse_space(["embedding_dim=16:64"])  # a range of a choice field is refused, not read as two choices
    assert tuple(SearchSpace.model_fields) == SEARCHED  # the one list of names every part of the search uses
