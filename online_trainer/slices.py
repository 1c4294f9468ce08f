"""The gate's figures per segment: hit@k of the candidate and of the serving model on each segment
of the hold-out (``streamrec.core.segments``, the dimensions the A/B evaluator slices by too).

A hold-out row's segments come from what the row carries and what the trainer knows: the user's
history length is the row's ``recent_items`` (the model's own input, as the API logs it), the
event kind its ``kind``, and the item's popularity its interaction count, estimated from the
replay buffer (:func:`item_interactions`). The verdict rule is ``segments.flagged``: a candidate that
passes the overall comparison but loses a big enough segment by more than ``slices.flag_loss`` is
flagged; with ``trainer.block_on_slice_flag`` the gate rejects it (reason ``slice``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from online_trainer.buffer import ReplayBuffer
from streamrec.core import segments
from streamrec.core.settings import SliceTuning


@dataclass(frozen=True)
class SliceJudge:
    """What the gate needs to slice a hold-out: the shared tuning, each item's interaction count
    (an item not named has none), and whether a flagged segment rejects the candidate."""

    tuning: SliceTuning
    item_interactions: Mapping[str, int]
    block: bool = False


def item_interactions(replay: ReplayBuffer) -> dict[str, int]:
    """Each item's learned interactions, estimated from the replay buffer: its rows there times
    ``seen / len`` (the buffer is a uniform sample of everything learned; exact while it is not full)."""
    if len(replay) == 0:
        return {}
    scale = replay.seen / len(replay)
    counts = replay.frame["item_id"].astype(str).value_counts()
    return {str(item): round(count * scale) for item, count in counts.items()}


def holdout_segments(holdout: pd.DataFrame, judge: SliceJudge) -> list[tuple[str, ...]]:
    """The segment labels of each hold-out row, in row order."""
    kinds = holdout["kind"] if "kind" in holdout.columns else pd.Series([None] * len(holdout), index=holdout.index)
    return [
        segments.segment_labels(
            history_length=segments.history_length(recent),
            item_interactions=judge.item_interactions.get(str(item), 0),
            event_kind=str(kind) if isinstance(kind, str) and kind else None,
            tuning=judge.tuning,
        )
        for recent, item, kind in zip(holdout["recent_items"], holdout["item_id"], kinds, strict=True)
    ]


def slice_figures(
    holdout: pd.DataFrame,
    candidate_hits: np.ndarray,
    serving_hits: np.ndarray | None,
    judge: SliceJudge,
    *,
    wins_overall: bool,
) -> dict[str, dict[str, Any]]:
    """Per segment present in the hold-out: ``examples``, ``candidate`` and ``serving`` hit@k
    (None without a serving model) and ``flagged``, in ``segments.all_segments`` order."""
    rows: dict[str, list[int]] = defaultdict(list)
    for index, labels in enumerate(holdout_segments(holdout, judge)):
        for label in labels:
            rows[label].append(index)
    order = {label: rank for rank, label in enumerate(segments.all_segments(judge.tuning))}
    figures: dict[str, dict[str, Any]] = {}
    for label in sorted(rows, key=lambda name: (order.get(name, len(order)), name)):
        members = np.asarray(rows[label])
        candidate = float(np.mean(candidate_hits[members]))
        serving = float(np.mean(serving_hits[members])) if serving_hits is not None else None
        figures[label] = {
            "examples": len(members),
            "candidate": candidate,
            "serving": serving,
            "flagged": serving is not None
            and segments.flagged(
                examples=len(members),
                candidate=candidate,
                baseline=serving,
                wins_overall=wins_overall,
                tuning=judge.tuning,
            ),
        }
    return figures
