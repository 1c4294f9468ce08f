"""How the online loop turns events into examples (no Kafka: ``OnlineTrainer.ingest`` directly),
and the small pure pieces around it: hold-out split, ``--until`` parsing, settings."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from online_trainer.cli import parse_until
from online_trainer.dataset import holdout_rows, interactions_until, split_holdout
from online_trainer.examples import example_columns, example_weights, positive_examples
from online_trainer.loop import OnlineTrainer
from online_trainer.settings import TrainerSettings, TrainerTuning
from serving.settings import ServingSettings
from streamrec.core.attributes import Attribute, AttributeSchema, write_schema
from streamrec.core.errors import SettingsError
from streamrec.core.events import Interaction, InteractionKind, LabeledExample
from streamrec.core.settings import PathSettings

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
SCHEMA = AttributeSchema(
    user=(
        Attribute(name="occupation", type="categorical"),
        Attribute(name="age", type="numeric", boundaries=(18.0, 30.0)),
    ),
    event_kinds=("add_to_cart", "purchase", "view"),
)


class AttributesFromDict:
    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    def user_attributes(self, user_ids: Sequence[str]) -> dict[str, dict[str, object]]:
        self.asked.append(list(user_ids))
        return {u: {"occupation": "writer", "age": 33.0} for u in user_ids}

    def item_attributes(self, item_ids: Sequence[str]) -> dict[str, dict[str, object]]:
        return {item: {} for item in item_ids}


def trainer(tmp_path: Path, **tuning: object) -> OnlineTrainer:
    settings = TrainerSettings(paths=PathSettings(state_dir=tmp_path), trainer=TrainerTuning(**tuning))  # type: ignore[arg-type]
    write_schema(settings.data_dir, SCHEMA)  # what `streamrec features setup --dataset` leaves
    return OnlineTrainer(settings, lookup=AttributesFromDict())


def click(event_id: str, item: str, minutes: int, user: str = "u1", kind: InteractionKind = "view") -> Interaction:
    when = T0 + timedelta(minutes=minutes)
    return Interaction(event_id=event_id, event_time=when, user_id=user, item_id=item, kind=kind)


def test_each_interaction_becomes_an_example_with_the_state_before_it(tmp_path: Path) -> None:
    loop = trainer(tmp_path)
    loop.bootstrap_until = pd.Timestamp(T0)
    outcomes = [
        loop.ingest(click("old", "0", 0)),  # at --until: the bootstrap model learned it
        loop.ingest(click("a", "1", 1)),
        loop.ingest(click("b", "2", 2)),
        loop.ingest(click("b", "2", 2)),  # redelivered
        loop.ingest(click("c", "1", 90)),
    ]
    assert outcomes == ["already_trained", "example", "example", "duplicate", "example"]
    examples = loop._examples(loop.pending)
    assert loop.schema == SCHEMA  # read from the feature repo's attribute_schema.json
    assert list(examples.columns) == list(example_columns(SCHEMA))
    assert examples["recent_items"].tolist() == [[], ["1"], ["2", "1"]]
    # counts as of the user's previous event (what Feast holds then): at c, that is b, with a and b
    # inside (b - 1 h, b], although b is 88 minutes before c
    assert examples["count_1h"].tolist() == [0, 1, 2]
    assert examples["count_24h"].tolist() == [0, 1, 2]
    assert examples["view_count_24h"].tolist() == [0, 1, 2] and examples["purchase_count_24h"].sum() == 0
    assert examples["item_id"].tolist() == ["1", "2", "1"]
    assert set(examples["occupation"]) == {"writer"} and set(examples["age"]) == {33.0}
    assert examples["count_1h"].dtype == "int64"


def test_only_positive_kinds_are_learned_but_every_kind_moves_the_state(tmp_path: Path) -> None:
    loop = trainer(tmp_path, positive_kinds=["add_to_cart", "purchase"], kind_weights={"purchase": 4.0})
    outcomes = [
        loop.ingest(click("v1", "shoe", 0)),
        loop.ingest(click("c1", "shoe", 1, kind="add_to_cart")),
        loop.ingest(click("v2", "hat", 2)),
        loop.ingest(click("p1", "shoe", 3, kind="purchase")),
    ]
    assert outcomes == ["not_positive", "example", "not_positive", "example"]
    examples = loop._examples(loop.pending)
    assert examples["kind"].tolist() == ["add_to_cart", "purchase"]
    assert examples["recent_items"].tolist() == [["shoe"], ["hat", "shoe"]]  # the views count as history
    assert examples["view_count_1h"].tolist() == [1, 2] and examples["add_to_cart_count_1h"].tolist() == [0, 1]
    assert example_weights(examples, loop.tuning.kind_weights).tolist() == [1.0, 4.0]
    # the same selection for a frame (bootstrap, benchmarks)
    assert positive_examples(examples, ["purchase"])["item_id"].tolist() == ["shoe"]
    assert positive_examples(examples, None) is examples


def test_kind_settings_are_validated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pydantic import ValidationError

    tuning = TrainerTuning()
    assert tuning.positive_kinds is None and tuning.kind_weights == {} and tuning.learns("view")
    with pytest.raises(ValidationError, match="unknown event kind"):
        TrainerTuning(kind_weights={"purchse": 2.0})
    with pytest.raises(ValidationError, match="nothing would be learned"):
        TrainerTuning(positive_kinds=())
    with pytest.raises(ValidationError, match="finite and >= 0"):
        TrainerTuning(kind_weights={"purchase": -1.0})
    monkeypatch.setenv("STREAMREC_TRAINER__KIND_WEIGHTS", '{"purchase": 4.0}')
    monkeypatch.setenv("STREAMREC_TRAINER__POSITIVE_KINDS", '["purchase", "add_to_cart"]')
    monkeypatch.setenv("STREAMREC_PATHS__STATE_DIR", str(tmp_path))
    from streamrec.core.settings import load

    loaded = load(TrainerSettings).trainer
    assert loaded.kind_weights == {"purchase": 4.0} and not loaded.learns("view") and loaded.learns("purchase")


def test_labeled_examples_learn_from_clicks_with_the_logged_features(tmp_path: Path) -> None:
    loop = trainer(tmp_path, source="labeled")
    assert loop.topic == loop.settings.topics.labeled
    logged = {
        "occupation": "student",
        "age": 19.0,
        "recent_items": ["7", "8"],
        "count_1h": 2,
        "count_24h": 5,
        **{f"{kind}_count_{w}": 1 for kind in SCHEMA.event_kinds for w in ("1h", "24h")},
    }

    def labeled(event_id: str, clicked: bool, features: dict[str, object]) -> LabeledExample:
        return LabeledExample(
            event_id=event_id,
            event_time=T0,
            user_id="u2",
            request_id="r1",
            item_id="9",
            position=0,
            arm="canary",
            model_version=3,
            score=1.5,
            clicked=clicked,
            impression_time=T0 - timedelta(seconds=5),
            click_time=T0 if clicked else None,
            features=features,
        )

    assert loop.ingest(labeled("n", False, logged)) == "not_clicked"
    assert loop.ingest(labeled("y", True, logged)) == "example"
    assert loop.ingest(labeled("z", True, {})) == "example"  # nothing logged: the trainer's own state
    examples = loop._examples(loop.pending)
    assert examples["recent_items"].tolist() == [["7", "8"], ["9"]]
    assert examples["occupation"].tolist() == ["student", "writer"] and examples["age"].tolist() == [19.0, 33.0]
    assert examples["count_24h"].tolist() == [5, 1] and examples["view_count_24h"].tolist() == [1, 0]
    assert examples["kind"].tolist() == ["click", "click"]


def test_the_newest_examples_are_held_out() -> None:
    frame = pd.DataFrame({"event_time": pd.to_datetime([5, 1, 4, 2, 3, 9, 8, 7, 6, 10], unit="s", utc=True)})
    fit, holdout = split_holdout(frame, holdout_size=100)
    assert len(holdout) == 2 and holdout["event_time"].min() > fit["event_time"].max()
    assert len(split_holdout(frame, holdout_size=1)[1]) == 1
    assert split_holdout(frame.head(4), holdout_size=100)[1].empty  # too few rows to spare any


def test_until_parsing_and_cut() -> None:
    assert parse_until("1997-09-20T03:05:10") == pd.Timestamp("1997-09-20T03:05:10Z")
    assert parse_until("874724710") == pd.Timestamp(874724710, unit="s", tz="UTC")
    assert parse_until("2026-01-01T13:00:00+01:00") == pd.Timestamp("2026-01-01T12:00:00Z")
    with pytest.raises(SettingsError, match="--until"):
        parse_until("yesterday-ish")
    frame = pd.DataFrame({"event_time": pd.to_datetime([1, 2, 3], unit="s", utc=True)})
    assert len(interactions_until(frame, datetime(1970, 1, 1, 0, 0, 2, tzinfo=UTC))) == 2


def test_settings_share_the_model_server_section_with_serving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMREC_TRAINER__INTERVAL_S", "15")
    monkeypatch.setenv("STREAMREC_MODEL_SERVER__PORT", "8600")
    monkeypatch.setenv("STREAMREC_PATHS__STATE_DIR", str(tmp_path))
    from streamrec.core.settings import load

    settings = load(TrainerSettings)
    assert settings.trainer.interval_s == 15 and settings.model_server.port == 8600
    assert settings.model_base_path == load(ServingSettings).model_base_path == tmp_path / "models" / "streamrec"
    assert settings.staging_path.parent == settings.model_base_path.parent  # same file system: atomic rename
    assert not settings.staging_path.name.isdigit()
    monkeypatch.setenv("STREAMREC_TRAINER__GATE_MARGN", "0.1")
    with pytest.raises(SettingsError, match="GATE_MARGIN"):
        load(TrainerSettings)


def test_tensorboard_summaries_are_written_per_step(tmp_path: Path) -> None:
    import tensorflow as tf

    from online_trainer.metrics import SummaryWriter

    writer = SummaryWriter(tmp_path / "tb")
    writer.scalars(1, {"loss": 2.5, "gate/passed": 1, "publish_s": None})
    writer.scalars(2, {"loss": 1.5})
    writer.close()
    seen: dict[tuple[int, str], float] = {}
    for path in (tmp_path / "tb").iterdir():
        for record in tf.data.TFRecordDataset(str(path)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            for value in event.summary.value:
                seen[(event.step, value.tag)] = float(tf.make_ndarray(value.tensor))
    assert seen == {(1, "loss"): 2.5, (1, "gate/passed"): 1.0, (2, "loss"): 1.5}


def test_trained_offsets_stop_at_the_first_row_held_out_for_the_gate_in_each_partition() -> None:
    """Lineage's ``trained_offsets``: the newest rows (by event time) are learned one version later."""
    from online_trainer.loop import trained_offsets

    # rows in arrival order: partition 0 offsets 10..13, partition 1 offsets 20..21, one row without Kafka
    times = [0, 1, 5, 9, 2, 8, 3]
    positions: list[tuple[int, int] | None] = [(0, 10), (0, 11), (0, 12), (0, 13), (1, 20), (1, 21), None]
    examples = pd.DataFrame({"event_time": [T0 + timedelta(seconds=t) for t in times]})
    consumed = {0: 14, 1: 22, 2: 7}
    # rows 5 and 3 held out: (1, 21) at 8 s and (0, 13) at 9 s
    assert trained_offsets(consumed, [5, 3], positions) == {0: 13, 1: 21, 2: 7}
    # row 2, (0, 12) at 5 s, too: partition 0 is covered below 12 only
    assert trained_offsets(consumed, [2, 5, 3], positions) == {0: 12, 1: 21, 2: 7}
    # nothing held out: everything consumed was learned
    assert trained_offsets(consumed, [], positions) == consumed
    # holdout_rows picks the newest (at most a fifth: 1 of 7 here), and split_holdout the same rows
    train_rows, held_rows = holdout_rows(examples, 2)
    assert list(held_rows) == [3] and list(train_rows) == [0, 1, 4, 6, 2, 5]
    _, holdout = split_holdout(examples.assign(row=range(len(times))), 2)
    assert list(holdout["row"]) == [3]
    assert trained_offsets(consumed, held_rows, positions) == {0: 13, 1: 22, 2: 7}
