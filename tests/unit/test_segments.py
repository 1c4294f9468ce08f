"""Segment labels and the slice flag rule shared by the gate and the evaluator."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from streamrec.core import segments
from streamrec.core.settings import SliceTuning

TUNING = SliceTuning(user_activity_bounds=(5, 20), item_popularity_bounds=(10, 100), min_examples=30, flag_loss=0.2)


@pytest.mark.parametrize(
    ("length", "bucket"), [(0, "0-4"), (4, "0-4"), (5, "5-19"), (19, "5-19"), (20, "20+"), (10_000, "20+")]
)
def test_activity_bucket_edges(length: int, bucket: str) -> None:
    assert segments.activity_bucket(length, (5, 20)) == bucket


def test_activity_buckets_cover_every_length_once() -> None:
    buckets = segments.activity_buckets((5, 20))
    assert buckets == ("0-4", "5-19", "20+")
    assert {segments.activity_bucket(length, (5, 20)) for length in range(50)} == set(buckets)


@pytest.mark.parametrize(("count", "band"), [(0, "tail"), (9, "tail"), (10, "torso"), (99, "torso"), (100, "head")])
def test_popularity_band_edges(count: int, band: str) -> None:
    assert segments.popularity_band(count, (10, 100)) == band


def test_segment_labels_of_one_example() -> None:
    assert segments.segment_labels(history_length=0, item_interactions=150, event_kind="click", tuning=TUNING) == (
        "user_tenure=new",
        "user_activity=0-4",
        "item_popularity=head",
        "event_kind=click",
    )
    assert segments.segment_labels(history_length=7, item_interactions=3, event_kind=None, tuning=TUNING) == (
        "user_tenure=returning",
        "user_activity=5-19",
        "item_popularity=tail",
    )


def test_every_label_of_an_example_is_listed_by_all_segments_and_parses_back() -> None:
    listed = segments.all_segments(TUNING, ("view", "purchase"))
    assert len(listed) == len(set(listed)) == 2 + 3 + 3 + 2
    for length in (0, 3, 5, 25):
        for count in (0, 50, 500):
            for seg in segments.segment_labels(
                history_length=length, item_interactions=count, event_kind="purchase", tuning=TUNING
            ):
                assert seg in listed
                dimension, value = segments.parse(seg)
                assert segments.label(dimension, value) == seg


@pytest.mark.parametrize("bad", ["user_tenure", "colour=red", "event_kind="])
def test_parse_rejects_non_labels(bad: str) -> None:
    with pytest.raises(ValueError, match="not a segment label"):
        segments.parse(bad)


@pytest.mark.parametrize(
    ("examples", "candidate", "baseline", "wins", "expected"),
    [
        (30, 0.10, 0.20, True, True),  # 50 % lower on a big enough segment: flagged
        (30, 0.17, 0.20, True, False),  # 15 % lower: within flag_loss
        (29, 0.00, 0.20, True, False),  # too few examples to judge
        (30, 0.10, 0.20, False, False),  # does not win overall: the gate rejects it anyway
        (30, 0.00, 0.00, True, False),  # baseline has nothing to lose
    ],
)
def test_flagged(examples: int, candidate: float, baseline: float, wins: bool, expected: bool) -> None:
    assert (
        segments.flagged(examples=examples, candidate=candidate, baseline=baseline, wins_overall=wins, tuning=TUNING)
        is expected
    )


@pytest.mark.parametrize("bounds", [(), (5, 5), (20, 5), (0, 5)])
def test_bounds_must_ascend(bounds: tuple[int, ...]) -> None:
    with pytest.raises(ValidationError, match="strictly ascending"):
        SliceTuning(user_activity_bounds=bounds)


def test_history_length_counts_recent_items_without_padding() -> None:
    assert segments.history_length(["7", "3", "", ""]) == 2
    assert segments.history_length([]) == 0


def test_activity_bounds_stay_within_the_recent_items_a_history_length_counts() -> None:
    with pytest.raises(ValidationError, match="lower the last bound"):
        SliceTuning(user_activity_bounds=(5, 50))
