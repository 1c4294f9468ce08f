"""Which produced records each published version newly covers: the input of live model freshness.

A version's lineage says, per partition, the offset below which every record was learned
(``kafka.trained_offsets``; the newest rows, held out for the gate, are covered by the next
version). :class:`CoverageLedger` keeps the (partition, offset, produce second) of every consumed
example record that no published version covers yet. A published version takes those below its
trained offsets, counted per whole second of their Kafka timestamp, as
``lineage["freshness"]["produced_counts"] = [[epoch_second, count], ...]``; the API observes
``streamrec_model_freshness_seconds`` from them when it first serves the version. A rejected
interval's records stay in the ledger and go to the next published version, which covers them.

Bounded (``trainer.freshness_pending_max``: the oldest produce times are dropped first) and saved
with each trainer checkpoint (:meth:`CoverageLedger.to_json`), so the last version's held-out rows
are counted after a restart too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class CoverageLedger:
    """Example records not covered by a published version yet, and the offsets already covered."""

    def __init__(
        self,
        max_entries: int,
        covered: Mapping[int, int] | None = None,
        entries: Iterable[tuple[int, int, int]] = (),
    ) -> None:
        self.max_entries = max_entries
        self.covered: dict[int, int] = dict(covered or {})  # per partition: offsets below are covered
        self.dropped = 0  # entries dropped by the bound
        self._entries = np.empty((0, 3), dtype=np.int64)  # rows: partition, offset, produce second
        self.add(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, entries: Iterable[tuple[int, int, int]]) -> None:
        """Record (partition, offset, produce second) of consumed example records; those already
        covered, or already recorded, are ignored."""
        new = np.asarray(list(entries), dtype=np.int64).reshape(-1, 3)
        if len(new) == 0 or self.max_entries == 0:
            return
        new = new[new[:, 1] >= self._bound(new[:, 0], self.covered)]
        merged = np.concatenate([self._entries, new])
        _, first = np.unique(merged[:, :2], axis=0, return_index=True)
        merged = merged[np.sort(first)]
        excess = len(merged) - self.max_entries
        if excess > 0:
            keep = np.sort(np.argsort(merged[:, 2], kind="stable")[excess:])
            merged = merged[keep]
            self.dropped += excess
            log.warning(
                "freshness ledger full (trainer.freshness_pending_max = %d): dropped the %d oldest records",
                self.max_entries,
                excess,
            )
        self._entries = merged

    def produced_counts(self, trained_offsets: Mapping[int, int]) -> list[list[int]]:
        """``[[epoch_second, count], ...]`` (ascending) of the records a version with these trained
        offsets newly covers; the ledger is unchanged (:meth:`settle` once the version is published)."""
        seconds, counts = np.unique(self._entries[self._covered_by(trained_offsets), 2], return_counts=True)
        return [[int(second), int(count)] for second, count in zip(seconds, counts, strict=True)]

    def settle(self, trained_offsets: Mapping[int, int]) -> None:
        """A version with these trained offsets was published: its records leave the ledger."""
        self._entries = self._entries[~self._covered_by(trained_offsets)]
        for partition, offset in trained_offsets.items():
            self.covered[int(partition)] = max(self.covered.get(int(partition), 0), int(offset))

    def to_json(self, settled: Mapping[int, int] | None = None) -> dict[str, Any]:
        """The ledger for a checkpoint's meta, as it will be once ``settled`` (trained offsets) is."""
        after = CoverageLedger(self.max_entries, self.covered, ((p, o, s) for p, o, s in self._entries.tolist()))
        if settled is not None:
            after.settle(settled)
        return {
            "covered": {str(partition): offset for partition, offset in sorted(after.covered.items())},
            "uncovered": after._entries.tolist(),
        }

    @classmethod
    def from_json(cls, record: Mapping[str, Any] | None, max_entries: int) -> CoverageLedger:
        """A ledger saved by :meth:`to_json` (None: an empty one, e.g. a checkpoint from before it existed)."""
        if not record:
            return cls(max_entries)
        covered = {int(partition): int(offset) for partition, offset in record.get("covered", {}).items()}
        entries = [(int(p), int(o), int(s)) for p, o, s in record.get("uncovered", [])]
        return cls(max_entries, covered, entries)

    def _covered_by(self, trained_offsets: Mapping[int, int]) -> np.ndarray:
        limits = {int(partition): int(offset) for partition, offset in trained_offsets.items()}
        return self._entries[:, 1] < self._bound(self._entries[:, 0], limits)

    @staticmethod
    def _bound(partitions: np.ndarray, offsets: Mapping[int, int]) -> np.ndarray:
        """Per row, the offset of its partition in ``offsets`` (-1 where the partition is absent)."""
        return np.fromiter((offsets.get(int(p), -1) for p in partitions), dtype=np.int64, count=len(partitions))


def trained_offsets(
    consumed: dict[int, int], deferred_rows: Iterable[int], row_positions: list[tuple[int, int] | None]
) -> dict[int, int]:
    """Per partition, the offset below which every record was learned by this interval's version.

    ``row_positions``: each new row's (partition, offset); ``deferred_rows``: the rows held out for
    the gate (``IntervalPlan.deferred_rows``), learned only in the next interval, so in each
    partition coverage stops at the first of them. Conservative: a row learned now but after a
    held-out one in the same partition waits for the next version too.
    """
    covered = dict(consumed)
    for index in deferred_rows:
        position = row_positions[int(index)]
        if position is not None:
            partition, offset = position
            covered[partition] = min(covered.get(partition, offset), offset)
    return covered
