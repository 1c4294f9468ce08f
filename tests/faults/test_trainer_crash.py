"""Fault 7: SIGKILL the online trainer between the version rename and the offset commit.

A real ``python -m online_trainer.cli trainer`` process, started with ``trainer.fault_stop_at =
"revealed"``, stops itself (SIGSTOP) right after it renamed version 2 into the model base path and
before it committed the offsets that version consumed; the test SIGKILLs it there, restarts it
without the fault, and streams more events. The restarted trainer must resume from the offsets
saved with version 2 (its trainer checkpoint), not from the group's committed ones (none).

Checked against the input (each record's partition and offset from the producer's delivery
reports): every version's new examples are exactly the records between its parent's offsets and
its own, so no record is learned by two versions (no duplicate version) and the versions' ranges
cover every record produced (none skipped); version 2's held-out rows are learned by version 3,
and the group ends committed at the topic's end. The events of one user are 27 h apart, longer than
the trainer's 24 h ``event_id`` memory, so a re-read record would become an example again and show.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from features import store as feature_store
from features.settings import FeatureStoreTuning
from online_trainer import export
from online_trainer.bootstrap import bootstrap
from online_trainer.model_config import ModelConfig
from online_trainer.settings import TrainerSettings, TrainerTuning
from streamrec.core.events import Interaction
from streamrec.core.settings import CommonSettings, PathSettings
from streamrec.datasets.description import load_dataset
from streamrec.kafka.consume import end_offsets
from streamrec.ops.settings import StackSettings
from tests.support.processes import settings_env

# Feast's dask offline store (feast/infra/offline_stores/dask.py, _drop_duplicates) calls fillna
# on object columns, which pandas 2.3 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Downcasting object dtype arrays on .fillna:FutureWarning")

DATASET = "synthetic:events=2000,users=200,items=300,categories=8,days=3"
TINY = ModelConfig(
    embedding_dim=16,
    item_id_buckets=4096,
    user_id_buckets=2048,
    attribute_buckets=64,
    profile_dim=4,
    content_dim=4,
    batch_size=256,
    epochs=2,
)
BEFORE_CRASH, AFTER_CRASH = 60, 40  # records streamed before the first trainer runs, after the restart


@pytest.fixture(scope="module")
def template(
    local_stack: object, stack_settings: StackSettings, tmp_path_factory: pytest.TempPathFactory
) -> tuple[FeatureStoreTuning, Path, pd.Timestamp]:
    """The feature repo, and a state directory holding version 1 (bootstrapped in-process) and its checkpoint."""
    data_dir = Path(tmp_path_factory.mktemp("crash_feast"))
    tuning = FeatureStoreTuning(data_dir=data_dir, project=f"c{uuid.uuid4().hex[:10]}")
    repo = TrainerSettings(redis=stack_settings.redis, paths=PathSettings(state_dir=data_dir), features=tuning)
    feature_store.setup(repo, DATASET)
    state_dir = Path(tmp_path_factory.mktemp("crash_state"))
    settings = TrainerSettings(
        redis=stack_settings.redis,
        paths=PathSettings(state_dir=state_dir),
        features=tuning,
        trainer=TrainerTuning(holdout_size=200, publish=False, metrics_port=0),
    )
    history = load_dataset(DATASET).interactions
    until = history["event_time"].max()
    assert bootstrap(settings, history, until, config=TINY, progress=False).version == 1
    return tuning, state_dir, until


def stream(users: list[str], items: list[str], start: pd.Timestamp, first: int, count: int) -> list[Interaction]:
    """``count`` clicks, users in turn, 9 h apart: one user's events are 27 h apart (see the module docstring)."""
    return [
        Interaction(
            event_id=f"crash-{i}",
            event_time=(start + pd.Timedelta(hours=9 * i)).to_pydatetime(),
            user_id=users[i % len(users)],
            item_id=items[i % len(items)],
            kind="view",
        )
        for i in range(first, first + count)
    ]


def produce(settings: CommonSettings, events: list[Interaction]) -> list[tuple[int, int]]:
    """Write ``events``; each one's (partition, offset) as the broker acknowledged it."""
    acknowledged: list[tuple[int, int]] = []

    def delivered(error: Any, message: Any) -> None:
        assert error is None, error
        acknowledged.append((message.partition(), message.offset()))

    producer = Producer(settings.kafka.client_config())
    for event in events:
        producer.produce(settings.topics.interactions, key=event.key(), value=event.to_bytes(), on_delivery=delivered)
    assert producer.flush(30) == 0
    assert len(acknowledged) == len(events)
    return acknowledged


def committed_offsets(settings: TrainerSettings) -> dict[int, int]:
    consumer = Consumer({**settings.kafka.client_config(), "group.id": settings.trainer.group_id})
    try:
        partitions = [TopicPartition(settings.source_topic, p) for p in range(settings.topics.partitions)]
        return {tp.partition: tp.offset for tp in consumer.committed(partitions, timeout=10) if tp.offset >= 0}
    finally:
        consumer.close()


