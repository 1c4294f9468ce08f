"""``streamrec tune``: a bounded hyperparameter search for the bootstrap model, with keras-tuner.

Every trial is a short bootstrap: the model ``streamrec train`` builds (ModelConfig with the
trial's values for the :class:`~online_trainer.settings.SearchSpace` fields), trained for
``trainer.search.epochs`` epochs by :func:`online_trainer.training.train` on the rows the bootstrap
trains on, and scored with the gate's metric, hit@k (``trainer.gate_k``) on the gate's
time-ordered hold-out (the newest ``trainer.holdout_size`` examples, ``dataset.split_holdout``).
So the search maximises what decides whether a version is published; NDCG@k is recorded beside it.

Why a custom ``Tuner.run_trial`` and no HyperModel: the trainer does not train with
``model.fit`` (its own traced step and full-catalog loss), so keras-tuner chooses the values and
keeps the oracle's state, and the trial runs the project's training. The space is declared inside
``run_trial``, so keras-tuner's first trial takes each hyperparameter's default, ModelConfig's own
value (when the space holds it): trial 1 is the baseline the others are compared with. The oracle
is a seeded ``RandomSearch`` (``BayesianOptimization`` would need scikit-learn and spends its first
3 x 4 trials at random anyway).

Every finished trial is written to ``trials.json`` beside ``best_config.json`` at once, so an
interrupted search keeps what it measured; :mod:`online_trainer.tuned_config` is the file
``streamrec train`` reads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras_tuner as kt
import numpy as np
import pandas as pd

from online_trainer.catalog import ItemCatalog
from online_trainer.dataset import interactions_until, split_holdout, training_rows
from online_trainer.examples import examples_from_interactions, positive_examples
from online_trainer.inference import recommend
from online_trainer.model import build_model
from online_trainer.model_config import ModelConfig
from online_trainer.ranking_metrics import ranking_metrics
from online_trainer.settings import (
    CHOICES,
    RANGES,
    HyperparameterSearch,
    SearchSpace,
    TrainerSettings,
    TrainerTuning,
)
from online_trainer.training import train
from online_trainer.tuned_config import BestConfig, TunedValues
from streamrec.core.attributes import AttributeSchema
from streamrec.core.errors import DatasetError, SettingsError

if TYPE_CHECKING:
    from feast import FeatureStore

    from streamrec.datasets.description import Dataset


@dataclass(frozen=True)
class TuningData:
    """The bootstrap's training rows and hold-out, and the catalog its model ranks."""

    fit: pd.DataFrame
    holdout: pd.DataFrame
    catalog: ItemCatalog
    schema: AttributeSchema
    description: str


def sample_users(interactions: pd.DataFrame, users: int | None, seed: int) -> pd.DataFrame:
    """Every interaction of ``users`` users drawn with ``seed`` (all of them when None or more than there are)."""
    if users is None:
        return interactions
    ids = interactions["user_id"].astype(str)
    distinct = np.sort(ids.unique())
    if users >= len(distinct):
        return interactions
    chosen = np.random.default_rng(seed).choice(distinct, size=users, replace=False)
    return interactions.loc[ids.isin(chosen).to_numpy()].reset_index(drop=True)


def _tuning_data(
    examples: pd.DataFrame,
    fit: pd.DataFrame,
    holdout: pd.DataFrame,
    catalog: ItemCatalog,
    schema: AttributeSchema,
    source: str,
) -> TuningData:
    if holdout.empty or fit.empty:
        raise DatasetError(
            f"{len(examples)} examples are too few to hold out the newest ones and train on the rest; "
            "raise --sample-users or --until"
        )
    description = (
        f"{len(fit):,} training and {len(holdout):,} held-out examples (from {holdout['event_time'].min()}) "
        f"of {examples['user_id'].nunique():,} users, {len(catalog):,} items, features from {source}"
    )
    return TuningData(fit, holdout, catalog, schema, description)


