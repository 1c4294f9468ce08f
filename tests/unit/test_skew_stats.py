"""Skew and drift statistics (features/skew_stats.py) on hand-computed cases, and the window sample."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from features import skew_stats
from features.skew_checker import summary
from features.skew_settings import SkewThresholds
from features.skew_window import WindowSample
from streamrec.core import contracts
from streamrec.core.attributes import InputKind

RULES = Path(__file__).resolve().parents[2] / "infra" / "prometheus" / "rules" / "streamrec-model.rules.yml"
INPUTS: dict[str, InputKind] = {
    "user_id": "string",
    "recent_items": "strings",
    "count_1h": "int",
    "age": "float",
    "gender": "string",
}


def js_by_hand(p: list[float], q: list[float]) -> float:
    """sqrt of the base-2 Jensen-Shannon divergence, written out."""
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]

    def kl(x: list[float]) -> float:
        return sum(a * math.log2(a / c) for a, c in zip(x, m, strict=True) if a > 0)

    return math.sqrt((kl(p) + kl(q)) / 2)


def test_identical_samples_have_zero_distance() -> None:
    values = [0.0, 1.0, 1.0, 5.0, None, 7.5]
    assert skew_stats.js_distance(values, list(values)) == 0.0
    assert skew_stats.ks_statistic(values, list(values)) == 0.0
    assert skew_stats.linf_distance(["a", "b", "b"], ["b", "a", "b"]) == 0.0


def test_disjoint_samples_have_the_maximal_distance() -> None:
    assert skew_stats.js_distance([1.0, 1.0, 2.0], [10.0, 11.0]) == pytest.approx(1.0)
    assert skew_stats.ks_statistic([0.0, 1.0, 2.0], [10.0, 11.0]) == 1.0
    assert skew_stats.linf_distance(["a", "a"], ["b", "b", "b"]) == 1.0
    # one side empty: nothing in common
    assert skew_stats.linf_distance([], ["b"]) == 1.0
    assert skew_stats.js_distance([], [1.0]) == 1.0


def test_known_values() -> None:
    # ECDFs of {1,2,3,4} and {3,4,5,6} differ most at 2 (0.5 vs 0) and at 4 (1 vs 0.5)
    assert skew_stats.ks_statistic([1.0, 2.0, 3.0, 4.0], [3.0, 4.0, 5.0, 6.0]) == pytest.approx(0.5)
    # shares a .5/.25, b .25/.75, c .25/0 -> the largest difference is b's
    assert skew_stats.linf_distance(list("aabc"), list("abbb")) == pytest.approx(0.5)
    # one bin per value {0, 1} plus the unknowns' bin: (.5, .5, 0) against (1, 0, 0)
    expected = js_by_hand([0.5, 0.5, 0], [1, 0, 0])
    assert skew_stats.js_distance([0.0, 0.0, 1.0, 1.0], [0.0] * 4) == pytest.approx(expected)
    # unknown values count in a bin of their own: (.5 at 1, .5 unknown) against (1, 0)
    assert skew_stats.js_distance([1.0, None], [1.0, 1.0]) == pytest.approx(js_by_hand([0.5, 0.5], [1, 0]))
    assert skew_stats.js_distance([1.0, None], [1.0, 1.0]) == pytest.approx(0.5579, abs=1e-4)


def test_many_distinct_values_share_equal_width_bins() -> None:
    edges = skew_stats.shared_bin_edges(np.arange(100, dtype=float), bins=10)
    assert len(edges) == 11 and edges[0] == 0 and edges[-1] == 99
    edges = skew_stats.shared_bin_edges(np.array([3.0, 1.0, 3.0]), bins=10)  # one bin per value
    assert list(edges) == [0.5, 2.0, 3.5]


def test_ks_is_undefined_without_known_values() -> None:
    assert math.isnan(skew_stats.ks_statistic([None, None], [1.0]))


def test_model_values_follow_the_api_normalization() -> None:
    assert skew_stats.model_value("gender", "string", None) == ""
    assert skew_stats.model_value("count_1h", "int", pd.NA) == 0
    assert skew_stats.model_value("age", "float", float("nan")) is None
    assert skew_stats.model_value("age", "float", np.float64(31)) == 31.0
    items = np.array([str(i) for i in range(30)] + [None, ""], dtype=object)  # parquet gives arrays
    newest = [str(i) for i in range(contracts.RECENT_ITEMS_MAX)]
    assert skew_stats.model_value("recent_items", "strings", items) == newest
    assert skew_stats.model_value("tags", "strings", items) == [str(i) for i in range(30)]
    unknown_but_count = {"recent_items": [], "count_1h": 3, "age": None, "gender": ""}
    assert skew_stats.model_row({"count_1h": 3}, INPUTS) == unknown_but_count


def row(recent: list[str], count: int, age: float | None, gender: str) -> dict[str, object]:
    return {"recent_items": recent, "count_1h": count, "age": age, "gender": gender}


def test_skew_per_feature_and_mismatch_share() -> None:
    served = [row(["a", "b"], 2, 30.0, "F"), row(["c"], 1, 40.0, "M"), row([], 0, None, "M"), row(["a"], 5, 20.0, "F")]
    recomputed = [
        row(["a", "b"], 2, 30.0 + 1e-9, "F"),  # within the float tolerance
        row(["c", "a"], 2, 40.0, "M"),  # a newer state: one more item, one more event
        row([], 0, None, "M"),
        row(["b", "a"], 5, 20.0, "F"),  # same items, other order: a different input
    ]
    stats = {s.feature: s for s in skew_stats.skew(served, recomputed, INPUTS)}
    assert set(stats) == {"recent_items", "count_1h", "age", "gender"}
    assert stats["recent_items"].values["mismatch_share"] == 0.5
    assert stats["count_1h"].values["mismatch_share"] == 0.25
    assert stats["age"].values["mismatch_share"] == 0.0
    assert stats["gender"].values == {"linf": 0.0, "mismatch_share": 0.0}
    # pooled items: served a 2/4, b 1/4, c 1/4; recomputed a 3/6, b 2/6, c 1/6
    assert stats["recent_items"].values["linf"] == pytest.approx(max(0, 1 / 4 - 2 / 6, 1 / 4 - 1 / 6, key=abs))
    assert stats["count_1h"].kind == "numeric" and set(stats["count_1h"].values) == {"js", "ks", "mismatch_share"}
    with pytest.raises(ValueError, match="paired"):
        skew_stats.skew(served, recomputed[:2], INPUTS)


def test_drift_has_no_mismatch_share_and_over_thresholds_names_what_crossed() -> None:
    reference = [row(["a"], 1, 30.0, "F")] * 10
    recent = [row(["z"], 1, 30.0, "F")] * 9 + [row(["a"], 9, 30.0, "M")]
    stats = skew_stats.drift(reference, recent, INPUTS)
    assert all("mismatch_share" not in s.values for s in stats)
    by_feature = {s.feature: s.values for s in stats}
    assert by_feature["recent_items"]["linf"] == pytest.approx(0.9)  # a: 1.0 -> 0.1, z: 0 -> 0.9
    assert by_feature["count_1h"]["js"] == pytest.approx(js_by_hand([1, 0, 0], [0.9, 0.1, 0]))
    assert by_feature["count_1h"]["ks"] == pytest.approx(0.1)
    assert by_feature["gender"]["linf"] == pytest.approx(0.1)  # at the threshold, not above it
    crossed = skew_stats.over_thresholds(stats, SkewThresholds().as_dict())
    assert crossed == ["recent_items.linf=0.900", f"count_1h.js={by_feature['count_1h']['js']:.3f}"]


def test_the_log_thresholds_are_the_alert_rules_thresholds() -> None:
    rules = yaml.safe_load(RULES.read_text())
    exprs = {rule["alert"]: rule["expr"] for group in rules["groups"] for rule in group["rules"] if "alert" in rule}
    found = dict(re.findall(r'statistic="(\w+)"\}\s*>\s*([0-9.]+)', exprs["StreamrecTrainServeSkew"]))
    assert {name: float(value) for name, value in found.items()} == SkewThresholds().as_dict()


def test_summary_line_names_the_worst_features() -> None:
    from features.skew import SkewReport

    served = [row(["a"], 1, 30.0, "F"), row(["b"], 2, 31.0, "M")]
    recomputed = [row(["a"], 1, 30.0, "F"), row(["b", "a"], 3, 31.0, "M")]
    report = SkewReport(2, skew_stats.skew(served, recomputed, INPUTS), None)
    line = summary(report, 40, SkewThresholds().as_dict())
    assert line.startswith("skew: 2 rows checked (of ~40 in the window); worst mismatch_share 0.500")
    assert "drift worst no reference yet" in line and "recent_items.mismatch_share=0.500" in line


def test_window_sample_is_bounded_and_uniform() -> None:
    window: WindowSample[int] = WindowSample(bucket_s=10.0, per_bucket=50, seed=1)
    for i in range(10_000):  # 100 rows a second over 100 s
        window.add(i / 100, i)
    assert len(window) <= 11 * 50
    rows, in_range = window.take(50.0, 100.0, 200)
    assert len(rows) == 200 and all(5_000 < i <= 10_000 for i in rows)
    assert in_range == pytest.approx(5_000, rel=0.02)
    halves = Counter(i < 7_500 for i in rows)  # each half of the range gets about half the sample
    assert abs(halves[True] - halves[False]) < 50
    window.prune(50.0)
    assert all(i >= 5_000 for i in window.take(0.0, 100.0, 10_000)[0])


def test_window_sample_is_exact_while_no_bucket_overflows() -> None:
    window: WindowSample[str] = WindowSample(bucket_s=1.0, per_bucket=100)
    for t, name in ((0.5, "old"), (1.5, "a"), (2.5, "b"), (3.5, "late")):
        window.add(t, name)
    assert window.take(1.0, 3.0, 10) == (["a", "b"], 2)
