"""The report's segment section shows what a user must see: the segment a winning canary loses,
the promotion held for it, and the segments the gate flagged per version."""

from __future__ import annotations

import json
from pathlib import Path

from streamrec.core import contracts
from streamrec.ops.report_slices import gate_slices, slices_html


def _segments(new_canary_ctr: float) -> dict[str, object]:
    return {
        "user_tenure=returning": {
            "unit": "request",
            "stable": {"trials": 400, "clicks": 120, "ctr": 0.3},
            "canary": {"trials": 400, "clicks": 240, "ctr": 0.6},
            "flagged": False,
        },
        "user_tenure=new": {
            "unit": "request",
            "stable": {"trials": 400, "clicks": 120, "ctr": 0.3},
            "canary": {"trials": 400, "clicks": int(400 * new_canary_ctr), "ctr": new_canary_ctr},
            "flagged": new_canary_ctr < 0.24,
        },
    }


def test_a_segment_the_winner_loses_is_shown_with_the_held_promotion(tmp_path: Path) -> None:
    base = tmp_path / "models"
    lineage = base / "3" / contracts.LINEAGE_PATH
    lineage.parent.mkdir(parents=True)
    lineage.write_text(
        json.dumps(
            {"slices": {"event_kind=purchase": {"examples": 60, "candidate": 0.0, "serving": 0.4, "flagged": True}}}
        )
    )
    held = {
        "state": "held",
        "action": "hold",
        "time": "t1",
        "stable_version": 2,
        "canary_version": 3,
        "reason": "loses user_tenure=new",
        "figures": {"slices": {"flagged": ["user_tenure=new"], "segments": _segments(0.1)}},
    }
    promoted = {
        "state": "applied",
        "action": "promote",
        "time": "t2",
        "stable_version": 2,
        "canary_version": 4,
        "reason": "wins",
        "figures": {"slices": {"flagged": [], "segments": _segments(0.3)}},
    }
    page = slices_html([promoted], [held], base)
    assert "<b>user_tenure=new</b>" in page  # the held promotion names its segment
    assert "<b>0.100 (400)</b>" in page and "<b>FLAGGED</b>" in page
    assert page.count("FLAGGED") == 1  # the later promotion lost no segment
    assert "version 3: 1 segments, <b>flagged: event_kind=purchase</b>" in page
    assert gate_slices(base) == {3: json.loads(lineage.read_text())["slices"]}


def test_nothing_recorded_says_so(tmp_path: Path) -> None:
    page = slices_html([], [], tmp_path / "missing")
    assert "no decision carried a slice table yet" in page and "no gate slices recorded" in page