def data_from_feast(
    settings: TrainerSettings,
    interactions: pd.DataFrame,
    until: datetime,
    *,
    schema: AttributeSchema,
    users: int | None = None,
    store: FeatureStore | None = None,
) -> TuningData:
    """The rows ``streamrec train --until`` would train and gate on (the bootstrap's own step,
    ``dataset.training_rows``), of ``users`` sampled users when given; the catalog is the whole
    history's, as the gate's."""
    if store is None:
        from features.store import open_store

        store = open_store(settings)
    tuning = settings.trainer
    history = interactions_until(interactions, until)
    rows = training_rows(
        store,
        sample_users(history, users, tuning.search.seed),
        until,
        schema,
        positive_kinds=tuning.positive_kinds,
        holdout_size=tuning.holdout_size,
        min_coverage=tuning.min_feature_coverage,
        catalog_item_ids=history["item_id"],
    )
    return _tuning_data(rows.examples, rows.fit, rows.holdout, rows.catalog, schema, rows.info.features_source)


def data_from_frames(
    dataset: Dataset, until: datetime | None, tuning: TrainerTuning, *, users: int | None = None
) -> TuningData:
    """The same rows built from the dataset's own frames, without a feature repo (benchmarks, tests):
    what Feast's join returns before any stream push was logged (``dataset.build_examples``' fallback)."""
    history = interactions_until(dataset.interactions, until)
    examples = positive_examples(
        examples_from_interactions(sample_users(history, users, tuning.search.seed), dataset.users, dataset.schema),
        tuning.positive_kinds,
    )
    if examples.empty:
        raise DatasetError(f"no interaction of the learned kinds {tuning.positive_kinds} to tune on")
    fit, holdout = split_holdout(examples, tuning.holdout_size)
    catalog = ItemCatalog.for_dataset(dataset.items, history["item_id"].astype(str), dataset.schema)
    return _tuning_data(examples, fit, holdout, catalog, dataset.schema, "the dataset's frames")


def evaluate(model: Any, holdout: pd.DataFrame, *, k: int) -> tuple[float, float]:
    """(hit@k, NDCG@k) over hold-out rows, each with one positive, nothing excluded: the gate's hit@k."""
    ids, _ = recommend(model, holdout, k=k)
    found = ranking_metrics(ids, [{item} for item in holdout["item_id"].astype(str)], k)
    return found.hit, found.ndcg


@dataclass(frozen=True)
class TrialRecord:
    """One trial, numbered from 1 (trial 1: ModelConfig's values): its values, hold-out metric (None: it
    failed, ``error`` says why), last epoch's loss and seconds."""

    trial: int
    values: dict[str, float | int]
    metric: float | None
    ndcg: float | None
    loss: float | None
    seconds: float
    error: str | None = None


@dataclass
class SearchResult:
    metric: str  # e.g. hit_at_10
    k: int
    epochs: int
    data: str
    trials: list[TrialRecord] = field(default_factory=list)

    def succeeded(self) -> list[TrialRecord]:
        """The trials with a metric; raises, naming the first errors, when every trial failed."""
        done = [record for record in self.trials if record.metric is not None]
        if not done:
            errors = "; ".join(f"trial {record.trial}: {record.error}" for record in self.trials[:3])
            raise SettingsError(f"every trial failed ({errors or 'none ran'}); narrow the search space (--space)")
        return done

    @property
    def best(self) -> TrialRecord:
        """The trial with the highest metric (the earliest of equals)."""
        return max(self.succeeded(), key=lambda record: (record.metric, -record.trial))

    def to_json(self) -> dict[str, Any]:
        done = any(record.metric is not None for record in self.trials)
        return {
            "metric": self.metric,
            "k": self.k,
            "epochs_per_trial": self.epochs,
            "data": self.data,
            "best_trial": self.best.trial if done else None,
            "trials": [asdict(record) for record in self.trials],
        }


def declare_space(hp: Any, space: SearchSpace, base: ModelConfig) -> dict[str, float | int]:
    """Register ``space`` with keras-tuner's ``hp``; defaults are ``base``'s values where the space holds them."""
    values: dict[str, float | int] = {}
    for name in CHOICES:
        choices: tuple[int, ...] = getattr(space, name)
        current = getattr(base, name)
        default = current if current in choices else choices[0]
        values[name] = int(hp.Choice(name, list(choices), default=default))
    for name in RANGES:
        low, high = getattr(space, name)
        if low == high:
            values[name] = float(hp.Fixed(name, low))
            continue
        current = getattr(base, name)
        default = current if low <= current <= high else low
        values[name] = float(hp.Float(name, low, high, sampling="log", default=default))
    return values


