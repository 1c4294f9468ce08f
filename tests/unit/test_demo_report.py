"""The demo report from the files a loop leaves behind: summary figures, plots, HTML page."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from streamrec.ops.report import LoopRecord, summary, write_report

START = 1_800_000_000.0


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(START + seconds, tz=UTC).isoformat()


def _record(tmp_path: Path) -> LoopRecord:
    rng = np.random.default_rng(0)
    times = START + np.arange(600) * 0.5
    responses = pd.DataFrame(
        {
            "time": times,
            "arm": np.where(np.arange(600) % 2 == 0, "stable", "canary"),
            "hit": rng.random(600) < 0.15,
            "latency_ms": rng.gamma(4.0, 3.0, 600),
            "fallback": False,
            "model_version": np.where(np.arange(600) % 2 == 0, 1, 2),
        }
    )
    evaluator = tmp_path / "evaluator"
    evaluator.mkdir()
    # The first points as written before ties were counted (no "credited"/"ties"), the last as now.
    timeline = [
        {
            "time": _iso(seconds),
            "stable": {"version": 1},
            "canary": {"version": 2},
            "interleaving": {"clicked": clicked, "canary_share": share},
        }
        for seconds, clicked, share in ((60, 5, 0.8), (120, 40, 0.55), (180, 90, 0.6))
    ]
    timeline.append(
        {
            "time": _iso(240),
            "stable": {"version": 1},
            "canary": {"version": 2},
            "interleaving": {"clicked": 200, "credited": 140, "ties": 60, "canary_share": 0.62},
        }
    )
    decision = {
        "time": _iso(250),
        "action": "promote",
        "reason": "canary's items drew 62.0% of 140 interleaved clicks (always-valid p=0.0400)",
        "stable_version": 1,
        "canary_version": 2,
    }
    (evaluator / "timeline.jsonl").write_text("".join(json.dumps(point) + "\n" for point in timeline))
    (evaluator / "decisions.jsonl").write_text(json.dumps(decision) + "\n")
    simulator = tmp_path / "simulator"
    simulator.mkdir()
    responses.to_parquet(simulator / "responses.parquet")
    return LoopRecord.load(simulator, evaluator, tmp_path / "models")


def test_the_summary_counts_decisions_and_reports_the_last_experiments_click_share(tmp_path: Path) -> None:
    record = _record(tmp_path)
    figures = summary(record)
    assert (figures["requests"], figures["promotions"], figures["rollbacks"]) == (600, 1, 0)
    assert figures["requests_canary"] == figures["requests_stable"] == 300
    assert figures["last_experiment_interleaved_clicks"] == 200
    assert figures["last_experiment_tied_clicks"] == 60
    assert figures["last_experiment_canary_click_share"] == 0.62


def test_the_report_writes_the_plots_the_page_and_the_summary(tmp_path: Path) -> None:
    page = write_report(_record(tmp_path), tmp_path / "report")
    assert (tmp_path / "report" / "loop.png").stat().st_size > 10_000
    text = page.read_text()
    assert "62.0% of 140 interleaved clicks" in text and "loop.png" in text
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["promotions"] == 1


def test_a_loop_without_interleaving_or_decisions_still_reports(tmp_path: Path) -> None:
    empty = LoopRecord(pd.DataFrame(), [], [])
    assert "last_experiment_canary_click_share" not in summary(empty)
    assert "last_experiment_tied_clicks" not in summary(empty)
    assert write_report(empty, tmp_path / "report").exists()


def test_a_loop_with_only_a_few_interleaved_clicks_still_reports(tmp_path: Path) -> None:
    record = _record(tmp_path)
    record.timeline = record.timeline[:1]  # 5 clicks: below the plot's threshold, no line to label
    assert write_report(record, tmp_path / "report").exists()
