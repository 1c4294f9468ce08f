"""infra/helm/streamrec: lint, render, validate strictly, and name only what exists.

``helm lint`` and ``helm template`` run for the default, small and large values; every rendered
object is validated by ``kubeconform -strict`` against the Kubernetes schemas of the
kubernetes-validate package (refs made local: kubeconform cannot fetch) and the CRD schemas in
infra/helm/schemas (Strimzi, the Redis operator, cert-manager, Prometheus Operator). Then the
chart's contents are checked against the code: every command it runs exists in the CLI, every
STREAMREC_* variable is a setting, the Kafka and Redis grants are the local secure stack's, and
the autoscalers read the metrics the Prometheus adapter's rules make.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from serving.grpc_security.ssl_config import read_ssl_config
from streamrec.core.settings import CommonSettings, known_env_names
from streamrec.ops.stack.certs import LocalCA
from streamrec.ops.stack.kafka_access import service_acls
from streamrec.ops.stack.redis_server import REDIS_ACCESS
from tests.support.cli_words import assert_cli_accepts
from tests.support.tools import require_tool

pytestmark = pytest.mark.unit

REPO_ROOT = Path(__file__).resolve().parents[2]
HELM_DIR = REPO_ROOT / "infra" / "helm"
CHART = HELM_DIR / "streamrec"
CRD_SCHEMAS = HELM_DIR / "schemas"
KUBERNETES_VERSION = "1.33.0"
VALUES = {
    "default": [],
    "no-tls": ["--set", "tls.enabled=false"],
    "large": ["-f", str(CHART / "values-large.yaml")],
}
PROJECT_IMAGE = "streamrec:"


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("helm"), *args], capture_output=True, text=True, timeout=120, check=False)


def render(values: str) -> str:
    result = helm("template", "rel", str(CHART), *VALUES[values])
    assert result.returncode == 0, result.stderr
    return result.stdout


def objects(manifest: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(manifest) if doc]


@pytest.fixture(scope="module")
def kubernetes_schemas(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """kubernetes-validate's strict schemas for KUBERNETES_VERSION, their refs made relative.

    The package's files carry an ``$id`` on kubernetes.io and refs to ``/api/_definitions.json``,
    which a validator resolves against that host; kubeconform has no network here."""
    package = importlib.util.find_spec("kubernetes_validate")
    assert package is not None and package.origin is not None, "kubernetes-validate is missing: run `make setup`"
    flavour = f"v{KUBERNETES_VERSION}-local-strict"
    source = Path(package.origin).parent / "kubernetes-json-schema" / flavour
    assert source.is_dir(), f"kubernetes-validate has no schemas for {flavour}; pin a version that has"
    root = tmp_path_factory.mktemp("kubernetes-schemas")
    (root / flavour).mkdir()
    for path in source.glob("*.json"):
        schema = json.loads(path.read_text().replace('"/api/_definitions.json#', '"_definitions.json#'))
        schema.pop("$id", None)
        (root / flavour / path.name).write_text(json.dumps(schema))
    return root


def kubeconform(manifest: str, schemas: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            require_tool("kubeconform"),
            "-strict",
            "-summary",
            "-kubernetes-version",
            KUBERNETES_VERSION,
            "-schema-location",
            f"{schemas}/{{{{ .NormalizedKubernetesVersion }}}}-local{{{{ .StrictSuffix }}}}/"
            "{{ .ResourceKind }}{{ .KindSuffix }}.json",
            "-schema-location",
            f"{CRD_SCHEMAS}/{{{{ .Group }}}}/{{{{ .ResourceKind }}}}_{{{{ .ResourceAPIVersion }}}}.json",
            "-",
        ],
        input=manifest,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("values", sorted(VALUES))
def test_the_chart_lints(values: str) -> None:
    result = helm("lint", "--strict", str(CHART), *VALUES[values])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", sorted(VALUES))
def test_every_rendered_object_is_valid_against_its_schema(values: str, kubernetes_schemas: Path) -> None:
    manifest = render(values)
    result = kubeconform(manifest, kubernetes_schemas)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(objects(manifest))} resources found" in result.stdout
    assert "Skipped: 0" in result.stdout  # nothing validated by no schema


def test_the_validator_refuses_a_misspelt_field_and_an_unknown_kind(kubernetes_schemas: Path) -> None:
    """The schemas are strict and complete: a typo fails, and so does a kind without a schema."""
    docs = objects(render("default"))
    deployment = next(doc for doc in docs if doc["kind"] == "Deployment")
    deployment["spec"]["replica"] = 2
    assert kubeconform(yaml.safe_dump(deployment), kubernetes_schemas).returncode != 0
    kafka = next(doc for doc in docs if doc["kind"] == "Kafka")
    kafka["spec"]["kafka"]["listners"] = []
    assert kubeconform(yaml.safe_dump(kafka), kubernetes_schemas).returncode != 0
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert kubeconform(yaml.safe_dump(unknown), kubernetes_schemas).returncode != 0


def _containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def _project_containers(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (doc["metadata"]["name"], container)
        for doc in docs
        if doc["kind"] in {"Deployment", "Job"}
        for container in _containers(doc)
        if container["image"].startswith(PROJECT_IMAGE)
    ]


@pytest.mark.parametrize("values", sorted(VALUES))
def test_every_command_the_chart_runs_exists_in_the_cli(values: str) -> None:
    containers = _project_containers(objects(render(values)))
    names = {name.removeprefix("rel-streamrec-") for name, _ in containers}
    assert {"streams", "joiner", "trainer", "evaluator", "api", "skew", "topics", "features-setup"} <= names
    for name, container in containers:
        assert "command" not in container, f"{name}: the image's entrypoint is `streamrec`; give `args`"
        assert_cli_accepts([str(word) for word in container["args"]], name)


@pytest.mark.parametrize("values", sorted(VALUES))
def test_every_streamrec_variable_is_a_setting(values: str) -> None:
    containers = _project_containers(objects(render(values)))
    unknown = {
        f"{name}: {variable['name']}"
        for name, container in containers
        for variable in container["env"]
        if variable["name"].startswith("STREAMREC_") and variable["name"] not in known_env_names()
    }
    assert not unknown, f"unknown settings variables {sorted(unknown)}"


@pytest.mark.parametrize("values", sorted(VALUES))
def test_every_container_has_requests_and_a_memory_limit(values: str) -> None:
    docs = objects(render(values))
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            resources = container.get("resources", {})
            where = f"{doc['metadata']['name']}/{container['name']}"
            assert {"cpu", "memory"} <= set(resources.get("requests", {})), where
            assert "memory" in resources.get("limits", {}), where


def test_kafka_users_have_the_grants_of_the_local_secure_stack() -> None:
    docs = objects(render("default"))
    operations = {"Read": "READ", "Write": "WRITE", "Create": "CREATE"}
    charted = {
        (doc["metadata"]["name"], acl["resource"]["type"], acl["resource"]["name"], operations[operation],
         acl["resource"]["patternType"] == "prefix")
        for doc in docs
        if doc["kind"] == "KafkaUser" and "authorization" in doc["spec"]
        for acl in doc["spec"]["authorization"]["acls"]
        for operation in acl["operations"]
    }  # fmt: skip
    expected = {
        (grant.identity, grant.resource, grant.name, operation, grant.prefixed)
        for grant in service_acls(CommonSettings())
        for operation in grant.operations
    }
    assert charted == expected
    kafka = next(doc for doc in docs if doc["kind"] == "Kafka")
    assert kafka["spec"]["kafka"]["authorization"]["superUsers"] == ["admin"]
    assert all(listener["tls"] for listener in kafka["spec"]["kafka"]["listeners"])


def _values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return values


def test_redis_users_have_the_rules_of_the_local_secure_stack() -> None:
    """The chart's ACL file: default off, each identity with REDIS_ACCESS's rules and its
    password's hash (the same password as its Secret), identities without access off."""
    import hashlib

    docs = objects(render("default"))
    secrets = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "Secret"}
    acl_lines = secrets["rel-streamrec-redis-acl"]["stringData"]["user.acl"].splitlines()
    assert acl_lines[0] == "user default off resetpass resetkeys resetchannels -@all"
    by_user = {line.split()[1]: line for line in acl_lines[1:]}
    for user, line in by_user.items():
        rules = REDIS_ACCESS[user]
        if rules is None:
            assert line == f"user {user} off resetpass resetkeys resetchannels -@all"
            continue
        password = secrets[f"rel-streamrec-redis-{user}"]["stringData"]["password"]
        assert len(password) == 32
        digest = hashlib.sha256(password.encode()).hexdigest()
        assert line == " ".join(("user", user, "on", f"#{digest}", "resetchannels", *rules))
    # and no identity with access in the code is missing from the chart
    assert set(_values()["redisAcls"]) == {user for user, rules in REDIS_ACCESS.items() if rules is not None}


