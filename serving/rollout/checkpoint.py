"""Where the evaluator's evidence lies in Kafka: ``checkpoint.json`` in its output directory.

The evaluator keeps its evidence in memory and rebuilds it from ``topics.labeled`` after a
restart. It reads the topic's partitions by assignment (no consumer group, so a restart never
waits for a dead member's session to expire, and nothing is committed that a crash could put
ahead of the evidence), and keeps here:

* ``positions``: the next offset to read per partition, saved after every batch;
* the current experiment (stable version, canary line) and ``start``, the positions at which it
  began.

At start, when the labels still show that experiment, the evaluator reads again from ``start``.
It counts a request once however often its examples are read (by request id), so the rebuilt
figures are those of a run without the restart. Otherwise it goes on from ``positions``. A
partition missing from either map is read from its beginning, as a first start does.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class EvaluatorCheckpoint:
    topic: str
    positions: dict[int, int] = field(default_factory=dict)
    stable: int | None = None
    canary_versions: list[int] = field(default_factory=list)
    start: dict[int, int] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, topic: str) -> EvaluatorCheckpoint:
        """The saved checkpoint, or an empty one when there is none or it was for another topic."""
        if not path.exists():
            return cls(topic)
        data: dict[str, Any] = json.loads(path.read_text())
        if data.get("topic") != topic:
            return cls(topic)
        return cls(
            topic=topic,
            positions=_offsets(data.get("positions")),
            stable=data.get("stable"),
            canary_versions=[int(version) for version in data.get("canary_versions", [])],
            start=_offsets(data.get("start")),
        )

    def save(self, path: Path) -> None:
        """Write atomically (a crash leaves the old file or the new one)."""
        temp = path.with_suffix(".tmp")
        temp.write_text(json.dumps(asdict(self)))
        os.replace(temp, path)


def _offsets(raw: dict[str, int] | None) -> dict[int, int]:
    return {int(partition): int(offset) for partition, offset in (raw or {}).items()}
