"""Synthetic interactions for scale tests: Zipf-distributed item popularity.

Real catalogs are long-tailed: a few items take most interactions. Sampling items from a
truncated Zipf law with exponent ``zipf_exponent`` reproduces that shape, which is what makes
per-item windows and caches behave realistically under load. Users are uniform, times are
evenly spread over ``duration``; everything is seeded and deterministic.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd

from streamrec.datasets.frames import as_interaction_frame

DEFAULT_START = datetime(2026, 1, 1, tzinfo=UTC)


def zipf_item_probabilities(n_items: int, exponent: float) -> np.ndarray:
    ranks = np.arange(1, n_items + 1, dtype=np.float64)
    weights: np.ndarray = ranks**-exponent
    probabilities: np.ndarray = weights / weights.sum()
    return probabilities


def generate(
    *,
    n_users: int = 1000,
    n_items: int = 2000,
    n_events: int = 100_000,
    zipf_exponent: float = 1.1,
    start: datetime = DEFAULT_START,
    duration: timedelta = timedelta(days=1),
    seed: int = 0,
) -> pd.DataFrame:
    if min(n_users, n_items, n_events) <= 0:
        raise ValueError("n_users, n_items and n_events must be positive")
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, size=n_events)
    items = rng.choice(n_items, size=n_events, p=zipf_item_probabilities(n_items, zipf_exponent))
    offsets_ns = np.sort(rng.integers(0, int(duration.total_seconds() * 1e9), size=n_events))
    frame = pd.DataFrame(
        {
            "event_id": [f"syn-{seed}-{index}" for index in range(n_events)],
            "user_id": pd.Series(users).map(lambda user: f"u{user}"),
            "item_id": pd.Series(items).map(lambda item: f"i{item}"),
            "kind": "view",
            "rating": np.nan,
            "event_time": pd.Timestamp(start) + pd.to_timedelta(offsets_ns, unit="ns"),
        }
    )
    return as_interaction_frame(frame, source="synthetic")
