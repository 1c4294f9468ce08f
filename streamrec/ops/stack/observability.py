"""What the local stack's Prometheus scrapes: every project process's ``/metrics`` port, the probe
(Kafka consumer-group lag, Kafka and Redis reachability) and Prometheus itself.

Ports: a process's metrics port is the one its ``STREAMREC_<SECTION>__METRICS_PORT`` names in the
stack's environment, else ``stack.metrics_port_base`` plus its place in :data:`METRICS_PROGRAMS`, so
two stacks on one machine (the demo beside a user's, the tests beside both) differ by one setting.
The Prometheus config is rendered from the same table, so its targets always follow the ports the
stack chose; ``promtool check config`` checks it (``tests``). Compose's Prometheus scrapes the same
job names (``infra/prometheus/prometheus.yml``).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from streamrec.core.settings import ENV_NESTED_DELIMITER, ENV_PREFIX, PROJECT_ROOT
from streamrec.ops.settings import StackSettings

# Program -> the settings section whose ``metrics_port`` it reads, in port order from
# ``stack.metrics_port_base``. The probe takes its port on its command line.
METRICS_PROGRAMS: dict[str, str | None] = {
    "streams": "STREAMS",
    "api": "API",
    "joiner": "JOINER",
    "trainer": "TRAINER",
    "evaluator": "EVALUATOR",
    "model-server": "MODEL_SERVER",
    "skew": "SKEW",
    "probe": None,
}
RULES_GLOB = PROJECT_ROOT / "infra" / "prometheus" / "rules" / "*.yml"


def metrics_variable(program: str) -> str | None:
    """The environment variable that sets ``program``'s metrics port (None: a command-line flag)."""
    section = METRICS_PROGRAMS[program]
    return f"{ENV_PREFIX}{section}{ENV_NESTED_DELIMITER}METRICS_PORT" if section else None


def metrics_port(settings: StackSettings, program: str, environment: Mapping[str, str]) -> int:
    """The port ``program`` serves ``/metrics`` on in this stack (0: it was told not to)."""
    variable = metrics_variable(program)
    if variable is not None and variable in environment:
        return int(environment[variable])
    return settings.stack.metrics_port_base + list(METRICS_PROGRAMS).index(program)


def scrape_targets(settings: StackSettings, environment: Mapping[str, str]) -> dict[str, str]:
    """Job name -> ``host:port`` of every process the stack's Prometheus scrapes."""
    host = settings.stack.kafka_host
    targets = {"prometheus": f"{host}:{settings.stack.prometheus_port}"}
    for program in METRICS_PROGRAMS:
        port = metrics_port(settings, program, environment)
        if port:
            targets[program] = f"{host}:{port}"
    return targets


def prometheus_config(settings: StackSettings, root: Path, rule_files: str = str(RULES_GLOB)) -> str:
    """The stack's ``prometheus.yml``: Prometheus itself, and one job per process read from the
    target files :func:`add_target` writes when the stack starts the process (so a process nobody
    started is not reported down, and one that crashed is)."""
    interval = f"{settings.stack.scrape_interval_s:g}s"
    targets_dir = root / "prometheus" / "targets"
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [rule_files],
        "scrape_configs": [
            {
                "job_name": "prometheus",
                "static_configs": [{"targets": [f"{settings.stack.kafka_host}:{settings.stack.prometheus_port}"]}],
            },
            *(
                {
                    "job_name": program,
                    "file_sd_configs": [
                        {"files": [str(targets_dir / f"{program}.json")], "refresh_interval": interval}
                    ],
                }
                for program in METRICS_PROGRAMS
            ),
        ],
    }
    return json.dumps(config, indent=2) + "\n"  # JSON is YAML: Prometheus reads it as is


def add_target(root: Path, program: str, target: str) -> None:
    """Make Prometheus scrape ``program`` at ``target`` (it rereads the file within an interval)."""
    targets_dir = root / "prometheus" / "targets"
    targets_dir.mkdir(parents=True, exist_ok=True)
    staged = targets_dir / f".{program}.json"
    staged.write_text(json.dumps([{"targets": [target]}]))
    staged.replace(targets_dir / f"{program}.json")  # Prometheus never reads half a file


def remove_target(root: Path, program: str) -> None:
    """Stop scraping ``program`` (stopped on purpose, so not down)."""
    (root / "prometheus" / "targets" / f"{program}.json").unlink(missing_ok=True)


def prometheus_url(settings: StackSettings) -> str:
    return f"http://{settings.stack.kafka_host}:{settings.stack.prometheus_port}"


def prometheus_command(settings: StackSettings, root: Path) -> list[str]:
    """Debian's ``prometheus`` on the stack's config, its data under ``<state>/prometheus``."""
    return [
        settings.stack.prometheus_bin,
        f"--config.file={root / 'prometheus' / 'prometheus.yml'}",
        f"--storage.tsdb.path={root / 'prometheus' / 'data'}",
        f"--storage.tsdb.retention.time={settings.stack.prometheus_retention}",
        f"--web.listen-address={settings.stack.kafka_host}:{settings.stack.prometheus_port}",
        "--web.enable-lifecycle",
    ]


def prometheus_ready(settings: StackSettings) -> bool:
    """Prometheus answers its readiness endpoint (it has loaded its config and rules)."""
    try:
        with urllib.request.urlopen(f"{prometheus_url(settings)}/-/ready", timeout=1.0) as response:  # noqa: S310 -- loopback
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False