def test_the_autoscalers_read_the_adapters_metrics_then_cpu() -> None:
    docs = objects(render("default"))
    adapter = yaml.safe_load((HELM_DIR / "prometheus-adapter-values.yaml").read_text())
    adapted = {rule["name"]["as"]: rule["seriesQuery"] for rule in adapter["rules"]["custom"]}
    autoscalers = {
        doc["spec"]["scaleTargetRef"]["name"]: doc for doc in docs if doc["kind"] == "HorizontalPodAutoscaler"
    }
    assert set(autoscalers) == {"rel-streamrec-api", "rel-streamrec-tf-serving"}
    for autoscaler in autoscalers.values():
        custom, cpu = autoscaler["spec"]["metrics"]
        assert custom["pods"]["metric"]["name"] in adapted
        assert cpu["resource"]["name"] == "cpu"
    # the API's series exists: the Recommend latency histogram's count
    from serving.api.metrics import ApiMetrics

    series = adapted["streamrec_api_requests_per_second"].split("{")[0]
    assert series.removesuffix("_count") in {metric.name for metric in ApiMetrics().registry.collect()}


def test_the_api_is_probed_on_its_plaintext_health_port_and_serves_tls() -> None:
    docs = objects(render("default"))
    api = next(doc for doc in docs if doc["kind"] == "Deployment" and doc["metadata"]["name"] == "rel-streamrec-api")
    (container,) = api["spec"]["template"]["spec"]["containers"]
    env = {variable["name"]: variable.get("value") for variable in container["env"]}
    health_port = int(env["STREAMREC_API__HEALTH_PORT"])
    assert container["readinessProbe"]["grpc"] == {"port": health_port, "service": "streamrec.v1.Recommender"}
    assert container["livenessProbe"]["grpc"]["port"] == health_port
    assert env["STREAMREC_GRPC__TLS"] == "true" and env["STREAMREC_GRPC__CERT_FILE"]
    assert int(env["STREAMREC_API__PORT"]) != health_port


