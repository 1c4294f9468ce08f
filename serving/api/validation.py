"""Checks on a ``RecommendRequest`` that answer INVALID_ARGUMENT, with a message that names the fix.

Kept apart from the handler so the rules are unit-tested without a server. The size check is
on the serialized request: gRPC's own receive limit answers RESOURCE_EXHAUSTED (and only at
megabytes), while an oversized request here is the caller's mistake, so it gets
INVALID_ARGUMENT like every other bad input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from serving.api.errors import InvalidRequest
from serving.api.settings import ApiSection


@dataclass(frozen=True)
class ValidRequest:
    """A request that passed every check, with its defaults applied."""

    user_id: str
    k: int
    exclude_seen: bool
    context: dict[str, str]


def validate(request: Any, limits: ApiSection) -> ValidRequest:
    """Return the checked request, or raise ``InvalidRequest`` saying what is wrong."""
    size = request.ByteSize()
    if size > limits.max_request_bytes:
        raise InvalidRequest(
            f"request is {size} bytes, above the limit of {limits.max_request_bytes}; send a shorter user_id/context"
        )
    user_id = request.user_id.strip()
    if not user_id:
        raise InvalidRequest("user_id is empty; pass the id of the user to recommend for")
    if len(user_id) > limits.max_user_id_chars:
        raise InvalidRequest(f"user_id has {len(user_id)} characters, above the limit of {limits.max_user_id_chars}")
    k = request.k if request.k != 0 else limits.default_k
    if k < 0:
        raise InvalidRequest(f"k must be positive (1..{limits.max_k}), got {request.k}")
    if k > limits.max_k:
        raise InvalidRequest(f"k must be at most {limits.max_k}, got {request.k}")
    return ValidRequest(user_id=user_id, k=k, exclude_seen=request.exclude_seen, context=dict(request.context))
