"""Errors of the recommendation API, each naming what to do about it.

StreamrecError
└── ApiError
    ├── ApiSetupError        the API cannot start (generated code, feature store, ports): fix and restart
    └── InvalidRequest       the caller's request is malformed; answered with INVALID_ARGUMENT
"""

from __future__ import annotations

from streamrec.core.errors import StreamrecError


class ApiError(StreamrecError):
    """Base of the recommendation API's own errors."""


class ApiSetupError(ApiError):
    """The API cannot start or run as configured; the message names the fix."""


class InvalidRequest(ApiError):
    """A request the API refuses; the message is returned to the caller as is."""
