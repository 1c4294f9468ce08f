"""From a trained candidate to a published version, without ever exposing a bad or half one.

The order, shared by ``streamrec train`` and the online loop:

1. **stage** (after the in-memory half of step 2): ``export.export_version`` into the hidden
   staging directory beside the model base path (``TrainerSettings.staging_path``; same file
   system). The model server polls only the base path, so nothing staged is visible to it.
2. **gate** (:mod:`online_trainer.gate`): the in-memory checks run first (a NaN or worse
   candidate, or one whose fine-tune loss or gradient norm was NaN/inf, is not even exported),
   then the checks of the staged export. A rejected candidate's directory is deleted: it never
   reaches the base path. The verdict goes into the lineage (``gate``), with the figures per
   segment (``slices``: examples, candidate, serving, flagged).
3. **checkpoint** the trainer state that goes with the version (:mod:`online_trainer.checkpoint`).
4. **reveal**: one ``os.rename`` of the staged directory to ``<base>/<version>``. Before this
   point a crash leaves only staging leftovers and an orphan checkpoint, which :meth:`VersionWriter.recover`
   deletes at the next start; after it, the version is complete.
5. **label**: ``ModelServerClient.publish_canary`` (loads the version, then moves ``canary``). When
   the model server is unreachable the version stays on disk unlabelled (the server's file-system
   poll may still load it); the trainer records the last labelled version in
   ``<trainer_state_path>/published.json`` and labels the newest version at its next start.
6. **prune** versions beyond ``trainer.retention`` (never one a label points at) and their checkpoints.

The caller commits its Kafka offsets only after this returns (at-least-once: a crash anywhere
above replays the same records into the same version number). A crash after the rename and before
that commit neither loses nor repeats a record: the checkpoint of step 3 holds the offsets the version
consumed, and the restarted loop starts there (``loop.OnlineTrainer._on_assign``), not at the
older committed offsets. See docs/design/trainer.md#crash-safety-of-publish-and-commit.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from online_trainer import checkpoint, export, metrics
from online_trainer.checkpoint import Checkpoint
from online_trainer.gate import GateResult, check_export, run_gate
from online_trainer.model import TwoTowerModel
from online_trainer.ope_gate import OpeVerdict
from online_trainer.settings import TrainerSettings
from online_trainer.slices import SliceJudge
from streamrec.core.errors import StreamrecError

log = logging.getLogger(__name__)
PUBLISHED_FILE = "published.json"

Fault = Callable[[str], None]
"""Crash injection for tests: called with a step name (``staged``, ``checkpointed``, ``revealed``)."""
FAULT_STEPS = ("staged", "checkpointed", "revealed")


def stop_at(step: str) -> Fault:
    """A fault that stops this process (SIGSTOP) the first time publishing reaches ``step``.

    For fault tests of a real trainer process (``trainer.fault_stop_at``): the test sees the process
    stopped, exactly at that step, and SIGKILLs it; nothing is raised, unlike an in-process fault.
    """
    if step not in FAULT_STEPS:
        raise ValueError(f"unknown publish step {step!r}; expected one of {FAULT_STEPS}")
    stopped: list[str] = []

    def fault(reached: str) -> None:
        if reached == step and not stopped:
            stopped.append(reached)
            log.warning("fault injection (trainer.fault_stop_at): stopping at %r, pid %d", step, os.getpid())
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGSTOP)

    return fault


class Publisher(Protocol):
    """What the trainer needs from ``serving.model_client.ModelServerClient``."""

    def publish_canary(self, version: int) -> None: ...

    def labels(self) -> dict[str, int]: ...


@dataclass
class Outcome:
    gate: GateResult
    version: int | None = None  # the revealed version (None when the gate rejected the candidate)
    labelled: bool = False  # canary label moved to it
    timings: dict[str, float] = field(default_factory=dict)


class VersionWriter:
    """Owns the base path, the staging directory and the trainer checkpoints of one model."""

    def __init__(self, settings: TrainerSettings) -> None:
        self.base_path = settings.model_base_path
        self.staging_path = settings.staging_path
        self.state_path = settings.trainer_state_path
        self.retention = settings.trainer.retention
        self.table_dtype = settings.trainer.serving_table_dtype

    def recover(self) -> list[Path]:
        """Delete what an interrupted run left behind (one trainer writes a base path)."""
        removed = export.remove_temp_dirs(self.base_path)
        if self.staging_path.exists():
            removed.append(self.staging_path)
            shutil.rmtree(self.staging_path)
        removed += checkpoint.remove_orphans(self.state_path, set(export.list_versions(self.base_path)))
        for path in removed:
            log.warning("removed leftover of an interrupted run: %s", path)
        return removed

    def versions(self) -> list[int]:
        return export.list_versions(self.base_path)

    def next_version(self) -> int:
        return (export.latest_version(self.base_path) or 0) + 1

    def stage(self, model: TwoTowerModel, version: int, *, lineage: dict[str, Any], warmup_users: pd.DataFrame) -> Path:
        leftover = self.staging_path / str(version)
        if leftover.exists():
            shutil.rmtree(leftover)
        return export.export_version(
            model, self.staging_path, version, lineage=lineage, warmup_users=warmup_users, table_dtype=self.table_dtype
        )

    def discard(self, staged: Path) -> None:
        shutil.rmtree(staged, ignore_errors=True)

    def reveal(self, staged: Path, version: int) -> Path:
        target = self.base_path / str(version)
        if target.exists():
            raise FileExistsError(f"{target} exists; versions are immutable (is another trainer writing here?)")
        self.base_path.mkdir(parents=True, exist_ok=True)
        os.rename(staged, target)
        descriptor = os.open(self.base_path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        return target

    # -- the last version that got the canary label ---------------------------------------------
    def labelled_version(self) -> int | None:
        path = self.state_path / PUBLISHED_FILE
        if not path.is_file():
            return None
        value = json.loads(path.read_text()).get("canary")
        return int(value) if value is not None else None

    def mark_labelled(self, version: int) -> None:
        self.state_path.mkdir(parents=True, exist_ok=True)
        temp = self.state_path / f".{PUBLISHED_FILE}.tmp"
        temp.write_text(json.dumps({"canary": version}))
        os.replace(temp, self.state_path / PUBLISHED_FILE)

    def prune(self, publisher: Publisher | None) -> list[int]:
        protect = {version for version in (self.labelled_version(),) if version is not None}
        if publisher is not None:
            try:
                protect |= set(publisher.labels().values())
            except (StreamrecError, OSError) as exc:  # no labels known: keep the newest ones only
                log.warning("could not read the model server labels before pruning: %s", exc)
        removed = export.prune_versions(self.base_path, self.retention, protect)
        checkpoint.remove_orphans(self.state_path, set(self.versions()))
        return removed


def label_canary(writer: VersionWriter, publisher: Publisher | None, version: int) -> bool:
    """Point ``canary`` at ``version``; False (version stays on disk) when the server cannot be reached."""
    if publisher is None:
        return False
    try:
        publisher.publish_canary(version)
    except (StreamrecError, OSError) as exc:
        metrics.PUBLISH_FAILURES.inc()
        log.warning(
            "version %d is written but not labelled canary (%s); retrying at the next publish/start", version, exc
        )
        return False
    writer.mark_labelled(version)
    return True


def _add_to_lineage(version_dir: Path, extra: dict[str, Any]) -> None:
    """Update the staged (not yet visible) version's lineage record."""
    path = version_dir / export.EXTRA_DIR / export.LINEAGE_FILE
    record = json.loads(path.read_text())
    record.update(extra)
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(temp, path)


