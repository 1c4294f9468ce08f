"""The report's health panels against a real Prometheus (Debian's ``prometheus``) scraping a real exporter.

The test serves a registry with a few contract series over HTTP, starts Prometheus on a free port
with a 1 s scrape interval and its TSDB in ``tmp_path``, waits for the first samples, then renders
every panel of the loop overview: Prometheus must accept every query, the PNG must be written, and
the summaries must report exactly the values exported (a constant counter's rate is 0) and "no data"
where nothing was exported.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from streamrec.ops import health_panels
from streamrec.ops.dashboards import PANELS, PanelSpec, Query
from streamrec.ops.health_panels import NO_DATA, PrometheusQueryError, panel_summaries, render_health_panels
from streamrec.ops.stack.ports import free_ports
from tests.support.tools import require_tool

READY_TIMEOUT_S = 20.0


def _exporter_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    ctr = Gauge("streamrec_evaluator_arm_ctr", "CTR per arm", ["arm"], registry=registry)
    ctr.labels(arm="stable").set(0.125)
    ctr.labels(arm="canary").set(0.25)
    lag = Gauge("streamrec_consumer_group_lag", "Lag", ["group", "topic"], registry=registry)
    lag.labels(group="streamrec-joiner", topic="streamrec.impressions").set(42)
    lag.labels(group="streamrec-worker", topic="streamrec.interactions").set(3)
    lag.labels(group="streamrec-worker", topic="streamrec.items").set(4)
    Gauge("trainer_loss", "Mean fine-tune loss", registry=registry).set(0.75)
    Counter("streams_events_in_total", "Records read", registry=registry).inc(5)  # constant: its rate is 0
    return registry


def _has_data(base_url: str, expr: str) -> bool:
    url = f"{base_url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 -- loopback test server
            return bool(json.load(response)["data"]["result"])
    except OSError:  # not listening yet, or 503 while it starts
        return False


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[str]:
    """A Prometheus scraping an exporter of a few contract series as job "trainer"; yields its URL."""
    binary = require_tool("prometheus")
    exporter_port, prometheus_port = free_ports(2)
    server, _ = start_http_server(exporter_port, addr="127.0.0.1", registry=_exporter_registry())
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "trainer", "static_configs": [{"targets": [f"127.0.0.1:{exporter_port}"]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log_path = tmp_path / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{prometheus_port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        # two scrapes of every series, so rate() has its two samples
        while not _has_data(base_url, "count(count_over_time(streams_events_in_total[1m]) >= 2)"):
            assert process.poll() is None, f"prometheus exited: {log_path.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"no samples after {READY_TIMEOUT_S} s: {log_path.read_text()[-2000:]}"
            time.sleep(0.25)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        server.shutdown()
        server.server_close()


def test_panels_show_what_prometheus_scraped(prometheus: str, tmp_path: Path) -> None:
    end = time.time()
    start = end - 60

    out_path = render_health_panels(prometheus, start, end, tmp_path / "report" / "health.png")

    assert out_path == tmp_path / "report" / "health.png"
    assert out_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_path.stat().st_size > 10_000

    summaries = dict(panel_summaries(prometheus, start, end))
    assert list(summaries) == [spec.title for spec in PANELS]
    assert summaries["CTR per arm"] == "canary 25%, stable 12.5%"
    assert summaries["Consumer lag per group"] == "streamrec-joiner 42, streamrec-worker 7"
    assert summaries["Trainer loss"] == "loss 0.75"
    assert summaries["Events into the worker"] == "events/s 0/s"
    assert summaries["Targets up"] == "trainer 1"
    assert summaries["Train/serve skew"] == NO_DATA
    assert summaries["Recommend latency"] == NO_DATA


def test_a_query_prometheus_refuses_is_an_error_naming_it(
    prometheus: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    broken = PanelSpec("Broken", (Query("sum by (le (streams_events_in_total)", "x"),), "none", "unbalanced")
    monkeypatch.setattr(health_panels, "PANELS", (*PANELS, broken))
    end = time.time()
    with pytest.raises(PrometheusQueryError, match=r"sum by \(le \(streams_events_in_total\)"):
        render_health_panels(prometheus, end - 60, end, tmp_path / "health.png")
