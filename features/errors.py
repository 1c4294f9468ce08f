"""Errors of the feature store helpers, each naming the fix.

StreamrecError (streamrec.core.errors)
└── FeaturesError              the feature store is not set up or cannot be reached
    └── PushValidationError    a frame handed to a push helper has the wrong columns or types
"""

from __future__ import annotations

from streamrec.core.errors import StreamrecError


class FeaturesError(StreamrecError):
    """The feature store is missing something (run ``streamrec features setup``) or is unreachable."""


class PushValidationError(FeaturesError):
    """A frame to push does not match its stream view; nothing of it was written."""
