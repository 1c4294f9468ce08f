"""The trainer on real services: Feast (Redis online + parquet offline), Kafka, the model server.

* point in time: a feature row written at or after an example's timestamp is never in it;
* the online loop: stream interactions for one user, run one interval, a new version is
  published as canary and ranks that user's new items higher than its parent did;
* a crash between writing and renaming leaves no visible version, and the restarted trainer
  replays exactly the uncommitted records into the same version number;
* a diverged (NaN) fine-tune is rejected: no version directory, the model server unchanged.

One tiny model is bootstrapped per module (from the first ml-100k events, through Feast set up
with ``streamrec features setup --dataset ml-100k``'s code, so the towers read its declared
attributes) and copied into each test's own state directory.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from feast import FeatureStore

from features import store as feature_store
from features.settings import FeatureStoreTuning
from online_trainer import export
from online_trainer import finetune as finetune_module
from online_trainer.bootstrap import BootstrapResult, bootstrap
from online_trainer.dataset import build_examples
from online_trainer.examples import user_arrays
from online_trainer.inference import recommend
from online_trainer.loop import OnlineTrainer
from online_trainer.model import TwoTowerModel
from online_trainer.model_config import ModelConfig
from online_trainer.settings import TrainerSettings, TrainerTuning
from serving.model_client import ModelServerClient
from serving.settings import ModelServerSection
from streamrec.core import contracts
from streamrec.core.attributes import read_schema
from streamrec.core.events import Interaction
from streamrec.core.settings import CommonSettings, PathSettings
from streamrec.datasets.movielens import load_interactions
from streamrec.kafka.consume import end_offsets
from streamrec.ops.settings import StackSettings
from tests.support.model_server import running_model_server

# Feast's dask offline store (feast/infra/offline_stores/dask.py, _drop_duplicates) calls fillna
# on object columns of the pushed rows, which pandas 2.3 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Downcasting object dtype arrays on .fillna:FutureWarning")

TINY = ModelConfig(
    embedding_dim=16,
    item_id_buckets=4096,
    user_id_buckets=2048,
    attribute_buckets=64,
    profile_dim=4,
    content_dim=4,
    batch_size=256,
    epochs=2,
    learning_rate=0.01,
    finetune_learning_rate=0.02,
)
BOOTSTRAP_EVENTS = 2000


@pytest.fixture(scope="module")
def feast_tuning(
    local_stack: object, stack_settings: StackSettings, tmp_path_factory: pytest.TempPathFactory
) -> FeatureStoreTuning:
    data_dir = Path(tmp_path_factory.mktemp("trainer_feast"))
    tuning = FeatureStoreTuning(data_dir=data_dir, project=f"t{uuid.uuid4().hex[:10]}")
    settings = TrainerSettings(redis=stack_settings.redis, paths=PathSettings(state_dir=data_dir), features=tuning)
    feature_store.setup(settings, "ml-100k")
    return tuning


@pytest.fixture(scope="module")
def history() -> pd.DataFrame:
    return load_interactions().head(BOOTSTRAP_EVENTS)


@pytest.fixture(scope="module")
def template(
    feast_tuning: FeatureStoreTuning,
    stack_settings: StackSettings,
    history: pd.DataFrame,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, BootstrapResult]:
    """Version 1 and its trainer checkpoint, bootstrapped once through Feast (nothing pushed)."""
    state_dir = Path(tmp_path_factory.mktemp("trainer_template"))
    settings = TrainerSettings(
        redis=stack_settings.redis,
        paths=PathSettings(state_dir=state_dir),
        features=feast_tuning,
        trainer=TrainerTuning(holdout_size=300, publish=False, metrics_port=0),
    )
    result = bootstrap(settings, history, history["event_time"].max(), config=TINY, progress=False)
    return state_dir, result


def trainer_settings(
    fresh: CommonSettings, feast_tuning: FeatureStoreTuning, state_dir: Path, server_port: int, **tuning: Any
) -> TrainerSettings:
    defaults: dict[str, Any] = dict(
        group_id=f"trainer-{uuid.uuid4().hex[:8]}",
        interval_s=3600.0,
        holdout_size=10,
        finetune_epochs=5,
        metrics_port=0,
        replay_fraction=0.5,
    )
    return TrainerSettings(
        kafka=fresh.kafka,
        redis=fresh.redis,
        topics=fresh.topics,
        paths=PathSettings(state_dir=state_dir),
        features=feast_tuning,
        model_server=ModelServerSection(port=server_port, load_timeout_s=60.0),
        trainer=TrainerTuning(**{**defaults, **tuning}),
    )


@pytest.fixture
def state_dir(template: tuple[Path, BootstrapResult], tmp_path: Path) -> Path:
    copy = tmp_path / "state"
    shutil.copytree(template[0], copy, ignore=shutil.ignore_patterns("feast"))
    return copy


@pytest.fixture
def served(state_dir: Path) -> Iterator[Any]:
    with running_model_server(state_dir / "models" / contracts.MODEL_NAME) as server:
        yield server


def produce(settings: CommonSettings, events: list[Interaction], *, garbage: bytes | None = None) -> None:
    producer = Producer(settings.kafka.client_config())
    for event in events:
        producer.produce(settings.topics.interactions, key=event.key(), value=event.to_bytes())
    if garbage is not None:
        producer.produce(settings.topics.interactions, key=b"x", value=garbage)
    assert producer.flush(30) == 0


def stream_for_user(user_id: str, items: list[str], start: pd.Timestamp, count: int) -> list[Interaction]:
    return [
        Interaction(
            event_id=f"s-{user_id}-{i}",
            event_time=(start + pd.Timedelta(seconds=30 * i)).to_pydatetime(),
            user_id=user_id,
            item_id=items[i % len(items)],
            kind="click",
        )
        for i in range(count)
    ]


def consume_all(trainer: OnlineTrainer, settings: CommonSettings, timeout_s: float = 60.0) -> None:
    """Poll until the trainer has read every record produced so far."""
    import time

    target = {p: o for p, o in end_offsets(settings, settings.topics.interactions).items() if o > 0}
    deadline = time.monotonic() + timeout_s
    while any(trainer.positions.get(p, 0) < o for p, o in target.items()):
        assert time.monotonic() < deadline, f"trainer stuck at {trainer.positions}, expected {target}"
        trainer.poll(0.5)


def committed_offsets(settings: TrainerSettings) -> dict[int, int]:
    consumer = Consumer({**settings.kafka.client_config(), "group.id": settings.trainer.group_id})
    try:
        partitions = [TopicPartition(settings.source_topic, p) for p in range(settings.topics.partitions)]
        return {tp.partition: tp.offset for tp in consumer.committed(partitions, timeout=10) if tp.offset >= 0}
    finally:
        consumer.close()


COUNTED: dict[str, tuple[str, dict[str, str]]] = {
    "examples": ("trainer_records_total", {"outcome": "example"}),
    "already_trained": ("trainer_records_total", {"outcome": "already_trained"}),
    "invalid": ("trainer_records_total", {"outcome": "invalid:undecodable"}),
    "gate_passed": ("trainer_gate_total", {"result": "passed", "reason": ""}),
}


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


# -- point in time ---------------------------------------------------------------------------


def activity_row(user_id: str, when: pd.Timestamp, recent: list[str], count: int) -> dict[str, Any]:
    return {
        "user_id": user_id,
        "recent_items": recent,
        "count_1h": count,
        "count_24h": count,
        "last_event_ts": int(when.timestamp()),
        "event_timestamp": when,
    }


def test_a_feature_written_after_an_example_is_never_in_it(
    feast_tuning: FeatureStoreTuning, stack_settings: StackSettings
) -> None:
    settings = TrainerSettings(
        redis=stack_settings.redis, paths=PathSettings(state_dir=feast_tuning.data_dir), features=feast_tuning
    )
    store: FeatureStore = feature_store.open_store(settings)
    t1, t2 = pd.Timestamp("1999-01-01T10:00:00Z"), pd.Timestamp("1999-01-01T11:00:00Z")
    micro = pd.Timedelta(microseconds=1)
    user = "pit-user"  # not an ml-100k user: its profile is empty, its activity is ours alone
    # the worker's rows after events at t1, at t2 and a second one at t2 (stamped t2 + 1 µs)
    rows = [activity_row(user, t1, ["a"], 1), activity_row(user, t2, ["b", "a"], 2)]
    rows.append(activity_row(user, t2 + micro, ["c", "b", "a"], 3))
    feature_store.push_user_activity(store, pd.DataFrame(rows))
    at = {
        "before t1": t1 - pd.Timedelta(minutes=1),
        "at t1": t1,
        "between": t1 + pd.Timedelta(minutes=30),
        "1st at t2": t2,
        "2nd at t2": t2,  # same second, later in the log: sees the 1st one's state, not its own
        "after t2": t2 + pd.Timedelta(minutes=1),
    }
    interactions = pd.DataFrame(
        {
            "event_id": list(at),
            "user_id": user,
            "item_id": "x",
            "event_time": pd.to_datetime(list(at.values()), utc=True),
        }
    )
    schema = read_schema(feast_tuning.data_dir)
    assert [attribute.name for attribute in schema.user] == ["age", "gender", "occupation", "zip_prefix"]
    examples, info = build_examples(store, interactions, min_coverage=0.0, schema=schema)
    assert info.features_source == "feast"
    seen = dict(zip(at, zip(examples["recent_items"], examples["count_1h"], strict=True), strict=True))
    assert seen == {
        "before t1": ([], 0),
        "at t1": ([], 0),  # the row written at the example's own time may hold its label
        "between": (["a"], 1),
        "1st at t2": (["a"], 1),
        "2nd at t2": (["b", "a"], 2),
        "after t2": (["c", "b", "a"], 3),
    }
    # without enough offline rows the builder says it fell back to the interaction log
    other = interactions.assign(user_id="never-pushed")
    fallback, fallback_info = build_examples(store, other, min_coverage=0.5, schema=schema)
    assert fallback_info.features_source == "interaction_log" and "recomputed" in fallback_info.note
    assert fallback["recent_items"].tolist()[-1] == ["x"]


def test_bootstrap_exports_version_one_with_its_lineage(template: tuple[Path, BootstrapResult]) -> None:
    state_dir, result = template
    assert result.version == 1 and result.outcome.gate.passed
    lineage = export.read_lineage(state_dir / "models" / contracts.MODEL_NAME / "1")
    assert lineage["kind"] == "bootstrap" and lineage["feature_service"] == contracts.USER_FEATURE_SERVICE
    assert lineage["dataset"]["features_source"] == "interaction_log"  # nothing was pushed offline
    assert lineage["dataset"]["rows"] == BOOTSTRAP_EVENTS and lineage["gate"]["passed"] is True
    assert lineage["bootstrap_until"] == result.dataset.data_end
    assert lineage["model_config"]["attributes"]["user"][0]["name"] == "age"  # ml-100k's declared attributes


# -- the online loop -------------------------------------------------------------------------


def _focus(template: tuple[Path, BootstrapResult], history: pd.DataFrame) -> tuple[str, list[str]]:
    """A user of the bootstrap data and three items version 1 ranks low for them."""
    state_dir, _ = template
    model = export.load_for_finetune(state_dir / "models" / contracts.MODEL_NAME / "1")
    user = str(history["user_id"].value_counts().index[0])
    ids, _ = recommend(model, pd.DataFrame({"user_id": [user]}), k=400)
    return user, [str(item) for item in ids[0][300:303]]


def test_one_interval_publishes_a_canary_that_learned_the_new_interactions(
    fresh_settings: CommonSettings,
    feast_tuning: FeatureStoreTuning,
    template: tuple[Path, BootstrapResult],
    history: pd.DataFrame,
    state_dir: Path,
    served: Any,
) -> None:
    user, items = _focus(template, history)
    start = history["event_time"].max() + pd.Timedelta(minutes=5)
    old = stream_for_user(user, ["1"], history["event_time"].min(), 2)  # before --until: skipped
    produced_from = int(time.time())
    produce(fresh_settings, old + stream_for_user(user, items, start, 60), garbage=b"\xff not json")
    settings = trainer_settings(fresh_settings, feast_tuning, state_dir, served.port)
    client = ModelServerClient.from_settings(settings)
    counted_before = {name: sample(*labels) for name, labels in COUNTED.items()}
    trainer = OnlineTrainer(settings, publisher=client)
    trainer.start()
    try:
        consume_all(trainer, fresh_settings)
        assert len(trainer.pending) == 60
        report = trainer.run_interval()
    finally:
        trainer.close()
    assert report is not None and report.version == 2, report and report.outcome and report.outcome.gate.summary()
    assert report.outcome is not None and report.outcome.labelled
    counted = {name: sample(*labels) - counted_before[name] for name, labels in COUNTED.items()}
    assert counted == {"examples": 60, "already_trained": 2, "invalid": 1, "gate_passed": 1}
    assert sample("trainer_current_version") == 2 and sample("trainer_publish_seconds_count") >= 1
    assert client.labels() == {"stable": 1, "canary": 2}
    assert (
        committed_offsets(settings)
        == report.offsets
        == {p: o for p, o in end_offsets(fresh_settings, fresh_settings.topics.interactions).items() if o > 0}
    )
    lineage = export.read_lineage(settings.model_base_path / "2")
    assert lineage["parent_version"] == 1 and lineage["kafka"]["offsets"] == {
        str(p): o for p, o in report.offsets.items()
    }
    assert lineage["data"]["new_examples"] == 60
    # the gate's held-out newest rows are learned one version later: coverage stops before them
    consumed, trained = lineage["kafka"]["offsets"], lineage["kafka"]["trained_offsets"]
    assert lineage["data"]["holdout_examples"] > 0 and trained.keys() == consumed.keys()
    assert all(trained[p] <= consumed[p] for p in trained) and trained != consumed
    # freshness: the produce times (Kafka timestamps, this test's seconds) of the examples it covers
    produced = lineage["freshness"]["produced_counts"]
    assert 0 < sum(count for _, count in produced) < 60
    assert all(produced_from <= second <= time.time() for second, _ in produced)
    # the user's inputs after the stream, asked of both versions through the model server
    recent, counts = trainer.histories.snapshot(user)
    request = pd.DataFrame([{"user_id": user, "recent_items": recent, **counts}])
    inputs = user_arrays(request, read_schema(feast_tuning.data_dir))  # attributes unknown
    inputs["exclude_items"] = np.array([[""]], dtype=object)
    asker = ModelServerClient(served.target, timeout_s=10.0)
    _, before = asker.predict(inputs, version=1)
    version, after = asker.predict(inputs, label=contracts.CANARY_LABEL)
    asker.close()
    assert version == 2

    def positions(outputs: dict[str, np.ndarray]) -> list[int]:
        ranked = [item.decode() for item in outputs["item_ids"][0]]
        return [ranked.index(item) if item in ranked else contracts.TOP_K_EXPORTED for item in items]

    # the streamed items move into / up the exported top-K
    assert sum(positions(after)) < sum(positions(before)), (positions(before), positions(after))
    assert min(positions(after)) < 10


def test_crash_before_rename_then_restart_replays_exactly_the_uncommitted_records(
    fresh_settings: CommonSettings,
    feast_tuning: FeatureStoreTuning,
    template: tuple[Path, BootstrapResult],
    history: pd.DataFrame,
    state_dir: Path,
    served: Any,
) -> None:
    user, items = _focus(template, history)
    start = history["event_time"].max() + pd.Timedelta(minutes=5)
    produce(fresh_settings, stream_for_user(user, items, start, 40))
    # the gate's metric is not under test here: a margin of 1 lets any finite candidate through
    settings = trainer_settings(fresh_settings, feast_tuning, state_dir, served.port, gate_margin=1.0)
    seen_at_crash: dict[str, Any] = {}

    def crash(step: str) -> None:
        if step == "checkpointed":
            seen_at_crash.update(positions=dict(crashing.positions), pending=len(crashing.pending))
            raise KeyboardInterrupt("killed between writing the version and renaming it")

    crashing = OnlineTrainer(settings, publisher=ModelServerClient.from_settings(settings), fault=crash)
    crashing.start()
    try:
        consume_all(crashing, fresh_settings)
        with pytest.raises(KeyboardInterrupt):
            crashing.run_interval()
    finally:
        crashing.close()  # the consumer leaves the group without committing, as a killed process would
    assert export.list_versions(settings.model_base_path) == [1]  # no half-version visible
    assert committed_offsets(settings) == {}
    assert ModelServerClient(served.target).available_versions() == [1]

    restarted = OnlineTrainer(settings, publisher=ModelServerClient.from_settings(settings))
    restarted.start()
    try:
        assert not settings.staging_path.exists()  # recover() removed the hidden leftover
        consume_all(restarted, fresh_settings)
        assert len(restarted.pending) == 40  # exactly the uncommitted records, once each
        report = restarted.run_interval()
    finally:
        restarted.close()
    assert report is not None and report.version == 2
    assert report.offsets == seen_at_crash["positions"] == committed_offsets(settings)
    # a third start finds nothing new: it resumes after the committed offsets
    again = OnlineTrainer(settings, publisher=None)
    again.start()
    try:
        for _ in range(6):
            again.poll(0.5)
        assert again.pending == [] and again.version == 2
    finally:
        again.close()


def test_a_diverged_finetune_is_rejected_and_the_model_server_is_unchanged(
    fresh_settings: CommonSettings,
    feast_tuning: FeatureStoreTuning,
    template: tuple[Path, BootstrapResult],
    history: pd.DataFrame,
    state_dir: Path,
    served: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    user, items = _focus(template, history)
    produce(fresh_settings, stream_for_user(user, items, history["event_time"].max() + pd.Timedelta(minutes=5), 20))
    settings = trainer_settings(fresh_settings, feast_tuning, state_dir, served.port, finetune_epochs=1)
    real_train = finetune_module.train

    def diverging_train(model: TwoTowerModel, examples: pd.DataFrame, **kwargs: Any) -> dict[str, float]:
        stats = real_train(model, examples, **kwargs)
        model.set_weights([np.full_like(weight, np.nan) for weight in model.get_weights()])
        return {**stats, "loss": float("nan")}

    monkeypatch.setattr(finetune_module, "train", diverging_train)
    client = ModelServerClient.from_settings(settings)
    trainer = OnlineTrainer(settings, publisher=client)
    trainer.start()  # labels version 1 (the template was never published)
    status_before = client.status()
    try:
        consume_all(trainer, fresh_settings)
        report = trainer.run_interval()
    finally:
        trainer.close()
    assert report is not None and report.version is None
    assert report.outcome is not None and report.outcome.gate.reasons == ["nonfinite"]
    assert export.list_versions(settings.model_base_path) == [1]
    assert not (settings.staging_path / "2").exists()
    assert client.status() == status_before and client.labels().get(contracts.CANARY_LABEL) == 1
    # the stream moved on: offsets are committed and the version it keeps has a newer checkpoint
    assert committed_offsets(settings) == report.offsets
    assert (settings.trainer_state_path / "v1-s1").is_dir()
