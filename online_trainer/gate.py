"""The validation gate: a candidate version is published only if every check passes.

Checks, each adding a machine-readable reason to :class:`GateResult` when it fails:

* ``nonfinite``: the fine-tune's loss or gradient norm was NaN/inf (``training``: the stats
  ``training.train`` returned), whatever the weights look like afterwards.
* ``nonfinite_weights``: a weight is NaN or inf (a diverged fine-tune).
* ``nonfinite_outputs``: user or item vectors, or scores, on the hold-out are NaN/inf, or the
  top-K comes back padded although the catalog is large enough. (The ranking code turns NaN scores
  into padding, so "no NaN in the answer" alone would let a NaN model through.)
* ``metric_regression``: hit@k on the recent hold-out is worse than the serving model's by more
  than ``margin`` (absolute) *and* the drop is significant: a one-sided exact sign test on the
  rows where only one of the two models hits gives ``p < alpha``. Both models are evaluated on
  the same rows, so the comparison is paired. A trainer interval's hold-out is small, and on it
  hit@k moves by about the margin from noise alone, so the margin alone rejected candidates that
  were no worse; a broken model (random weights, collapsed vectors) still fails with p far below
  any usable ``alpha``. See docs/design/trainer.md#validation-gate.
* ``signature_mismatch``: the exported SavedModel lacks a signature of ``streamrec.core.contracts``, or
  an input/output has another name, dtype or shape (``None`` dims allowed where the contract
  says B/E/N); the user inputs are those of the model's attribute schema
  (:func:`online_trainer.signatures.contract_signatures`).
* ``slice`` (only with ``SliceJudge.block``): the candidate passed the overall comparison but
  lost a segment of the hold-out badly (:mod:`online_trainer.slices`). Without ``block`` the
  segment is only flagged in ``GateResult.slices``, the lineage and the metrics.
* ``ope_regression``: the off-policy gate (:mod:`online_trainer.ope_gate`) estimated, on the
  lists stable showed with exploration, a click rate significantly below stable's. Its figures
  (or why it abstained) are in ``GateResult.ope`` and the lineage either way.
* ``export_outputs``: calling the exported signatures on hold-out rows gives wrong shapes/dtypes
  or non-finite scores (this catches a model that is fine in memory but broken once exported).

What a failure means for publishing is decided by :mod:`online_trainer.publish`: a candidate is
exported into a hidden staging directory, gated there, and only renamed into the model base path
when it passes; a rejected one is deleted, so the model server never sees it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from online_trainer.examples import user_arrays
from online_trainer.inference import catalog_vectors, recommend, user_vectors
from online_trainer.model import TwoTowerModel
from online_trainer.ope_gate import OpeVerdict
from online_trainer.signatures import contract_signatures, signatures_problems
from online_trainer.slices import SliceJudge, slice_figures
from streamrec.core import contracts
from streamrec.core.attributes import AttributeSchema

REASONS = (
    "nonfinite",
    "nonfinite_weights",
    "nonfinite_outputs",
    "metric_regression",
    "slice",
    "signature_mismatch",
    "export_outputs",
    "ope_regression",
)
TRAINING_FIGURES = ("loss", "gradient_norm_mean", "gradient_norm_max")
"""The ``training.train`` stats that must be finite for a candidate to be published."""


@dataclass
class GateResult:
    """The verdict on one candidate: ``passed`` iff ``reasons`` is empty."""

    reasons: list[str] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    candidate_metric: float | None = None
    serving_metric: float | None = None
    holdout_size: int = 0
    p_value: float | None = None  # the sign test's, when the candidate fell below the margin
    # per segment: examples, candidate and serving hit@k, flagged (slices.slice_figures); {} unsliced
    slices: dict[str, dict[str, Any]] = field(default_factory=dict)
    # the off-policy gate's verdict and figures (ope_gate.OpeVerdict.to_json); None: not run
    ope: dict[str, Any] | None = None

    @property
    def flagged_segments(self) -> list[str]:
        return [segment for segment, figures in self.slices.items() if figures["flagged"]]

    @property
    def passed(self) -> bool:
        return not self.reasons

    def fail(self, reason: str, detail: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown gate reason {reason!r}; expected one of {REASONS}")
        if reason not in self.reasons:
            self.reasons.append(reason)
        self.details.append(f"{reason}: {detail}")

    def summary(self) -> str:
        metric = ""
        if self.candidate_metric is not None:
            serving = "n/a" if self.serving_metric is None else f"{self.serving_metric:.4f}"
            metric = f" hit@k {self.candidate_metric:.4f} vs serving {serving} on {self.holdout_size} rows"
        verdict = "passed" if self.passed else "rejected (" + "; ".join(self.details) + ")"
        flags = f", flagged {', '.join(self.flagged_segments)}" if self.flagged_segments and self.passed else ""
        return f"gate {verdict}{metric}{flags}"

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reasons": list(self.reasons),
            "details": list(self.details),
            "candidate_metric": self.candidate_metric,
            "serving_metric": self.serving_metric,
            "holdout_size": self.holdout_size,
            "p_value": self.p_value,
            "flagged_segments": self.flagged_segments,
            "ope": self.ope,
        }


def hits(model: TwoTowerModel, holdout: pd.DataFrame, *, k: int) -> np.ndarray:
    """Per hold-out example: is its positive item in the model's top-k (nothing excluded)?"""
    ids, _ = recommend(model, holdout, k=k)
    return _positives_in(ids, holdout)