def process_state(pid: int) -> str:
    """The kernel's one-letter state of ``pid`` (``T``: stopped by a signal)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def start_trainer(settings: TrainerSettings, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(  # noqa: S603  # our own module
            [sys.executable, "-m", "online_trainer.cli", "trainer"],
            env=settings_env(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def log_tail(path: Path) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-40:])


def test_sigkill_between_rename_and_commit_neither_duplicates_nor_skips_records(
    fresh_settings: CommonSettings, template: tuple[FeatureStoreTuning, Path, pd.Timestamp], tmp_path: Path
) -> None:
    feast_tuning, template_dir, until = template
    state_dir = tmp_path / "state"
    shutil.copytree(template_dir, state_dir)
    tuning = TrainerTuning(
        group_id=f"trainer-{uuid.uuid4().hex[:8]}",
        interval_s=3.0,
        holdout_size=10,
        finetune_epochs=1,
        gate_margin=1.0,  # the gate's metric is not under test: every finite candidate passes
        publish=False,
        metrics_port=0,
        session_timeout_s=6.0,  # the killed trainer's group membership ends soon after the kill
    )
    settings = TrainerSettings(
        kafka=fresh_settings.kafka,
        redis=fresh_settings.redis,
        topics=fresh_settings.topics,
        paths=PathSettings(state_dir=state_dir),
        features=feast_tuning,
        trainer=tuning,
    )
    dataset = load_dataset(DATASET)
    users = dataset.interactions["user_id"].astype(str).drop_duplicates().head(3).tolist()
    items = dataset.interactions["item_id"].astype(str).drop_duplicates().head(12).tolist()
    start = until + pd.Timedelta(hours=1)
    positions = produce(fresh_settings, stream(users, items, start, 0, BEFORE_CRASH))

    # 1. the first trainer publishes version 2 and stops itself right after the rename
    faulty = settings.model_copy(update={"trainer": tuning.model_copy(update={"fault_stop_at": "revealed"})})
    log_path = tmp_path / "trainer.log"
    crashing = start_trainer(faulty, log_path)
    try:
        deadline = time.monotonic() + 120
        while process_state(crashing.pid) != "T":
            assert crashing.poll() is None, f"the trainer exited ({crashing.returncode}):\n{log_tail(log_path)}"
            assert time.monotonic() < deadline, f"the trainer never reached the rename:\n{log_tail(log_path)}"
            time.sleep(0.2)
    finally:
        crashing.kill()  # SIGKILL: no handler, no commit, no leaving the group
        crashing.wait(30)
    assert export.list_versions(settings.model_base_path) == [1, 2]
    assert committed_offsets(settings) == {}, "the kill was meant to land before the commit"

    # 2. restarted without the fault; more events arrive
    restarted = start_trainer(settings, log_path)
    try:
        positions += produce(fresh_settings, stream(users, items, start, BEFORE_CRASH, AFTER_CRASH))
        end = {p: o for p, o in end_offsets(fresh_settings, fresh_settings.topics.interactions).items() if o > 0}
        deadline = time.monotonic() + 120
        while committed_offsets(settings) != end:
            assert restarted.poll() is None, f"the trainer exited ({restarted.returncode}):\n{log_tail(log_path)}"
            assert time.monotonic() < deadline, f"the trainer never caught up with {end}:\n{log_tail(log_path)}"
            time.sleep(0.5)
    finally:
        restarted.terminate()
        restarted.wait(60)

    # 3. every version learned exactly the records between its parent's offsets and its own
    versions = export.list_versions(settings.model_base_path)
    assert versions == list(range(1, len(versions) + 1)) and len(versions) >= 3, versions
    lineages = {version: export.read_lineage(settings.model_base_path / str(version)) for version in versions}
    consumed: dict[int, int] = {}  # version 1 (the bootstrap) consumed nothing of the topic
    learned = 0
    for version in versions[1:]:
        lineage = lineages[version]
        upto = {int(p): int(o) for p, o in lineage["kafka"]["offsets"].items()}
        in_range = sum(consumed.get(p, 0) <= offset < upto.get(p, 0) for p, offset in positions)
        assert lineage["parent_version"] == version - 1
        assert lineage["data"]["new_examples"] == in_range, (version, consumed, upto)
        assert all(upto.get(p, 0) >= consumed.get(p, 0) for p in consumed), (version, consumed, upto)
        learned += in_range
        consumed = upto
    assert consumed == end == committed_offsets(settings)
    assert learned == BEFORE_CRASH + AFTER_CRASH == len(positions)
    # version 2's hold-out (saved with it, before the kill) is what the restarted trainer learned first
    assert lineages[3]["data"]["deferred_examples"] == lineages[2]["data"]["holdout_examples"] > 0
