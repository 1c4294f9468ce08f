"""The segments (slices) models are judged on, shared by the trainer's gate and the A/B evaluator.

A segment label is ``"dimension=value"``; one example belongs to one segment of each dimension:

  * ``user_tenure``: ``new`` (no history before this example) or ``returning``
  * ``user_activity``: the bucket of the user's history length, from ``SliceTuning.user_activity_bounds``
    (bounds (5, 20): ``0-4``, ``5-19``, ``20+``). The history length is the number of distinct
    recent items the model saw for the user (its ``recent_items`` input, ``""`` padding not
    counted): :func:`history_length`.
  * ``item_popularity``: ``tail``, ``torso`` or ``head`` by the item's interaction count, from
    ``SliceTuning.item_popularity_bounds`` (torso_from, head_from)
  * ``event_kind``: the interaction kind (``view``, ``click``, ...), when the example has one

The same labels are Prometheus label values (``segment``) and lineage / decision-log keys, so a
segment reads the same on every dashboard. :func:`flagged` is the one rule for "wins overall,
loses a segment badly". Pure Python on purpose: core imports no dataframe library.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from streamrec.core.settings import SliceTuning

USER_TENURE: Final = "user_tenure"
USER_ACTIVITY: Final = "user_activity"
ITEM_POPULARITY: Final = "item_popularity"
EVENT_KIND: Final = "event_kind"
DIMENSIONS: Final = (USER_TENURE, USER_ACTIVITY, ITEM_POPULARITY, EVENT_KIND)


def label(dimension: str, value: str) -> str:
    """``"dimension=value"``; a dimension not in :data:`DIMENSIONS` is a programming error."""
    if dimension not in DIMENSIONS:
        raise ValueError(f"unknown segment dimension {dimension!r}; use one of {', '.join(DIMENSIONS)}")
    return f"{dimension}={value}"


def parse(segment: str) -> tuple[str, str]:
    """The (dimension, value) of a label made by :func:`label`."""
    dimension, sep, value = segment.partition("=")
    if not sep or dimension not in DIMENSIONS or not value:
        raise ValueError(f"{segment!r} is not a segment label; expected 'dimension=value' with one of {DIMENSIONS}")
    return dimension, value


def history_length(recent_items: Iterable[str]) -> int:
    """The user's history length as both judges see it: the non-empty ids of ``recent_items``."""
    return sum(1 for item in recent_items if item)


def tenure(history_length: int) -> str:
    return "new" if history_length <= 0 else "returning"


def activity_bucket(history_length: int, bounds: tuple[int, ...]) -> str:
    """The bucket of ``history_length``: ``"0-4"``, ``"5-19"``, ``"20+"`` for bounds (5, 20)."""
    if history_length < 0:
        raise ValueError(f"history length {history_length} is negative")
    low = 0
    for high in bounds:
        if history_length < high:
            return f"{low}-{high - 1}"
        low = high
    return f"{low}+"


def activity_buckets(bounds: tuple[int, ...]) -> tuple[str, ...]:
    """Every bucket of :func:`activity_bucket`, lowest first."""
    return tuple(activity_bucket(length, bounds) for length in (0, *bounds))


def popularity_band(interactions: int, bounds: tuple[int, int]) -> str:
    """``tail`` below ``bounds[0]`` interactions, ``head`` from ``bounds[1]``, else ``torso``."""
    torso_from, head_from = bounds
    if interactions >= head_from:
        return "head"
    return "torso" if interactions >= torso_from else "tail"


def segment_labels(
    *, history_length: int, item_interactions: int, event_kind: str | None, tuning: SliceTuning
) -> tuple[str, ...]:
    """The segments of one example, one per dimension (no ``event_kind`` when the kind is unknown).

    ``history_length``: the user's interactions before this example; ``item_interactions``: the
    interactions the item had (the item's popularity as the judge knows it).
    """
    labels = [
        label(USER_TENURE, tenure(history_length)),
        label(USER_ACTIVITY, activity_bucket(history_length, tuning.user_activity_bounds)),
        label(ITEM_POPULARITY, popularity_band(item_interactions, tuning.item_popularity_bounds)),
    ]
    if event_kind:
        labels.append(label(EVENT_KIND, event_kind))
    return tuple(labels)


def all_segments(tuning: SliceTuning, event_kinds: Iterable[str] = ()) -> tuple[str, ...]:
    """Every label an example can get under ``tuning``, in dimension order (for reports and series)."""
    return (
        label(USER_TENURE, "new"),
        label(USER_TENURE, "returning"),
        *(label(USER_ACTIVITY, bucket) for bucket in activity_buckets(tuning.user_activity_bounds)),
        *(label(ITEM_POPULARITY, band) for band in ("head", "torso", "tail")),
        *(label(EVENT_KIND, kind) for kind in event_kinds),
    )


def flagged(*, examples: int, candidate: float, baseline: float, wins_overall: bool, tuning: SliceTuning) -> bool:
    """Whether a version that wins overall loses this segment badly: at least ``min_examples``
    examples and a figure more than ``flag_loss`` (relative) below the baseline's."""
    if not wins_overall or examples < tuning.min_examples or baseline <= 0.0:
        return False
    return candidate < baseline * (1.0 - tuning.flag_loss)


__all__ = [
    "DIMENSIONS",
    "EVENT_KIND",
    "ITEM_POPULARITY",
    "USER_ACTIVITY",
    "USER_TENURE",
    "activity_bucket",
    "activity_buckets",
    "all_segments",
    "flagged",
    "history_length",
    "label",
    "parse",
    "popularity_band",
    "segment_labels",
    "tenure",
]
