"""``streamrec train --until T``: the first version (or the next one), learned from history.

Steps: the feature repo's attribute schema (``attribute_schema.json``, written by ``streamrec
features setup --dataset``) -> the interactions up to ``T`` -> the example frame through Feast's
point-in-time join (:mod:`online_trainer.dataset`), keeping the kinds the trainer learns
(``trainer.positive_kinds``) -> the catalog from ``recommender_item_v1`` (or the items seen, for a
dataset without item attributes) -> a model built from the schema, trained on all but the newest
hold-out rows, each example weighted by its kind (``trainer.kind_weights``) -> the same publish
path as the online loop (staging, gate without a serving model to compare with, checkpoint,
rename, canary label; :mod:`online_trainer.publish`).

Under ``tf.distribute`` (``--workers N`` or a worker cluster, :mod:`online_trainer.distributed`)
every worker builds the same example frame and trains on its shard of each global batch; only
the chief publishes, from a plain copy of the trained model, and every worker learns its outcome.

The checkpoint saved with the version seeds the online loop: every user's history after the
last event up to ``T`` and a replay buffer of the bootstrap examples. The lineage records
``bootstrap_until = T``; the online trainer skips stream records at or before it (the model has
learned them), so it can read the topic from the beginning without learning anything twice.
"""

from __future__ import annotations

import dataclasses
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import pandas as pd

from online_trainer.buffer import ReplayBuffer
from online_trainer.checkpoint import Checkpoint
from online_trainer.dataset import DatasetInfo, interactions_until, training_rows
from online_trainer.distributed import CHIEF_FAILED, DistributedTrainingError, Distribution
from online_trainer.history import UserHistories
from online_trainer.model import build_model
from online_trainer.model_config import ModelConfig
from online_trainer.model_state import copy_model
from online_trainer.publish import Outcome, Publisher, VersionWriter, publish_candidate
from online_trainer.settings import TrainerSettings
from online_trainer.slices import SliceJudge, item_interactions
from online_trainer.training import train
from streamrec.core import contracts
from streamrec.core.attributes import AttributeSchema, read_schema

if TYPE_CHECKING:
    from feast import FeatureStore

log = logging.getLogger(__name__)


@dataclass
class BootstrapResult:
    dataset: DatasetInfo
    train_stats: dict[str, float]
    # The published version (None: rejected); every worker of a distributed run learns the chief's.
    version: int | None
    chief_outcome: Outcome | None = None  # None on a worker that is not the chief: only the chief publishes

    @property
    def is_chief(self) -> bool:
        return self.chief_outcome is not None

    @property
    def outcome(self) -> Outcome:
        """The gate's verdict and what was published (the chief's, or the only worker's)."""
        if self.chief_outcome is None:
            raise DistributedTrainingError("only the chief (worker 0) gates and publishes; read its result")
        return self.chief_outcome


def bootstrap(
    settings: TrainerSettings,
    interactions: pd.DataFrame,
    until: datetime,
    *,
    config: ModelConfig | None = None,
    epochs: int | None = None,
    store: FeatureStore | None = None,
    publisher: Publisher | None = None,
    progress: bool = True,
    schema: AttributeSchema | None = None,
    distribution: Distribution | None = None,
) -> BootstrapResult:
    """Train on ``interactions`` up to ``until`` and publish the next version (if the gate passes).

    ``schema``: the dataset's declared attributes (None: the feature repo's, ``read_schema``);
    ``config.attributes`` is replaced by it, so the towers always match the features.
    ``distribution``: this worker's cluster and strategy (made before any TensorFlow op ran); every
    worker of the cluster calls ``bootstrap`` with the same arguments.
    """
    if store is None:
        from features.store import open_store

        store = open_store(settings)
    schema = schema if schema is not None else read_schema(settings.data_dir)
    config = dataclasses.replace(config or ModelConfig(), attributes=schema)
    tuning = settings.trainer
    cutoff = pd.Timestamp(until)
    cutoff = cutoff.tz_localize("UTC") if cutoff.tzinfo is None else cutoff.tz_convert("UTC")
    history = interactions_until(interactions, cutoff.to_pydatetime())
    rows = training_rows(
        store,
        history,
        cutoff.to_pydatetime(),
        schema,
        positive_kinds=tuning.positive_kinds,
        holdout_size=tuning.holdout_size,
        min_coverage=tuning.min_feature_coverage,
    )
    examples, fit, holdout, catalog, info = rows.examples, rows.fit, rows.holdout, rows.catalog, rows.info
    log.info("training set: %d examples of %d users (%s)", len(examples), info.users, info.note)
    strategy = distribution.strategy if distribution is not None else None
    with strategy.scope() if strategy is not None else nullcontext():
        model = build_model(catalog, config)
    epochs = epochs if epochs is not None else tuning.bootstrap_epochs
    stats = train(model, fit, epochs=epochs, progress=progress, kind_weights=tuning.kind_weights, strategy=strategy)
    if distribution is not None:
        model = copy_model(model)  # out of the strategy: the export is the one-worker graph
        if not distribution.cluster.is_chief:
            log.info("worker %d trained its shards; waiting for the chief to publish", distribution.cluster.task_index)
            return BootstrapResult(info, stats, distribution.agree(0) or None)
    replay = ReplayBuffer(tuning.replay_buffer_size)
    replay.add(examples)
    state = Checkpoint(UserHistories.from_interactions(history), replay, meta={"offsets": {}})
    lineage = {
        "kind": "bootstrap",
        "parent_version": None,
        "bootstrap_until": cutoff.isoformat(),
        "data": {
            "start": info.data_start,
            "end": info.data_end,
            "examples": len(fit),
            "holdout_examples": len(holdout),
        },
        "dataset": info.to_json(),
        "kafka": None,
        "feature_service": contracts.USER_FEATURE_SERVICE,
        "item_feature_service": contracts.ITEM_FEATURE_SERVICE,
        "features_source": info.features_source,
        "metrics": {key: float(value) for key, value in stats.items()},
    }
    if distribution is not None:
        lineage["distributed"] = distribution.lineage(config.batch_size)
    writer = VersionWriter(settings)
    writer.recover()
    try:
        outcome = publish_candidate(
            writer,
            model,
            holdout=holdout,
            serving=None,
            lineage=lineage,
            trainer_state=state,
            publisher=publisher if tuning.publish else None,
            k=tuning.gate_k,
            margin=tuning.gate_margin,
            alpha=tuning.gate_alpha,
            training=stats,
            slices=SliceJudge(settings.slices, item_interactions(replay), tuning.block_on_slice_flag),
        )
    except BaseException:
        if distribution is not None:
            distribution.agree(CHIEF_FAILED)  # the other workers stop with an error instead of waiting
        raise
    if distribution is not None:
        distribution.agree(outcome.version or 0)  # releases the other workers
    return BootstrapResult(info, stats, outcome.version, outcome)
