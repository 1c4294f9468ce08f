"""The loop overview's panels drawn from Prometheus's HTTP API, for the demo report on machines without Grafana.

The panels are ``streamrec.ops.dashboards.PANELS``: the same titles and PromQL queries as the
Grafana dashboard, evaluated with ``/api/v1/query_range`` and drawn as one matplotlib grid (PNG).
``panel_summaries`` gives each panel's latest values as one line for the HTML report. Prometheus
being down is not an error of the report: both return nothing and log why.
"""

from __future__ import annotations

import json
import logging
import math
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

from streamrec.ops.dashboards import PANELS, PanelSpec, Query, Unit  # noqa: E402

logger = logging.getLogger(__name__)

MAX_POINTS = 240  # per series and panel: enough for a plot a third of a page wide
NO_DATA = "no data"
LEGEND_ENTRIES = 6  # more series than this are drawn but left out of the legend
SUMMARY_SERIES = 4  # more series than this are counted, not listed, in a summary line
_LEGEND_LABEL = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


class PrometheusQueryError(RuntimeError):
    """Prometheus answered but refused a query (a PromQL error in ``PANELS``)."""


@dataclass(frozen=True)
class Series:
    """One labelled series of a query's answer: ``points`` are (unix seconds, value), NaN left out."""

    legend: str
    points: list[tuple[float, float]]


@dataclass(frozen=True)
class PanelData:
    spec: PanelSpec
    series: list[Series]


def query_step(start: float, end: float) -> float:
    """The query_range step for ``[start, end]``: at most ``MAX_POINTS`` points, at least one a second."""
    if end <= start:
        raise ValueError(f"the range must end after it starts (start={start}, end={end})")
    return float(max(1, math.ceil((end - start) / MAX_POINTS)))


def legend_text(template: str, labels: dict[str, str]) -> str:
    """Grafana's legend template: ``{{name}}`` becomes the series' label value (empty when absent)."""
    text = _LEGEND_LABEL.sub(lambda match: labels.get(match.group(1), ""), template).strip()
    return text or ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k != "__name__") or template


def prometheus_json(url: str, timeout_s: float) -> dict[str, object]:
    """The JSON body of a Prometheus HTTP API call (its error body too, for a refused query)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 -- http(s) URL from settings
            body: dict[str, object] = json.load(response)
    except urllib.error.HTTPError as error:  # 400/422: Prometheus explains in the body
        try:
            body = json.loads(error.read() or b"{}")
        except ValueError:  # not Prometheus's answer (a proxy, another server): as good as unreachable
            raise error from None
        if body.get("status") != "error":
            raise
    return body


def _query_range(base_url: str, query: Query, start: float, end: float, step: float, timeout_s: float) -> list[Series]:
    params = urllib.parse.urlencode({"query": query.expr, "start": start, "end": end, "step": step})
    body = prometheus_json(f"{base_url}/api/v1/query_range?{params}", timeout_s)
    if body.get("status") != "success":
        raise PrometheusQueryError(f"Prometheus refused {query.expr!r}: {body.get('errorType')}: {body.get('error')}")
    data = body.get("data")
    if not isinstance(data, dict) or data.get("resultType") != "matrix":
        raise PrometheusQueryError(f"unexpected answer to {query.expr!r} from {base_url}: {str(body)[:200]}")
    series = []
    for result in data["result"]:
        points = [(float(ts), float(value)) for ts, value in result["values"]]
        points = [(ts, value) for ts, value in points if not math.isnan(value)]
        if points:
            series.append(Series(legend_text(query.legend, result["metric"]), points))
    return sorted(series, key=lambda s: s.legend)


def _base_url(prometheus_url: str) -> str:
    scheme = urllib.parse.urlsplit(prometheus_url).scheme
    if scheme not in ("http", "https"):
        raise ValueError(f"prometheus_url must be an http(s) URL such as http://127.0.0.1:9090, got {prometheus_url!r}")
    return prometheus_url.rstrip("/")


def fetch_panels(prometheus_url: str, start: float, end: float, *, timeout_s: float = 10.0) -> list[PanelData] | None:
    """Every panel's series over ``[start, end]`` (unix seconds), or None (logged) when Prometheus is unreachable."""
    base_url = _base_url(prometheus_url)
    step = query_step(start, end)
    panels = []
    try:
        for spec in PANELS:
            series = [s for query in spec.queries for s in _query_range(base_url, query, start, end, step, timeout_s)]
            panels.append(PanelData(spec, series))
    except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
        logger.warning("health panels skipped: Prometheus at %s is unreachable (%s)", base_url, error)
        return None
    return panels