def _positives_in(top_ids: np.ndarray, holdout: pd.DataFrame) -> np.ndarray:
    positives = holdout["item_id"].astype(str).to_numpy()
    return np.asarray([positive in row for positive, row in zip(positives, top_ids, strict=True)], dtype=bool)


def sign_test_p(worse: int, better: int) -> float:
    """One-sided exact sign test: P(at least ``worse`` of ``worse + better`` fair coin flips).

    ``worse``: rows only the serving model hits; ``better``: rows only the candidate hits. Small
    when the candidate loses more rows than chance explains.
    """
    n = worse + better
    if n == 0:
        return 1.0
    tail: int = sum(math.comb(n, j) for j in range(worse, n + 1))
    return float(tail / 2**n)


def check_model(
    result: GateResult,
    candidate: TwoTowerModel,
    holdout: pd.DataFrame,
    *,
    serving: TwoTowerModel | None,
    k: int,
    margin: float,
    alpha: float = 1.0,
    training: Mapping[str, float] | None = None,
    slices: SliceJudge | None = None,
) -> None:
    """The in-memory checks: finite training figures, weights and outputs, the metric against
    ``serving``, and (with ``slices``) the same metric per segment.

    ``alpha``: the sign test's level (module docstring); 1.0 rejects every drop beyond ``margin``.
    ``training``: the fine-tune's stats (``training.train``); None when there was no training.
    """
    nonfinite = {
        name: value for name, value in (training or {}).items() if name in TRAINING_FIGURES and not math.isfinite(value)
    }
    if nonfinite:
        result.fail("nonfinite", f"the fine-tune's {nonfinite} is NaN/inf (diverged)")
        return
    bad = [weight.name for weight in candidate.weights if not np.all(np.isfinite(np.asarray(weight)))]
    if bad:
        result.fail("nonfinite_weights", f"{len(bad)} weight tensor(s) hold NaN/inf, e.g. {bad[0]}")
        return  # every output would be garbage; the remaining checks add nothing
    result.holdout_size = len(holdout)
    if holdout.empty:
        result.fail("nonfinite_outputs", "the hold-out is empty, so the outputs could not be checked")
        return
    users = user_vectors(candidate, holdout)
    items = catalog_vectors(candidate)
    ids, scores = recommend(candidate, holdout, k=k)
    depth = min(k, len(candidate.catalog))
    if not (np.all(np.isfinite(users)) and np.all(np.isfinite(items)) and np.all(np.isfinite(scores))):
        result.fail("nonfinite_outputs", "user/item vectors or scores hold NaN/inf on the hold-out")
        return
    if np.any(ids[:, :depth] == ""):
        result.fail("nonfinite_outputs", f"top-{k} is padded although the catalog has {len(candidate.catalog)} items")
        return
    candidate_hits = _positives_in(ids, holdout)  # the top-k just checked
    result.candidate_metric = float(np.mean(candidate_hits))
    serving_hits = None
    if serving is not None:
        serving_hits = hits(serving, holdout, k=k)
        result.serving_metric = float(np.mean(serving_hits))
        if result.candidate_metric < result.serving_metric - margin:
            worse = int(np.sum(serving_hits & ~candidate_hits))
            better = int(np.sum(candidate_hits & ~serving_hits))
            result.p_value = sign_test_p(worse, better)
            if result.p_value < alpha:
                result.fail(
                    "metric_regression",
                    f"hit@{k} {result.candidate_metric:.4f} < serving {result.serving_metric:.4f} - margin {margin} "
                    f"(sign test p={result.p_value:.3g} < {alpha}: {worse} rows lost, {better} gained)",
                )
    if slices is not None:
        _check_slices(result, holdout, candidate_hits, serving_hits, slices, k=k)


def _check_slices(
    result: GateResult,
    holdout: pd.DataFrame,
    candidate_hits: np.ndarray,
    serving_hits: np.ndarray | None,
    judge: SliceJudge,
    *,
    k: int,
) -> None:
    """Figures per segment; "wins overall" means the overall comparison passed (the version would be published)."""
    wins_overall = serving_hits is not None and "metric_regression" not in result.reasons
    result.slices = slice_figures(holdout, candidate_hits, serving_hits, judge, wins_overall=wins_overall)
    flagged = result.flagged_segments
    if flagged and judge.block:
        worst = ", ".join(
            f"{segment} hit@{k} {result.slices[segment]['candidate']:.4f} vs serving "
            f"{result.slices[segment]['serving']:.4f} ({result.slices[segment]['examples']} rows)"
            for segment in flagged
        )
        result.fail("slice", f"wins overall but loses by more than slices.flag_loss on {worst}")


