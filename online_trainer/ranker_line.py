"""The ranking model's version line in the online trainer (``ranking.enabled``).

* **Start**: the newest version under ``ranker_base_path`` is loaded to keep training it. With
  none, version 1 is a new ranking model, which serves the retrieval order until it has learned
  (:mod:`online_trainer.ranker_model`), exported and labelled ``stable`` and ``canary``. Labels
  that exist are left alone: they are the evaluator's to move, and a version it rolled back must
  not come back as the canary when the trainer restarts.
* **Collect**: every labeled example the trainer's reader of ``topics.labeled`` sees (clicked or
  not) is a training row: the logged user inputs, the item, its retrieval score and the position
  it was shown at. Rows at or before the newest impression a version learned (its lineage) are
  skipped, so the look-back window read again after a restart is not learned twice.
* **Interval** (with each published retrieval version, so both canaries form the canary arm
  together): fine-tune a copy of the current model on the new rows except the newest
  ``holdout_fraction``, and gate it: finite loss and weights; on the held-out rows a log loss
  not significantly worse than the serving model's (a paired comparison of the two models'
  per-row losses), and an order within each request not worse than the serving model's beyond
  noise (the share of (clicked, not clicked) pairs of one list it orders right, once there are
  enough pairs: a pointwise loss can improve while the order users see gets worse). Then export to a
  hidden staging folder, check the signature and one answer, rename into the base path and
  label it ``canary``. A rejected candidate leaves its rows
  learned by nobody, the serving version in place.

See docs/design/trainer.md#the-ranking-model.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

from online_trainer import export
from online_trainer.model_state import assign_optimizer_state, assign_weights, optimizer_state, weights_by_path
from online_trainer.publish import Publisher
from online_trainer.ranker_export import export_ranker, load_ranker_for_finetune, ranker_signature_problems
from online_trainer.ranker_model import RankerModel, build_ranker
from online_trainer.ranker_training import (
    RankerBatch,
    per_row_logloss,
    ranker_examples,
    ranker_metrics,
    served_logits,
    train_ranker,
    within_request_auc,
)
from online_trainer.settings import RankerTuning, TrainerSettings
from streamrec.core import contracts
from streamrec.core.attributes import AttributeSchema
from streamrec.core.errors import StreamrecError
from streamrec.core.events import LabeledExample

log = logging.getLogger(__name__)


@dataclass
class RankerOutcome:
    """One ranking interval: the gate's verdict, figures, and the version published (None: rejected)."""

    reasons: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    version: int | None = None

    @property
    def passed(self) -> bool:
        return not self.reasons


def labeled_row(example: LabeledExample) -> dict[str, Any]:
    """A training row of ``example``: the logged relative retrieval score, or NaN when the list was
    served in retrieval order (then ``score`` is the retrieval score; :func:`relative_to_request`)."""
    retrieval = example.retrieval_score
    return {
        "request_id": example.request_id,
        "score": example.score if example.ranker_version is None else math.nan,
        "user_id": example.user_id,
        "features": dict(example.features),
        "item_id": example.item_id,
        "position": example.position,
        "clicked": example.clicked,
        "retrieval_score": math.nan if retrieval is None else retrieval,
        "impression_time": example.impression_time,
        "event_id": example.event_id,
    }