def _format(value: float, unit: Unit) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if unit == "s":
        return f"{value * 1000:.3g} ms" if abs(value) < 1 else f"{value:.3g} s"
    if unit == "percentunit":
        return f"{value * 100:.3g}%"
    if unit in ("ops", "reqps"):
        return f"{value:.3g}/s"
    return f"{value:.6g}"


def summarize(panel: PanelData) -> str:
    """The panel's latest value of each series on one line, e.g. ``p50 12 ms, p99 85 ms``."""
    if not panel.series:
        return NO_DATA
    parts = [f"{s.legend} {_format(s.points[-1][1], panel.spec.unit)}" for s in panel.series[:SUMMARY_SERIES]]
    if len(panel.series) > SUMMARY_SERIES:
        parts.append(f"(+{len(panel.series) - SUMMARY_SERIES} more series)")
    return ", ".join(parts)


def panel_summaries(prometheus_url: str, start: float, end: float) -> list[tuple[str, str]]:
    """(panel title, latest values) for every panel; empty (logged) when Prometheus is unreachable."""
    panels = fetch_panels(prometheus_url, start, end)
    return [] if panels is None else [(panel.spec.title, summarize(panel)) for panel in panels]


def _draw_stat(ax: Axes, panel: PanelData) -> None:
    """Grafana's stat panel: each series' latest value in a cell, green at 1 or more (a target up), else red."""
    ax.set_axis_off()
    ax.set_title(panel.spec.title, fontsize=10, loc="left")
    if not panel.series:
        ax.text(0.5, 0.5, NO_DATA, ha="center", va="center", transform=ax.transAxes, color="grey")
        return
    width = 1 / len(panel.series)
    for index, series in enumerate(panel.series):
        value = series.points[-1][1]
        ax.text(
            (index + 0.5) * width,
            0.5,
            f"{series.legend}\n{_format(value, panel.spec.unit)}",
            ha="center",
            va="center",
            transform=ax.transAxes,
            fontsize=9,
            color="white",
            bbox={"boxstyle": "round", "facecolor": "tab:green" if value >= 1 else "tab:red", "edgecolor": "none"},
        )


def _draw_timeseries(ax: Axes, panel: PanelData, start: float, end: float) -> None:
    ax.set_title(panel.spec.title, fontsize=10)
    if not panel.series:
        ax.text(0.5, 0.5, NO_DATA, ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    for index, series in enumerate(panel.series):
        times = [ts for ts, _ in series.points]
        label = series.legend if index < LEGEND_ENTRIES else None
        marker = "." if len(series.points) < 3 else None  # a line needs two points; a short range may have one
        ax.plot(times, [value for _, value in series.points], label=label, linewidth=1.2, marker=marker)
    if panel.spec.unit == "percentunit":
        ax.yaxis.set_major_formatter(lambda value, _: f"{value * 100:.3g}%")
    elif panel.spec.unit not in ("none", "short"):
        ax.set_ylabel({"s": "seconds", "ops": "per second", "reqps": "requests/s"}[panel.spec.unit], fontsize=8)
    ax.set_xlim(start, end)
    clock = "%H:%M:%S" if end - start < 600 else "%H:%M"
    ax.xaxis.set_major_formatter(lambda value, _: datetime.fromtimestamp(value).strftime(clock))
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")


def draw_panels(panels: list[PanelData], start: float, end: float, out_path: Path, columns: int = 3) -> Path:
    """Stat panels as full-width rows of cells, then the time series in a grid of ``columns``, x from
    ``start`` to ``end``; a panel without series says "no data"."""
    stats = [panel for panel in panels if panel.spec.kind == "stat"]
    charts = [panel for panel in panels if panel.spec.kind != "stat"]
    chart_rows = math.ceil(len(charts) / columns)
    fig = plt.figure(figsize=(5.2 * columns, 1.2 * len(stats) + 3.0 * chart_rows))
    grid = fig.add_gridspec(len(stats) + chart_rows, columns, height_ratios=[0.4] * len(stats) + [1.0] * chart_rows)
    try:
        for row, panel in enumerate(stats):
            _draw_stat(fig.add_subplot(grid[row, :]), panel)
        for index, panel in enumerate(charts):
            row, column = divmod(index, columns)
            _draw_timeseries(fig.add_subplot(grid[len(stats) + row, column]), panel, start, end)
        fig.tight_layout()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_path, dpi=90)
    finally:
        plt.close(fig)
    return out_path


def render_health_panels(prometheus_url: str, start: float, end: float, out_path: Path) -> Path | None:
    """Draw the loop overview's panels over ``[start, end]`` (unix seconds) into the PNG ``out_path``.

    Returns the path, or None (with the reason logged) when Prometheus is unreachable.
    """
    panels = fetch_panels(prometheus_url, start, end)
    if panels is None:
        return None
    return draw_panels(panels, start, end, out_path)
