"""The demo report: what the closed loop did, as a summary and as plots (PNG + one HTML page).

Inputs are the files the processes leave behind, so the report can be rebuilt after the fact
(``LoopRecord.load`` then ``write_report``): the simulator's ``responses.parquet``, the evaluator's
``decisions.jsonl`` and ``timeline.jsonl``, the model versions' directories, and histogram samples
scraped from the workers' Prometheus endpoints (freshness).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from streamrec.ops.report_ope import ope_html, ope_summary
from streamrec.ops.report_slices import slices_html  # noqa: E402


@dataclass
class LoopRecord:
    responses: pd.DataFrame
    decisions: list[dict[str, Any]]
    versions: list[dict[str, Any]]  # {"version": int, "published_at": epoch s}
    freshness_s: dict[float, float] = field(default_factory=dict)  # histogram: upper bound -> cumulative count
    counters: dict[str, float] = field(default_factory=dict)
    timeline: list[dict[str, Any]] = field(default_factory=list)  # the evaluator's running figures
    held: list[dict[str, Any]] = field(default_factory=list)  # promotions held for a flagged segment
    model_base_path: Path | None = None  # where the versions' lineages (the gate's slices) are
    # per version: the off-policy estimate before its canary and the realized rate (report_ope.ope_table)
    ope: pd.DataFrame | None = None

    @classmethod
    def load(cls, simulator_dir: Path, evaluator_dir: Path, model_base_path: Path) -> LoopRecord:
        responses_path = simulator_dir / "responses.parquet"
        responses = pd.read_parquet(responses_path) if responses_path.exists() else pd.DataFrame()
        # applied decisions only: the log also holds each one's intent (serving/rollout/decision_log.py)
        records = _read_jsonl(evaluator_dir / "decisions.jsonl")
        decisions = [d for d in records if d.get("state", "applied") == "applied"]
        held = [d for d in records if d.get("state") == "held"]
        versions = []
        if model_base_path.exists():
            for child in sorted(model_base_path.iterdir()):
                if child.is_dir() and child.name.isdigit():
                    versions.append({"version": int(child.name), "published_at": child.stat().st_mtime})
        return cls(
            responses,
            decisions,
            versions,
            timeline=_read_jsonl(evaluator_dir / "timeline.jsonl"),
            held=held,
            model_base_path=model_base_path,
        )

    @property
    def interleaving_points(self) -> list[dict[str, Any]]:
        """The timeline's snapshots of experiments that had interleaved requests, oldest first."""
        return [point for point in self.timeline if "interleaving" in point]


def _health_html(health: HealthPanels | None, out_dir: Path) -> str:
    if health is None:
        return "<h2>health</h2><p>no Prometheus data (the stack's Prometheus was not running)</p>"
    rows = "".join(
        f"<tr><td>{html.escape(title)}</td><td>{html.escape(value)}</td></tr>" for title, value in health.summaries
    )
    source = health.png.relative_to(out_dir) if health.png.is_relative_to(out_dir) else health.png
    return (
        "<h2>health (the loop overview dashboard's panels, from Prometheus)</h2>"
        f"<table border=1><tr><th>panel</th><th>latest</th></tr>{rows}</table>"
        f"<img src='{html.escape(str(source))}' width='100%'>"
    )


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def histogram_quantile(buckets: dict[float, float], quantile: float) -> float | None:
    """Prometheus-style quantile estimate from cumulative bucket counts (linear within a bucket)."""
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = quantile * total
    previous_bound, previous_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if np.isinf(bound):
                return previous_bound
            span = count - previous_count
            return previous_bound + (bound - previous_bound) * ((rank - previous_count) / span if span else 0.0)
        previous_bound, previous_count = bound, count
    return bounds[-1]