def relative_to_request(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows without a logged relative retrieval score (a one-stage list) get their score minus the
    best shown score of their request, the API's :func:`serving.api.rerank.relative_scores` as
    near as the shown items allow (position 0 shows the best candidate unless exploration drew it)."""
    missing = frame["retrieval_score"].isna() & frame["score"].notna()
    best = frame.groupby("request_id")["score"].transform("max")
    relative = frame["retrieval_score"].where(~missing, frame["score"] - best)
    return frame.assign(retrieval_score=relative.fillna(0.0))


class RankerLine:
    """The ranking model of one trainer: its versions, pending rows and publishing."""

    def __init__(
        self, settings: TrainerSettings, schema: AttributeSchema, publisher: Publisher | None, *, publish: bool = True
    ) -> None:
        self.tuning: RankerTuning = settings.trainer.ranker
        self.base_path = settings.ranker_base_path
        self.staging_path = self.base_path.parent / f".{self.base_path.name}.staging"
        self.schema = schema
        self.publisher = publisher if publish else None
        self.model: RankerModel | None = None
        self._spare: RankerModel | None = None  # an earlier candidate that serves nothing (see _copy)
        self.version = 0
        self.learned_until: pd.Timestamp | None = None  # the newest impression the current version learned
        self.pending: dict[str, dict[str, Any]] = {}  # event_id -> row (a redelivered example counts once)

    # -- start ----------------------------------------------------------------------------------
    def resume(self) -> None:
        if self.staging_path.exists():
            shutil.rmtree(self.staging_path)
        export.remove_temp_dirs(self.base_path)
        versions = export.list_versions(self.base_path)
        if not versions:
            self.model = build_ranker(self.schema)
            self.version = 1
            export_ranker(self.model, self.base_path / "1", self.schema, lineage={"kind": "initial", "parent": None})
            log.info("ranking model version 1 (serves the retrieval order until it learns) at %s", self.base_path)
        else:
            self.version = versions[-1]
            self.model = load_ranker_for_finetune(self.base_path / str(self.version))
            if self.model.schema != self.schema:
                raise StreamrecError(
                    f"ranking model version {self.version} at {self.base_path} was trained on other declared "
                    "attributes than the feature repo's; move that folder away to start a new ranking model"
                )
            until = export.read_lineage(self.base_path / str(self.version)).get("learned_until")
            self.learned_until = pd.Timestamp(until) if until else None
        if self.publisher is not None and not self._labels():
            # the first start (or a server that lost its config): serve what is there; labels that
            # exist are the evaluator's to move (a rolled-back version must not come back as canary)
            self._label(self.version)

    # -- collect --------------------------------------------------------------------------------
    def add(self, example: LabeledExample) -> None:
        if self.learned_until is not None and example.impression_time <= self.learned_until:
            return
        if len(self.pending) < self.tuning.max_pending:
            self.pending.setdefault(example.event_id, labeled_row(example))

    # -- interval -------------------------------------------------------------------------------
    def run_interval(self) -> RankerOutcome | None:
        """Fine-tune, gate and publish (module docstring); None when too few new rows."""
        if self.model is None:
            raise StreamrecError("call resume() before run_interval()")
        if len(self.pending) < self.tuning.min_examples:
            log.info(
                "ranking model: %d new labeled examples, fewer than min_examples %d; no candidate this interval",
                len(self.pending),
                self.tuning.min_examples,
            )
            return None
        frame = relative_to_request(pd.DataFrame(list(self.pending.values()))).sort_values(
            "impression_time", kind="stable"
        )
        self.pending = {}
        held = max(1, int(len(frame) * self.tuning.holdout_fraction))
        train_rows, holdout_rows = frame.iloc[:-held], frame.iloc[-held:]
        outcome = RankerOutcome()
        candidate = self._copy(self.model)
        stats = train_ranker(
            candidate,
            ranker_examples(train_rows, self.schema),
            epochs=self.tuning.epochs,
            batch_size=self.tuning.batch_size,
        )
        outcome.figures["training"] = stats
        holdout = ranker_examples(holdout_rows, self.schema)
        self._check(outcome, candidate, holdout, holdout_rows["request_id"].to_numpy(), stats)
        if not outcome.passed:
            log.warning("ranking candidate rejected: %s", "; ".join(outcome.reasons))
            self._spare = candidate
            return outcome
        version = (export.latest_version(self.base_path) or 0) + 1
        learned_until = pd.Timestamp(train_rows["impression_time"].max()).isoformat()
        lineage = {
            "kind": "finetune",
            "parent_version": self.version,
            "learned_until": learned_until,
            "data": {"new_examples": len(train_rows), "holdout_examples": len(holdout_rows)},
            "gate": outcome.figures,
        }
        staged = export_ranker(candidate, self.staging_path / str(version), self.schema, lineage=lineage)
        self._check_export(outcome, staged, holdout)
        if not outcome.passed:
            shutil.rmtree(staged, ignore_errors=True)
            self._spare = candidate
            return outcome
        self.base_path.mkdir(parents=True, exist_ok=True)
        os.rename(staged, self.base_path / str(version))
        self._spare, self.model, self.version, outcome.version = self.model, candidate, version, version
        self.learned_until = pd.Timestamp(learned_until)
        self._label(version)
        export.prune_versions(self.base_path, self.tuning.retention, self._protected())
        log.info("ranking model version %d published (%s)", version, outcome.figures.get("holdout"))
        return outcome

    def _copy(self, model: RankerModel) -> RankerModel:
        """A candidate holding ``model``'s weights and optimizer state: the spare model object
        (an earlier candidate that serves nothing) when there is one, so its traced training step
        and serving module are reused; a new object otherwise."""
        spare, self._spare = self._spare, None
        if spare is None or spare is model or spare.config != model.config:
            spare = build_ranker(self.schema, model.config)
        assign_weights(spare, weights_by_path(model))
        assign_optimizer_state(spare, optimizer_state(model))
        return spare

    def _check(
        self,
        outcome: RankerOutcome,
        candidate: RankerModel,
        holdout: RankerBatch,
        holdout_ids: np.ndarray,
        stats: dict[str, float],
    ) -> None:
        serving = self.model
        if serving is None:
            raise StreamrecError("call resume() before run_interval()")
        if not math.isfinite(stats["loss"]) or not all(np.isfinite(np.asarray(w)).all() for w in candidate.weights):
            outcome.reasons.append("nonfinite: the fine-tune's loss or a weight is NaN/inf")
            return
        ours, theirs = per_row_logloss(candidate, holdout), per_row_logloss(serving, holdout)
        difference = ours - theirs
        mean = float(difference.mean())
        spread = float(difference.std(ddof=1) / math.sqrt(len(difference))) if len(difference) > 1 else math.inf
        low = mean - NormalDist().inv_cdf(0.975) * spread
        outcome.figures["holdout"] = {
            "candidate": ranker_metrics(candidate, holdout),
            "serving": ranker_metrics(serving, holdout),
            "logloss_difference": mean,
            "logloss_difference_low": low,
        }
        ids, clicked = holdout_ids, holdout.clicked.reshape(-1)
        ours_auc, pairs = within_request_auc(ids, clicked, served_logits(candidate, holdout))
        theirs_auc, _ = within_request_auc(ids, clicked, served_logits(serving, holdout))
        outcome.figures["holdout"].update(
            {"within_request_auc": ours_auc, "serving_within_request_auc": theirs_auc, "request_pairs": pairs}
        )
        # noise: two standard errors of a proportion over the pairs (they share requests, so this
        # is a floor, not an exact interval); a real regression, like a reversed order, is far past it
        noise = 2 * math.sqrt(max(theirs_auc * (1 - theirs_auc), 1e-6) / max(pairs, 1))
        if pairs >= self.tuning.min_request_pairs and ours_auc < theirs_auc - self.tuning.auc_margin - noise:
            outcome.reasons.append(
                f"ranking_regression: within-request AUC {ours_auc:.4f} vs serving {theirs_auc:.4f} on "
                f"{pairs} (clicked, not clicked) pairs of held-out requests, worse by more than "
                f"auc_margin + noise ({self.tuning.auc_margin} + {noise:.4f})"
            )
        if low > self.tuning.gate_margin:
            outcome.reasons.append(
                f"logloss_regression: held-out log loss {float(ours.mean()):.4f} vs serving "
                f"{float(theirs.mean()):.4f}, worse by at least {low:.4f} (95 %) on {len(difference)} rows"
            )

    def _check_export(self, outcome: RankerOutcome, staged: Path, holdout: RankerBatch) -> None:
        import tensorflow as tf

        loaded = tf.saved_model.load(str(staged))
        problems = ranker_signature_problems(loaded, self.schema)
        if problems:
            outcome.reasons.append("signature_mismatch: " + "; ".join(problems))
            return
        part = holdout.subset(np.arange(min(8, len(holdout))))
        request = {name: tf.constant(values) for name, values in part.users.items()}
        request["item_ids"] = tf.constant(part.item_ids)
        request["retrieval_scores"] = tf.constant(part.retrieval_scores)
        scores = loaded.signatures[contracts.RANK_SIGNATURE](**request)["scores"].numpy()
        if scores.shape != part.item_ids.shape or not np.isfinite(scores).all():
            outcome.reasons.append(f"export_outputs: rank answered {scores.shape} or non-finite scores")

    # -- labels ---------------------------------------------------------------------------------
    def _label(self, version: int) -> None:
        if self.publisher is None:
            return
        try:
            if self.publisher.labels().get(contracts.CANARY_LABEL) != version:
                self.publisher.publish_canary(version)
        except (StreamrecError, OSError) as exc:
            log.warning("ranking model version %d is written but not labelled canary: %s", version, exc)

    def _labels(self) -> dict[str, int]:
        if self.publisher is None:
            return {}
        try:
            return self.publisher.labels()
        except (StreamrecError, OSError) as exc:
            log.warning("could not read the ranking model's labels: %s", exc)
            return {}

    def _protected(self) -> set[int]:
        protect = {self.version}
        if self.publisher is not None:
            try:
                protect |= set(self.publisher.labels().values())
            except (StreamrecError, OSError):
                pass
        return protect


def ranker_publisher(settings: TrainerSettings) -> Any:
    """The model client of the ranking model (same server and config file as the retrieval model's)."""
    from serving.model_client import ModelServerClient

    return ModelServerClient.from_settings(
        settings, model_name=settings.ranking.model_name, server_base_path=settings.ranker_server_base_path
    )
