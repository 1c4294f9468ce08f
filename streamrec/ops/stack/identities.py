"""The identities of a secure stack (``stack up --secure``): one per service, each with its own
certificate, Kafka (SCRAM) password, Redis (ACL) password and gRPC bearer token, as files.

Every secret lives in ``<state>/secrets`` (mode 0700), one file each (0600, written by
``certs.write_private``), created once and kept across ``stack up``: a process is told *where* its
secrets are (``STREAMREC_*_FILE`` variables, :func:`service_environment`), never the secrets
themselves, so none appears in a command line, an environment dump or the supervisord config.
What each identity may do is decided by the services (Kafka ACLs, Redis ACL users, the model
server's admin identities); this module only names the identities and holds their credentials.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from streamrec.core.settings import ENV_NESTED_DELIMITER, ENV_PREFIX
from streamrec.ops.stack.certs import IssuedCertificate, LocalCA, write_private

# "admin": the operator (``stack env`` in a shell, topic creation, ACLs); the others are processes.
IDENTITIES: tuple[str, ...] = (
    "admin",
    "replay",
    "streams",
    "joiner",
    "trainer",
    "evaluator",
    "model-server",
    "api",
    "skew",
)
# Kafka brokers and Redis authenticate to each other as these (inter-broker SCRAM user, TLS certs).
SERVER_CERTIFICATES: tuple[str, ...] = ("kafka", "redis")


@dataclass(frozen=True)
class Identity:
    """One identity's credentials, as files."""

    name: str
    certificate: IssuedCertificate
    kafka_password_file: Path
    redis_password_file: Path
    grpc_token_file: Path

    def kafka_password(self) -> str:
        return self.kafka_password_file.read_text().strip()

    def redis_password(self) -> str:
        return self.redis_password_file.read_text().strip()

    def grpc_token(self) -> str:
        return self.grpc_token_file.read_text().strip()


def _secret_file(path: Path) -> Path:
    if not path.is_file():
        write_private(path, (secrets.token_urlsafe(32) + "\n").encode())
    return path


@dataclass(frozen=True)
class StackSecrets:
    """The CA, the servers' certificates and every identity of one stack."""

    directory: Path
    ca: LocalCA
    identities: Mapping[str, Identity]
    servers: Mapping[str, IssuedCertificate]

    @property
    def ca_file(self) -> Path:
        return self.ca.ca_file

    @property
    def grpc_tokens_file(self) -> Path:
        """Every identity's bearer token, ``<identity> <token>`` per line (read by gRPC servers)."""
        return self.directory / "grpc-tokens"

    @classmethod
    def ensure(cls, directory: Path, *, renew: bool = False) -> StackSecrets:
        """The stack's secrets in ``directory``, created where missing (certificates renewed
        with ``renew``; passwords and tokens are kept)."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        directory.chmod(0o700)  # mkdir's mode does not apply to a folder that already exists
        ca = LocalCA.load_or_create(directory / "ca")
        identities = {
            name: Identity(
                name=name,
                certificate=ca.issue(name, renew=renew),
                kafka_password_file=_secret_file(directory / name / "kafka-password"),
                redis_password_file=_secret_file(directory / name / "redis-password"),
                grpc_token_file=_secret_file(directory / name / "grpc-token"),
            )
            for name in IDENTITIES
        }
        servers = {name: ca.issue(name, renew=renew) for name in SERVER_CERTIFICATES}
        stack_secrets = cls(directory=directory, ca=ca, identities=identities, servers=servers)
        tokens = "".join(f"{name} {identity.grpc_token()}\n" for name, identity in identities.items())
        write_private(stack_secrets.grpc_tokens_file, tokens.encode())
        return stack_secrets


def _env(section: str, key: str) -> str:
    return f"{ENV_PREFIX}{section.upper()}{ENV_NESTED_DELIMITER}{key.upper()}"


def service_environment(stack_secrets: StackSecrets, name: str) -> dict[str, str]:
    """The ``STREAMREC_*`` variables that make a process connect as identity ``name``: SASL_SSL
    to Kafka, TLS and its ACL user to Redis, TLS (and its token) on gRPC; file paths only."""
    identity = stack_secrets.identities[name]
    certificate = identity.certificate
    return {
        _env("kafka", "security_protocol"): "SASL_SSL",
        _env("kafka", "sasl_mechanism"): "SCRAM-SHA-512",
        _env("kafka", "sasl_username"): name,
        _env("kafka", "sasl_password_file"): str(identity.kafka_password_file),
        _env("kafka", "ssl_ca_file"): str(stack_secrets.ca_file),
        _env("redis", "username"): name,
        _env("redis", "password_file"): str(identity.redis_password_file),
        _env("redis", "tls"): "true",
        _env("redis", "ca_file"): str(stack_secrets.ca_file),
        _env("redis", "cert_file"): str(certificate.cert_file),
        _env("redis", "key_file"): str(certificate.key_file),
        _env("grpc", "tls"): "true",
        _env("grpc", "ca_file"): str(stack_secrets.ca_file),
        _env("grpc", "cert_file"): str(certificate.cert_file),
        _env("grpc", "key_file"): str(certificate.key_file),
        _env("grpc", "token_file"): str(identity.grpc_token_file),
        _env("grpc", "tokens_file"): str(stack_secrets.grpc_tokens_file),
    }
