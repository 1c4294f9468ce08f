"""The replay buffer: a uniform sample of every example the model has learned from.

Each fine-tune mixes the interval's new examples with a sample drawn from here, so the model keeps
what it learned from older data instead of drifting toward the last minute (catastrophic
forgetting). The buffer is a reservoir sample (Vitter's algorithm R): after ``seen`` examples,
each one is in the buffer with probability ``capacity / seen``, whatever its age, in bounded
memory. The random generator is seeded from ``seen``, so a restart from a checkpoint draws the
same way as a run without the restart.

The buffer holds the example frame's columns (``examples.example_columns`` of the model's schema):
those of ``frame`` when given, else those of the first examples added.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


class ReplayBuffer:
    def __init__(self, capacity: int, frame: pd.DataFrame | None = None, seen: int = 0) -> None:
        if capacity < 0:
            raise ValueError(f"ReplayBuffer capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.frame = (frame if frame is not None else pd.DataFrame()).reset_index(drop=True).iloc[:capacity]
        self.seen = max(seen, len(self.frame))

    @property
    def columns(self) -> list[str]:
        return list(self.frame.columns)

    def __len__(self) -> int:
        return len(self.frame)

    def add(self, examples: pd.DataFrame) -> None:
        """Offer ``examples`` (example-frame rows) to the reservoir."""
        if examples.empty or self.capacity == 0:
            self.seen += len(examples)
            return
        columns = self.columns or list(examples.columns)
        missing = [column for column in columns if column not in examples.columns]
        if missing:
            raise ValueError(f"replay buffer: the examples lack column(s) {missing} (another schema's examples?)")
        examples = examples.loc[:, columns].reset_index(drop=True)
        free = max(self.capacity - len(self.frame), 0)
        head, tail = examples.iloc[:free], examples.iloc[free:]
        if not head.empty:
            self.frame = head.copy() if self.frame.empty else pd.concat([self.frame, head], ignore_index=True)
            self.frame = self.frame.loc[:, columns]
            self.seen += len(head)
        if tail.empty:
            return
        rng = np.random.default_rng(self.seen)
        # Algorithm R: the example with global index i replaces slot j ~ U[0, i] if j < capacity.
        global_index = self.seen + np.arange(len(tail), dtype=np.int64)
        slots = rng.integers(0, global_index + 1)
        taken = slots < self.capacity
        self.seen += len(tail)
        if not taken.any():
            return
        chosen = pd.DataFrame({"slot": slots[taken], "row": np.nonzero(taken)[0]}).drop_duplicates("slot", keep="last")
        replacement = tail.iloc[chosen["row"].to_numpy()]
        replacement.index = chosen["slot"].to_numpy()
        self.frame.loc[replacement.index, columns] = replacement[columns]

    def sample(self, count: int, *, seed: int) -> pd.DataFrame:
        """``count`` distinct examples (or all of them if fewer), chosen uniformly."""
        count = min(count, len(self.frame))
        if count <= 0:
            return self.frame.iloc[:0].copy()
        rows = np.random.default_rng(seed).choice(len(self.frame), size=count, replace=False)
        return self.frame.iloc[np.sort(rows)].reset_index(drop=True)

    def replay_count(self, new_examples: int, replay_fraction: float) -> int:
        """How many replayed examples make ``replay_fraction`` of a mix with ``new_examples`` new ones."""
        if replay_fraction <= 0 or new_examples <= 0:
            return 0
        return min(len(self.frame), round(new_examples * replay_fraction / (1.0 - replay_fraction)))
