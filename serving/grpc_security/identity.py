"""Who calls a gRPC server, and the interceptor that keeps the admin RPCs to admin identities.

A caller's identity is the common name of its client certificate, trusted only when the server
verified that certificate (mutual TLS, ``client_verify``), else the identity whose token it sent
as ``authorization: Bearer <token>``, looked up in ``grpc.tokens_file`` (``<identity> <token>``
per line; every entry compared in constant time). :class:`CallerCheck`, installed only on a TLS
server that can tell callers apart, then decides:

* the health service answers anyone, so probes and load balancers need no credentials;
* every other RPC needs an identity: UNAUTHENTICATED without one or with an unknown token;
* an admin RPC (the model server's ``HandleReloadConfigRequest``, which loads versions and moves
  labels) needs one of ``grpc.admin_identities``: PERMISSION_DENIED otherwise.

Without TLS no identity could be trusted, so none is asked for and the server behaves as it
always did. Refusals are logged with the method and the identity, never with a token.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

from serving.grpc_security.credentials import ServerTls
from streamrec.core.errors import SettingsError
from streamrec.core.settings import GrpcSecurity

log = logging.getLogger(__name__)

HEALTH_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
_BEARER = "bearer "


class TokenTable:
    """The ``<identity> <token>`` lines of a tokens file, read once. An identity may have several
    tokens (the old and the new one while a token is rotated); a token names one identity."""

    def __init__(self, entries: Iterable[tuple[str, str]]) -> None:
        self._entries = tuple((identity, token.encode()) for identity, token in entries)
        tokens = [token for _, token in self._entries]
        if len(set(tokens)) != len(tokens):
            raise SettingsError("grpc.tokens_file gives one token to two identities; give each its own token")

    @classmethod
    def read(cls, path: Path) -> TokenTable:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise SettingsError(f"grpc.tokens_file: cannot read {path} ({exc.strerror})") from exc
        entries = []
        for number, line in enumerate(text.splitlines(), start=1):
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            if len(words) != 2:
                raise SettingsError(
                    f"grpc.tokens_file {path}, line {number}: expected '<identity> <token>' ({len(words)} words)"
                )
            entries.append((words[0], words[1]))
        return cls(entries)

    @property
    def identities(self) -> frozenset[str]:
        return frozenset(identity for identity, _ in self._entries)

    def identity(self, token: str) -> str | None:
        """The identity ``token`` belongs to, or None; every entry is compared (no early exit)."""
        candidate = token.encode()
        found = None
        for identity, known in self._entries:
            if hmac.compare_digest(known, candidate):
                found = identity
        return found


def bearer_token(metadata: Sequence[tuple[str, Any]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` header, if the call has one."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value[: len(_BEARER)].lower() == _BEARER:
            return value[len(_BEARER) :].strip()
    return None


class CallerCheck(grpc.ServerInterceptor):
    """Refuses calls without an identity, and admin calls from identities that are not admins."""

    def __init__(
        self,
        tokens: TokenTable | None,
        admin_identities: Collection[str],
        admin_methods: Collection[str] = (),
        *,
        trust_certificates: bool,
        open_methods: Collection[str] = HEALTH_METHODS,
    ) -> None:
        self._tokens = tokens
        self._admins = frozenset(admin_identities)
        self._admin_methods = frozenset(admin_methods)
        self._open = frozenset(open_methods)
        self._trust_certificates = trust_certificates

    def identify(self, context: grpc.ServicerContext) -> str | None:
        """The caller's identity: its verified certificate's common name, else its token's."""
        if self._trust_certificates:
            names = context.auth_context().get("x509_common_name")
            if names:
                return bytes(names[0]).decode("utf-8", "replace")
        if self._tokens is None:
            return None
        token = bearer_token(context.invocation_metadata())
        return self._tokens.identity(token) if token else None

    def check(self, method: str, context: grpc.ServicerContext) -> None:
        """Abort the call unless its caller may call ``method``."""
        identity = self.identify(context)
        if identity is None:
            log.warning("refused %s: the caller has no identity this server knows", method)
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "this server needs a caller identity: a client certificate signed by its CA, or a known "
                "token as 'authorization: Bearer <token>' (grpc.token_file)",
            )
        if method in self._admin_methods and identity not in self._admins:
            log.warning("refused %s to %r: not one of the admin identities", method, identity)
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method.rsplit('/', 1)[-1]} is an admin RPC; caller {identity!r} is not one of "
                f"grpc.admin_identities ({', '.join(sorted(self._admins))})",
            )

    def intercept_service(
        self, continuation: Callable[[Any], grpc.RpcMethodHandler[Any, Any] | None], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        method: str = details.method
        if handler is None or method in self._open:
            return handler
        return _guarded(handler, lambda context: self.check(method, context))


def _guarded(
    handler: grpc.RpcMethodHandler[Any, Any], check: Callable[[grpc.ServicerContext], None]
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler`` with ``check(context)`` run before its behaviour, whatever its kind."""
    codecs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    for kind, wrap in (
        ("unary_unary", grpc.unary_unary_rpc_method_handler),
        ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ("stream_unary", grpc.stream_unary_rpc_method_handler),
        ("stream_stream", grpc.stream_stream_rpc_method_handler),
    ):
        behaviour = getattr(handler, kind)
        if behaviour is not None:

            def checked(request: Any, context: grpc.ServicerContext, _behaviour: Any = behaviour) -> Any:
                check(context)
                return _behaviour(request, context)

            return wrap(checked, **codecs)
    return handler


def caller_check(
    security: GrpcSecurity, tls: ServerTls | None, admin_methods: Collection[str] = ()
) -> CallerCheck | None:
    """The check a server with ``tls`` installs; None when it has no TLS (no identity can be
    trusted) or, on a server without admin RPCs, no way to tell callers apart (TLS alone).

    A server with admin RPCs refuses to start with TLS but no way to identify callers: the admin
    RPCs would then be open to anyone who can connect, or to no one.
    """
    if tls is None:
        return None
    tokens = TokenTable.read(security.tokens_file) if security.tokens_file is not None else None
    if tokens is None and not tls.client_verify:
        if admin_methods:
            raise SettingsError(
                "with TLS the admin RPCs need a caller identity: turn on client certificates "
                "(STREAMREC_GRPC__CLIENT_VERIFY=true, or client_verify in the SSLConfig) or set "
                "STREAMREC_GRPC__TOKENS_FILE"
            )
        return None
    return CallerCheck(tokens, security.admin_identities, admin_methods, trust_certificates=tls.client_verify)
