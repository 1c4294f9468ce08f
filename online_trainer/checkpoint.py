"""Trainer checkpoints: what the online loop needs, besides the weights, to resume a version.

A checkpoint belongs to one model version and holds the trainer's state *at the Kafka offsets
recorded in that version's lineage*: every user's stream history (:mod:`online_trainer.history`)
and the replay buffer (:mod:`online_trainer.buffer`). It is written before the version is renamed
into the model base path, so a published version always has its checkpoint; a checkpoint whose
version never appeared (a crash in between) is an orphan that :func:`remove_orphans` deletes.

Layout: ``<trainer_state_path>/v<version>-s<seq>/{users.parquet, replay.parquet, deferred.parquet, meta.json}``,
written under a hidden temp name and renamed, like model versions. A version can get more than one
checkpoint (``seq`` 0, 1, ...): when the gate rejects a candidate, the trainer still moved past
those records (their features are in the user histories), so it saves a newer checkpoint of the
version it keeps serving before it commits the offsets. Every checkpoint is a new directory, so
no write ever replaces one in place; :func:`load_latest` takes the highest ``seq``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from online_trainer.buffer import ReplayBuffer
from online_trainer.history import UserHistories


@dataclass
class Checkpoint:
    histories: UserHistories
    replay: ReplayBuffer
    meta: dict[str, Any]
    # The last interval's hold-out, not learned yet: the next interval trains on it first
    # (:mod:`online_trainer.finetune`). Saved so a restart learns it too.
    deferred: pd.DataFrame = field(default_factory=pd.DataFrame)


_NAME = re.compile(r"^v(\d+)-s(\d+)$")


def _checkpoints(state_path: Path) -> dict[int, list[tuple[int, Path]]]:
    """version -> [(seq, dir)], ascending by seq."""
    found: dict[int, list[tuple[int, Path]]] = {}
    if not state_path.is_dir():
        return found
    for entry in state_path.iterdir():
        match = _NAME.match(entry.name)
        if match and entry.is_dir():
            found.setdefault(int(match.group(1)), []).append((int(match.group(2)), entry))
    return {version: sorted(items) for version, items in found.items()}


def save(state_path: Path, version: int, checkpoint: Checkpoint) -> Path:
    state_path.mkdir(parents=True, exist_ok=True)
    existing = _checkpoints(state_path).get(version, [])
    seq = existing[-1][0] + 1 if existing else 0
    target = state_path / f"v{version}-s{seq}"
    temp = state_path / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
    temp.mkdir()
    try:
        checkpoint.histories.to_frame().to_parquet(temp / "users.parquet", index=False)
        checkpoint.replay.frame.to_parquet(temp / "replay.parquet", index=False)
        checkpoint.deferred.to_parquet(temp / "deferred.parquet", index=False)
        meta = {**checkpoint.meta, "replay_seen": checkpoint.replay.seen, "replay_capacity": checkpoint.replay.capacity}
        (temp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        os.rename(temp, target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return target


def load_latest(state_path: Path, version: int, replay_capacity: int) -> Checkpoint | None:
    """The newest checkpoint of ``version``, or None when there is none (e.g. a version made elsewhere)."""
    existing = _checkpoints(state_path).get(version, [])
    if not existing:
        return None
    folder = existing[-1][1]
    meta = json.loads((folder / "meta.json").read_text())
    replay_frame = _read_examples(folder / "replay.parquet")
    deferred_path = folder / "deferred.parquet"  # absent in checkpoints written before it existed
    deferred = _read_examples(deferred_path) if deferred_path.exists() else pd.DataFrame()
    return Checkpoint(
        histories=UserHistories.from_frame(pd.read_parquet(folder / "users.parquet")),
        replay=ReplayBuffer(replay_capacity, replay_frame, seen=int(meta.get("replay_seen", len(replay_frame)))),
        meta=meta,
        deferred=deferred,
    )


def _read_examples(path: Path) -> pd.DataFrame:
    frame = pd.read_parquet(path)
    if "recent_items" in frame.columns:
        frame["recent_items"] = frame["recent_items"].map(lambda items: [str(i) for i in items])
    return frame


def remove_orphans(state_path: Path, published_versions: set[int]) -> list[Path]:
    """Delete temp dirs, checkpoints of versions that are not (or no longer) published, and all
    but the newest checkpoint of each published version."""
    removed: list[Path] = []
    if not state_path.is_dir():
        return removed
    doomed = [entry for entry in state_path.iterdir() if entry.name.startswith(".tmp-")]
    for version, items in _checkpoints(state_path).items():
        doomed += [folder for _, folder in (items if version not in published_versions else items[:-1])]
    for entry in doomed:
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed
