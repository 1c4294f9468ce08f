"""How well the off-policy gate predicted: per version, its estimate before the canary and the
click rate the version then earned online, on the same positions.

The gate estimates a candidate's click rate on the explorable positions of a list (the last
``exploration.slots``), where the logging policy draws; ``realized`` is the click rate that
version's own lists (single-model, not interleaved, not fallback) earned on those positions,
from the labeled examples of the run. A version that never served a list of its own (rolled back
while interleaved) has no realized figure. The absolute error over the versions that have both is
the loop benchmark's "OPE estimate error".
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import pandas as pd

from streamrec.core import contracts

COLUMNS = ("version", "verdict", "estimator", "estimate", "stable_estimate", "support", "realized", "realized_rows")


def labeled_frame(examples: list[Any]) -> pd.DataFrame:
    """The columns of labeled examples this module reads, one row per example (redeliveries dropped)."""
    rows = [
        {
            "event_id": example.event_id,
            "request_id": example.request_id,
            "model_version": example.model_version,
            "position": example.position,
            "clicked": example.clicked,
            "own_list": example.team is None and not example.fallback,
        }
        for example in examples
    ]
    frame = pd.DataFrame(rows, columns=["event_id", "request_id", "model_version", "position", "clicked", "own_list"])
    return frame.drop_duplicates("event_id")


def realized_slot_ctr(labeled: pd.DataFrame, slots: int) -> pd.DataFrame:
    """Per model version: clicks and rows on the last ``slots`` positions of its own lists."""
    own = labeled[labeled["own_list"]]
    if own.empty or slots < 1:
        return pd.DataFrame(columns=["model_version", "realized", "realized_rows"])
    size = own.groupby("request_id")["position"].transform("count")
    slot_rows = own[own["position"] >= size - slots]
    grouped = slot_rows.groupby("model_version")["clicked"]
    return pd.DataFrame(
        {"realized": grouped.mean().astype(float), "realized_rows": grouped.size().astype(int)}
    ).reset_index()


def ope_table(model_base_path: Path, labeled: pd.DataFrame, slots: int) -> pd.DataFrame:
    """One row per version whose lineage holds the gate's off-policy figures (``COLUMNS``)."""
    rows = []
    if model_base_path.exists():
        for child in sorted(model_base_path.iterdir(), key=lambda path: (len(path.name), path.name)):
            lineage_path = child / contracts.LINEAGE_PATH
            if not (child.name.isdigit() and lineage_path.is_file()):
                continue
            ope = json.loads(lineage_path.read_text()).get("gate", {}).get("ope")
            if not isinstance(ope, dict):
                continue
            difference = ope.get("difference") or {}
            rows.append(
                {
                    "version": int(child.name),
                    "verdict": ope.get("verdict"),
                    "estimator": ope.get("estimator"),
                    "estimate": difference.get("candidate"),
                    "stable_estimate": difference.get("baseline"),
                    "support": ope.get("support"),
                }
            )
    table = pd.DataFrame(rows, columns=list(COLUMNS[:6]))
    realized = realized_slot_ctr(labeled, slots).rename(columns={"model_version": "version"})
    table = table.merge(realized, on="version", how="left") if not table.empty else table.reindex(columns=COLUMNS)
    table["error"] = (table["estimate"].astype(float) - table["realized"].astype(float)).abs()
    return table


def ope_summary(table: pd.DataFrame) -> dict[str, float | int]:
    """Versions judged, and the mean absolute error where an estimate and a realized figure exist."""
    judged = table.dropna(subset=["estimate", "realized"])
    figures: dict[str, float | int] = {"ope_versions_estimated": int(table["estimate"].notna().sum())}
    if len(judged):
        figures["ope_estimate_mean_abs_error"] = round(float(judged["error"].mean()), 4)
        figures["ope_versions_with_realized_ctr"] = len(judged)
    return figures


def ope_html(table: pd.DataFrame) -> str:
    if table.empty:
        return ""
    header = "".join(f"<th>{name}</th>" for name in table.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(value))}</td>" for value in row) + "</tr>"
        for row in table.itertuples(index=False)
    )
    return (
        "<h2>off-policy estimates before the canary vs what each version earned</h2>"
        "<p>click rate on the explorable positions: the gate's estimate from stable's logged lists, and the "
        "realized rate of the version's own lists afterwards (empty: it never served a list of its own)</p>"
        f"<table border=1><tr>{header}</tr>{body}</table>"
    )


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "" if pd.isna(value) else f"{value:.4f}"
    return "" if value is None else str(value)
