"""The Prometheus alert rules in infra/prometheus/rules are valid, unit-tested and documented.

`promtool check rules` validates every rules file and `promtool test rules` runs the unit tests in
infra/prometheus/tests; the structural tests hold the conventions promtool cannot see: every
alert carries a severity and its annotations, has a case where it fires and one where it does not
(in a test file that loads its rules), and its runbook link lands on its own section of
docs/operations.md.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO_ROOT / "infra" / "prometheus"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
TEST_FILES = sorted((PROMETHEUS_DIR / "tests").glob("*.test.yml"))
OPERATIONS_DOC = REPO_ROOT / "docs" / "operations.md"
RUNBOOK_PREFIX = "docs/operations.md#"
SEVERITIES = frozenset({"page", "ticket"})
ANNOTATIONS = ("summary", "description", "runbook")


@dataclass(frozen=True)
class Alert:
    name: str
    rule_file: Path
    rule: dict[str, Any]


def _yaml(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return loaded


def _alerts(rule_files: list[Path]) -> Iterator[Alert]:
    for rule_file in rule_files:
        for group in _yaml(rule_file)["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    yield Alert(rule["alert"], rule_file, rule)


def _alert_cases() -> Iterator[tuple[Path, set[str], dict[str, Any]]]:
    """(test file, the alerts its rule_files define, one alert_rule_test case) for every case."""
    for test_file in TEST_FILES:
        spec = _yaml(test_file)
        loaded = [(test_file.parent / rule_file).resolve() for rule_file in spec["rule_files"]]
        defined = {alert.name for alert in _alerts(loaded)}
        for test in spec["tests"]:
            for case in test.get("alert_rule_test", []):
                yield test_file, defined, case


def _github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "`promtool` was not found on PATH; `make setup` installs it (infra/setup-system.sh installs the "
            "Debian `prometheus` package, which ships promtool)"
        )
    return found


def test_rule_and_test_files_exist() -> None:
    assert RULE_FILES, f"no rules file (*.yml) in {PROMETHEUS_DIR / 'rules'}"
    assert TEST_FILES, f"no promtool test file (*.test.yml) in {PROMETHEUS_DIR / 'tests'}"


def test_promtool_check_rules(promtool: str) -> None:
    result = subprocess.run(
        [promtool, "check", "rules", *map(str, RULE_FILES)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("test_file", TEST_FILES, ids=lambda path: path.name)
def test_promtool_test_rules(promtool: str, test_file: Path) -> None:
    # promtool resolves a test file's rule_files against the working directory.
    result = subprocess.run(
        [promtool, "test", "rules", test_file.name],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=test_file.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_names_are_unique() -> None:
    names = [alert.name for alert in _alerts(RULE_FILES)]
    assert names, "the rules files define no alert"
    assert len(names) == len(set(names)), sorted(name for name in names if names.count(name) > 1)


@pytest.mark.parametrize("alert", list(_alerts(RULE_FILES)), ids=lambda alert: alert.name)
def test_alert_has_severity_and_annotations(alert: Alert) -> None:
    labels = alert.rule.get("labels", {})
    annotations = alert.rule.get("annotations", {})
    assert labels.get("severity") in SEVERITIES, f"{alert.name}: severity must be one of {sorted(SEVERITIES)}"
    missing = [name for name in ANNOTATIONS if not str(annotations.get(name, "")).strip()]
    assert not missing, f"{alert.name} ({alert.rule_file.name}) lacks annotations {missing}"
    assert "$value" in annotations["description"], f"{alert.name}: the description must show the value"
    assert annotations["runbook"] == RUNBOOK_PREFIX + alert.name.lower(), (
        f"{alert.name}: runbook must link its own section, {RUNBOOK_PREFIX}{alert.name.lower()}"
    )


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for test_file, defined, case in _alert_cases():
        name = case["alertname"]
        # A case for an alert its test file does not load would pass with exp_alerts: [] and test nothing.
        assert name in defined, f"{test_file.name}: alert_rule_test for {name}, which its rule_files do not define"
        (firing if case.get("exp_alerts") else quiet).add(name)
    names = {alert.name for alert in _alerts(RULE_FILES)}
    assert not names - firing, f"alerts with no firing case (non-empty exp_alerts): {sorted(names - firing)}"
    assert not names - quiet, f"alerts with no case where they stay quiet (exp_alerts: []): {sorted(names - quiet)}"


def test_runbook_anchors_exist() -> None:
    headings = re.findall(r"^#{1,6} (.+)$", OPERATIONS_DOC.read_text(), flags=re.MULTILINE)
    anchors = {_github_anchor(heading) for heading in headings}
    missing = {
        alert.name: alert.rule["annotations"]["runbook"]
        for alert in _alerts(RULE_FILES)
        if alert.rule["annotations"]["runbook"].removeprefix(RUNBOOK_PREFIX) not in anchors
    }
    assert not missing, f"runbook links with no matching heading in {OPERATIONS_DOC.name}: {missing}"
