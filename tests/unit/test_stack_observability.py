"""The local stack's Prometheus config and metrics ports: promtool accepts the config with the
project's rules, targets follow the ports the stack chose, and a started process becomes a target."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from streamrec.core.settings import PathSettings
from streamrec.ops.settings import StackSettings, StackTuning
from streamrec.ops.stack import observability


def _settings(tmp_path: Path) -> StackSettings:
    return StackSettings(
        paths=PathSettings(state_dir=tmp_path),
        stack=StackTuning(metrics_port_base=21000, prometheus_port=21100),
    )


def test_ports_come_from_the_base_unless_a_process_has_its_own(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    assert observability.metrics_port(settings, "streams", {}) == 21000
    assert observability.metrics_port(settings, "probe", {}) == 21000 + len(observability.METRICS_PROGRAMS) - 1
    own = {"STREAMREC_API__METRICS_PORT": "23456", "STREAMREC_TRAINER__METRICS_PORT": "0"}
    targets = observability.scrape_targets(settings, own)
    assert targets["api"] == "127.0.0.1:23456"
    assert "trainer" not in targets  # told not to serve metrics
    assert targets["prometheus"] == "127.0.0.1:21100"
    assert len(set(targets.values())) == len(targets)


def test_promtool_accepts_the_config_with_the_project_rules(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make setup` installs Debian's prometheus package"
    settings = _settings(tmp_path)
    config = tmp_path / "prometheus.yml"
    config.write_text(observability.prometheus_config(settings, tmp_path))
    for program, target in observability.scrape_targets(settings, {}).items():
        if program != "prometheus":
            observability.add_target(tmp_path, program, target)
    checked = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout and "rule files found" in checked.stdout, checked.stdout


def test_a_started_process_is_a_target_until_stopped(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    jobs = {
        job["job_name"]: job
        for job in json.loads(observability.prometheus_config(settings, tmp_path))["scrape_configs"]
    }
    assert set(jobs) == {"prometheus", *observability.METRICS_PROGRAMS}
    (targets_file,) = jobs["api"]["file_sd_configs"][0]["files"]
    observability.add_target(tmp_path, "api", "127.0.0.1:21001")
    assert json.loads(Path(targets_file).read_text()) == [{"targets": ["127.0.0.1:21001"]}]
    observability.remove_target(tmp_path, "api")
    assert not Path(targets_file).exists()


@pytest.mark.parametrize("bad", ["2 days", "", "10"])
def test_retention_must_be_a_prometheus_duration(bad: str) -> None:
    with pytest.raises(ValueError, match="prometheus_retention"):
        StackTuning(prometheus_retention=bad)
