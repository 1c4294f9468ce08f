"""The evaluator's decision log (``decisions.jsonl``): written before a decision acts, reconciled at start.

A decision moves the model server's labels (promote: ``stable`` := the canary; rollback:
``canary`` := stable, and the version goes into ``rejected.json``). The evaluator can die at any
point around that move, so every decision is appended (and fsynced) in two records with the
same ``id``:

1. ``"state": "intent"`` before the move: versions, reason, figures, test, and the read
   positions of the evidence;
2. ``"state": "applied"`` once the move (and a rollback's rejection) is done, or ``"abandoned"``
   when reconciliation finds the labels moved elsewhere meanwhile (nothing is moved then).

A promotion held back by a flagged segment (``evaluator.py``) is one record, ``"state": "held"``
(``"action": "hold"``): it moves nothing, so it needs no outcome, and readers of applied
decisions never see it.

:meth:`DecisionLog.reconcile` runs at start: for an intent without an outcome it reads the
labels; the move already in effect -> ``applied`` (the rejection completed, nothing moved
again); the labels still those of the experiment -> the move is made now, then ``applied``;
anything else -> ``abandoned``. A decision is so applied at most once and never lost, and
``rejected.json`` holds exactly the canaries of applied rollbacks (plus any listed before).
Readers take the applied records (:func:`applied_decisions`); records written before this log
had states have none and count as applied.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from streamrec.core import contracts

log = logging.getLogger(__name__)

DecisionState = Literal["intent", "applied", "abandoned", "held"]


class LabelController(Protocol):
    """How the evaluator reads and moves the model server's labels (the model client in production)."""

    def labels(self) -> dict[str, int]: ...

    def promote(self, version: int | None = None) -> int: ...

    def rollback(self, version: int | None = None) -> int: ...


def read_records(path: Path) -> Iterator[dict[str, Any]]:
    """Every record of a decision log, oldest first (a torn last line, from a crash, is skipped)."""
    if not path.exists():
        return
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                log.warning("skipping an unreadable line of %s: %r", path, line[:80])


def applied_decisions(path: Path) -> list[dict[str, Any]]:
    """The applied decisions of a log, oldest first."""
    return [record for record in read_records(path) if record.get("state", "applied") == "applied"]


class DecisionLog:
    """``decisions.jsonl`` and ``rejected.json`` in the evaluator's output directory."""

    def __init__(self, output_dir: Path) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        self.path = output_dir / "decisions.jsonl"
        self.rejected_path = output_dir / "rejected.json"

    # -- reading ------------------------------------------------------------------------------
    def outcomes(self) -> dict[str, dict[str, Any]]:
        """Each decision's latest record by id (the intent, or its outcome)."""
        latest: dict[str, dict[str, Any]] = {}
        for number, record in enumerate(read_records(self.path)):
            latest[str(record.get("id", f"line-{number}"))] = record
        return latest

    def decided_versions(self) -> set[int]:
        """Canary versions decided for good: applied decisions and rejected versions."""
        applied = {int(record["canary_version"]) for record in applied_decisions(self.path)}
        return applied | set(self.rejected_versions())

    def last_hold(self, stable_version: int, canary_versions: list[int]) -> dict[str, Any] | None:
        """The newest ``held`` record of this stable version and canary line, if any."""
        held = None
        for record in read_records(self.path):
            if (
                record.get("state") == "held"
                and record.get("stable_version") == stable_version
                and record.get("canary_version") in canary_versions
            ):
                held = record
        return held

    def rejected_versions(self) -> list[int]:
        if not self.rejected_path.exists():
            return []
        return [int(version) for version in json.loads(self.rejected_path.read_text())]

    # -- writing ------------------------------------------------------------------------------
    def intend(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append ``record`` (action, versions, reason, figures ...) as a new decision's intent."""
        intent = {"id": uuid.uuid4().hex, "state": "intent", "time": _now(), **record}
        self._append(intent)
        return intent

    def hold(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append ``record`` (versions, reason, figures ...) as a promotion held back: no label moves."""
        held = {"id": uuid.uuid4().hex, "state": "held", "time": _now(), **record, "action": "hold"}
        self._append(held)
        return held

    def apply(self, intent: dict[str, Any], controller: LabelController, **extra: str) -> dict[str, Any]:
        """Move the labels as ``intent`` says, then record it applied."""
        canary = int(intent["canary_version"])
        if intent["action"] == "promote":
            controller.promote(canary)
        else:
            controller.rollback(canary)
            self._mark_rejected(canary)
        return self._outcome(intent, "applied", **extra)

    def reconcile(self, controller: LabelController) -> list[dict[str, Any]]:
        """Settle every intent without an outcome against the labels (module docstring); returns
        the outcomes written."""
        settled = []
        for intent in self.outcomes().values():
            if intent.get("state") != "intent":
                continue
            labels = controller.labels()
            stable, canary = labels.get(contracts.STABLE_LABEL), labels.get(contracts.CANARY_LABEL)
            before = (int(intent["stable_version"]), int(intent["canary_version"]))
            if self._in_effect(intent, stable, canary):
                if intent["action"] == "rollback":
                    self._mark_rejected(before[1])
                settled.append(self._outcome(intent, "applied", recovered="already in effect"))
            elif (stable, canary) == before:
                settled.append(self.apply(intent, controller, recovered="applied at start"))
            else:
                reason = f"the labels moved on meanwhile: stable {stable}, canary {canary}"
                settled.append(self._outcome(intent, "abandoned", recovered=reason))
            log.info(
                "decision %s (%s of version %s): %s", intent["id"], intent["action"], before[1], settled[-1]["state"]
            )
        return settled

    @staticmethod
    def _in_effect(intent: dict[str, Any], stable: int | None, canary: int | None) -> bool:
        old_stable, old_canary = int(intent["stable_version"]), int(intent["canary_version"])
        if intent["action"] == "promote":
            return stable == old_canary
        return stable == old_stable and canary == old_stable

    def _outcome(self, intent: dict[str, Any], state: DecisionState, **extra: str) -> dict[str, Any]:
        record = {**intent, **extra, "state": state, "time": _now(), "intent_time": intent["time"]}
        self._append(record)
        return record

    def _mark_rejected(self, version: int) -> None:
        rejected = sorted({*self.rejected_versions(), version})
        temp = self.rejected_path.with_suffix(".tmp")
        temp.write_text(json.dumps(rejected))
        os.replace(temp, self.rejected_path)

    def _append(self, record: dict[str, Any]) -> None:
        with self.path.open("a+b") as handle:
            torn = handle.tell() > 0 and _last_byte(handle) != b"\n"  # a crash mid-line: start a new one
            handle.write((("\n" if torn else "") + json.dumps(record) + "\n").encode())
            handle.flush()
            os.fsync(handle.fileno())


def _last_byte(handle: Any) -> bytes:
    handle.seek(-1, os.SEEK_END)
    last: bytes = handle.read(1)
    return last


def _now() -> str:
    return datetime.now(UTC).isoformat()
