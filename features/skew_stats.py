"""Train/serve skew and drift statistics: pure functions over feature values (no Feast, no Kafka).

Rows are mappings of model input name -> value, normalized by :func:`model_row` the way the API
normalizes what it reads (``serving/api/user_features.py``): ``string`` -> str ("" unknown),
``strings`` -> list[str] ([] unknown), ``int`` -> int (0 unknown), ``float`` -> float (None
unknown). So a difference here is a difference in what the model sees, not in representation.

Per feature, by kind (as in TensorFlow Data Validation's skew and drift comparators):

* categorical (``string``) and list (``strings``): ``linf``, the L-infinity distance between the
  two empirical distributions, max over values of |p(v) - q(v)|; a list's distribution is that
  of its entries pooled over the rows (how often each item appears);
* numeric (``int``, ``float``): ``js``, the Jensen-Shannon distance (base 2, so in [0, 1]) of the
  two histograms over shared bins, unknown values in a bin of their own; and ``ks``, the
  two-sample Kolmogorov-Smirnov statistic of the known values (NaN when a side has none);
* paired rows only (skew, not drift): ``mismatch_share``, the share of rows whose served value is
  not the recomputed one (floats within ``rel_tol``/``abs_tol``, lists in order).

Every statistic is 0 for identical inputs and at most 1. See docs/design/skew.md.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp

from streamrec.core import contracts
from streamrec.core.attributes import InputKind

FeatureKind = Literal["categorical", "list", "numeric"]
KIND_OF_INPUT: dict[InputKind, FeatureKind] = {
    "string": "categorical",
    "strings": "list",
    "int": "numeric",
    "float": "numeric",
}
DISTRIBUTION_STATISTICS: dict[FeatureKind, tuple[str, ...]] = {
    "categorical": ("linf",),
    "list": ("linf",),
    "numeric": ("js", "ks"),
}
MISMATCH_SHARE = "mismatch_share"


# -- normalization ------------------------------------------------------------------------
def _missing(value: Any) -> bool:
    """None, NaN, pandas' NA or NaT (anything that is not equal to itself or is None)."""
    if value is None:
        return True
    if isinstance(value, list | tuple | np.ndarray):
        return False
    try:
        return bool(value != value)
    except (TypeError, ValueError):  # pandas.NA refuses bool()
        return True


def model_value(name: str, kind: InputKind, value: Any) -> Any:
    """``value`` as the model input ``kind`` reads it (the module docstring's rules)."""
    if kind == "string":
        return "" if _missing(value) else str(value)
    if kind == "strings":
        tokens = [] if _missing(value) else [str(token) for token in value if not _missing(token) and str(token)]
        return tokens[: contracts.RECENT_ITEMS_MAX] if name == "recent_items" else tokens
    if kind == "int":
        return 0 if _missing(value) else int(value)
    return None if _missing(value) else float(value)


def model_row(values: Mapping[str, Any], inputs: Mapping[str, InputKind]) -> dict[str, Any]:
    """Every input of ``inputs`` (``user_id`` excepted) from ``values``; an absent one is unknown."""
    return {name: model_value(name, kind, values.get(name)) for name, kind in inputs.items() if name != "user_id"}


# -- statistics ---------------------------------------------------------------------------
def linf_distance(left: Sequence[Hashable], right: Sequence[Hashable]) -> float:
    """max over values v of |p_left(v) - p_right(v)| (empirical); 0 when both are empty, 1 when one is."""
    if not left or not right:
        return 0.0 if not left and not right else 1.0
    p, q = Counter(left), Counter(right)
    return float(max(abs(p[value] / len(left) - q[value] / len(right)) for value in p.keys() | q.keys()))


def pooled(rows: Iterable[Sequence[str]]) -> list[str]:
    """The entries of every list, one sequence (a list feature's distribution is theirs)."""
    return [token for row in rows for token in row]


def _known(values: Sequence[float | None]) -> np.ndarray:
    return np.array([float(value) for value in values if value is not None and not math.isnan(value)], dtype=float)


def shared_bin_edges(values: np.ndarray, bins: int) -> np.ndarray:
    """Histogram edges for ``values`` (both samples pooled): one bin per distinct value when there
    are at most ``bins`` of them (exact for counts), else ``bins`` equal-width bins over their range."""
    distinct = np.unique(values)
    if distinct.size == 0:
        return np.array([0.0, 1.0])
    if distinct.size > bins:
        return np.histogram_bin_edges(values, bins=bins)
    middles = (distinct[1:] + distinct[:-1]) / 2
    return np.concatenate([[distinct[0] - 0.5], middles, [distinct[-1] + 0.5]])