def summary(record: LoopRecord) -> dict[str, Any]:
    responses = record.responses
    figures: dict[str, Any] = {
        "requests": int(len(responses)),
        "versions_published": len(record.versions),
        "promotions": sum(d["action"] == "promote" for d in record.decisions),
        "rollbacks": sum(d["action"] == "rollback" for d in record.decisions),
        **record.counters,
    }
    if len(responses):
        for arm, group in responses.groupby("arm"):
            figures[f"ctr_{arm}"] = round(float(group["hit"].mean()), 4)
            figures[f"requests_{arm}"] = int(len(group))
        figures["recommend_p50_ms"] = round(float(responses["latency_ms"].quantile(0.5)), 2)
        figures["recommend_p99_ms"] = round(float(responses["latency_ms"].quantile(0.99)), 2)
        figures["fallback_share"] = round(float(responses["fallback"].mean()), 4)
    freshness_p99 = histogram_quantile(record.freshness_s, 0.99)
    if freshness_p99 is not None:
        figures["freshness_p99_ms"] = round(freshness_p99 * 1000, 1)
    interleaved = record.interleaving_points
    if interleaved:  # the experiment running at the end: how far the canary line is from a verdict
        last = interleaved[-1]["interleaving"]
        figures["last_experiment_interleaved_clicks"] = int(last["clicked"])
        if "ties" in last:  # timelines written before ties were counted have none
            figures["last_experiment_tied_clicks"] = int(last["ties"])
        figures["last_experiment_canary_click_share"] = round(float(last["canary_share"]), 3)
    if record.ope is not None:
        figures.update(ope_summary(record.ope))
    return figures


def _click_share(ax: Any, record: LoopRecord) -> None:
    """The canary's share of credited interleaved clicks over time, one line per experiment."""
    points = record.interleaving_points
    title = "canary's share of credited interleaved clicks (ties left out; 0.5 = no difference), per experiment"
    if not points:
        ax.text(0.5, 0.5, "no interleaved requests", ha="center")
        ax.set(title=title)
        return
    responses = record.responses
    start = responses["time"].min() if len(responses) else datetime.fromisoformat(points[0]["time"]).timestamp()
    frame = pd.DataFrame(
        {
            "minutes": [(datetime.fromisoformat(p["time"]).timestamp() - start) / 60 for p in points],
            "share": [p["interleaving"]["canary_share"] for p in points],
            # Ties (an item both models had) credit neither; older timelines did not count them.
            "credited": [p["interleaving"].get("credited", p["interleaving"]["clicked"]) for p in points],
            "stable": [p["stable"]["version"] for p in points],
        }
    )
    frame = frame[frame["credited"] >= 10]  # the first few clicks say nothing
    for stable, group in frame.groupby("stable"):
        ax.plot(group["minutes"], group["share"], label=f"canary line vs stable v{stable}")
    ax.axhline(0.5, color="black", linewidth=0.8)
    for decision in record.decisions:
        at = (datetime.fromisoformat(decision["time"]).timestamp() - start) / 60
        ax.axvline(at, color="green" if decision["action"] == "promote" else "red", linestyle="--", alpha=0.7)
    ax.set(title=title, xlabel="minutes", ylabel="share", ylim=(0, 1), xlim=(0, None))
    if frame.empty:  # every experiment still below 10 credited clicks: no line, so no legend
        ax.text(0.5, 0.5, "fewer than 10 credited interleaved clicks per experiment so far", ha="center")
        return
    ax.legend(loc="upper left")


