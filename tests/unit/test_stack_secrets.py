"""The secure stack's certificate authority and identities (``streamrec.ops.stack.certs``,
``streamrec.ops.stack.identities``): files only their owner reads, certificates a TLS peer accepts,
and processes told where their secrets are, never the secrets."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest
from pydantic import SecretStr

from streamrec.core.settings import CommonSettings, GrpcSecurity, KafkaSettings, PathSettings, RedisSettings
from streamrec.ops.settings import StackSettings, StackTuning
from streamrec.ops.stack.certs import LocalCA
from streamrec.ops.stack.identities import IDENTITIES, StackSecrets, service_environment
from streamrec.ops.stack.local_stack import LocalStack


def modes(directory: Path) -> dict[str, int]:
    return {str(path.relative_to(directory)): path.stat().st_mode & 0o777 for path in directory.rglob("*")}


def handshake(server_ca: LocalCA, client_trusts: LocalCA, name: str = "kafka") -> str:
    """A TLS handshake over a socket pair: the server presents ``server_ca``'s certificate for
    ``name``, the client trusts ``client_trusts`` and checks the host name ``localhost``."""
    issued = server_ca.issue(name)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(issued.cert_file, issued.key_file)
    client_context = ssl.create_default_context(cafile=str(client_trusts.ca_file))
    left, right = socket.socketpair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server_context.wrap_socket(left, server_side=True) as tls:
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_context.wrap_socket(right, server_hostname="localhost") as tls:
            return tls.recv(2).decode()
    finally:
        thread.join(5)


def test_certificates_are_private_verifiable_and_kept_until_renewed(tmp_path: Path) -> None:
    ca = LocalCA.load_or_create(tmp_path / "ca")
    assert handshake(ca, ca) == "ok"
    first = ca.issue("kafka").cert_file.read_bytes()
    assert ca.issue("kafka").cert_file.read_bytes() == first  # up twice: nothing changes
    assert ca.issue("kafka", renew=True).cert_file.read_bytes() != first
    assert LocalCA.load_or_create(tmp_path / "ca").certificate == ca.certificate
    assert set(modes(tmp_path / "ca").values()) == {0o600}
    assert (tmp_path / "ca").stat().st_mode & 0o777 == 0o700
    other = LocalCA.load_or_create(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(ca, other)  # a certificate from another CA is refused
    with pytest.raises(ValueError, match="plain file name"):
        ca.issue("../escape")


def test_each_identity_gets_its_own_credentials_as_private_files(tmp_path: Path) -> None:
    secrets = StackSecrets.ensure(tmp_path / "secrets")
    assert set(secrets.identities) == set(IDENTITIES)
    passwords = [identity.kafka_password() for identity in secrets.identities.values()]
    assert len(set(passwords)) == len(passwords) and min(map(len, passwords)) >= 32
    assert set(modes(tmp_path / "secrets").values()) <= {0o600, 0o700}
    assert {path.stat().st_mode & 0o777 for path in (tmp_path / "secrets").rglob("*") if path.is_file()} == {0o600}
    again = StackSecrets.ensure(tmp_path / "secrets")
    assert again.identities["api"].kafka_password() == secrets.identities["api"].kafka_password()
    tokens = dict(line.split(" ") for line in secrets.grpc_tokens_file.read_text().splitlines())
    assert tokens == {name: identity.grpc_token() for name, identity in secrets.identities.items()}

    environment = service_environment(secrets, "api")
    every_secret = {
        value
        for identity in secrets.identities.values()
        for value in (identity.kafka_password(), identity.redis_password(), identity.grpc_token())
    }
    assert not any(secret in value for value in environment.values() for secret in every_secret)
    settings = CommonSettings(
        kafka=KafkaSettings(
            security_protocol="SASL_SSL",
            sasl_username="api",
            sasl_password_file=Path(environment["STREAMREC_KAFKA__SASL_PASSWORD_FILE"]),
            ssl_ca_file=secrets.ca_file,
        ),
        redis=RedisSettings(username="api", password_file=secrets.identities["api"].redis_password_file, tls=True),
        grpc=GrpcSecurity(tls=True, ca_file=secrets.ca_file),
    )
    config = settings.kafka.client_config()
    assert (config["sasl.username"], config["sasl.password"]) == ("api", secrets.identities["api"].kafka_password())
    assert config["ssl.ca.location"] == str(secrets.ca_file)
    assert settings.redis.client_options()["password"] == secrets.identities["api"].redis_password()
    assert settings.redis.url().startswith("rediss://api:")


def test_a_secret_is_given_inline_or_as_a_file_and_a_missing_file_says_so(tmp_path: Path) -> None:
    from streamrec.core.errors import SettingsError

    with pytest.raises(SettingsError, match="not both"):
        RedisSettings(password=SecretStr("x"), password_file=tmp_path / "p").secret()  # noqa: S106
    with pytest.raises(SettingsError, match="cannot read .*create it or fix the path"):
        KafkaSettings(sasl_username="a", sasl_password_file=tmp_path / "missing").client_config()


def test_a_secure_stack_hands_each_program_its_own_identity(tmp_path: Path) -> None:
    settings = StackSettings(stack=StackTuning(secure=True), paths=PathSettings(state_dir=tmp_path))
    stack = LocalStack(settings)
    assert stack.secrets is not None
    shell = stack.client_environment()
    assert (shell["STREAMREC_KAFKA__SASL_USERNAME"], shell["STREAMREC_STACK__SECURE"]) == ("admin", "true")
    api = stack.program_environment("api")
    assert (api["STREAMREC_KAFKA__SASL_USERNAME"], api["STREAMREC_REDIS__USERNAME"]) == ("api", "api")
    assert api["STREAMREC_GRPC__TOKEN_FILE"] == str(stack.secrets.identities["api"].grpc_token_file)
    assert (
        "STREAMREC_KAFKA__SASL_USERNAME"
        not in LocalStack(StackSettings(paths=PathSettings(state_dir=tmp_path / "plain"))).client_environment()
    )
