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
appended to ``decisions.jsonl`` (time, versions, per-arm figures, test statistic, reason) and
counted in Prometheus; the running per-arm figures of the current experiment are appended to
``timeline.jsonl`` on an interval, for anyone following an experiment (``tail -f``).
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import Counter, Gauge

from serving.rollout.policy import Decision, Experiment, PolicyConfig
from serving.rollout.settings import EvaluatorSettings
from streamrec.core import contracts
from streamrec.core.events import LabeledExample

log = logging.getLogger(__name__)

DECISIONS = Counter("streamrec_evaluator_decisions_total", "Experiment decisions", ["action"])
EXAMPLES = Counter("streamrec_evaluator_examples_total", "Labeled examples read", ["outcome"])
ARM_CTR = Gauge("streamrec_evaluator_arm_ctr", "Click-through rate (hit rate) per arm", ["arm"])
ARM_TRIALS = Gauge("streamrec_evaluator_arm_requests", "Requests counted per arm", ["arm"])
CANARY_WIN_SHARE = Gauge(
    "streamrec_evaluator_canary_win_share", "Share of clicked interleaved requests won by the canary's items"
)
VERSION = Gauge("streamrec_evaluator_version", "Model version under each label", ["label"])


class LabelController(Protocol):
    def labels(self) -> dict[str, int]: ...

    def promote(self, version: int | None = None) -> int: ...

    def rollback(self) -> int: ...


class AbEvaluator:
    """The evaluator's state: the current experiment, decided versions, and its logs."""

    def __init__(self, controller: LabelController, config: PolicyConfig, output_dir: Path) -> None:
        self.controller = controller
        self.config = config
        output_dir.mkdir(parents=True, exist_ok=True)
        self.decisions_path = output_dir / "decisions.jsonl"
        self.timeline_path = output_dir / "timeline.jsonl"
        self.rejected_path = output_dir / "rejected.json"
        self.experiment: Experiment | None = None
        self.decided: set[int] = set(self.rejected_versions())
        # Requests already counted as hits (bounded: examples of one request arrive together).
        self._hit_requests: OrderedDict[str, None] = OrderedDict()

    # -- labels -------------------------------------------------------------------------
    def refresh_labels(self) -> None:
        labels = self.controller.labels()
        stable, canary = labels.get(contracts.STABLE_LABEL), labels.get(contracts.CANARY_LABEL)
        for label, version in labels.items():
            VERSION.labels(label).set(version)
        if stable is None or canary is None or canary == stable or canary in self.decided:
            self.experiment = None
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
            return
        log.info("new experiment: canary %s against stable %s", canary, stable)
        self.experiment = Experiment(stable, canary, self.config)

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
        if example.position == 0:
            experiment.record(
                example.arm,
                hit=False,
                degraded=example.degraded,
                latency_ms=example.serve_latency_ms,
                version=example.model_version,
                user_id=example.user_id,
                interleaved=interleaved,
            )
        if example.clicked and example.request_id not in self._hit_requests:
            self._hit_requests[example.request_id] = None
            if len(self._hit_requests) > 100_000:
                self._hit_requests.popitem(last=False)
            experiment.record_hit(example.arm, example.model_version, example.user_id, interleaved=interleaved)
            if team is not None:
                experiment.record_credit(team, example.model_version, example.user_id, tie=bool(example.shared))
        return None

    def decide(self) -> Decision | None:
        experiment = self.experiment
        if experiment is None:
            return None
        decision = experiment.decide()
        if decision.action == "continue":
            return None
        canary = experiment.canary.version
        if decision.action == "promote":
            self.controller.promote(canary)
        else:
            self.controller.rollback()
            self._mark_rejected(canary)
        self.decided.add(canary)
        self._audit(decision, experiment)
        DECISIONS.labels(decision.action).inc()
        log.info("%s version %s: %s", decision.action, canary, decision.reason)
        self.experiment = None
        return decision

    # -- records --------------------------------------------------------------------------
    def figures(self) -> dict[str, Any]:
        experiment = self.experiment
        if experiment is None:
            return {}
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
        return figures

    def snapshot(self) -> None:
        figures = self.figures()
        if figures:
            self._append(self.timeline_path, {"time": _now(), **figures})

    def rejected_versions(self) -> list[int]:
        if not self.rejected_path.exists():
            return []
        return [int(version) for version in json.loads(self.rejected_path.read_text())]

    def _mark_rejected(self, version: int) -> None:
        rejected = sorted({*self.rejected_versions(), version})
        temp = self.rejected_path.with_suffix(".tmp")
        temp.write_text(json.dumps(rejected))
        temp.replace(self.rejected_path)

    def _audit(self, decision: Decision, experiment: Experiment) -> None:
        record = {
            "time": _now(),
            "action": decision.action,
            "reason": decision.reason,
            "stable_version": experiment.stable.version,
            "canary_version": experiment.canary.version,
            "figures": self.figures(),
            "test": asdict(decision.test) if decision.test is not None else None,
        }
        self._append(self.decisions_path, record)

    @staticmethod
    def _append(path: Path, record: dict[str, Any]) -> None:
        with path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def _now() -> str:
    return datetime.now(UTC).isoformat()


def run(settings: EvaluatorSettings, *, max_seconds: float | None = None) -> None:
    """The evaluator process: consume labeled examples until stopped (or ``max_seconds``)."""
    from confluent_kafka import Consumer

    from serving.model_client import ModelServerClient
    from streamrec.core.errors import EventValidationError
    from streamrec.core.events import decode_event
    from streamrec.kafka.consume import consumer_config

    client = ModelServerClient.from_settings(settings)
    evaluator = AbEvaluator(client, settings.evaluator.policy, settings.evaluator_dir)
    consumer = Consumer(consumer_config(settings, settings.evaluator.group_id, from_beginning=True))
    consumer.subscribe([settings.topics.labeled])
    started = last_labels = last_snapshot = time.monotonic()
    evaluator.refresh_labels()
    try:
        while max_seconds is None or time.monotonic() - started < max_seconds:
            for message in consumer.consume(num_messages=500, timeout=0.5):
                if message.error() is not None:
                    log.warning("consumer error: %s", message.error())
                    continue
                try:
                    example = decode_event(message.value(), LabeledExample)
                except EventValidationError as error:
                    EXAMPLES.labels("invalid").inc()
                    log.warning("invalid labeled example at offset %s: %s", message.offset(), error)
                    continue
                evaluator.handle(example)
            evaluator.decide()
            now = time.monotonic()
            if now - last_labels >= settings.evaluator.labels_refresh_s:
                evaluator.refresh_labels()
                last_labels = now
            if now - last_snapshot >= settings.evaluator.snapshot_interval_s:
                evaluator.snapshot()
                last_snapshot = now
    finally:
        consumer.close()
        client.close()
