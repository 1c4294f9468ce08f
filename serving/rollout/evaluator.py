"""``streamrec evaluator``: reads labeled examples, tests canary against stable, acts.

The experiment under test is read from the model server's labels (the ``models.config`` the
model client keeps): whenever ``canary`` points at a version other than ``stable``'s, that pair
is an experiment. When only the canary moves (the trainer's next version) the experiment goes
on with the line's pooled evidence (``policy.pool_canary_line``; ``policy.py`` says why).
Labeled examples are attributed to it by their arm *and* model version, so examples still
arriving for an earlier pair (labels close a window after the impression) are ignored instead
of polluting the new one. A canary request interleaved with this experiment's stable version
(items carry a ``team``, the example the ``control_version``) also credits its first click to the
team that picked the clicked item, or counts a tie when both models had that item in their top k
(the example's ``shared``): the interleaved comparison ``policy.py`` decides on.

Decisions go through :class:`LabelController` (the model client in production): promote moves
``stable`` to the canary version (already loaded, so TF Serving's order holds), rollback moves
``canary`` back to the stable version and records the version as rejected. Every decision is
written to ``decisions.jsonl`` (time, versions, per-arm figures, test statistic, reason, the read
positions of its evidence) *before* it acts, and reconciled with the labels at start
(``decision_log.py``), and counted in Prometheus; the running per-arm figures of the current
experiment are appended to ``timeline.jsonl`` on an interval, for anyone following an experiment
(``tail -f``).

Segments (``slices.py``: user tenure and activity, item popularity, the click's ``event_kind``):
the figures per segment go into every decision record and timeline line
(``figures()["slices"]``) and to ``streamrec_evaluator_slice_ctr{arm,segment}``. When the
policy would promote but the canary loses a segment badly (``streamrec.core.segments.flagged``),
the segment is counted in ``streamrec_evaluator_slice_flags_total`` and, with
``block_promotion_on_slice_flag`` (the default: a canary that hurts a group of users should not
reach everyone unseen), the promotion is *held*: a ``held`` record in the decision log says which
segments and why, the labels stay, and the experiment goes on. It is promoted once no segment is
flagged any more (the line's next version, or more evidence), and the guardrails and the test can
still roll it back. A new hold record is written only when the flagged set changes.

Crash safety: the joiner is at-least-once, so an example may arrive twice (same ``event_id``); a
request counts once as a trial (its position-0 example) and once as a hit (any clicked example),
by request id, within an experiment, and a shown item once per request and position. The
evaluator rebuilds its evidence from Kafka after a restart: ``checkpoint.py`` keeps where the
experiment began in ``topics.labeled``, and :meth:`AbEvaluator.recover` reads it again from there.
Memory: ~200 B per request of the current experiment for those request ids, and a few counters
per item for the slices.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge

from serving.rollout.checkpoint import EvaluatorCheckpoint
from serving.rollout.decision_log import DecisionLog, LabelController
from serving.rollout.policy import Decision, Experiment, PolicyConfig
from serving.rollout.slices import SliceStats, SliceTable
from streamrec.core import contracts
from streamrec.core.events import LabeledExample
from streamrec.core.settings import SliceTuning

log = logging.getLogger(__name__)

DECISIONS = Counter("streamrec_evaluator_decisions_total", "Experiment decisions", ["action"])
EXAMPLES = Counter("streamrec_evaluator_examples_total", "Labeled examples read", ["outcome"])
ARM_CTR = Gauge("streamrec_evaluator_arm_ctr", "Click-through rate (hit rate) per arm", ["arm"])
ARM_TRIALS = Gauge("streamrec_evaluator_arm_requests", "Requests counted per arm", ["arm"])
CANARY_WIN_SHARE = Gauge(
    "streamrec_evaluator_canary_win_share", "Share of clicked interleaved requests won by the canary's items"
)
VERSION = Gauge("streamrec_evaluator_version", "Model version under each label", ["label"])
SLICE_CTR = Gauge(
    "streamrec_evaluator_slice_ctr", "CTR per arm and segment (requests or shown items: slices.py)", ["arm", "segment"]
)
SLICE_FLAGS = Counter(
    "streamrec_evaluator_slice_flags_total",
    "Canaries that won overall but lost this segment by more than slices.flag_loss",
    ["segment"],
)


__all__ = ["AbEvaluator", "LabelController"]


class AbEvaluator:
    """The evaluator's state: the current experiment, decided versions, read positions, and its logs."""

    def __init__(
        self,
        controller: LabelController,
        config: PolicyConfig,
        output_dir: Path,
        topic: str = "",
        *,
        slices: SliceTuning | None = None,
        block_promotion_on_slice_flag: bool = True,
        off_policy_estimate: Callable[[int], dict[str, Any] | None] | None = None,
    ) -> None:
        """``off_policy_estimate``: a version -> the off-policy gate's figures for it (its lineage's
        ``gate.ope``), written into each decision record beside the CTR the canary then earned."""
        self.controller = controller
        self.off_policy_estimate = off_policy_estimate
        self.config = config
        self.slice_tuning = slices or SliceTuning()
        self.block_promotion_on_slice_flag = block_promotion_on_slice_flag
        self.log = DecisionLog(output_dir)
        self.decisions_path = self.log.path
        self.timeline_path = output_dir / "timeline.jsonl"
        self.checkpoint_path = output_dir / "checkpoint.json"
        self.topic = topic
        self.experiment: Experiment | None = None
        self.decided: set[int] = self.log.decided_versions()
        # Next offset to read per partition of the labeled topic, and where the experiment began.
        self.positions: dict[int, int] = {}
        self.experiment_start: dict[int, int] = {}
        # Per request of this experiment: the positions counted as shown and as clicked, as bit
        # masks (the dedup of the module docstring); position 0 shown = the request's trial.
        self._shown: dict[str, int] = {}
        self._clicked: dict[str, int] = {}
        self.slices = SliceStats(self.slice_tuning, config.alpha)
        # The segments flagged at the last promote-look, and those of the last hold record.
        self._flagged: set[str] = set()
        self._held_on: list[str] | None = None
        self._exported: set[tuple[str, str]] = set()  # (arm, segment) of streamrec_evaluator_slice_ctr
        self._saved: EvaluatorCheckpoint | None = None

    # -- recovery ---------------------------------------------------------------------------
    def recover(self) -> dict[int, int]:
        """At start: settle decisions left half done, restore the experiment the labels still
        show, and return where to read ``topic`` from (partitions not named: the beginning)."""
        self.log.reconcile(self.controller)
        self.decided = self.log.decided_versions()
        saved = EvaluatorCheckpoint.load(self.checkpoint_path, self.topic)
        self.positions = dict(saved.positions)
        restored = None
        if saved.stable is not None and saved.canary_versions and saved.canary_versions[-1] not in self.decided:
            restored = Experiment(saved.stable, saved.canary_versions[0], self.config)
            for version in saved.canary_versions[1:]:
                restored.advance(version)
            self.experiment, self.experiment_start = restored, dict(saved.start)
        self.refresh_labels()
        if restored is not None and self.experiment is restored:
            log.info(
                "rebuilding the evidence of canary %s against stable %s from %s",
                saved.canary_versions,
                saved.stable,
                saved.start,
            )
            held = self.log.last_hold(restored.stable.version, restored.canary_versions)
            if held is not None:  # not written again for the same segments after the rebuild
                self._held_on = list(held["figures"]["slices"]["flagged"])
                self._flagged = set(self._held_on)
            self.positions = dict(saved.start)
            return dict(saved.start)
        return dict(self.positions)

    def mark_read(self, partition: int, offset: int) -> None:
        """The record at ``offset`` of ``partition`` has been read (counted, skipped or invalid)."""
        self.positions[partition] = offset + 1

    def save_checkpoint(self) -> None:
        """Write ``checkpoint.json`` when anything in it changed."""
        experiment = self.experiment
        checkpoint = EvaluatorCheckpoint(
            topic=self.topic,
            positions=dict(self.positions),
            stable=experiment.stable.version if experiment is not None else None,
            canary_versions=list(experiment.canary_versions) if experiment is not None else [],
            start=dict(self.experiment_start) if experiment is not None else {},
        )
        if checkpoint != self._saved:
            checkpoint.save(self.checkpoint_path)
            self._saved = checkpoint

    # -- labels -------------------------------------------------------------------------
    def refresh_labels(self) -> None:
        labels = self.controller.labels()
        stable, canary = labels.get(contracts.STABLE_LABEL), labels.get(contracts.CANARY_LABEL)
        for label, version in labels.items():
            VERSION.labels(label).set(version)
        if stable is None or canary is None or canary == stable or canary in self.decided:
            self.experiment = None
            self.save_checkpoint()
            return
        current = self.experiment
        if current is not None and (current.stable.version, current.canary.version) == (stable, canary):
            return
        if (
            current is not None
            and self.config.pool_canary_line
            and current.stable.version == stable
            and canary not in current.canary_versions
        ):
            log.info("canary line moves on: %s (after %s) against stable %s", canary, current.canary.version, stable)
            current.advance(canary)
            self.save_checkpoint()
            return
        log.info("new experiment: canary %s against stable %s", canary, stable)
        self.experiment = Experiment(stable, canary, self.config)
        self.experiment_start = dict(self.positions)
        self._reset_evidence()
        self.save_checkpoint()

    def _reset_evidence(self) -> None:
        self._shown, self._clicked = {}, {}
        self.slices = SliceStats(self.slice_tuning, self.config.alpha)
        self._flagged, self._held_on = set(), None
        for arm, segment in self._exported:  # no figure in this experiment (yet)
            SLICE_CTR.labels(arm, segment).set(math.nan)

    # -- evidence -------------------------------------------------------------------------
    def handle(self, example: LabeledExample) -> Decision | None:
        experiment = self.experiment
        if experiment is None:
            EXAMPLES.labels("no_experiment").inc()
            return None
        if not experiment.counts_for(example.arm, example.model_version):
            EXAMPLES.labels("other_version").inc()
            return None
        EXAMPLES.labels("counted").inc()
        # Interleaved with this experiment's stable: the click's team is evidence too.
        team = example.team if example.control_version == experiment.stable.version else None
        interleaved = team is not None
        bit = 1 << example.position
        shown = self._shown.get(example.request_id, 0)
        if shown & bit:
            EXAMPLES.labels("duplicate").inc()  # labeled again after a joiner restart
        else:
            self._shown[example.request_id] = shown | bit
            self.slices.record_shown(example.arm, example.item_id)
        if example.position == 0 and not shown & bit:
            self.slices.record_request(example.arm, example.features)
            experiment.record(
                example.arm,
                hit=False,
                degraded=example.degraded,
                latency_ms=example.serve_latency_ms,
                version=example.model_version,
                user_id=example.user_id,
                interleaved=interleaved,
            )
        clicked = self._clicked.get(example.request_id)
        if example.clicked and not (clicked or 0) & bit:
            self._clicked[example.request_id] = (clicked or 0) | bit
            self.slices.record_clicked(example.arm, example.item_id)
        if example.clicked and clicked is None:
            self.slices.record_request_hit(example.arm, example.features, example.kind)
            experiment.record_hit(example.arm, example.model_version, example.user_id, interleaved=interleaved)
            if team is not None:
                experiment.record_credit(team, example.model_version, example.user_id, tie=bool(example.shared))
        return None

    def decide(self) -> Decision | None:
        """Act on the policy's decision; a promotion that loses a segment may be held instead
        (module docstring): then the experiment goes on and None is returned."""
        experiment = self.experiment
        if experiment is None:
            return None
        decision = experiment.decide()
        if decision.action == "continue":
            return None
        table = self.slices.table(wins_overall=decision.action == "promote")
        newly_flagged = set(table.flagged) - self._flagged
        for segment in sorted(newly_flagged):
            SLICE_FLAGS.labels(segment).inc()
        self._flagged = set(table.flagged)
        reason = decision.reason
        if table.flagged and self.block_promotion_on_slice_flag:
            self._hold(experiment, decision, table)
            return None
        if table.flagged:
            reason += (
                f"; promoted although it loses {', '.join(table.flagged)} (evaluator.block_promotion_on_slice_flag "
                "is off)"
            )
        canary = experiment.canary.version
        record = self._record(experiment, decision, reason, table)
        if self._held_on is not None:
            record["held_on"] = self._held_on  # the segments an earlier hold named, now cleared
        intent = self.log.intend({"action": decision.action, **record})
        self.log.apply(intent, self.controller)
        self.decided.add(canary)
        DECISIONS.labels(decision.action).inc()
        log.info("%s version %s: %s", decision.action, canary, decision.reason)
        self.experiment = None
        self.save_checkpoint()
        return decision

    def _hold(self, experiment: Experiment, decision: Decision, table: SliceTable) -> None:
        """Keep the labels; write a ``held`` record when the flagged segments changed."""
        if self._held_on == table.flagged:
            return
        self._held_on = table.flagged
        tuning = self.slice_tuning
        reason = (
            f"{decision.reason}, but the promotion is held: the canary's CTR on {', '.join(table.flagged)} is "
            f"more than {tuning.flag_loss:.0%} below stable's, significantly (slices.flag_loss, at least "
            f"slices.min_examples={tuning.min_examples} per arm) and evaluator.block_promotion_on_slice_flag is "
            "on; it is promoted once no segment is flagged, or by hand"
        )
        self.log.hold(self._record(experiment, decision, reason, table))
        DECISIONS.labels("hold").inc()
        log.warning("hold version %s: %s", experiment.canary.version, reason)

    def _record(self, experiment: Experiment, decision: Decision, reason: str, table: SliceTable) -> dict[str, Any]:
        return {
            "reason": reason,
            "stable_version": experiment.stable.version,
            "canary_version": experiment.canary.version,
            "figures": self.figures(table),
            "test": asdict(decision.test) if decision.test is not None else None,
            "positions": dict(self.positions),
            "off_policy_estimate": self._off_policy(experiment.canary.version),
        }

    def _off_policy(self, version: int) -> dict[str, Any] | None:
        if self.off_policy_estimate is None:
            return None
        try:
            return self.off_policy_estimate(version)
        except (OSError, ValueError) as exc:  # a pruned or unreadable version: the record goes on without it
            log.warning("no off-policy estimate for version %d: %s", version, exc)
            return None

    # -- records --------------------------------------------------------------------------
    def figures(self, slices: SliceTable | None = None) -> dict[str, Any]:
        """Per-arm figures of the current experiment and its slice table (``slices`` None: built
        here, a segment flagged where the canary is ahead on the figure the policy judges)."""
        experiment = self.experiment
        if experiment is None:
            return {}
        if slices is None:
            ahead = (
                experiment.wins.ctr > 0.5
                if experiment.interleaved_requests
                else experiment.canary.ctr > experiment.stable.ctr
            )
            slices = self.slices.table(wins_overall=ahead)
        for row in slices.rows:
            for arm_name, counts in row.arms.items():
                if counts.trials:
                    SLICE_CTR.labels(arm_name, row.segment).set(counts.ctr)
                    self._exported.add((arm_name, row.segment))
        figures: dict[str, Any] = {}
        for arm in (experiment.stable, experiment.canary):
            name = contracts.STABLE_LABEL if arm is experiment.stable else contracts.CANARY_LABEL
            figures[name] = {
                "version": arm.version,
                "requests": arm.trials,
                "hits": arm.hits,
                "ctr": arm.ctr,
                "degraded": arm.degraded,
                "p95_latency_ms": arm.p95_latency_ms(),
            }
            ARM_CTR.labels(name).set(arm.ctr)
            ARM_TRIALS.labels(name).set(arm.trials)
        current = experiment.current
        figures[contracts.CANARY_LABEL]["line"] = list(experiment.canary_versions)
        figures[contracts.CANARY_LABEL]["current"] = {
            "version": current.version,
            "requests": current.trials,
            "ctr": current.ctr,
            # its own (not interleaved) lists: what the CTR-collapse guardrail reads
            "plain_requests": experiment.current_plain.trials,
            "plain_ctr": experiment.current_plain.ctr,
        }
        if experiment.interleaved_requests:
            figures["interleaving"] = {
                "requests": experiment.interleaved_requests,
                "clicked": experiment.wins.trials + experiment.ties,
                "credited": experiment.wins.trials,
                "ties": experiment.ties,
                "canary_wins": experiment.wins.hits,
                "canary_share": experiment.wins.ctr,
                "current_clicked": experiment.current_wins.trials,
                "current_canary_share": experiment.current_wins.ctr,
            }
            CANARY_WIN_SHARE.set(experiment.wins.ctr)
        figures["slices"] = slices.as_record()
        return figures

    def snapshot(self) -> None:
        figures = self.figures()
        if figures:
            self._append(self.timeline_path, {"time": _now(), **figures})

    def rejected_versions(self) -> list[int]:
        return self.log.rejected_versions()

    @staticmethod
    def _append(path: Path, record: dict[str, Any]) -> None:
        with path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def _now() -> str:
    return datetime.now(UTC).isoformat()
