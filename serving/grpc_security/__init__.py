"""TLS and caller identity on the project's gRPC hops, built from the ``grpc`` settings section.

* ``credentials``: what a server presents (:class:`ServerTls`, :func:`server_tls`, :func:`listen`)
  and how a client dials (:func:`open_channel`: verifies the server against ``grpc.ca_file``,
  presents its certificate for mutual TLS, sends its bearer token).
* ``ssl_config``: TF Serving's ``--ssl_config_file`` (an ``SSLConfig`` text proto) as a
  :class:`ServerTls`, so the model server takes the same file as ``tensorflow_model_server``.
* ``identity``: who calls (client certificate common name, or bearer token in ``grpc.tokens_file``)
  and the interceptor that keeps the admin RPCs to ``grpc.admin_identities``.
* ``undecodable``: a request that does not parse is INVALID_ARGUMENT, not gRPC's INTERNAL.

Without ``grpc.tls`` every server listens in plaintext and every channel is insecure, as before.
Files are read once, when a server or channel is built; a secret's contents never reach a log
or an error message (errors name the file and the setting).
"""

import grpc

from serving.grpc_security.credentials import ServerTls, channel_credentials, listen, open_channel, server_tls
from serving.grpc_security.identity import CallerCheck, TokenTable, caller_check
from serving.grpc_security.ssl_config import read_ssl_config
from serving.grpc_security.undecodable import RefuseUndecodable

__all__ = [
    "CallerCheck",
    "RefuseUndecodable",
    "ServerTls",
    "TokenTable",
    "caller_check",
    "channel_credentials",
    "listen",
    "open_channel",
    "read_ssl_config",
    "server_interceptors",
    "server_tls",
]


def server_interceptors(check: CallerCheck | None) -> list[grpc.ServerInterceptor]:
    """The interceptors every project server installs: the caller check (when there is one)
    first, so an unknown caller learns nothing about its request, then undecodable requests."""
    return [*([check] if check is not None else []), RefuseUndecodable()]
