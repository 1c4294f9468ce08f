"""Checks on ``RecommendRequest`` and ``SimilarItemsRequest`` that answer INVALID_ARGUMENT, naming the fix.

Kept apart from the handlers so the rules are unit-tested without a server. The size check is
on the serialized request: gRPC's own receive limit answers RESOURCE_EXHAUSTED (and only at
megabytes), while an oversized request here is the caller's mistake, so it gets
INVALID_ARGUMENT like every other bad input (gRPC's limit, ``api.max_receive_bytes``, stays far
above it). The context map is bounded in entries and in key and value length. Ids are stripped
of surrounding blanks; item id lists are checked id by id (an empty id is a caller's bug, never
"no item") and de-duplicated in order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from serving.api.errors import InvalidRequest
from serving.api.settings import ApiSection


@dataclass(frozen=True)
class ValidRequest:
    """A ``RecommendRequest`` that passed every check, with its defaults applied."""

    user_id: str
    k: int
    exclude_seen: bool
    context: dict[str, str]
    exclude_item_ids: tuple[str, ...] = ()
    # None: rank the whole catalog; a tuple: rank only these (never empty)
    candidate_item_ids: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ValidSimilarRequest:
    """A ``SimilarItemsRequest`` that passed every check, with its defaults applied."""

    item_id: str
    k: int
    exclude_item_ids: tuple[str, ...] = ()


def validate(request: Any, limits: ApiSection) -> ValidRequest:
    """Return the checked ``RecommendRequest``, or raise ``InvalidRequest`` saying what is wrong."""
    _check_size(request, limits)
    user_id = request.user_id.strip()
    if not user_id:
        raise InvalidRequest("user_id is empty; pass the id of the user to recommend for")
    if len(user_id) > limits.max_user_id_chars:
        raise InvalidRequest(f"user_id has {len(user_id)} characters, above the limit of {limits.max_user_id_chars}")
    candidates = item_ids("candidate_item_ids", request.candidate_item_ids, limits.max_candidate_items, limits)
    return ValidRequest(
        user_id=user_id,
        k=_k(request.k, limits),
        exclude_seen=request.exclude_seen,
        context=_context(request.context, limits),
        exclude_item_ids=item_ids("exclude_item_ids", request.exclude_item_ids, limits.max_exclude_items, limits),
        candidate_item_ids=candidates or None,
    )


def validate_similar(request: Any, limits: ApiSection) -> ValidSimilarRequest:
    """Return the checked ``SimilarItemsRequest``, or raise ``InvalidRequest`` saying what is wrong."""
    _check_size(request, limits)
    item_id = request.item_id.strip()
    if not item_id:
        raise InvalidRequest("item_id is empty; pass the id of the item to find similar items for")
    if len(item_id) > limits.max_item_id_chars:
        raise InvalidRequest(f"item_id has {len(item_id)} characters, above the limit of {limits.max_item_id_chars}")
    return ValidSimilarRequest(
        item_id=item_id,
        k=_k(request.k, limits),
        exclude_item_ids=item_ids("exclude_item_ids", request.exclude_item_ids, limits.max_exclude_items, limits),
    )


def item_ids(field: str, values: Sequence[str], max_count: int, limits: ApiSection) -> tuple[str, ...]:
    """``values`` checked (non-empty, not too long, not too many) and de-duplicated in order."""
    if len(values) > max_count:
        raise InvalidRequest(f"{field} has {len(values)} ids, above the limit of {max_count}; send fewer")
    unique: dict[str, None] = {}
    for position, raw in enumerate(values):
        value = raw.strip()  # as user_id and item_id are
        if not value:
            raise InvalidRequest(f"{field}[{position}] is empty; every item id must be non-empty")
        if len(value) > limits.max_item_id_chars:
            raise InvalidRequest(
                f"{field}[{position}] has {len(value)} characters, above the limit of {limits.max_item_id_chars}"
            )
        unique.setdefault(value, None)
    return tuple(unique)


def _context(context: Any, limits: ApiSection) -> dict[str, str]:
    """The request's context map, within the entry count and the key and value lengths."""
    if len(context) > limits.max_context_entries:
        raise InvalidRequest(
            f"context has {len(context)} entries, above the limit of {limits.max_context_entries}; send fewer"
        )
    for key, value in context.items():
        if len(key) > limits.max_context_chars:
            raise InvalidRequest(
                f"context key {key[:32]!r}... has {len(key)} characters, above the limit of {limits.max_context_chars}"
            )
        if len(value) > limits.max_context_chars:
            raise InvalidRequest(
                f"context[{key[:32]!r}] has {len(value)} characters, above the limit of {limits.max_context_chars}"
            )
    return dict(context)


def _check_size(request: Any, limits: ApiSection) -> None:
    size = request.ByteSize()
    if size > limits.max_request_bytes:
        raise InvalidRequest(
            f"request is {size} bytes, above the limit of {limits.max_request_bytes}; "
            "send a shorter context or fewer item ids"
        )


def _k(requested: int, limits: ApiSection) -> int:
    k = requested if requested != 0 else limits.default_k
    if k < 0:
        raise InvalidRequest(f"k must be positive (1..{limits.max_k}), got {requested}")
    if k > limits.max_k:
        raise InvalidRequest(f"k must be at most {limits.max_k}, got {requested}")
    return k
