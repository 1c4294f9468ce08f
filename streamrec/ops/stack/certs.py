"""A local certificate authority and the certificates of the stack's services (``stack up --secure``).

:class:`LocalCA` keeps a CA key and certificate in one folder of the state directory (mode 0700)
and issues each service a certificate for the local host names (``localhost``, ``127.0.0.1``),
usable as server and as client certificate (mutual TLS). Every file is written 0600 and
atomically (a reader never sees half a key). Issuing is idempotent: a certificate that exists,
was signed by this CA and is valid for at least ``renew_within`` more is kept, so ``stack up``
twice does not change what running services trust; ``renew=True`` replaces it (rotation: issue,
then restart the service). Built on ``cryptography``; keys are ECDSA P-256, stored unencrypted as
PKCS#8 PEM (what gRPC, librdkafka, Kafka's PEM keystores and Redis all read).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOCAL_HOSTS = ("localhost", "127.0.0.1")
CA_NAME = "ca"


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by its owner only (0600), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class IssuedCertificate:
    """The files of one service's certificate: its chain, its key, both in one file (for Kafka's
    PEM keystore), and the CA certificate that verifies its peers."""

    name: str
    cert_file: Path
    key_file: Path
    bundle_file: Path
    ca_file: Path


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _subject_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


class LocalCA:
    """A certificate authority in ``directory`` (``ca.crt``, ``ca.key``), created on first use."""

    def __init__(self, directory: Path, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        self.directory = directory
        self._key = key
        self.certificate = certificate

    @property
    def ca_file(self) -> Path:
        return self.directory / f"{CA_NAME}.crt"

    @classmethod
    def load_or_create(
        cls, directory: Path, *, common_name: str = "streamrec local CA", valid_days: int = 3650
    ) -> LocalCA:
        """The CA in ``directory``; a new one (key and self-signed certificate) if there is none."""
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        directory.chmod(0o700)
        cert_path, key_path = directory / f"{CA_NAME}.crt", directory / f"{CA_NAME}.key"
        if cert_path.is_file() and key_path.is_file():
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_path} is not an EC key; remove {directory} to create a new CA")
            return cls(directory, key, x509.load_pem_x509_certificate(cert_path.read_bytes()))
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = _now()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )  # fmt: skip
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        write_private(key_path, _key_pem(key))
        write_private(cert_path, certificate.public_bytes(serialization.Encoding.PEM))
        return cls(directory, key, certificate)

    def issue(
        self,
        name: str,
        hosts: Sequence[str] = LOCAL_HOSTS,
        *,
        valid_days: int = 90,
        renew: bool = False,
        renew_within: datetime.timedelta = datetime.timedelta(days=7),
    ) -> IssuedCertificate:
        """The certificate of service ``name`` (common name ``name``, subject alternative names
        ``hosts``), for server and client use; kept if still good, else (or with ``renew``) new."""
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"certificate name {name!r}: use a plain file name such as 'kafka-1' or 'api'")
        issued = IssuedCertificate(
            name=name,
            cert_file=self.directory / f"{name}.crt",
            key_file=self.directory / f"{name}.key",
            bundle_file=self.directory / f"{name}.pem",
            ca_file=self.ca_file,
        )
        if not renew and self._still_good(issued, hosts, renew_within):
            return issued
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=valid_days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(_subject_names(hosts)), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        chain = certificate.public_bytes(serialization.Encoding.PEM)
        key_pem = _key_pem(key)
        write_private(issued.key_file, key_pem)
        write_private(issued.cert_file, chain)
        write_private(issued.bundle_file, key_pem + chain)
        return issued

    def _still_good(self, issued: IssuedCertificate, hosts: Sequence[str], renew_within: datetime.timedelta) -> bool:
        if not all(path.is_file() for path in (issued.cert_file, issued.key_file, issued.bundle_file)):
            return False
        certificate = x509.load_pem_x509_certificate(issued.cert_file.read_bytes())
        try:
            certificate.verify_directly_issued_by(self.certificate)
        except (ValueError, TypeError, InvalidSignature):
            return False
        if certificate.not_valid_after_utc - renew_within < _now():
            return False
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return set(names) == set(_subject_names(hosts))
