"""Stream events -> example rows of the online loop (``loop.OnlineTrainer.ingest`` / ``_examples``).

An event first moves its user's state (:mod:`online_trainer.history`), whatever its kind; it
becomes an example only if its kind is one the trainer learns (``trainer.positive_kinds``). The
example's user inputs are the state *before* the event, plus the user's declared attributes: those
the impression logged (labeled examples whose logged features are complete), else a Feast online
read (:mod:`online_trainer.lookup`), one batched read per interval.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from online_trainer.attribute_values import frame_column
from online_trainer.examples import count_columns, example_columns, user_input_columns
from online_trainer.history import UserHistories
from online_trainer.lookup import FeatureLookup
from online_trainer.settings import TrainerTuning
from streamrec.core.attributes import AttributeSchema
from streamrec.core.events import Interaction, LabeledExample

POSITION = "_kafka_position"  # key of a pending row's (partition, offset)
PRODUCED = "_produced_s"  # key of a pending row's Kafka timestamp, whole epoch seconds (None: unknown)
_LOGGED = "_logged"  # the row's user inputs are those the impression logged


def event_row(
    event: Interaction | LabeledExample,
    histories: UserHistories,
    schema: AttributeSchema,
    tuning: TrainerTuning,
    bootstrap_until: pd.Timestamp | None,
) -> tuple[str, dict[str, Any] | None]:
    """(outcome, example row or None) for one event; the user's state moves unless it was skipped.

    Outcomes: ``example``, ``not_clicked``, ``already_trained`` (at or before the bootstrap's
    ``--until``), ``duplicate`` (a redelivered ``event_id``), ``not_positive`` (a kind not learned).
    """
    if isinstance(event, LabeledExample):
        if not event.clicked:
            return "not_clicked", None
        event_time, kind = event.click_time or event.event_time, "click"
    else:
        event_time, kind = event.event_time, event.kind
    if bootstrap_until is not None and event_time <= bootstrap_until:
        return "already_trained", None
    history = histories.get(event.user_id)
    recent, counts = list(history.recent_items), history.counts(schema.counted_kinds)
    if not history.accept(event.event_id, event.item_id, int(event_time.timestamp()), kind):
        return "duplicate", None
    if not tuning.learns(kind):
        return "not_positive", None
    row: dict[str, Any] = {"user_id": event.user_id, "recent_items": recent, **counts}
    logged = user_input_columns(schema)[1:]
    if isinstance(event, LabeledExample) and all(name in event.features for name in logged):
        row.update({name: event.features[name] for name in logged})  # what the model saw at impression
        row[_LOGGED] = True
    row.update(item_id=event.item_id, kind=kind, event_time=event_time)
    return "example", row


def examples_frame(rows: list[dict[str, Any]], schema: AttributeSchema, lookup: FeatureLookup) -> pd.DataFrame:
    """Pending rows -> the example frame; user attributes not logged are read through ``lookup``."""
    unlogged = sorted({str(row["user_id"]) for row in rows if not row.get(_LOGGED)})
    read = lookup.user_attributes(unlogged) if unlogged and schema.user else {}
    filled = [row if row.get(_LOGGED) else {**row, **read.get(str(row["user_id"]), {})} for row in rows]
    frame = pd.DataFrame(filled)
    for attribute in schema.user:
        column = frame[attribute.name] if attribute.name in frame else [None] * len(frame)
        frame[attribute.name] = pd.Series(frame_column(attribute, column), index=frame.index, dtype=object)
    frame["recent_items"] = [[str(item) for item in items] for items in frame["recent_items"]]
    for name in count_columns(schema):
        frame[name] = frame[name].astype("int64")
    frame["event_time"] = pd.to_datetime(frame["event_time"], utc=True)
    return frame[list(example_columns(schema))]
