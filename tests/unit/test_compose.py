"""infra/docker-compose.yml is valid and names only what exists.

No Docker engine is needed: `docker-compose config -q` validates the file statically, and every
service that runs the project's image is checked against the real CLI (the image's entrypoint is
``streamrec``, so a service's ``command`` is a subcommand plus flags). A renamed command or flag
then fails here instead of in a container at start.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from streamrec.core.settings import known_env_names
from streamrec.ops.cli import app
from tests.support.cli_words import assert_cli_accepts
from tests.support.tools import require_tool

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]
INFRA_DIR = REPO_ROOT / "infra"
COMPOSE_FILE = INFRA_DIR / "docker-compose.yml"


def _services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    return services


def _project_services() -> dict[str, dict[str, Any]]:
    """Services that run the project's image: built here, or using the image a built one tags."""
    services = _services()
    project_images = {spec["image"] for spec in services.values() if "build" in spec and "image" in spec}
    return {name: spec for name, spec in services.items() if "build" in spec or spec.get("image") in project_images}


def _command_words(spec: dict[str, Any]) -> list[str]:
    command = spec["command"]
    return shlex.split(command) if isinstance(command, str) else [str(word) for word in command]


def _host_volume_sources(spec: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path, container path) for each bind mount given relative to infra/."""
    mounts = []
    for volume in spec.get("volumes", []):
        if isinstance(volume, dict):
            source, target = str(volume.get("source", "")), str(volume.get("target", ""))
        else:
            source, target, *_ = str(volume).split(":")
        if source.startswith(("./", "../")):
            mounts.append((source, target))
    return mounts


def compose_config(secrets_dir: Path | None, *extra: str) -> subprocess.CompletedProcess[str]:
    """``docker-compose config`` of the file, with ``SECRETS_DIR`` set or (None) unset."""
    environment = {key: value for key, value in os.environ.items() if key not in {"SECRETS_DIR", "PUBLISH_ADDRESS"}}
    if secrets_dir is not None:
        environment["SECRETS_DIR"] = str(secrets_dir)
    return subprocess.run(
        [require_tool("docker-compose"), "-f", str(COMPOSE_FILE), "config", *extra],
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `streamrec stack compose-secrets DIR` writes."""
    directory = tmp_path_factory.mktemp("compose") / "secrets"
    result = CliRunner().invoke(app, ["stack", "compose-secrets", str(directory)])
    assert result.exit_code == 0, result.output
    return directory


def test_compose_config_is_valid(secrets_dir: Path) -> None:
    result = compose_config(secrets_dir, "-q")
    assert result.returncode == 0, result.stderr


def test_compose_refuses_to_start_without_its_secrets() -> None:
    result = compose_config(None, "-q")
    assert result.returncode != 0
    assert "set SECRETS_DIR to a folder written by `streamrec stack compose-secrets DIR`" in result.stderr


def test_compose_publishes_on_localhost_only_and_has_no_default_password(secrets_dir: Path) -> None:
    resolved = yaml.safe_load(compose_config(secrets_dir).stdout)
    published = {name: [str(port) for port in spec.get("ports", [])] for name, spec in resolved["services"].items()}
    assert {name for name, ports in published.items() if ports} == {"api", "tf-serving", "prometheus", "grafana"}
    assert all(port.startswith("127.0.0.1:") for ports in published.values() for port in ports), published
    # every secret file compose mounts exists, and only its owner reads it
    for name, secret in resolved["secrets"].items():
        path = Path(secret["file"])
        assert path.is_file() and path.stat().st_mode & 0o077 == 0, name
    services = _services()
    grafana = services["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana-admin-password"  # noqa: S105
    assert not any("PASSWORD" in key and not key.endswith("__FILE") for key in grafana)
    redis = _command_words(services["redis"])
    assert redis[redis.index("--aclfile") + 1] == "/run/secrets/redis-acl"
    assert redis[redis.index("--protected-mode") + 1] == "yes"
    acl = (secrets_dir / "redis-users.acl").read_text()
    assert acl.startswith("user default off")
    # each project service logs into Redis as a user of its own, its password a mounted secret
    for name, spec in _project_services().items():
        user = spec["environment"]["STREAMREC_REDIS__USERNAME"]
        assert {"source": f"redis-password-{user}", "target": "redis-password"} in spec["secrets"], name
        assert f"user {user} " in acl
        assert spec["environment"]["STREAMREC_REDIS__PASSWORD_FILE"] == "/run/secrets/redis-password"  # noqa: S105


def test_compose_binds_another_address_only_when_told(secrets_dir: Path) -> None:
    environment_result = subprocess.run(
        [require_tool("docker-compose"), "-f", str(COMPOSE_FILE), "config"],
        cwd=REPO_ROOT,
        env={**os.environ, "SECRETS_DIR": str(secrets_dir), "PUBLISH_ADDRESS": "0.0.0.0"},  # noqa: S104
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    ports = yaml.safe_load(environment_result.stdout)["services"]["api"]["ports"]
    assert [str(port) for port in ports] == ["0.0.0.0:50051:50051/tcp"]  # noqa: S104


def test_project_services_exist() -> None:
    assert {"topics", "features-setup", "streams", "joiner", "api", "trainer", "evaluator", "simulate"} <= set(
        _project_services()
    )


@pytest.mark.parametrize("service", sorted(_project_services()))
def test_project_service_command_is_accepted_by_the_cli(service: str) -> None:
    assert_cli_accepts(_command_words(_project_services()[service]), service)


@pytest.mark.parametrize("service", sorted(_project_services()))
def test_project_service_environment_names_known_settings(service: str) -> None:
    # Settings reject an unknown STREAMREC_* variable at start; catch the typo here instead.
    environment = _project_services()[service].get("environment", {})
    names = environment if isinstance(environment, dict) else [entry.split("=", 1)[0] for entry in environment]
    unknown = {name for name in names if name.startswith("STREAMREC_")} - known_env_names()
    assert not unknown, f"{service}: unknown settings variables {sorted(unknown)}"


def test_relative_volume_sources_exist() -> None:
    mounts = [(name, source) for name, spec in _services().items() for source, _ in _host_volume_sources(spec)]
    assert mounts, "expected bind mounts of files under infra/"
    missing = [f"{name}: {source}" for name, source in mounts if not (INFRA_DIR / source).exists()]
    assert not missing, f"bind-mount sources missing under infra/: {missing}"


def test_tf_serving_reads_models_where_the_project_writes_them() -> None:
    """TF Serving's base path lies in the volume the trainer writes to, at the same path, so the
    base_path the project's clients put into HandleReloadConfigRequest is the one it sees."""
    services = _services()
    tf_serving = services["tf-serving"]
    options = dict(word.split("=", 1) for word in _command_words(tf_serving) if "=" in word)
    assert options["--model_name"] == "streamrec"
    state_mount = next(v for v in tf_serving["volumes"] if str(v).startswith("state:"))
    mount_path = str(state_mount).split(":")[1]
    assert options["--model_base_path"].startswith(mount_path + "/")
    trainer_env = services["trainer"]["environment"]
    assert trainer_env["STREAMREC_MODEL_SERVER__HOST"] == "tf-serving"
    assert any(str(v).startswith(f"state:{mount_path}") for v in services["trainer"]["volumes"])
