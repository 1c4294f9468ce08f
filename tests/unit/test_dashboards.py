"""The loop overview dashboard (streamrec/ops/dashboards.py) and its committed JSON.

The committed file must equal a regeneration, every panel queries something, every series a query
names is one the project's processes define (found by reading the metric constructors in the
packages' source, so a misspelt name fails here and not on an empty Grafana panel), and the JSON has
the shape Grafana loads. The panels' rendering against a real Prometheus is
tests/integration/test_health_panels.py; here only its offline behaviour.
"""

from __future__ import annotations

import ast
import json
import logging
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from streamrec.ops import dashboards
from streamrec.ops.health_panels import legend_text, panel_summaries, query_step, render_health_panels
from streamrec.ops.stack.ports import free_ports

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMITTED = REPO_ROOT / "infra" / "grafana" / "dashboards" / dashboards.DASHBOARD_FILE
PROVISIONING = REPO_ROOT / "infra" / "grafana" / "provisioning"
PACKAGES = ("streamrec", "streams", "features", "online_trainer", "serving")
METRIC_KINDS = frozenset({"Counter", "Gauge", "Histogram", "Summary"})
# Series Prometheus itself writes for every target.
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset"})


def _sample_names(kind: str, name: str) -> set[str]:
    """The sample names prometheus_client exposes for a metric declared as ``kind(name, ...)``."""
    if kind == "Counter":
        return {name.removesuffix("_total") + "_total"}
    if kind == "Histogram":
        return {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    if kind == "Summary":
        return {name, f"{name}_sum", f"{name}_count"}
    return {name}


@cache
def defined_series() -> frozenset[str]:
    """Every series name a metric constructor in the project's packages declares (string-literal names)."""
    names = set(PROMETHEUS_SERIES)
    for package in PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            if "_generated" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                callee = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
                first = node.args[0]
                if callee in METRIC_KINDS and isinstance(first, ast.Constant) and isinstance(first.value, str):
                    names |= _sample_names(callee, first.value)
    return frozenset(names)


def series_in(expr: str) -> set[str]:
    """The series names a PromQL expression selects (functions, label lists, matchers and windows left out)."""
    stripped = _STRING.sub('""', expr)
    stripped = re.sub(r"\{[^}]*\}", "", stripped)
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)
    stripped = _GROUPING.sub("", stripped)
    names = set()
    for match in _IDENTIFIER.finditer(stripped):
        if stripped[match.end() :].lstrip().startswith("(") or match.group() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def _committed() -> dict[str, Any]:
    board: dict[str, Any] = json.loads(COMMITTED.read_text())
    return board


def test_committed_dashboard_equals_a_regeneration(tmp_path: Path) -> None:
    written = dashboards.write_dashboards(tmp_path)
    assert [path.name for path in written] == [dashboards.DASHBOARD_FILE]
    assert COMMITTED.exists(), f"{COMMITTED} is missing: generate it with `streamrec dashboards`"
    assert written[0].read_text() == COMMITTED.read_text(), (
        f"{COMMITTED.relative_to(REPO_ROOT)} is stale (PANELS changed): regenerate it with `streamrec dashboards` "
        "and commit the result"
    )


def test_every_panel_queries_the_provisioned_datasource() -> None:
    board = _committed()
    assert [panel["title"] for panel in board["panels"]] == [spec.title for spec in dashboards.PANELS]
    datasource_uids = {
        source["uid"]
        for source in yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"]
    }
    for panel in board["panels"]:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"panel {panel['title']!r} has an empty query"
            assert target["legendFormat"], f"panel {panel['title']!r}: query {target['expr']!r} has no legend"
            assert target["datasource"]["uid"] in datasource_uids
        assert panel["datasource"]["uid"] in datasource_uids


def test_queries_name_only_series_the_project_defines() -> None:
    used = {name for spec in dashboards.PANELS for query in spec.queries for name in series_in(query.expr)}
    assert {"up", "streams_freshness_seconds_bucket", "streamrec_evaluator_arm_ctr"} <= used  # the parser finds names
    unknown = sorted(used - defined_series())
    assert not unknown, f"dashboard queries name series no metric constructor in {PACKAGES} declares: {unknown}"


def test_a_misspelt_series_name_is_caught() -> None:
    expr = 'histogram_quantile(0.99, sum by (le) (rate(streams_freshnes_seconds_bucket{view="user"}[1m])))'
    assert series_in(expr) == {"streams_freshnes_seconds_bucket"}
    assert series_in(expr) - defined_series() == {"streams_freshnes_seconds_bucket"}
    assert "streams_freshness_seconds_bucket" in defined_series()
    assert "streamrec_api_errors_total" in defined_series()  # declared with its _total suffix


def test_json_has_the_shape_grafana_loads() -> None:
    board = _committed()
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 39
    assert board["uid"] == dashboards.DASHBOARD_UID and board["title"] == "streamrec loop overview"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(set(ids)) == len(ids), "panel ids must be unique"
    occupied: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        assert panel["type"] in {"timeseries", "stat"}
        pos = panel["gridPos"]
        assert all(isinstance(pos[key], int) for key in ("h", "w", "x", "y")), panel["title"]
        assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another"
        occupied |= cells


def test_grafana_provisions_the_generated_folder() -> None:
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "streamrec.yml").read_text())
    assert provider["apiVersion"] == 1
    [entry] = provider["providers"]
    assert entry["type"] == "file" and entry["options"]["path"] == "/var/lib/grafana/dashboards"


def test_query_step_keeps_ranges_to_a_few_hundred_points() -> None:
    assert query_step(1000.0, 1060.0) == 1.0
    assert query_step(0.0, 3600.0) == 15.0
    with pytest.raises(ValueError, match="must end after it starts"):
        query_step(10.0, 10.0)


def test_legend_templates_take_label_values() -> None:
    assert legend_text("{{group}}", {"group": "streamrec-joiner", "topic": "t"}) == "streamrec-joiner"
    assert legend_text("served {{ arm }}", {"arm": "canary"}) == "served canary"
    assert legend_text("{{code}}", {"job": "api"}) == "job=api"  # no such label: the labels themselves


def test_unreachable_prometheus_gives_no_panels_and_says_why(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    [port] = free_ports(1)
    url = f"http://127.0.0.1:{port}"
    with caplog.at_level(logging.WARNING, logger="streamrec.ops.health_panels"):
        assert render_health_panels(url, 0.0, 60.0, tmp_path / "health.png") is None
        assert panel_summaries(url, 0.0, 60.0) == []
    assert not (tmp_path / "health.png").exists()
    assert f"Prometheus at {url} is unreachable" in caplog.text


def test_a_url_that_is_not_http_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="http"):
        render_health_panels("127.0.0.1:9090", 0.0, 60.0, tmp_path / "health.png")
