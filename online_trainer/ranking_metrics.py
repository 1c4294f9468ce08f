"""Ranking quality for the benchmarks: Recall/NDCG/Hit@K, RecBole's definitions (Prometheus: ``metrics``).

For one user with relevant (held-out) items ``R`` and a ranked list ``L`` of length ``K``:

* ``Recall@K = |L ∩ R| / |R|``
* ``NDCG@K = DCG / IDCG`` with binary relevance, ``DCG = Σ_{i: L_i ∈ R} 1 / log2(i + 1)`` (ranks from
  1) and ``IDCG = Σ_{i=1}^{min(|R|, K)} 1 / log2(i + 1)``
* ``Hit@K = 1 if |L ∩ R| > 0``

Each is averaged over the users that have at least one relevant item (RecBole's ``full`` mode).
:func:`top_k_masked` ranks the full catalog with each user's seen items masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RankingMetrics:
    recall: float
    ndcg: float
    hit: float
    users: int

    def as_dict(self, k: int, prefix: str = "") -> dict[str, float]:
        return {
            f"{prefix}recall_at_{k}": self.recall,
            f"{prefix}ndcg_at_{k}": self.ndcg,
            f"{prefix}hit_at_{k}": self.hit,
        }


def ranking_metrics(
    ranked: Sequence[Sequence[str]] | np.ndarray, relevant: Sequence[set[str]], k: int
) -> RankingMetrics:
    """Average Recall/NDCG/Hit@k of ranked lists (one per user) against each user's relevant set."""
    if len(ranked) != len(relevant):
        raise ValueError(f"ranking_metrics: {len(ranked)} ranked lists for {len(relevant)} relevant sets")
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    recalls: list[float] = []
    ndcgs: list[float] = []
    hits: list[float] = []
    for items, truth in zip(ranked, relevant, strict=True):
        if not truth:
            continue
        gains = np.fromiter((item in truth for item in list(items)[:k]), dtype=bool, count=min(k, len(items)))
        found = int(gains.sum())
        recalls.append(found / len(truth))
        ndcgs.append(float(discounts[: len(gains)][gains].sum() / discounts[: min(len(truth), k)].sum()))
        hits.append(float(found > 0))
    if not recalls:
        raise ValueError("ranking_metrics: no user has a relevant item; nothing to evaluate")
    return RankingMetrics(float(np.mean(recalls)), float(np.mean(ndcgs)), float(np.mean(hits)), len(recalls))


def overlap_at_k(
    reference: Sequence[Sequence[str]] | np.ndarray, candidate: Sequence[Sequence[str]] | np.ndarray
) -> np.ndarray:
    """Per row: the share of the reference's non-padding ids that the candidate's list also holds."""
    return np.asarray(
        [
            len(set(theirs) & (wanted := {item for item in ours if item})) / max(1, len(wanted))
            for ours, theirs in zip(reference, candidate, strict=True)
        ],
        dtype=np.float64,
    )


def top_k_masked(scores: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """Row-wise indices of the k best scores [U, k], best first, where ``mask`` [U, N] True is excluded."""
    if scores.shape != mask.shape:
        raise ValueError(f"top_k_masked: scores {scores.shape} and mask {mask.shape} differ")
    masked = np.where(mask, -np.inf, scores.astype(np.float64))
    k = min(k, masked.shape[1])
    part = np.argpartition(-masked, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(masked, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)
