"""A bounded, uniform sample of the rows of a sliding time window (the skew checker's buffer).

The checker compares at most ``n`` rows of the last ``window_s`` seconds every run. Keeping the
whole window would grow with traffic (a few KB per impression), so the window is cut into
buckets of ``bucket_s`` seconds, each holding a reservoir sample (Vitter's algorithm R) of at
most ``n`` of its rows and the count it saw. :meth:`WindowSample.take` draws from the buckets in
proportion to how many of their rows fall in the asked range: a uniform sample of the window in
``O(n * buckets)`` memory. No Kafka, no Feast: unit-tested on its own.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Generic, TypeVar

RowT = TypeVar("RowT")


@dataclass
class _Bucket(Generic[RowT]):
    seen: int = 0
    rows: list[tuple[float, RowT]] = field(default_factory=list)


class WindowSample(Generic[RowT]):
    """Rows stamped with a time (epoch seconds), sampled per bucket; see the module docstring."""

    def __init__(self, bucket_s: float, per_bucket: int, seed: int = 0) -> None:
        if bucket_s <= 0 or per_bucket < 1:
            raise ValueError(f"bucket_s must be > 0 and per_bucket >= 1, got {bucket_s} and {per_bucket}")
        self._bucket_s = bucket_s
        self._per_bucket = per_bucket
        self._random = random.Random(seed)  # noqa: S311 -- a sample, not a secret
        self._buckets: dict[int, _Bucket[RowT]] = {}

    def add(self, time_s: float, row: RowT) -> None:
        bucket = self._buckets.setdefault(math.floor(time_s / self._bucket_s), _Bucket())
        bucket.seen += 1
        if len(bucket.rows) < self._per_bucket:
            bucket.rows.append((time_s, row))
            return
        slot = self._random.randrange(bucket.seen)
        if slot < self._per_bucket:
            bucket.rows[slot] = (time_s, row)

    def prune(self, before_s: float) -> None:
        """Forget the buckets that end at or before ``before_s``."""
        last_gone = math.floor(before_s / self._bucket_s) - 1
        for key in [key for key in self._buckets if key <= last_gone]:
            del self._buckets[key]

    def take(self, start_s: float, end_s: float, n: int) -> tuple[list[RowT], int]:
        """Up to ``n`` rows with ``start_s < time <= end_s``, uniformly drawn, oldest first, and an
        estimate of how many rows fell in that range (exact while no bucket overflowed)."""
        shares: list[tuple[float, list[tuple[float, RowT]]]] = []
        for bucket in self._buckets.values():
            inside = [(time_s, row) for time_s, row in bucket.rows if start_s < time_s <= end_s]
            if inside:
                shares.append((bucket.seen * len(inside) / len(bucket.rows), inside))
        total = sum(count for count, _ in shares)
        chosen: list[tuple[float, RowT]] = []
        for count, inside in shares:
            want = len(inside) if total <= n else min(len(inside), round(n * count / total))
            chosen += self._random.sample(inside, want)
        if len(chosen) > n:  # rounding up in several buckets
            chosen = self._random.sample(chosen, n)
        chosen.sort(key=lambda pair: pair[0])
        return [row for _, row in chosen], round(total)

    def __len__(self) -> int:
        return sum(len(bucket.rows) for bucket in self._buckets.values())
