"""One interval's learning step, shared by ``streamrec trainer`` and ``bench/prequential.py``.

The online loop (:mod:`online_trainer.loop`) owns Kafka, Feast, the gate and publishing; this
module owns *what the model learns from* an interval and *how*, so the prequential benchmark
measures exactly the trainer's learning, not a look-alike:

1. **Hold-out, learned one interval late.** The gate needs rows the candidate has not seen, so the
   newest rows of an interval (``trainer.holdout_size``, at most a fifth) are held out. They used
   to be learned only if the replay buffer happened to draw them; :class:`IntervalPlan` now
   *defers* them: they are the first training rows of the next interval. Every event is learned
   as a new example exactly once, one interval late at worst.
2. **Replay** (:mod:`online_trainer.buffer`): the new rows are mixed with a uniform sample of
   everything learned before (``trainer.replay_fraction`` of the mix). On ml-100k most stream
   events come from users the model has never seen (their id rows cannot help yet), so what an
   update gains is a better shared model: item vectors and the recent-items path learn from
   more data. Replay is what lets each update keep *re-learning* the whole history, the way a
   retrain's epochs would, at the cost of a bigger mix and of less weight on the interval's own
   events; ``replay_fraction`` sets that trade (0.1 by default).
3. **Fine-tune** a copy of the serving model (:func:`online_trainer.model_state.clone_for_finetune`:
   weights and Adam state carried over) for ``trainer.finetune_epochs`` over the mix, with the
   softmax over the whole catalog (``trainer.finetune_loss``; the settings say why), each example
   weighted by its event kind (``trainer.kind_weights``).

See docs/design/trainer.md#fine-tuning-step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from online_trainer.buffer import ReplayBuffer
from online_trainer.catalog import ItemCatalog
from online_trainer.dataset import holdout_rows
from online_trainer.model import TwoTowerModel
from online_trainer.model_state import clone_for_finetune, copy_into, finetune_config
from online_trainer.settings import TrainerTuning
from online_trainer.training import trace_train_step, train


@dataclass
class IntervalPlan:
    """What one interval trains on, validates on, and leaves for the next one."""

    fresh: pd.DataFrame  # the previous interval's deferred hold-out + this interval's new rows minus its hold-out
    holdout: pd.DataFrame  # the gate's rows: never in ``mix``
    replayed: pd.DataFrame  # drawn from the replay buffer
    deferred: pd.DataFrame  # this interval's hold-out: the first training rows of the next interval
    deferred_rows: np.ndarray  # positions of ``deferred`` in the interval's new examples

    @property
    def mix(self) -> pd.DataFrame:
        if self.replayed.empty:
            return self.fresh
        return pd.concat([self.fresh, self.replayed], ignore_index=True)


def plan_interval(
    examples: pd.DataFrame,
    *,
    deferred: pd.DataFrame,
    replay: ReplayBuffer,
    tuning: TrainerTuning,
    seed: int,
) -> IntervalPlan:
    """Split an interval's new ``examples`` (time order) into what is learned now, held out, and deferred.

    ``replay`` must not hold ``examples`` yet (add them after planning): replay is for older rows.
    """
    train_rows, held_rows = holdout_rows(examples, tuning.holdout_size)
    fresh = examples.iloc[train_rows].reset_index(drop=True)
    holdout = examples.iloc[held_rows].reset_index(drop=True)
    next_deferred = holdout
    if holdout.empty:  # too few new rows to spare: the most recent replayed ones, else the new ones
        holdout = replay.frame.sort_values("event_time").tail(tuning.holdout_size)
        holdout = holdout if not holdout.empty else fresh.tail(tuning.holdout_size)
    if not deferred.empty:
        fresh = pd.concat([deferred.loc[:, list(fresh.columns)], fresh], ignore_index=True)
    replayed = replay.sample(replay.replay_count(len(fresh), tuning.replay_fraction), seed=seed)
    return IntervalPlan(
        fresh=fresh, holdout=holdout, replayed=replayed, deferred=next_deferred, deferred_rows=held_rows
    )


def finetune(
    model: TwoTowerModel,
    plan: IntervalPlan,
    tuning: TrainerTuning,
    *,
    catalog: ItemCatalog | None = None,
    reuse: TwoTowerModel | None = None,
) -> tuple[TwoTowerModel, dict[str, float]]:
    """A candidate: a copy of ``model`` fine-tuned on ``plan.mix`` (``model`` itself is untouched).

    ``catalog``: the candidate's catalog when the interval brought new items (set before training,
    so a new positive is learned with its content features). ``reuse``: an earlier candidate that
    serves nothing any more; it becomes the copy (see ``model_state.copy_into``) instead of a new object.
    """
    full_catalog = tuning.finetune_loss == "full_catalog"
    if (
        reuse is not None
        and reuse is not model
        and reuse.config == finetune_config(model.config, full_catalog=full_catalog)
    ):
        candidate = copy_into(reuse, model)
    else:
        candidate = clone_for_finetune(model, full_catalog=full_catalog)
    if catalog is not None:
        candidate.catalog = catalog
    mix = plan.mix
    stats: dict[str, float] = {}
    if not mix.empty:
        stats = train(candidate, mix, epochs=tuning.finetune_epochs, progress=False, kind_weights=tuning.kind_weights)
    return candidate, stats


def training_pair(
    model: TwoTowerModel, tuning: TrainerTuning, warm_up: pd.DataFrame
) -> tuple[TwoTowerModel, TwoTowerModel]:
    """The serving model as a fine-tune copy, and a spare: the two objects the intervals alternate between.

    Each interval trains the spare in place (:func:`finetune` with ``reuse``) and, once published,
    the candidate serves and the model it replaced becomes the spare. A model loaded from disk has
    the bootstrap's config, which the reuse check refuses, so without this the second interval
    built (and traced) a third object. Both returned objects have their training step traced on
    ``warm_up`` (a few hundred rows; none: left for the first intervals), weights untouched.
    """
    full_catalog = tuning.finetune_loss == "full_catalog"
    if model.config != finetune_config(model.config, full_catalog=full_catalog):
        model = clone_for_finetune(model, full_catalog=full_catalog)
    spare = clone_for_finetune(model, full_catalog=full_catalog)
    for each in (model, spare):
        trace_train_step(each, warm_up, kind_weights=tuning.kind_weights)
    return model, spare