def js_distance(left: Sequence[float | None], right: Sequence[float | None], *, bins: int = 20) -> float:
    """Jensen-Shannon distance (base 2) of the two histograms over shared bins, plus a bin of unknowns."""
    if not left or not right:
        return 0.0 if not left and not right else 1.0
    known_left, known_right = _known(left), _known(right)
    edges = shared_bin_edges(np.concatenate([known_left, known_right]), bins)
    histograms = [
        np.append(np.histogram(known, bins=edges)[0], len(values) - len(known)).astype(float)
        for known, values in ((known_left, left), (known_right, right))
    ]
    distance = float(jensenshannon(histograms[0], histograms[1], base=2))
    return 0.0 if math.isnan(distance) else min(1.0, distance)  # NaN: rounding below 0 under the root


def ks_statistic(left: Sequence[float | None], right: Sequence[float | None]) -> float:
    """The two-sample Kolmogorov-Smirnov statistic of the known values; NaN when a side has none."""
    known_left, known_right = _known(left), _known(right)
    if not known_left.size or not known_right.size:
        return math.nan
    return float(ks_2samp(known_left, known_right).statistic)


def values_differ(kind: InputKind, served: Any, recomputed: Any, *, rel_tol: float, abs_tol: float) -> bool:
    """Whether two normalized values of one input differ (floats within the tolerances)."""
    if kind == "float" and served is not None and recomputed is not None:
        return not math.isclose(served, recomputed, rel_tol=rel_tol, abs_tol=abs_tol)
    return bool(served != recomputed)


@dataclass(frozen=True)
class FeatureStatistics:
    """One feature's statistics (name -> value, see the module docstring)."""

    feature: str
    kind: FeatureKind
    values: Mapping[str, float]


def distribution_statistics(
    name: str, kind: InputKind, left: Sequence[Any], right: Sequence[Any], *, bins: int
) -> dict[str, float]:
    """The distance statistics of one feature between two samples of its values."""
    feature_kind = KIND_OF_INPUT[kind]
    if feature_kind == "categorical":
        return {"linf": linf_distance(left, right)}
    if feature_kind == "list":
        return {"linf": linf_distance(pooled(left), pooled(right))}
    return {"js": js_distance(left, right, bins=bins), "ks": ks_statistic(left, right)}


def _column(rows: Sequence[Mapping[str, Any]], name: str) -> list[Any]:
    return [row[name] for row in rows]


def skew(
    served: Sequence[Mapping[str, Any]],
    recomputed: Sequence[Mapping[str, Any]],
    inputs: Mapping[str, InputKind],
    *,
    bins: int = 20,
    rel_tol: float = 1e-6,
    abs_tol: float = 1e-9,
) -> list[FeatureStatistics]:
    """Per feature: the distance statistics and the mismatch share of paired, normalized rows."""
    if len(served) != len(recomputed):
        raise ValueError(f"skew needs paired rows; got {len(served)} served and {len(recomputed)} recomputed")
    if not served:
        raise ValueError("skew needs at least one served row")
    result = []
    for name, kind in inputs.items():
        if name == "user_id":
            continue
        left, right = _column(served, name), _column(recomputed, name)
        values = distribution_statistics(name, kind, left, right, bins=bins)
        differing = sum(
            values_differ(kind, a, b, rel_tol=rel_tol, abs_tol=abs_tol) for a, b in zip(left, right, strict=True)
        )
        values[MISMATCH_SHARE] = differing / len(served)
        result.append(FeatureStatistics(name, KIND_OF_INPUT[kind], values))
    return result


def drift(
    reference: Sequence[Mapping[str, Any]],
    recent: Sequence[Mapping[str, Any]],
    inputs: Mapping[str, InputKind],
    *,
    bins: int = 20,
) -> list[FeatureStatistics]:
    """Per feature: the distance statistics between a reference sample and recent rows (unpaired)."""
    if not reference or not recent:
        raise ValueError(f"drift needs rows on both sides; got {len(reference)} reference and {len(recent)} recent")
    return [
        FeatureStatistics(
            name,
            KIND_OF_INPUT[kind],
            distribution_statistics(name, kind, _column(reference, name), _column(recent, name), bins=bins),
        )
        for name, kind in inputs.items()
        if name != "user_id"
    ]


def over_thresholds(statistics: Iterable[FeatureStatistics], thresholds: Mapping[str, float]) -> list[str]:
    """``feature.statistic=value`` for every statistic above its threshold (NaN never is)."""
    return [
        f"{stats.feature}.{name}={value:.3f}"
        for stats in statistics
        for name, value in stats.values.items()
        if name in thresholds and value > thresholds[name]
    ]