def signature_problems(loaded: Any, schema: AttributeSchema) -> list[str]:
    """Every difference between a loaded SavedModel's signatures and the contract for ``schema``."""
    return signatures_problems(loaded, contract_signatures(schema))


def signature_inputs(holdout: pd.DataFrame, schema: AttributeSchema, *, rows: int = 8) -> dict[str, np.ndarray]:
    """A ``recommend`` request built from hold-out rows (excluding each row's recent items)."""
    sample = holdout.iloc[:rows]
    arrays = user_arrays(sample, schema)
    arrays["exclude_items"] = arrays["recent_items"][:, :5].copy()
    return arrays


def check_export(
    result: GateResult, export_dir: Path, holdout: pd.DataFrame, catalog_size: int, schema: AttributeSchema
) -> None:
    """Load the exported version, compare its signatures to the contract and call each once."""
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(export_dir))
    except Exception as exc:  # any load failure means the model server would fail too
        result.fail("signature_mismatch", f"the export at {export_dir} does not load: {exc}")
        return
    problems = signature_problems(loaded, schema)
    if problems:
        result.fail("signature_mismatch", "; ".join(problems))
        return
    if holdout.empty:
        return
    arrays = signature_inputs(holdout, schema)
    batch = len(arrays["user_id"])
    request = {name: tf.constant(value) for name, value in arrays.items()}
    answer = loaded.signatures[contracts.RECOMMEND_SIGNATURE](**request)
    ids, scores = answer["item_ids"].numpy(), answer["scores"].numpy()
    expected = (batch, contracts.TOP_K_EXPORTED)
    if ids.shape != expected or scores.shape != expected or scores.dtype != np.float32:
        result.fail(
            "export_outputs", f"recommend returned {ids.shape}/{scores.shape} {scores.dtype}, expected {expected}"
        )
        return
    most_excluded = max(len({item for item in row if item}) for row in arrays["exclude_items"])
    eligible = max(min(contracts.TOP_K_EXPORTED, catalog_size - most_excluded), 0)
    if not np.all(np.isfinite(scores[:, :eligible])) or np.any(ids[:, :eligible] == b""):
        result.fail("export_outputs", "recommend returned NaN/inf or padded scores for eligible items")
        return
    score_request = {name: value for name, value in request.items() if name != "exclude_items"}
    score_request["item_ids"] = answer["item_ids"][:, :3]
    scored = loaded.signatures[contracts.SCORE_SIGNATURE](**score_request)["scores"].numpy()
    if scored.shape != (batch, 3) or not np.all(np.isfinite(scored)):
        result.fail("export_outputs", f"score returned shape {scored.shape} or non-finite values")
        return
    _check_similar(result, loaded, answer["item_ids"][:, 0], catalog_size)


def _check_similar(result: GateResult, loaded: Any, item_ids: Any, catalog_size: int) -> None:
    """``similar`` for the items recommend returned first: full, finite, never the item itself."""
    import tensorflow as tf

    request = {"item_id": item_ids, "exclude_items": tf.fill([tf.shape(item_ids)[0], 1], "")}
    answer = loaded.signatures[contracts.SIMILAR_SIGNATURE](**request)
    ids, scores = answer["item_ids"].numpy(), answer["scores"].numpy()
    eligible = max(min(contracts.TOP_K_EXPORTED, catalog_size - 1), 0)
    returns_itself = any(item in row for item, row in zip(item_ids.numpy(), ids, strict=True))
    if returns_itself or not np.all(np.isfinite(scores[:, :eligible])) or np.any(ids[:, :eligible] == b""):
        result.fail("export_outputs", "similar returned an item itself, NaN/inf or padding for eligible items")


def run_gate(
    candidate: TwoTowerModel,
    holdout: pd.DataFrame,
    *,
    serving: TwoTowerModel | None,
    export_dir: Path | None,
    k: int,
    margin: float,
    alpha: float = 1.0,
    training: Mapping[str, float] | None = None,
    slices: SliceJudge | None = None,
    ope: OpeVerdict | None = None,
) -> GateResult:
    """All checks; the export checks only run when the in-memory ones passed. ``ope``: the
    off-policy gate's verdict on this candidate (``ope_gate.judge``), None when it did not run."""
    result = GateResult()
    if ope is not None:
        result.ope = ope.to_json()
        if ope.blocked:
            result.fail("ope_regression", ope.summary())
    check_model(
        result,
        candidate,
        holdout,
        serving=serving,
        k=k,
        margin=margin,
        alpha=alpha,
        training=training,
        slices=slices,
    )
    if result.passed and export_dir is not None:
        check_export(result, export_dir, holdout, len(candidate.catalog), candidate.schema)
    return result
