"""Errors of the model server, each carrying the gRPC status code TF Serving answers with.

ModelServerError (streamrec.core.errors.StreamrecError)      code
├── NotFound            unknown model / version / label  NOT_FOUND
├── InvalidArgument     bad inputs, signature or config  INVALID_ARGUMENT
├── FailedPrecondition  a label names an unloaded version FAILED_PRECONDITION
├── PermissionDenied    a reload points outside the root  PERMISSION_DENIED
└── Unavailable         the server is stopping           UNAVAILABLE

Messages follow TF Serving's wording where it has one (for example "Servable not found for
request: Specific(streamrec, 7)"), so logs and clients read the same against either server.
The client raises ``ModelServerRpcError`` (in ``serving.model_client``) for failed RPCs.
"""

from __future__ import annotations

import grpc

from streamrec.core.errors import StreamrecError


class ModelServerError(StreamrecError):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(ModelServerError):
    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(ModelServerError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(ModelServerError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(ModelServerError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(ModelServerError):
    code = grpc.StatusCode.UNAVAILABLE