class _BootstrapTuner(kt.RandomSearch):  # type: ignore[misc]  # keras-tuner ships no type hints
    """keras-tuner's random search whose trials call ``trial_fn`` with the trial's values (module docstring)."""

    def __init__(
        self, trial_fn: Callable[[dict[str, float | int]], float], space: SearchSpace, base: ModelConfig, **kw: Any
    ):
        super().__init__(**kw)
        self._trial_fn = trial_fn
        self._space = space
        self._base = base

    def run_trial(self, trial: Any, *args: Any, **kwargs: Any) -> dict[str, float]:
        values = declare_space(trial.hyperparameters, self._space, self._base)
        return {self.oracle.objective.name: self._trial_fn(values)}


def run_search(
    data: TuningData,
    search: HyperparameterSearch,
    *,
    k: int,
    directory: Path,
    base: ModelConfig | None = None,
    kind_weights: Mapping[str, float] | None = None,
    trials_path: Path | None = None,
    on_trial: Callable[[TrialRecord], None] | None = None,
) -> SearchResult:
    """Up to ``search.max_trials`` trials (fewer when the space runs out of new values) in ``directory``
    (keras-tuner's state, overwritten); each finished trial is passed to ``on_trial`` and written to
    ``trials_path``. ``base``: the ModelConfig the trials vary (default ModelConfig's, with ``data.schema``)."""
    base = dataclasses.replace(base or ModelConfig(), attributes=data.schema)
    result = SearchResult(metric=f"hit_at_{k}", k=k, epochs=search.epochs, data=data.description)

    def trial_fn(values: dict[str, float | int]) -> float:
        started = time.perf_counter()
        try:
            config = dataclasses.replace(base, **TunedValues.model_validate(values).as_overrides())
            model = build_model(data.catalog, config)
            stats = train(model, data.fit, epochs=search.epochs, progress=False, kind_weights=kind_weights)
            hit, ndcg = evaluate(model, data.holdout, k=k)
        except Exception as exc:  # one bad trial (e.g. out of memory) must not lose the others
            record = TrialRecord(
                len(result.trials) + 1, values, None, None, None, time.perf_counter() - started, repr(exc)
            )
            _finish(result, record, trials_path, on_trial)
            raise kt.errors.FailedTrialError(repr(exc)) from exc
        loss = stats["loss"] if math.isfinite(stats["loss"]) else None
        record = TrialRecord(len(result.trials) + 1, values, hit, ndcg, loss, time.perf_counter() - started)
        _finish(result, record, trials_path, on_trial)
        return hit

    tuner = _BootstrapTuner(
        trial_fn,
        search.space,
        base,
        objective=kt.Objective(result.metric, direction="max"),
        max_trials=search.max_trials,
        seed=search.seed,
        directory=str(directory),
        project_name="bootstrap",
        overwrite=True,
        max_consecutive_failed_trials=search.max_trials + 1,  # never: `result.succeeded` reports failures
    )
    with warnings.catch_warnings():
        # keras-tuner 1.4's oracle lock calls threading.currentThread().getName(), deprecated since Python 3.10.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"keras_tuner\.")
        tuner.search(verbose=0)
    result.succeeded()
    return result


def _finish(
    result: SearchResult, record: TrialRecord, path: Path | None, on_trial: Callable[[TrialRecord], None] | None
) -> None:
    result.trials.append(record)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    if on_trial is not None:
        on_trial(record)


def best_config(result: SearchResult, *, dataset: str, until: str, trials_path: Path) -> BestConfig:
    """The ``best_config.json`` content for ``result``'s best trial."""
    best = result.best
    return BestConfig(
        values=TunedValues.model_validate(best.values),
        metric=result.metric,
        metric_value=float(best.metric or 0.0),
        trial=best.trial,
        trials=len(result.trials),
        epochs_per_trial=result.epochs,
        dataset=dataset,
        until=until,
        trials_path=str(trials_path),
    )


def trial_line(record: TrialRecord, total: int, metric: str) -> str:
    """One progress line per trial, e.g. ``trial 2/8  embedding_dim=64 ... -> hit_at_10 0.0812 ...``."""
    values = " ".join(f"{name}={value:g}" for name, value in record.values.items())
    if record.metric is None:
        return f"trial {record.trial}/{total}  {values} -> failed after {record.seconds:.1f} s: {record.error}"
    loss = "n/a" if record.loss is None else f"{record.loss:.4f}"
    return (
        f"trial {record.trial}/{total}  {values} -> {metric} {record.metric:.4f}, "
        f"ndcg {record.ndcg or 0.0:.4f}, loss {loss}, {record.seconds:.1f} s"
    )
