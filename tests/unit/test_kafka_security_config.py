"""Kafka security of the secure stack, without a broker: the nodes' rendered configuration, the
SCRAM arguments StorageTool formats with, the ACL table, and the client settings the services
(confluent-kafka and Faust) connect with."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import faust
import pytest
from pydantic import SecretStr, ValidationError

from streamrec.core.errors import SettingsError, StackError
from streamrec.core.settings import KafkaSettings, PathSettings, TopicSettings
from streamrec.ops.settings import StackSettings, StackTuning
from streamrec.ops.stack import kafka_access, kafka_broker
from streamrec.ops.stack.certs import write_private
from streamrec.ops.stack.identities import IDENTITIES, StackSecrets
from streams.faust_app import broker_credentials


def stack_settings(tmp_path: Path, *, secure: bool) -> StackSettings:
    return StackSettings(
        paths=PathSettings(state_dir=tmp_path / "state"),
        stack=StackTuning(kafka_port=19092, kafka_controller_port=19192, secure=secure),
    )


def rendered(settings: StackSettings, secrets: StackSecrets | None) -> dict[str, str]:
    """The node's server.properties as written, as a dict; fails on a key given twice (Java's
    Properties would silently keep the last)."""
    node = kafka_broker.nodes(settings)[0]
    node.root.mkdir(parents=True, exist_ok=True)
    kafka_broker._render(settings, node, "1@127.0.0.1:19192", secrets)
    assert node.config.stat().st_mode & 0o777 == 0o600
    pairs = [line.split("=", 1) for line in node.config.read_text().splitlines() if line and not line.startswith("#")]
    keys = [key for key, _ in pairs]
    assert len(keys) == len(set(keys)), sorted(key for key in keys if keys.count(key) > 1)
    return dict((key, value) for key, value in pairs)


def test_a_secure_node_speaks_sasl_ssl_with_mtls_between_controllers_and_denies_by_default(tmp_path: Path) -> None:
    secrets = StackSecrets.ensure(tmp_path / "secrets")
    config = rendered(stack_settings(tmp_path, secure=True), secrets)
    assert config["listeners"] == "SASL_SSL://127.0.0.1:19092,CONTROLLER://127.0.0.1:19192"
    assert config["advertised.listeners"] == "SASL_SSL://127.0.0.1:19092"
    assert config["listener.security.protocol.map"] == "CONTROLLER:SSL,SASL_SSL:SASL_SSL"
    assert config["inter.broker.listener.name"] == "SASL_SSL"
    assert config["listener.name.controller.ssl.client.auth"] == "required"
    assert (config["sasl.enabled.mechanisms"], config["sasl.mechanism.inter.broker.protocol"]) == (
        "SCRAM-SHA-512",
        "SCRAM-SHA-512",
    )
    admin_password = secrets.identities["admin"].kafka_password()
    assert config["listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config"] == (
        "org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="admin" password="{admin_password}";'
    )
    assert (config["ssl.keystore.type"], config["ssl.keystore.location"]) == (
        "PEM",
        str(secrets.servers["kafka"].bundle_file),
    )
    assert (config["ssl.truststore.type"], config["ssl.truststore.location"]) == ("PEM", str(secrets.ca_file))
    assert config["authorizer.class.name"] == "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
    assert config["allow.everyone.if.no.acl.found"] == "false"
    assert config["super.users"] == "User:admin;User:CN=kafka"


def test_a_plaintext_node_has_no_authorizer_and_no_tls(tmp_path: Path) -> None:
    config = rendered(stack_settings(tmp_path, secure=False), None)
    assert config["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19192"
    assert config["listener.security.protocol.map"] == "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
    assert not [key for key in config if key.startswith(("ssl.", "sasl.", "authorizer", "super.users"))]


def test_every_identity_is_formatted_with_its_scram_password_from_a_private_file(tmp_path: Path) -> None:
    secrets = StackSecrets.ensure(tmp_path / "secrets")
    path = kafka_broker._scram_arguments(secrets, tmp_path / "scram.args")
    assert path.stat().st_mode & 0o777 == 0o600
    lines = path.read_text().splitlines()
    assert lines[0::2] == ["--add-scram"] * len(IDENTITIES)  # one argument per line, as StorageTool reads @files
    assert lines[1::2] == [
        f"SCRAM-SHA-512=[name={name},password={secrets.identities[name].kafka_password()}]" for name in IDENTITIES
    ]


def test_a_password_that_would_break_the_jaas_line_is_refused_naming_its_file(tmp_path: Path) -> None:
    secrets = StackSecrets.ensure(tmp_path / "secrets")
    write_private(secrets.identities["admin"].kafka_password_file, b'pass" evil="1\n')
    with pytest.raises(StackError, match="admin/kafka-password"):
        rendered(stack_settings(tmp_path, secure=True), secrets)


def test_a_secure_start_on_plaintext_storage_is_refused_before_anything_runs(tmp_path: Path) -> None:
    settings = stack_settings(tmp_path, secure=True)
    node = kafka_broker.nodes(settings)[0]
    node.data.mkdir(parents=True)
    (node.data / "meta.properties").write_text("cluster.id=abc\n")  # formatted by a plaintext stack
    with pytest.raises(StackError, match="formatted without SCRAM credentials"):
        kafka_broker.prepare(settings, StackSecrets.ensure(tmp_path / "secrets"))
    with pytest.raises(StackError, match="needs the stack's secrets"):
        kafka_broker.prepare(settings)


# -- the ACL table -------------------------------------------------------------------------------
@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in [key for key in os.environ if key.upper().startswith("STREAMREC_")]:
        monkeypatch.delenv(key)
    return monkeypatch


def table(settings: StackSettings) -> set[str]:
    return {grant.describe() for grant in kafka_access.service_acls(settings)}


def test_each_service_may_use_only_its_own_topics_and_group(clean_environment: object, tmp_path: Path) -> None:
    assert table(stack_settings(tmp_path, secure=True)) == {
        "replay: WRITE topic streamrec.interactions",
        "streams: READ topic streamrec.interactions",
        "streams: WRITE topic streamrec.deadletter",
        "streams: READ+WRITE+CREATE topic streamrec.interactions.by-item",
        "streams: READ+WRITE+CREATE topic streamrec-features-*",
        "streams: READ group streamrec-features",
        "joiner: READ topic streamrec.impressions",
        "joiner: READ topic streamrec.clicks",
        "joiner: WRITE topic streamrec.labeled",
        "joiner: WRITE topic streamrec.deadletter",
        "joiner: READ+WRITE+CREATE topic streamrec-joiner-*",
        "joiner: READ group streamrec-joiner",
        "api: WRITE topic streamrec.impressions",
        "trainer: READ topic streamrec.interactions",
        "trainer: READ group streamrec-trainer",
        # the off-policy gate's and the ranking model's reader of the labeled examples
        "trainer: READ topic streamrec.labeled",
        "trainer: READ group streamrec-trainer-ope",
        "evaluator: READ topic streamrec.labeled",
        "evaluator: READ group streamrec-evaluator",
        "skew: READ topic streamrec.impressions",
        "skew: READ group streamrec-skew",
    }


def test_the_table_follows_the_services_settings(clean_environment: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_environment.setenv("STREAMREC_STREAMS__APP_ID", "features-b")
    clean_environment.setenv("STREAMREC_JOINER__APP_ID", "joiner-b")
    clean_environment.setenv("STREAMREC_TRAINER__SOURCE", "labeled")
    clean_environment.setenv("STREAMREC_TRAINER__GROUP_ID", "trainer-b")
    clean_environment.setenv("STREAMREC_EVALUATOR__GROUP_ID", "evaluator-b")
    clean_environment.setenv("STREAMREC_SKEW__GROUP_ID", "skew-b")
    settings = stack_settings(tmp_path, secure=True).model_copy(update={"topics": TopicSettings.prefixed("p")})
    grants = table(settings)
    assert {
        "streams: READ topic p.interactions",
        "streams: READ+WRITE+CREATE topic p.interactions.by-item",
        "streams: READ+WRITE+CREATE topic features-b-*",
        "streams: READ group features-b",
        "joiner: READ+WRITE+CREATE topic joiner-b-*",
        "trainer: READ topic p.labeled",
        "trainer: READ group trainer-b",
        "trainer: READ group trainer-b-ope",
        "evaluator: READ group evaluator-b",
        "skew: READ group skew-b",
    } <= grants
    assert not [grant for grant in grants if "streamrec" in grant]
    assert "trainer: READ topic p.interactions" not in grants


def test_a_grant_is_one_allow_binding_per_operation_for_its_user() -> None:
    grant = kafka_access.Grant("streams", "topic", "app-", ("READ", "CREATE"), prefixed=True)
    bindings = grant.bindings()
    assert [binding.operation.name for binding in bindings] == ["READ", "CREATE"]
    assert {
        (b.restype.name, b.name, b.resource_pattern_type.name, b.principal, b.host, b.permission_type.name)
        for b in bindings
    } == {("TOPIC", "app-", "PREFIXED", "User:streams", "*", "ALLOW")}


def test_no_grant_names_an_unknown_identity_the_operator_or_the_model_server(
    clean_environment: object, tmp_path: Path
) -> None:
    identities = {grant.identity for grant in kafka_access.service_acls(stack_settings(tmp_path, secure=True))}
    assert identities == set(IDENTITIES) - {"admin", "model-server"}


# -- client settings -----------------------------------------------------------------------------
def test_kafka_settings_refuse_sasl_without_a_principal_naming_the_variables() -> None:
    with pytest.raises(ValidationError, match="STREAMREC_KAFKA__SASL_USERNAME"):
        KafkaSettings(security_protocol="SASL_SSL")
    with pytest.raises(ValidationError, match="STREAMREC_KAFKA__SASL_PASSWORD_FILE"):
        KafkaSettings(security_protocol="SASL_SSL", sasl_username="api")
    with pytest.raises(ValidationError, match="not both"):
        KafkaSettings(sasl_password=SecretStr("x"), sasl_password_file=Path("/x"))
    with pytest.raises(ValidationError, match="go together"):
        KafkaSettings(security_protocol="SSL", ssl_cert_file=Path("/c.crt"))


def test_the_stack_hands_a_service_its_own_sasl_ssl_principal(tmp_path: Path) -> None:
    secrets = StackSecrets.ensure(tmp_path / "secrets")
    kafka = KafkaSettings(**kafka_broker.client_security(secrets, "streams"))
    config = kafka.client_config()
    assert (config["security.protocol"], config["sasl.mechanism"], config["sasl.username"]) == (
        "SASL_SSL",
        "SCRAM-SHA-512",
        "streams",
    )
    assert config["sasl.password"] == secrets.identities["streams"].kafka_password()
    assert config["ssl.ca.location"] == str(secrets.ca_file)
    assert kafka_broker.client_security(None, "streams") == {}


def test_faust_gets_scram_over_tls_verifying_the_stack_ca(tmp_path: Path) -> None:
    secrets = StackSecrets.ensure(tmp_path / "secrets")
    credentials = broker_credentials(KafkaSettings(**kafka_broker.client_security(secrets, "joiner")))
    assert isinstance(credentials, faust.SASLCredentials)
    assert (credentials.protocol.value, credentials.mechanism.value) == ("SASL_SSL", "SCRAM-SHA-512")
    assert (credentials.username, credentials.password) == ("joiner", secrets.identities["joiner"].kafka_password())
    context = credentials.ssl_context
    assert context is not None and context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert [cert["subject"] for cert in context.get_ca_certs()] == [((("commonName", "streamrec local CA"),),)]
    assert broker_credentials(KafkaSettings()) is None


def test_faust_tls_alone_presents_the_client_certificate(tmp_path: Path) -> None:
    secrets = StackSecrets.ensure(tmp_path / "secrets")
    certificate = secrets.identities["streams"].certificate
    kafka = KafkaSettings(
        security_protocol="SSL",
        ssl_ca_file=secrets.ca_file,
        ssl_cert_file=certificate.cert_file,
        ssl_key_file=certificate.key_file,
    )
    credentials = broker_credentials(kafka)
    assert isinstance(credentials, faust.SSLCredentials)
    assert credentials.protocol.value == "SSL"


def test_faust_refuses_unreadable_tls_files_and_passwords_naming_them(tmp_path: Path) -> None:
    missing_ca = KafkaSettings(security_protocol="SSL", ssl_ca_file=tmp_path / "nope.crt")
    with pytest.raises(SettingsError, match="nope.crt"):
        broker_credentials(missing_ca)
    missing_password = KafkaSettings(
        security_protocol="SASL_PLAINTEXT", sasl_username="api", sasl_password_file=tmp_path / "gone"
    )
    with pytest.raises(SettingsError, match="gone"):
        broker_credentials(missing_password)
