"""``streamrec trainer``: keep the model learning from the interaction stream.

One process, one Kafka consumer in its own group (``trainer.group_id``), manual commits only:

1. **Start**: delete leftovers of an interrupted run (:meth:`VersionWriter.recover`), load the
   newest version's weights (``export.load_for_finetune``) and its trainer checkpoint (user
   histories + replay buffer, :mod:`online_trainer.checkpoint`), trace the training step of the two
   model objects the intervals alternate between (``finetune.training_pair``, on a few replayed
   rows, weights untouched), label it canary if the last run could not, and join the group. On
   assignment every partition starts at the larger of the group's committed offset and the offset
   saved with the checkpoint (they differ only after a crash between publishing and committing;
   then the version already holds those records).
2. **Collect**: decode each record with ``streamrec.core.events.decode_event``. An invalid record is
   counted (``trainer_records_total{outcome="invalid:<reason>"}``) and skipped: the Faust worker
   owns the dead-letter topic. Records at or before the bootstrap's ``--until`` are skipped (the
   bootstrap already learned them), and so are redelivered ``event_id``s. Every other interaction
   moves its user's state, and one of a learned kind (``trainer.positive_kinds``) becomes an example
   whose user inputs are the user's state *before* it (:mod:`online_trainer.history`; the module
   docstring says why the trainer keeps this state itself instead of reading Feast online), with the
   user's declared attributes read from Feast online (:mod:`online_trainer.lookup`,
   :mod:`online_trainer.stream_examples`).
3. **Interval** (every ``interval_s`` or ``max_examples``, whichever comes first): hold out the
   newest examples (they are learned in the next interval), fine-tune a clone of the current
   weights on the rest plus a replay sample (:mod:`online_trainer.finetune`, the same step
   ``bench/prequential.py`` measures), and hand the candidate to
   :func:`online_trainer.publish.publish_candidate` (stage, gate, checkpoint, rename, canary
   label, prune). **Then** commit the offsets. A rejected candidate
   leaves the serving version in place; the trainer saves a newer checkpoint of that version
   (its histories moved on) and commits too, so one bad interval does not stall the stream.
   The gate also judges the candidate per segment (``slices`` settings, :mod:`online_trainer.slices`),
   and a published version's lineage counts the produce times of the records it newly covers
   (``freshness``, :mod:`online_trainer.freshness`), from which the API measures live model freshness.

The off-policy gate (``trainer.ope_gate``, :mod:`online_trainer.ope_gate`) judges each candidate
on the lists stable showed recently, read from ``topics.labeled`` by a second consumer in no group
(:mod:`online_trainer.logged_reader`); its verdict joins the gate's and the lineage.

With ``trainer.source = "labeled"`` the loop reads the joiner's labeled examples instead and learns
from the clicked ones, using the features logged with the impression when they are complete.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError, TopicPartition

from online_trainer import checkpoint, export, metrics
from online_trainer.buffer import ReplayBuffer
from online_trainer.catalog import ItemCatalog
from online_trainer.checkpoint import Checkpoint
from online_trainer.examples import empty_examples
from online_trainer.finetune import finetune, plan_interval, training_pair
from online_trainer.freshness import CoverageLedger, trained_offsets
from online_trainer.history import UserHistories
from online_trainer.logged_reader import LoggedExamples
from online_trainer.lookup import FeastLookup, FeatureLookup
from online_trainer.model import TwoTowerModel
from online_trainer.ope_gate import OpeVerdict, judge, logged_lists
from online_trainer.ope_rankings import two_tower_rankings
from online_trainer.publish import Fault, Outcome, Publisher, VersionWriter, label_canary, publish_candidate
from online_trainer.ranker_line import RankerLine, RankerOutcome
from online_trainer.settings import TrainerSettings
from online_trainer.slices import SliceJudge, item_interactions
from online_trainer.stream_examples import POSITION, PRODUCED, event_row, examples_frame
from streamrec.core import contracts
from streamrec.core.attributes import AttributeSchema, read_schema
from streamrec.core.errors import EventValidationError, StreamrecError
from streamrec.core.events import Interaction, LabeledExample, decode_event

log = logging.getLogger(__name__)


class TrainerError(StreamrecError):
    """The trainer cannot start or continue; the message names the fix."""


@dataclass
class IntervalReport:
    """What one interval did (also what the tests and the benchmark read)."""

    new_examples: int
    replayed: int
    holdout: int
    offsets: dict[int, int]
    trained: int = 0  # examples fed to fine-tuning (new minus hold-out, plus replayed)
    outcome: Outcome | None = None
    train_stats: dict[str, float] = field(default_factory=dict)
    publish_s: float | None = None
    # seconds per stage from the interval's end: examples, finetune, then publish_candidate's own
    stage_s: dict[str, float] = field(default_factory=dict)
    ranker: RankerOutcome | None = None  # the ranking model's interval (ranking.enabled), None: none ran

    @property
    def version(self) -> int | None:
        return self.outcome.version if self.outcome is not None else None


class OnlineTrainer:
    def __init__(
        self,
        settings: TrainerSettings,
        *,
        publisher: Publisher | None = None,
        lookup: FeatureLookup | None = None,
        fault: Fault | None = None,
        summaries: metrics.SummaryWriter | None = None,
        schema: AttributeSchema | None = None,
        ranker_publisher: Publisher | None = None,
    ) -> None:
        """``schema``: the dataset's attributes (None: the feature repo's ``attribute_schema.json``);
        the resumed version must have been trained with the same. ``ranker_publisher``: the ranking
        model's client (labels), with ``ranking.enabled``."""
        self.settings = settings
        self.tuning = settings.trainer
        self.topic = settings.source_topic
        self.writer = VersionWriter(settings)
        self.publisher = publisher
        self.schema = schema if schema is not None else read_schema(settings.data_dir)
        self.lookup: FeatureLookup = lookup if lookup is not None else FeastLookup(settings, self.schema)
        self.fault = fault
        self.summaries = summaries or metrics.SummaryWriter(None)
        self.model: TwoTowerModel | None = None
        self.version = 0
        self.histories = UserHistories()
        self.replay = ReplayBuffer(self.tuning.replay_buffer_size)
        self.deferred = empty_examples(self.schema)  # the last interval's hold-out, learned in the next one
        self.bootstrap_until: pd.Timestamp | None = None
        self.resume_offsets: dict[int, int] = {}
        self.positions: dict[int, int] = {}
        self.committed: dict[int, int] = {}
        # example rows, each with the (partition, offset) of its record under ``POSITION`` (None for
        # events given to ``ingest`` directly); ``_examples`` keeps only the example columns
        self.pending: list[dict[str, Any]] = []
        self.ledger = CoverageLedger(self.tuning.freshness_pending_max)  # records no version covers yet
        self.interval_started = time.monotonic()
        # A model object that serves nothing any more (the last rejected candidate, or the model a
        # published one replaced): the next interval trains it in place, keeping its traced train
        # step (``finetune(reuse=...)`` takes it only if its config is the fine-tune one). ``resume``
        # makes it and traces it (``finetune.training_pair``).
        self._spare: TwoTowerModel | None = None
        self.step = 0
        self._consumer: Consumer | None = None
        self.ranker = (
            RankerLine(settings, self.schema, ranker_publisher, publish=self.tuning.publish)
            if settings.ranking.enabled
            else None
        )
        ope = self.tuning.ope_gate
        self.logged = LoggedExamples(
            settings,
            group_id=self.tuning.labeled_reader_group_id,
            lookback_s=ope.lookback_s,
            max_examples=ope.max_examples,
            on_example=self.ranker.add if self.ranker is not None else None,
        )

    # -- start -------------------------------------------------------------------------------
    def start(self) -> None:
        """Resume the newest version, then join the consumer group."""
        self.resume()
        self.subscribe()

    def resume(self) -> None:
        """Everything but Kafka: leftovers removed, weights, checkpoint, canary label."""
        self.writer.recover()
        versions = self.writer.versions()
        if not versions:
            raise TrainerError(f"no model version under {self.writer.base_path}; run `streamrec train --until T` first")
        self.version = versions[-1]
        version_dir = self.writer.base_path / str(self.version)
        self.model = export.load_for_finetune(version_dir)
        if self.model.schema != self.schema:
            raise TrainerError(
                f"version {self.version} was trained on other declared attributes than the feature repo's "
                f"({self.settings.data_dir / 'attribute_schema.json'}); retrain with `streamrec train --until T` "
                "after `streamrec features setup --dataset ...`"
            )
        lineage = export.read_lineage(version_dir)
        until = lineage.get("bootstrap_until")
        self.bootstrap_until = pd.Timestamp(until) if until else None
        state = checkpoint.load_latest(self.writer.state_path, self.version, self.tuning.replay_buffer_size)
        if state is None:
            log.warning("version %d has no trainer checkpoint: starting with empty histories", self.version)
        else:
            self.histories, self.replay, self.deferred = state.histories, state.replay, state.deferred
            self.step = int(state.meta.get("step", 0))
            if state.meta.get("topic") == self.topic and state.meta.get("group_id") == self.tuning.group_id:
                self.resume_offsets = {int(p): int(o) for p, o in state.meta.get("offsets", {}).items()}
                self.ledger = CoverageLedger.from_json(state.meta.get("freshness"), self.tuning.freshness_pending_max)
        # Trace both training objects now, before the first interval waits on them.
        warm_up = self.replay.sample(self.model.config.finetune_batch_size + 1, seed=self.step)
        self.model, self._spare = training_pair(self.model, self.tuning, warm_up)
        metrics.CURRENT_VERSION.set(self.version)
        if self.tuning.publish and self.writer.labelled_version() != self.version:
            label_canary(self.writer, self.publisher, self.version)
        if self.ranker is not None:
            self.ranker.resume()
        self.interval_started = time.monotonic()

    def subscribe(self) -> None:
        config: dict[str, Any] = {
            **self.settings.kafka.client_config(),
            "group.id": self.tuning.group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": self.tuning.auto_offset_reset,
            "enable.partition.eof": False,
            "session.timeout.ms": int(self.tuning.session_timeout_s * 1000),
        }
        self._consumer = Consumer(config)
        self._consumer.subscribe([self.topic], on_assign=self._on_assign)
        if self.tuning.ope_gate.enabled or self.ranker is not None:
            self.logged.start()
        log.info("trainer resumes version %d on %s (group %s)", self.version, self.topic, self.tuning.group_id)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        committed = consumer.committed(partitions, timeout=30)
        for partition, stored in zip(partitions, committed, strict=True):
            candidates = [
                o for o in (stored.offset, self.resume_offsets.get(partition.partition)) if o is not None and o >= 0
            ]
            if candidates:
                partition.offset = max(candidates)
                self.positions[partition.partition] = partition.offset
                self.committed[partition.partition] = max(stored.offset, 0)
        consumer.assign(partitions)

    # -- collect -----------------------------------------------------------------------------
    def poll(self, timeout_s: float = 0.5) -> int:
        """Consume what is there (up to 1,000 records); returns the number of records read."""
        if self._consumer is None:
            raise TrainerError("call start() before poll()")
        self.logged.poll()
        messages = self._consumer.consume(num_messages=1000, timeout=timeout_s)
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    continue
                raise TrainerError(f"Kafka error on {self.topic}: {error}")
            partition, offset = int(message.partition() or 0), int(message.offset() or 0)
            self.positions[partition] = offset + 1
            kind, milliseconds = message.timestamp()
            produced_s = milliseconds // 1000 if kind != TIMESTAMP_NOT_AVAILABLE else None
            outcome = self._decode_and_ingest(message.value(), (partition, offset), produced_s)
            metrics.RECORDS.labels(outcome=outcome).inc()
        return len(messages)

    def _decode_and_ingest(self, value: bytes | None, position: tuple[int, int], produced_s: int | None) -> str:
        event: Interaction | LabeledExample
        try:
            if self.tuning.source == "labeled":
                event = decode_event(value, LabeledExample)
            else:
                event = decode_event(value, Interaction)
        except EventValidationError as exc:
            return f"invalid:{exc.reason}"
        return self.ingest(event, position=position, produced_s=produced_s)

    def ingest(
        self,
        event: Interaction | LabeledExample,
        *,
        position: tuple[int, int] | None = None,
        produced_s: int | None = None,
    ) -> str:
        """Move the user's state and maybe add a pending example; returns the outcome counted by ``poll``.

        ``position``: the record's (partition, offset); ``produced_s``: its Kafka timestamp in whole
        epoch seconds (both None for an event that did not come from Kafka)."""
        outcome, row = event_row(event, self.histories, self.schema, self.tuning, self.bootstrap_until)
        if row is not None:
            row[POSITION], row[PRODUCED] = position, produced_s
            self.pending.append(row)
        return outcome

    def interval_due(self) -> bool:
        elapsed = time.monotonic() - self.interval_started
        return len(self.pending) >= self.tuning.max_examples or elapsed >= self.tuning.interval_s

    # -- interval ----------------------------------------------------------------------------
    def _examples(self, rows: list[dict[str, Any]]) -> pd.DataFrame:
        return examples_frame(rows, self.schema, self.lookup)

    def _grown_catalog(self, catalog: ItemCatalog, item_ids: list[str]) -> ItemCatalog | None:
        """``catalog`` plus the interval's never-seen items (with attributes from Feast); None if none."""
        new = sorted({item for item in item_ids if item not in catalog.index})
        if not new:
            return None
        found = self.lookup.item_attributes(new) if self.schema.item else {}
        log.info("catalog grows by %d new item(s), e.g. %s", len(new), new[:3])
        return catalog.with_new_items(new, [found.get(item, {}) for item in new])

    def _state(self, offsets: dict[int, int], published: dict[int, int] | None = None) -> Checkpoint:
        """The trainer state at ``offsets``; ``published``: the trained offsets of the version it is saved with."""
        meta = {
            "topic": self.topic,
            "group_id": self.tuning.group_id,
            "offsets": offsets,
            "step": self.step + 1,
            "freshness": self.ledger.to_json(settled=published),
        }
        return Checkpoint(self.histories, self.replay, meta, self.deferred)

    def _commit(self, offsets: dict[int, int]) -> None:
        if self._consumer is None or not offsets or offsets == self.committed:
            return
        self._consumer.commit(
            offsets=[TopicPartition(self.topic, p, o) for p, o in sorted(offsets.items())], asynchronous=False
        )
        self.committed = dict(offsets)

    def run_interval(self) -> IntervalReport | None:
        """Fine-tune on what was collected, publish, commit. None when there was nothing to learn."""
        if self.model is None:
            raise TrainerError("call start() before run_interval()")
        interval_end = time.perf_counter()
        offsets = dict(self.positions)
        if not self.pending:
            self._commit(offsets)  # only skipped records: no state changed, nothing to publish
            self.interval_started = time.monotonic()
            return None
        if len(self.pending) < self.tuning.min_examples:
            return None
        rows, self.pending = self.pending, []
        self.interval_started = time.monotonic()
        examples = self._examples(rows)
        stage_s = {"examples_s": time.perf_counter() - interval_end}
        learned_late = len(self.deferred)  # the last interval's hold-out, learned in this one
        plan = plan_interval(examples, deferred=self.deferred, replay=self.replay, tuning=self.tuning, seed=self.step)
        holdout, replayed = plan.holdout, plan.replayed
        # every item trained on or held out (a deferred or replayed row may carry an item that only a
        # rejected candidate's catalog had), so no positive is missing from the full-catalog softmax
        seen_items = [*plan.mix["item_id"].astype(str), *examples["item_id"].astype(str)]
        catalog = self._grown_catalog(self.model.catalog, seen_items)
        candidate, stats = finetune(self.model, plan, self.tuning, catalog=catalog, reuse=self._spare)
        stage_s["finetune_s"] = time.perf_counter() - interval_end - stage_s["examples_s"]
        self.replay.add(examples)
        self.deferred = plan.deferred
        report = IntervalReport(
            len(examples), len(replayed), len(holdout), offsets, len(plan.mix), train_stats=stats, stage_s=stage_s
        )
        positions = [row[POSITION] for row in rows]
        covered = trained_offsets(offsets, plan.deferred_rows, positions)
        self.ledger.add((*row[POSITION], row[PRODUCED]) for row in rows if row[POSITION] and row[PRODUCED] is not None)
        lineage = {
            "kind": "finetune",
            "parent_version": self.version,
            "bootstrap_until": self.bootstrap_until.isoformat() if self.bootstrap_until is not None else None,
            "data": {
                "start": examples["event_time"].min().isoformat(),
                "end": examples["event_time"].max().isoformat(),
                "new_examples": len(examples),
                "deferred_examples": learned_late,
                "replayed_examples": len(replayed),
                "holdout_examples": len(holdout),
            },
            # offsets: consumed up to (where a restart resumes); trained_offsets: every record below
            # them was learned by this version (the newest rows, held out for the gate, are only
            # learned in the next interval), which is what model freshness is measured against
            "kafka": {
                "topic": self.topic,
                "group_id": self.tuning.group_id,
                "offsets": offsets,
                "trained_offsets": covered,
            },
            # produce times (Kafka timestamps, per whole second) of the records this version newly covers
            "freshness": {"produced_counts": self.ledger.produced_counts(covered)},
            "feature_service": contracts.USER_FEATURE_SERVICE,
            "features_source": "trainer user histories from the consumed stream; attributes from Feast online",
            "metrics": {key: float(value) for key, value in stats.items()},
        }
        ope = self._judge_off_policy(candidate)
        slices = SliceJudge(self.settings.slices, item_interactions(self.replay), self.tuning.block_on_slice_flag)
        stage_s["bookkeeping_s"] = time.perf_counter() - interval_end - stage_s["examples_s"] - stage_s["finetune_s"]
        report.outcome = publish_candidate(
            self.writer,
            candidate,
            holdout=holdout,
            serving=self.model,
            lineage=lineage,
            trainer_state=self._state(offsets, published=covered),
            publisher=self.publisher if self.tuning.publish else None,
            k=self.tuning.gate_k,
            margin=self.tuning.gate_margin,
            alpha=self.tuning.gate_alpha,
            fault=self.fault,
            training=stats,
            slices=slices,
            ope=ope,
        )
        report.stage_s.update(report.outcome.timings)
        if report.outcome.version is not None:
            self.ledger.settle(covered)
            self._spare, self.model, self.version = self.model, candidate, report.outcome.version
            metrics.CURRENT_VERSION.set(self.version)
            report.publish_s = time.perf_counter() - interval_end
            metrics.PUBLISH_SECONDS.observe(report.publish_s)
            if self.ranker is not None:  # its canary joins the retrieval canary (ranker_line docstring)
                report.ranker = self._ranker_interval(self.ranker)
        else:
            self._spare = candidate
            checkpoint.save(self.writer.state_path, self.version, self._state(offsets))
        self._commit(offsets)
        self._record(report)
        return report

    def _ranker_interval(self, ranker: RankerLine) -> RankerOutcome | None:
        """The ranking model's interval; a failure there is logged and counted, never the end of the
        retrieval trainer (the retrieval version is published already; that interval's rows are dropped)."""
        try:
            return ranker.run_interval()
        except (StreamrecError, ValueError, OSError) as exc:
            metrics.PUBLISH_FAILURES.inc()
            log.error("the ranking model's interval failed: %s", exc)
            return None

    def _judge_off_policy(self, candidate: TwoTowerModel) -> OpeVerdict | None:
        """The off-policy gate's verdict on ``candidate`` (None when ``trainer.ope_gate`` is off)."""
        ope = self.tuning.ope_gate
        if not ope.enabled:
            return None
        started = time.perf_counter()
        verdict = judge(
            logged_lists(self.logged.examples()),
            two_tower_rankings(candidate),
            self.settings.exploration.rules(),
            ope.rule(),
        )
        metrics.record_ope(verdict.verdict, time.perf_counter() - started)
        log.info("%s", verdict.summary())
        return verdict

    def _record(self, report: IntervalReport) -> None:
        self.step += 1
        metrics.EXAMPLES_TRAINED.inc(report.trained * self.tuning.finetune_epochs)
        if "examples_per_s" in report.train_stats:
            metrics.EXAMPLES_PER_SECOND.set(report.train_stats["examples_per_s"])
        metrics.record_training(report.train_stats)
        gate = report.outcome.gate if report.outcome is not None else None
        self.summaries.scalars(
            self.step,
            {
                "loss": report.train_stats.get("loss"),
                "gradient_norm/mean": report.train_stats.get("gradient_norm_mean"),
                "gradient_norm/max": report.train_stats.get("gradient_norm_max"),
                "examples_per_s": report.train_stats.get("examples_per_s"),
                "new_examples": report.new_examples,
                "replayed_examples": report.replayed,
                "gate/passed": None if gate is None else int(gate.passed),
                "gate/candidate_hit_at_k": None if gate is None else gate.candidate_metric,
                "gate/serving_hit_at_k": None if gate is None else gate.serving_metric,
                "publish_s": report.publish_s,
                "version": self.version,
            },
        )
        log.info(
            "interval %d: %d new + %d replayed examples, %s, version %d",
            self.step,
            report.new_examples,
            report.replayed,
            gate.summary() if gate is not None else "no gate",
            self.version,
        )

    # -- run ---------------------------------------------------------------------------------
    def run(self, *, stop: threading.Event | None = None, max_intervals: int | None = None) -> list[IntervalReport]:
        """Poll and run intervals until ``stop`` is set or ``max_intervals`` published/rejected."""
        reports: list[IntervalReport] = []
        while not (stop is not None and stop.is_set()):
            self.poll()
            if self.interval_due():
                report = self.run_interval()
                if report is not None:
                    reports.append(report)
                    if max_intervals is not None and len(reports) >= max_intervals:
                        break
        return reports

    def close(self) -> None:
        self.logged.close()
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        self.summaries.close()
