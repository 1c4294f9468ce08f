"""Answer a request that does not parse with INVALID_ARGUMENT, not gRPC's INTERNAL.

grpcio runs a method's request deserializer before the handler and answers INTERNAL
("Exception deserializing request!") when it raises, so a client sending garbage bytes (or a
string field that is not UTF-8) would read the server's answer as a server bug. The
:class:`RefuseUndecodable` interceptor gives every unary-request method a deserializer that
never raises and a behaviour that refuses what did not parse, naming the message type.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc


class _Undecodable:
    """What the lenient deserializer returns for bytes that are not the request message."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _lenient(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError, and others on odd input
            return _Undecodable(type(exc).__name__)

    return deserialize


class RefuseUndecodable(grpc.ServerInterceptor):
    """Unary-request methods answer INVALID_ARGUMENT to a request that does not parse."""

    def intercept_service(
        self, continuation: Callable[[Any], grpc.RpcMethodHandler[Any, Any] | None], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method: str = details.method
        for kind, wrap in (
            ("unary_unary", grpc.unary_unary_rpc_method_handler),
            ("unary_stream", grpc.unary_stream_rpc_method_handler),
        ):
            behaviour = getattr(handler, kind)
            if behaviour is None:
                continue

            def checked(request: Any, context: grpc.ServicerContext, _behaviour: Any = behaviour) -> Any:
                if isinstance(request, _Undecodable):
                    context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"the request to {method} is not a valid message of its type ({request.reason})",
                    )
                return _behaviour(request, context)

            return wrap(
                checked,
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler  # streaming requests keep gRPC's own handling
