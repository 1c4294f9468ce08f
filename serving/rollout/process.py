"""The evaluator process (``streamrec evaluator``): read labeled examples, judge, act, checkpoint.

It reads every partition of ``topics.labeled`` by assignment from where
:meth:`~serving.rollout.evaluator.AbEvaluator.recover` says (``checkpoint.py`` says why no
consumer group), and after every batch lets the evaluator decide and saves its checkpoint. The
labels are re-read every ``evaluator.labels_refresh_s``, the figures written to the timeline
every ``evaluator.snapshot_interval_s``, and its own lag (``lag.py``) exported every
``evaluator.lag_interval_s`` as ``streamrec_consumer_group_lag{group=evaluator.group_id}``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from serving.rollout.decision_log import LabelController
from serving.rollout.evaluator import EXAMPLES, AbEvaluator
from serving.rollout.lag import update_lag
from serving.rollout.paired_labels import PairedLabels
from serving.rollout.settings import EvaluatorSettings
from streamrec.core import contracts

log = logging.getLogger(__name__)


def run(settings: EvaluatorSettings, *, max_seconds: float | None = None) -> None:
    """Consume labeled examples until stopped (or ``max_seconds``)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from serving.model_client import ModelServerClient
    from streamrec.core.errors import EventValidationError, SettingsError
    from streamrec.core.events import LabeledExample, decode_event
    from streamrec.kafka.consume import consumer_config

    topic = settings.topics.labeled
    client = ModelServerClient.from_settings(settings)
    ranking_client = None
    controller: LabelController = client
    if settings.ranking.enabled:
        ranking_client = ModelServerClient.from_settings(
            settings, model_name=settings.ranking.model_name, server_base_path=settings.ranker_server_base_path
        )
        controller = PairedLabels(client, ranking_client)
    evaluator = AbEvaluator(
        controller,
        settings.evaluator.policy,
        settings.evaluator_dir,
        topic,
        slices=settings.slices,
        block_promotion_on_slice_flag=settings.evaluator.block_promotion_on_slice_flag,
        off_policy_estimate=lambda version: version_ope(settings.model_base_path, version),
    )
    config = {
        **consumer_config(settings, settings.evaluator.group_id, from_beginning=True),
        "enable.auto.commit": False,
    }
    consumer = Consumer(config)
    try:
        start = evaluator.recover()
        metadata = consumer.list_topics(topic, timeout=30).topics.get(topic)
        if metadata is None or metadata.error is not None or not metadata.partitions:
            raise SettingsError(f"the labeled topic {topic!r} does not exist; create it with `streamrec topics create`")
        consumer.assign(
            [
                TopicPartition(topic, partition, start.get(partition, OFFSET_BEGINNING))
                for partition in metadata.partitions
            ]
        )
        partitions = sorted(metadata.partitions)
        started = last_labels = last_snapshot = time.monotonic()
        last_lag = started - settings.evaluator.lag_interval_s  # the first update at once
        while max_seconds is None or time.monotonic() - started < max_seconds:
            for message in consumer.consume(num_messages=500, timeout=0.5):
                if message.error() is not None:
                    log.warning("consumer error: %s", message.error())
                    continue
                partition, offset = int(message.partition() or 0), int(message.offset() or 0)
                evaluator.mark_read(partition, offset)
                try:
                    example = decode_event(message.value(), LabeledExample)
                except EventValidationError as error:
                    EXAMPLES.labels("invalid").inc()
                    log.warning("invalid labeled example at %s/%s: %s", partition, offset, error)
                    continue
                evaluator.handle(example)
            evaluator.decide()
            evaluator.save_checkpoint()
            now = time.monotonic()
            if now - last_labels >= settings.evaluator.labels_refresh_s:
                evaluator.refresh_labels()
                last_labels = now
            if now - last_snapshot >= settings.evaluator.snapshot_interval_s:
                evaluator.snapshot()
                last_snapshot = now
            if now - last_lag >= settings.evaluator.lag_interval_s:
                update_lag(consumer, settings.evaluator.group_id, topic, partitions, evaluator.positions)
                last_lag = now
    finally:
        consumer.close()
        client.close()
        if ranking_client is not None:
            ranking_client.close()


def version_ope(base_path: Path, version: int) -> dict[str, Any] | None:
    """The off-policy gate's figures in a version's lineage (None: it has none, or it was pruned)."""
    path = base_path / str(version) / contracts.LINEAGE_PATH
    if not path.is_file():
        return None
    ope = json.loads(path.read_text()).get("gate", {}).get("ope")
    return ope if isinstance(ope, dict) else None
