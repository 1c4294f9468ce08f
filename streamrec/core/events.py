"""Event contracts: the one definition every producer and consumer uses.

Every record is a frozen pydantic model serialised as a JSON object, so that any Kafka client
(``kcat -P`` with a JSON line, confluent-kafka, Faust with a raw value serializer) can produce
and read it. Common fields:

* ``event_id``: unique per event; sinks deduplicate on it, which makes redelivery harmless.
* ``event_time``: when it happened (UTC). Accepts ISO-8601 or epoch seconds on input and is
  always written as ISO-8601.
* ``schema_version``: bumped on an incompatible change; a consumer rejects versions it does not
  know instead of guessing. A new *optional* field (with a default) is not one: records written
  before it still decode, so it stays version 1. Records are ``extra="forbid"``, so a consumer
  older than the field rejects records that carry it: deploy consumers before producers.

Keys: user-keyed topics (interactions, impressions, clicks, labeled) use ``user_id`` as the
Kafka key so that one user's events stay ordered in one partition.

Decoding goes through :func:`decode_event`, which turns every failure (bad bytes, bad JSON,
schema violation, implausible time) into an :class:`EventValidationError` with a reason that
the dead-letter record carries.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator

from streamrec.core.errors import EventValidationError

SCHEMA_VERSION: Literal[1] = 1

NonEmptyId = Annotated[str, Field(min_length=1, max_length=256)]
InteractionKind = Literal["view", "click", "rating", "purchase", "add_to_cart"]
Arm = Literal["stable", "canary"]


class Event(BaseModel):
    """Fields every event carries."""

    model_config = ConfigDict(frozen=True, extra="forbid", str_strip_whitespace=True)

    event_id: NonEmptyId
    event_time: AwareDatetime
    schema_version: Literal[1] = 1

    # pydantic reads epoch seconds (common in logs and kcat lines) as UTC; ISO strings keep
    # their offset, normalised to UTC here so every consumer compares like with like.
    @field_validator("event_time")
    @classmethod
    def _to_utc(cls, value: datetime) -> datetime:
        try:
            return value if value.tzinfo is UTC else value.astimezone(UTC)
        except OverflowError as exc:  # e.g. 0001-01-01T00:00+01:00; pydantic reports only ValueError
            raise ValueError(f"{value.isoformat()} is out of range in UTC") from exc

    def key(self) -> bytes | None:
        """The Kafka key for this event; user-keyed events override it."""
        return None

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


class UserKeyed(Event):
    user_id: NonEmptyId

    def key(self) -> bytes:
        return self.user_id.encode()


class Interaction(UserKeyed):
    """A user did something with an item (the stream the features and trainer learn from)."""

    item_id: NonEmptyId
    kind: InteractionKind = "view"
    rating: float | None = Field(default=None, ge=0, le=10)
    source: str | None = Field(default=None, max_length=64)


class ImpressionItem(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    item_id: NonEmptyId
    score: float
    position: int = Field(ge=0)
    # Interleaved lists: the arm whose model picked this item (``serving/api/interleave.py``), and
    # whether both models had it in their own top k (a click on it then favours neither).
    team: Arm | None = None
    shared: bool | None = None
    # The probability that the serving policy showed this item at this position, given the
    # positions before it (``streamrec/core/exploration.py``); whether exploration drew it. None:
    # not logged (an older producer, an interleaved or fallback list).
    propensity: float | None = Field(default=None, gt=0, le=1)
    explored: bool | None = None
    # Two-stage lists: the retrieval model's score of the item minus the best candidate's, as the
    # ranking model read it (``score`` is then the ranking model's); None: a one-stage list, or the
    # ranking model did not answer.
    retrieval_score: float | None = None


class Impression(UserKeyed):
    """One recommendation response as shown to a user."""

    request_id: NonEmptyId
    arm: Arm
    model_version: int = Field(ge=0)
    items: list[ImpressionItem] = Field(min_length=1)
    # fallback: not the model's personalised answer (cold start or trending); degraded: a
    # dependency (model server, feature store) failed or was too slow for this request.
    fallback: bool = False
    degraded: bool = False
    # How long the API took to answer (the evaluator's latency guardrail reads it).
    serve_latency_ms: float | None = Field(default=None, ge=0)
    # The raw features the model saw, logged so the trainer learns from exactly those.
    features: dict[str, Any] = Field(default_factory=dict)
    # Interleaved lists (items carry a team): the stable version the canary was interleaved with.
    control_version: int | None = Field(default=None, ge=0)
    # Two-stage lists: the ranking model's version that ordered them (None: one-stage).
    ranker_version: int | None = Field(default=None, ge=0)


class Click(UserKeyed):
    """A user clicked an item that a recommendation response showed."""

    request_id: NonEmptyId
    item_id: NonEmptyId
    position: int | None = Field(default=None, ge=0)
    # What the user did with the item ("click", "purchase", ...); None: unknown (older producers).
    kind: InteractionKind | None = None


class LabeledExample(UserKeyed):
    """One shown item with its outcome, emitted when the label window closes.

    Its ``event_id`` is :meth:`id_for` its request and item: the joiner is at-least-once, so after
    a crash it may label an item again, always under the same id; consumers count an id once.
    """

    request_id: NonEmptyId
    item_id: NonEmptyId
    position: int = Field(ge=0)
    arm: Arm
    model_version: int = Field(ge=0)
    score: float
    clicked: bool
    impression_time: AwareDatetime
    click_time: AwareDatetime | None = None
    # The kind of the click that labeled it; None when not clicked or the click's kind is unknown.
    kind: InteractionKind | None = None
    # Copied from the impression: the evaluator's guardrails read them per request.
    fallback: bool = False
    degraded: bool = False
    serve_latency_ms: float | None = Field(default=None, ge=0)
    features: dict[str, Any] = Field(default_factory=dict)
    # Interleaved lists: the team that picked this item, whether both models ranked it in their top
    # k (a tie when clicked), and the stable version of the pair.
    team: Arm | None = None
    shared: bool | None = None
    control_version: int | None = Field(default=None, ge=0)
    # Copied from the impression's item: its probability under the serving policy (the weight
    # denominator of off-policy estimates, ``streamrec.core.ope``) and whether exploration drew it.
    propensity: float | None = Field(default=None, gt=0, le=1)
    explored: bool | None = None
    # Copied from the impression: the retrieval model's score (the ranking model's training input)
    # and the ranking model's version; None for one-stage lists.
    retrieval_score: float | None = None
    ranker_version: int | None = Field(default=None, ge=0)

    @staticmethod
    def id_for(request_id: str, item_id: str) -> str:
        """The stable ``event_id`` of the example of ``item_id`` shown by ``request_id``."""
        return f"label:{request_id}:{item_id}"


class DeadLetter(Event):
    """An input that could not be processed, with everything needed to replay or debug it."""

    source_topic: str
    source_partition: int
    source_offset: int
    reason: str
    error: str
    original_value_b64: str
    original_key_b64: str | None = None

    @classmethod
    def for_raw(
        cls,
        *,
        value: bytes | None,
        key: bytes | None,
        topic: str,
        partition: int,
        offset: int,
        error: EventValidationError | Exception,
        now: datetime | None = None,
    ) -> DeadLetter:
        when = now or datetime.now(UTC)
        reason = error.reason if isinstance(error, EventValidationError) else type(error).__name__
        return cls(
            event_id=f"dlq:{topic}:{partition}:{offset}",
            event_time=when,
            source_topic=topic,
            source_partition=partition,
            source_offset=offset,
            reason=reason,
            error=str(error),
            original_value_b64=base64.b64encode(value or b"").decode(),
            original_key_b64=base64.b64encode(key).decode() if key is not None else None,
        )

    def original_value(self) -> bytes:
        return base64.b64decode(self.original_value_b64)


EventT = TypeVar("EventT", bound=Event)


def json_value(raw: bytes | None, what: str) -> Any:
    """The parsed JSON of a Kafka value, or ``EventValidationError("undecodable", ...)`` naming ``what``."""
    if raw is None:
        raise EventValidationError("undecodable", "the record has no value (tombstone)")
    try:
        return json.loads(raw)
    # ValueError: also integers past Python's digit limit; RecursionError: arrays nested too deep
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise EventValidationError("undecodable", f"{what} is not UTF-8 JSON: {exc}") from exc


def decode_event(
    raw: bytes | None,
    event_type: type[EventT],
    *,
    now: datetime | None = None,
    max_future_skew: timedelta | None = None,
) -> EventT:
    """Decode and validate one Kafka value, or raise ``EventValidationError`` saying why.

    ``max_future_skew``, when given, rejects events whose ``event_time`` is further ahead of
    ``now`` than that: a clock bug upstream must not open windows in the future.
    """
    payload = json_value(raw, "value")
    if not isinstance(payload, dict):
        raise EventValidationError("schema", f"expected a JSON object, got {type(payload).__name__}")
    version = payload.get("schema_version", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise EventValidationError(
            "schema_version",
            f"schema_version {version!r} is not supported (this consumer reads {SCHEMA_VERSION})",
        )
    try:
        event = event_type.model_validate(payload)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise EventValidationError("schema", f"{event_type.__name__} is invalid: {problems}") from exc
    if max_future_skew is not None:
        reference = now or datetime.now(UTC)
        if event.event_time - reference > max_future_skew:
            raise EventValidationError(
                "event_time",
                f"event_time {event.event_time.isoformat()} is more than {max_future_skew} "
                f"ahead of {reference.isoformat()}",
            )
    return event
