"""Server and channel credentials from ``GrpcSecurity``: TLS when ``grpc.tls``, plaintext otherwise.

A server's TLS is a :class:`ServerTls` (PEM contents, read at start), so the settings' files and
TF Serving's ``SSLConfig`` (which holds the PEM text itself) end in the same credentials. A
client channel verifies the server against ``grpc.ca_file`` (the system roots when unset),
presents ``grpc.cert_file`` when set (mutual TLS) and attaches ``grpc.token_file``'s token to
every call as ``authorization: Bearer``; gRPC sends call credentials only over TLS, so a token
never travels in plaintext.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from streamrec.core.errors import SettingsError
from streamrec.core.settings import GrpcSecurity

ENV = "STREAMREC_GRPC__"


def read_pem(path: Path, setting: str) -> bytes:
    """The bytes of ``path`` (named by setting ``grpc.<setting>``); a clear error when unreadable."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SettingsError(
            f"grpc.{setting}: cannot read {path} ({exc.strerror}); fix {ENV}{setting.upper()} or create the file"
        ) from exc
    if not data.strip():
        raise SettingsError(f"grpc.{setting}: {path} is empty; it should hold PEM text")
    return data


def _required(path: Path | None, setting: str, what: str) -> Path:
    if path is None:
        raise SettingsError(f"grpc.tls is on but grpc.{setting} is not set: set {ENV}{setting.upper()} to {what}")
    return path


@dataclass(frozen=True)
class ServerTls:
    """What a TLS server presents (key, certificate chain) and whom it accepts: with
    ``client_verify``, only clients whose certificate ``root_certificates`` signed."""

    private_key: bytes = field(repr=False)
    certificate_chain: bytes = field(repr=False)
    root_certificates: bytes | None = field(default=None, repr=False)
    client_verify: bool = False

    def __post_init__(self) -> None:
        if self.client_verify and not self.root_certificates:
            raise SettingsError(
                "client_verify needs the CA that signs client certificates: "
                "set grpc.ca_file (custom_ca in an SSLConfig)"
            )

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.root_certificates,
            require_client_auth=self.client_verify,
        )


def server_tls(security: GrpcSecurity) -> ServerTls | None:
    """The TLS a server listens with under ``security``; None without ``grpc.tls`` (plaintext)."""
    if not security.tls:
        return None
    cert = _required(security.cert_file, "cert_file", "this server's certificate (PEM)")
    key = _required(security.key_file, "key_file", "this server's private key (PEM)")
    return ServerTls(
        private_key=read_pem(key, "key_file"),
        certificate_chain=read_pem(cert, "cert_file"),
        root_certificates=read_pem(security.ca_file, "ca_file") if security.ca_file is not None else None,
        client_verify=security.client_verify,
    )


def listen(server: grpc.Server, address: str, tls: ServerTls | None) -> int:
    """Bind ``address`` with TLS (or plaintext without it); return the port, raise when it failed."""
    port = server.add_secure_port(address, tls.credentials()) if tls is not None else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address} (port in use?)")
    return port


def channel_credentials(security: GrpcSecurity) -> grpc.ChannelCredentials | None:
    """TLS credentials of a client under ``security``; None without ``grpc.tls``. The bearer token
    is not part of them: :func:`open_channel` adds it to each call's metadata."""
    if not security.tls:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(security.ca_file, "ca_file") if security.ca_file is not None else None,
        private_key=read_pem(security.key_file, "key_file") if security.key_file is not None else None,
        certificate_chain=read_pem(security.cert_file, "cert_file") if security.cert_file is not None else None,
    )


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, metadata: tuple[tuple[str, str | bytes], ...]) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call of a TLS channel. Per-call metadata in
    the calling thread: gRPC's token call credentials start a Python thread for every call
    (docs/design/security.md#grpc)."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details, (*(details.metadata or ()), self._header))

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation: Any, client_call_details: Any, request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


def open_channel(
    target: str, security: GrpcSecurity | None = None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """A channel to ``target``: TLS as ``security`` says (and its bearer token on every call),
    plaintext without it (or without ``grpc.tls``)."""
    credentials = channel_credentials(security) if security is not None else None
    if credentials is None:
        return grpc.insecure_channel(target, options=list(options))
    assert security is not None  # noqa: S101 - credentials exist only with settings
    extra = [("grpc.ssl_target_name_override", security.server_name)] if security.server_name else []
    channel = grpc.secure_channel(target, credentials, options=[*options, *extra])
    if security.token_file is None:
        return channel
    token = read_pem(security.token_file, "token_file").decode("utf-8", "replace").strip()
    return grpc.intercept_channel(channel, BearerToken(token))
