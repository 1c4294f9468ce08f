"""``streamrec status``: one terminal view of a running stack.

Processes and their health (supervisord), how to reach them, consumer lag, feature and model
freshness, model versions and labels (``models.config``), the running experiment (the
evaluator's timeline), recent decisions and firing alerts. Figures over time come from the stack's
Prometheus when it runs; without it, lag is asked from Kafka directly and the rest says how to start
it. Everything is read with the stack's own recorded settings, so a plain shell sees the ports the
demo chose.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from streamrec.ops.health_panels import prometheus_json
from streamrec.ops.stack.local_stack import LocalStack, under_environment
from streamrec.ops.stack.programs import service_targets

# PromQL of the freshness figures: windows long enough for a demo's trickle of samples.
FEATURE_FRESHNESS_P99 = "histogram_quantile(0.99, sum by (le) (rate(streams_freshness_seconds_bucket[5m])))"
MODEL_FRESHNESS_P95 = "histogram_quantile(0.95, sum by (le) (rate(streamrec_model_freshness_seconds_bucket[30m])))"


def prometheus_query(url: str, promql: str, timeout_s: float = 3.0) -> list[dict[str, Any]] | None:
    """The instant vector of ``promql`` (Prometheus' HTTP API); None when Prometheus does not answer."""
    body = _answer(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}", timeout_s)
    data = body.get("data") if body is not None else None
    return list(data.get("result", [])) if isinstance(data, dict) else None


def firing_alerts(url: str, timeout_s: float = 3.0) -> list[dict[str, Any]] | None:
    """Alerts Prometheus holds as firing; None when it does not answer."""
    body = _answer(f"{url}/api/v1/alerts", timeout_s)
    data = body.get("data") if body is not None else None
    if not isinstance(data, dict):
        return None
    return [alert for alert in data.get("alerts", []) if alert.get("state") == "firing"]


def _answer(url: str, timeout_s: float) -> dict[str, object] | None:
    try:
        return prometheus_json(url, timeout_s)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _scalar(result: list[dict[str, Any]] | None) -> float | None:
    if not result:
        return None
    value = float(result[0]["value"][1])
    return None if value != value else value  # NaN: no samples in the window


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold", show_edge=False, pad_edge=False)
    for column in columns:
        table.add_column(column)
    return table


def _lag_rows(stack: LocalStack, environment: Mapping[str, str], prometheus: str) -> list[tuple[str, str, str]]:
    result = prometheus_query(prometheus, "streamrec_consumer_group_lag")
    if result is not None:
        return [
            (
                sample["metric"].get("group", "?"),
                sample["metric"].get("topic", "?"),
                f"{float(sample['value'][1]):,.0f}",
            )
            for sample in result
        ]
    from streamrec.core.settings import CommonSettings
    from streamrec.ops.probe import StackProbe, watched_groups

    saved = under_environment(environment, CommonSettings)
    groups = under_environment(environment, watched_groups)
    probe = StackProbe(saved, groups)
    try:
        rows = []
        for family in probe.collect():
            if family.name == "streamrec_consumer_group_lag":
                rows += [
                    (sample.labels["group"], sample.labels["topic"], f"{sample.value:,.0f}")
                    for sample in family.samples
                ]
        return rows
    finally:
        probe.close()


def _models(environment: Mapping[str, str]) -> tuple[dict[str, int], list[int], Path]:
    from serving.protocol.models_config import find_model, read_config
    from serving.settings import ServingSettings
    from streamrec.core import contracts

    serving = under_environment(environment, ServingSettings)
    labels: dict[str, int] = {}
    if serving.model_config_file.exists():
        model = find_model(read_config(serving.model_config_file), contracts.MODEL_NAME)
        if model is not None:
            labels = dict(model.version_labels)
    base = serving.model_base_path
    versions = sorted(int(path.name) for path in base.iterdir() if path.name.isdigit()) if base.is_dir() else []
    return labels, versions, base


def _evaluator_dir(environment: Mapping[str, str]) -> Path:
    from serving.rollout.settings import EvaluatorSettings

    return under_environment(environment, EvaluatorSettings).evaluator_dir


def _last_line(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        return json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None


def print_status(stack: LocalStack, console: Console | None = None) -> None:
    console = console or Console()
    environment = stack.stack_environment()
    prometheus = stack.prometheus_url()
    health = stack.health()

    processes = _table(f"processes ({stack.root})", "name", "state", "ready", "detail")
    for info in stack.status():
        ready = "-" if info["statename"] == "STOPPED" else "yes" if health.get(info["name"]) else "NO"
        processes.add_row(info["name"], info["statename"], ready, info["description"])
    console.print(processes)

    targets = service_targets(environment)
    console.print(f"API: grpcurl -plaintext {targets['api']} list  |  model server: {targets['model-server']}")
    prometheus_up = prometheus_query(prometheus, "up")
    if prometheus_up is None:
        console.print("Prometheus: not running (streamrec stack start prometheus; streamrec stack start probe)")
    else:
        down = [sample["metric"].get("job", "?") for sample in prometheus_up if sample["value"][1] != "1"]
        console.print(
            f"Prometheus: {prometheus}  targets up {len(prometheus_up) - len(down)}/{len(prometheus_up)}"
            + (f", DOWN: {', '.join(down)}" if down else "")
        )

    lag = _table("consumer lag (records not committed)", "group", "topic", "lag")
    try:
        for row in _lag_rows(stack, environment, prometheus):
            lag.add_row(*row)
    except Exception as exc:  # noqa: BLE001 -- a status view reports what it cannot read and goes on
        lag.add_row("?", "?", f"not readable: {exc}")
    console.print(lag)

    if prometheus_up is not None:
        feature = _scalar(prometheus_query(prometheus, FEATURE_FRESHNESS_P99))
        model = _scalar(prometheus_query(prometheus, MODEL_FRESHNESS_P95))
        console.print(
            "freshness: features p99 (5 min) "
            + (f"{feature * 1000:.0f} ms" if feature is not None else "no samples")
            + ", model p95 (30 min) "
            + (f"{model:.0f} s" if model is not None else "no samples")
        )

    labels, versions, base = _models(environment)
    label_text = ", ".join(f"{label} = {version}" for label, version in sorted(labels.items())) or "none"
    shown = ", ".join(str(version) for version in versions[-5:]) if versions else "none"
    console.print(f"models ({base}): {len(versions)} version(s), newest {shown}; labels: {label_text}")

    evaluator_dir = _evaluator_dir(environment)
    point = _last_line(evaluator_dir / "timeline.jsonl")
    if point is not None:
        arms = "; ".join(
            f"{arm}: {point[arm].get('requests', 0):,} requests, CTR {point[arm].get('ctr', 0.0):.3f}"
            for arm in ("stable", "canary")
            if isinstance(point.get(arm), dict)
        )
        console.print(f"experiment (as of {point.get('time', '?')}): {arms}")
    else:
        console.print("experiment: no figures yet (the evaluator writes them every snapshot interval)")

    from serving.rollout.decision_log import applied_decisions

    decisions = applied_decisions(evaluator_dir / "decisions.jsonl")[-5:]
    table = _table("recent decisions", "time", "action", "stable", "canary", "reason")
    for record in decisions:
        table.add_row(
            str(record.get("time", "")),
            str(record.get("action", "")),
            str(record.get("stable_version", "")),
            str(record.get("canary_version", "")),
            str(record.get("reason", ""))[:80],
        )
    console.print(table if decisions else "recent decisions: none yet")

    alerts = firing_alerts(prometheus)
    if alerts is not None:
        if alerts:
            table = _table("firing alerts", "alert", "severity", "summary")
            for alert in alerts:
                table.add_row(
                    alert["labels"].get("alertname", "?"),
                    alert["labels"].get("severity", ""),
                    alert.get("annotations", {}).get("summary", ""),
                )
            console.print(table)
        else:
            console.print("firing alerts: none")