def _ctr_over_time(ax: Any, responses: pd.DataFrame, decisions: list[dict[str, Any]]) -> None:
    if responses.empty:
        ax.text(0.5, 0.5, "no responses", ha="center")
        return
    start = responses["time"].min()
    for arm, group in responses.groupby("arm"):
        minutes = (group["time"] - start) / 60
        rolling = group["hit"].astype(float).rolling(window=min(300, max(10, len(group) // 5)), min_periods=10).mean()
        ax.plot(minutes, rolling, label=f"{arm} (overall {group['hit'].mean():.3f})")
    for decision in decisions:
        at = (datetime.fromisoformat(decision["time"]).timestamp() - start) / 60
        ax.axvline(at, color="green" if decision["action"] == "promote" else "red", linestyle="--", alpha=0.7)
    ax.set(title="CTR (= online hit rate@K) per arm, rolling", xlabel="minutes", ylabel="CTR")
    ax.legend()


def _versions_timeline(ax: Any, record: LoopRecord) -> None:
    responses = record.responses
    start = responses["time"].min() if len(responses) else min((v["published_at"] for v in record.versions), default=0)
    if len(responses):
        for arm, group in responses.groupby("arm"):
            ax.scatter((group["time"] - start) / 60, group["model_version"], s=2, label=f"served to {arm}")
    for version in record.versions:
        ax.scatter([(version["published_at"] - start) / 60], [version["version"]], marker="^", color="black")
    for decision in record.decisions:
        at = (datetime.fromisoformat(decision["time"]).timestamp() - start) / 60
        color = "green" if decision["action"] == "promote" else "red"
        ax.scatter([at], [decision["canary_version"]], marker="*", s=150, color=color, zorder=5)
        ax.annotate(decision["action"], (at, decision["canary_version"]), textcoords="offset points", xytext=(5, 5))
    ax.set(title="model versions: published (▲), served, decisions (★)", xlabel="minutes", ylabel="version")
    if ax.get_legend_handles_labels()[0]:  # nothing was served: no legend (matplotlib warns on an empty one)
        ax.legend(loc="upper left")


def _distribution(ax: Any, values: np.ndarray, title: str, unit: str) -> None:
    if len(values) == 0:
        ax.text(0.5, 0.5, "no samples", ha="center")
        ax.set(title=title)
        return
    ax.hist(values, bins=50)
    for quantile, style in ((0.5, "-"), (0.99, "--")):
        value = float(np.quantile(values, quantile))
        ax.axvline(value, color="black", linestyle=style, label=f"p{int(quantile * 100)} {value:.1f} {unit}")
    ax.set(title=title, xlabel=unit)
    ax.legend()


def _freshness(ax: Any, buckets: dict[float, float]) -> None:
    finite = sorted(bound for bound in buckets if np.isfinite(bound))
    if not finite:
        ax.text(0.5, 0.5, "no freshness samples", ha="center")
        ax.set(title="feature freshness")
        return
    cumulative = [buckets[bound] for bound in finite]
    counts = np.diff([0.0, *cumulative])
    ax.bar(range(len(finite)), counts)
    ax.set_xticks(range(len(finite)), [f"≤{bound * 1000:g}" for bound in finite], rotation=45)
    p99 = histogram_quantile(buckets, 0.99)
    ax.set(
        title=f"feature freshness (Kafka → readable online), p99 ≈ {p99 * 1000 if p99 else float('nan'):.0f} ms",
        xlabel="ms bucket",
        ylabel="events",
    )


@dataclass(frozen=True)
class HealthPanels:
    """The dashboard's panels as the stack's Prometheus saw the run (``streamrec.ops.health_panels``)."""

    png: Path
    summaries: list[tuple[str, str]]  # panel title, its latest value(s)


def write_report(record: LoopRecord, out_dir: Path, health: HealthPanels | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    figure = plt.figure(figsize=(16, 14))
    grid = figure.add_gridspec(3, 2)
    _ctr_over_time(figure.add_subplot(grid[0, 0]), record.responses, record.decisions)
    _versions_timeline(figure.add_subplot(grid[0, 1]), record)
    _click_share(figure.add_subplot(grid[1, :]), record)
    latencies = record.responses["latency_ms"].to_numpy() if len(record.responses) else np.array([])
    _distribution(figure.add_subplot(grid[2, 0]), latencies, "Recommend latency (client side)", "ms")
    _freshness(figure.add_subplot(grid[2, 1]), record.freshness_s)
    figure.tight_layout()
    png = out_dir / "loop.png"
    figure.savefig(png, dpi=90)
    plt.close(figure)
    figures = summary(record)
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in figures.items())
    decisions = "".join(
        f"<tr><td>{html.escape(d['time'])}</td><td>{d['action']}</td><td>{d['stable_version']}</td>"
        f"<td>{d['canary_version']}</td><td>{html.escape(d['reason'])}</td></tr>"
        for d in record.decisions
    )
    page = out_dir / "report.html"
    page.write_text(
        "<html><head><meta charset='utf-8'><title>streamrec demo</title></head><body>"
        f"<h1>streamrec closed loop</h1><p>generated {datetime.now(UTC).isoformat()}</p>"
        f"<table border=1>{rows}</table><h2>decisions</h2><table border=1>"
        "<tr><th>time</th><th>action</th><th>stable</th><th>canary</th><th>reason</th></tr>"
        f"{decisions}</table>{ope_html(record.ope) if record.ope is not None else ''}"
        f"<img src='loop.png' width='100%'>{_health_html(health, out_dir)}"
        f"{slices_html(record.decisions, record.held, record.model_base_path) if record.model_base_path else ''}"
        "</body></html>"
    )
    (out_dir / "summary.json").write_text(json.dumps(figures, indent=2))
    return page
