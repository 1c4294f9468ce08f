"""The report's off-policy table: each version's estimate before its canary beside the click rate
its own lists then earned on the explorable positions."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from streamrec.core import contracts
from streamrec.ops.report_ope import ope_html, ope_summary, ope_table, realized_slot_ctr

pytestmark = pytest.mark.unit


def _lineage(base: Path, version: int, ope: dict[str, object] | None) -> None:
    path = base / str(version) / contracts.LINEAGE_PATH
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"gate": {"ope": ope} if ope is not None else {}}))


def _labeled() -> pd.DataFrame:
    """Version 2's own lists (3 items each, 2 explorable): its slots clicked 1 of 4; version 3 only
    interleaved (no own list); clicks at position 0 never count."""
    rows = []
    for request, clicks in (("a", (True, False, True)), ("b", (True, False, False))):
        for position, clicked in enumerate(clicks):
            rows.append((f"{request}{position}", request, 2, position, clicked, True))
    rows.append(("c0", "c", 3, 0, True, False))
    return pd.DataFrame(rows, columns=["event_id", "request_id", "model_version", "position", "clicked", "own_list"])


def test_estimates_sit_beside_the_realized_rate_of_the_same_positions(tmp_path: Path) -> None:
    difference = {"candidate": 0.3, "baseline": 0.2, "low": -0.1, "high": 0.3}
    _lineage(tmp_path, 2, {"verdict": "passed", "estimator": "dr", "difference": difference, "support": 0.8})
    _lineage(tmp_path, 3, {"verdict": "abstained", "estimator": "dr", "difference": None, "support": None})
    _lineage(tmp_path, 4, None)  # a version from before the gate: not in the table
    assert realized_slot_ctr(_labeled(), 2).set_index("model_version")["realized"].to_dict() == {2: 0.25}
    table = ope_table(tmp_path, _labeled(), slots=2)
    assert table["version"].tolist() == [2, 3]
    first = table.iloc[0]
    assert (first["estimate"], first["realized"], first["realized_rows"]) == (0.3, 0.25, 4)
    assert first["error"] == pytest.approx(0.05)
    assert pd.isna(table.iloc[1]["estimate"]) and pd.isna(table.iloc[1]["realized"])
    assert ope_summary(table) == {
        "ope_versions_estimated": 1,
        "ope_estimate_mean_abs_error": 0.05,
        "ope_versions_with_realized_ctr": 1,
    }
    assert "<td>0.3000</td>" in ope_html(table) and ope_html(table.iloc[0:0]) == ""


def test_no_versions_and_no_labels_give_an_empty_table(tmp_path: Path) -> None:
    empty = pd.DataFrame(columns=["event_id", "request_id", "model_version", "position", "clicked", "own_list"])
    table = ope_table(tmp_path / "missing", empty, slots=2)
    assert table.empty and ope_summary(table) == {"ope_versions_estimated": 0}