def test_tf_serving_gets_an_ssl_config_it_can_read(tmp_path: Path) -> None:
    """The init container's script turns cert-manager's PEM files into TF Serving's SSLConfig
    text proto; the project's reader of that format (the local model server's) accepts it."""
    docs = objects(render("default"))
    serving = next(
        doc for doc in docs if doc["kind"] == "Deployment" and doc["metadata"]["name"].endswith("tf-serving")
    )
    init = next(c for c in serving["spec"]["template"]["spec"]["initContainers"] if c["name"] == "ssl-config")
    assert "--ssl_config_file=/ssl/ssl.config" in serving["spec"]["template"]["spec"]["containers"][0]["args"]
    authority = LocalCA.load_or_create(tmp_path / "ca")
    issued = authority.issue("tf-serving", ["rel-streamrec-tf-serving"])
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "tls.crt").write_bytes(issued.cert_file.read_bytes())
    (tmp_path / "tls" / "tls.key").write_bytes(issued.key_file.read_bytes())
    (tmp_path / "ssl").mkdir()
    script = init["command"][2].replace("/tls/", f"{tmp_path}/tls/").replace("/ssl/", f"{tmp_path}/ssl/")
    subprocess.run(["sh", "-c", script], check=True, env={"PATH": os.environ["PATH"]}, timeout=30)
    tls = read_ssl_config(tmp_path / "ssl" / "ssl.config")
    assert tls.certificate_chain == issued.cert_file.read_bytes()
    assert tls.private_key == issued.key_file.read_bytes()


@pytest.mark.parametrize("autoscaling", ["true", "false"])
def test_disruption_budgets_let_a_drain_proceed_with_or_without_autoscaling(autoscaling: str) -> None:
    """Each budget lets at least one pod go (a minAvailable equal to the replicas blocks every drain)."""
    result = helm(
        "template", "rel", str(CHART),
        "--set", f"processes.api.autoscaling.enabled={autoscaling}",
        "--set", f"tfServing.autoscaling.enabled={autoscaling}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    budgets = {
        doc["metadata"]["name"]: doc["spec"] for doc in objects(result.stdout) if doc["kind"] == "PodDisruptionBudget"
    }
    assert set(budgets) == {"rel-streamrec-api", "rel-streamrec-tf-serving"}
    assert all(spec["maxUnavailable"] >= 1 and "minAvailable" not in spec for spec in budgets.values())


def test_the_small_values_are_the_defaults() -> None:
    """values-small.yaml documents the defaults: it renders the same objects (passwords aside)."""

    def without_passwords(manifest: str) -> list[dict[str, Any]]:
        return [doc for doc in objects(manifest) if doc["kind"] != "Secret"]

    small = helm("template", "rel", str(CHART), "-f", str(CHART / "values-small.yaml"))
    assert small.returncode == 0, small.stderr
    assert without_passwords(small.stdout) == without_passwords(render("default"))