def publish_candidate(
    writer: VersionWriter,
    candidate: TwoTowerModel,
    *,
    holdout: pd.DataFrame,
    serving: TwoTowerModel | None,
    lineage: dict[str, Any],
    trainer_state: Checkpoint,
    publisher: Publisher | None,
    k: int,
    margin: float,
    alpha: float = 1.0,
    fault: Fault | None = None,
    training: Mapping[str, float] | None = None,
    slices: SliceJudge | None = None,
    ope: OpeVerdict | None = None,
) -> Outcome:
    """Steps 1-6 of the module docstring; returns the gate verdict and what was published.

    ``training``: the fine-tune's stats (the gate rejects NaN/inf ones); ``slices``: judge the
    candidate per segment too (``gate.run_gate``); ``ope``: the off-policy gate's verdict.
    """
    import time

    started = time.perf_counter()
    version = writer.next_version()
    # the in-memory checks (cheap) before exporting; the export checks run on the staged copy below
    gate = run_gate(
        candidate,
        holdout,
        serving=serving,
        export_dir=None,
        k=k,
        margin=margin,
        alpha=alpha,
        training=training,
        slices=slices,
        ope=ope,
    )
    outcome = Outcome(gate=gate, timings={"check_s": time.perf_counter() - started})
    if gate.passed:
        warmup_users = holdout if not holdout.empty else trainer_state.replay.frame
        staged = writer.stage(candidate, version, lineage=lineage, warmup_users=warmup_users.head(16))
        exported = time.perf_counter()
        outcome.timings["export_s"] = exported - started - outcome.timings["check_s"]
        if fault is not None:
            fault("staged")  # a crash here leaves the staged dir for recover() to delete, like a real one
        try:
            check_export(gate, staged, holdout, len(candidate.catalog), candidate.schema)
        except BaseException:
            writer.discard(staged)
            raise
        outcome.timings["export_check_s"] = time.perf_counter() - exported
        if not gate.passed:
            writer.discard(staged)
    metrics.record_gate(gate.reasons)
    if gate.slices:
        metrics.record_slices(gate.slices)
    if not gate.passed:
        log.warning("candidate for version %d rejected: %s", version, gate.summary())
        return outcome
    _add_to_lineage(staged, {"gate": gate.to_json(), "slices": gate.slices})
    saving = time.perf_counter()
    checkpoint.save(writer.state_path, version, trainer_state)
    outcome.timings["checkpoint_s"] = time.perf_counter() - saving
    if fault is not None:
        fault("checkpointed")
    writer.reveal(staged, version)
    outcome.version = version
    if fault is not None:
        fault("revealed")
    revealed = time.perf_counter()
    outcome.labelled = label_canary(writer, publisher, version)
    outcome.timings["label_s"] = time.perf_counter() - revealed
    writer.prune(publisher)
    log.info("published version %d (%s)", version, gate.summary())
    return outcome
