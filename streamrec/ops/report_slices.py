"""The report's per-segment section: the evaluator's slice table of each decision (and the
promotions it held back), and the segments the trainer's gate flagged per version.

A version that wins overall but loses a segment badly is what this section exists to show, so
flagged rows are bold and held promotions are listed with the segments that held them.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from streamrec.core import contracts


def gate_slices(model_base_path: Path) -> dict[int, dict[str, Any]]:
    """Version -> its gate's per-segment figures (``lineage["slices"]``), for versions that have them."""
    found: dict[int, dict[str, Any]] = {}
    if not model_base_path.is_dir():
        return found
    for child in model_base_path.iterdir():
        path = child / contracts.LINEAGE_PATH
        if child.name.isdigit() and path.is_file():
            try:
                slices = json.loads(path.read_text()).get("slices")
            except ValueError:
                continue
            if slices:
                found[int(child.name)] = slices
    return found


def _ctr(arm: dict[str, Any] | None) -> str:
    if not arm:
        return "-"
    return f"{float(arm.get('ctr', 0.0)):.3f} ({int(arm.get('trials', 0)):,})"


def _bold(text: str, flagged: bool) -> str:
    return f"<b>{text}</b>" if flagged else text


def decision_slices_html(record: dict[str, Any]) -> str:
    """One decision's (or held promotion's) slice table; empty when it carries none."""
    slices = (record.get("figures") or {}).get("slices") or {}
    segments: dict[str, dict[str, Any]] = slices.get("segments") or {}
    if not segments:
        return ""
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{_bold(html.escape(cell), bool(figures.get('flagged')))}</td>"
            for cell in (
                segment,
                str(figures.get("unit", "")),
                _ctr(figures.get("stable")),
                _ctr(figures.get("canary")),
                "FLAGGED" if figures.get("flagged") else "",
            )
        )
        + "</tr>"
        for segment, figures in segments.items()
    )
    title = (
        f"{html.escape(str(record.get('time', '')))}: {html.escape(str(record.get('action', '')))} "
        f"canary {record.get('canary_version')} vs stable {record.get('stable_version')}"
    )
    return (
        f"<h3>{title}</h3><table border=1><tr><th>segment</th><th>unit</th><th>stable CTR (n)</th>"
        f"<th>canary CTR (n)</th><th></th></tr>{rows}</table>"
    )


def gate_slices_html(by_version: dict[int, dict[str, Any]]) -> str:
    """Per version, the segments its gate flagged (candidate below serving by more than flag_loss)."""
    lines = []
    for version in sorted(by_version):
        flagged = [segment for segment, figures in by_version[version].items() if figures.get("flagged")]
        examined = len(by_version[version])
        lines.append(
            f"<li>version {version}: {examined} segments, "
            + (f"<b>flagged: {html.escape(', '.join(flagged))}</b>" if flagged else "none flagged")
            + "</li>"
        )
    return f"<ul>{''.join(lines)}</ul>" if lines else "<p>no gate slices recorded</p>"


def slices_html(decisions: list[dict[str, Any]], held: list[dict[str, Any]], model_base_path: Path) -> str:
    """The whole section: held promotions, each decision's slice table, the gate's flags per version."""
    held_items = "".join(
        f"<li>{html.escape(str(record.get('time', '')))}: canary {record.get('canary_version')} held, "
        f"<b>{html.escape(', '.join((record.get('figures') or {}).get('slices', {}).get('flagged', [])))}</b>: "
        f"{html.escape(str(record.get('reason', '')))}</li>"
        for record in held
    )
    tables = "".join(decision_slices_html(record) for record in [*held, *decisions])
    return (
        "<h2>segments (slices)</h2>"
        + (f"<h3>promotions held for a segment</h3><ul>{held_items}</ul>" if held_items else "")
        + (tables or "<p>no decision carried a slice table yet</p>")
        + "<h3>the gate's segments per version</h3>"
        + gate_slices_html(gate_slices(model_base_path))
    )
