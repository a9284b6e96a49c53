"""Request and response bodies of the service (pydantic v2).

Validation runs per event at thousands of events/s, so every rule but the timestamp is a
pydantic-core constraint (checked in Rust); the timestamp needs one small Python function.

The number of events in a body is checked before its events are validated, against
``context={"max_events": n}`` given to ``model_validate_json`` (the routes pass the
configured limit); without a context the defaults of ``Settings`` apply. ``parse_events``
and ``parse_batch_request`` do this and turn errors into ``RequestValidationError``, with
locations in the body, as FastAPI's own validation would.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError, PydanticKnownError

#: Default limits, equal to those of ``Settings`` (``max_events_per_request``, ``batch_max_events``).
MAX_EVENTS = 1000
BATCH_MAX_EVENTS = 100_000
#: Latest timestamp accepted: 9999-12-31T23:59:59.999Z. Negative epochs are refused too.
MAX_TIMESTAMP_MS = 253_402_300_799_999


def _timestamp_ms(value: Any) -> int:
    """Epoch milliseconds from epoch milliseconds (int, integral float, digit string) or an
    RFC 3339 string with an offset. Aware strings give what ``events.parse_timestamp_ms``
    gives, so the online and offline paths agree; naive strings are refused here (the
    offline loaders read them as UTC, a request must say what it means)."""
    if type(value) is int:
        ms = value
    elif isinstance(value, bool) or not isinstance(value, int | float | str):
        raise PydanticCustomError("timestamp_type", "timestamp must be an RFC 3339 string or epoch milliseconds")
    elif isinstance(value, int):
        ms = int(value)
    elif isinstance(value, float):
        if not value.is_integer():  # also NaN and ±inf
            raise PydanticCustomError("timestamp_type", "timestamp in epoch milliseconds must be a whole number")
        ms = int(value)
    elif value.isascii() and value.isdigit():
        ms = int(value)
    else:
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            raise PydanticCustomError(
                "timestamp_parsing", "timestamp is not RFC 3339 (e.g. 2024-05-01T12:30:00Z) or epoch milliseconds"
            ) from None
        if dt.tzinfo is None:
            raise PydanticCustomError(
                "timestamp_naive", "timestamp has no UTC offset: add 'Z' or '+hh:mm' (RFC 3339)"
            )
        ms = round(dt.timestamp() * 1000)
    if not 0 <= ms <= MAX_TIMESTAMP_MS:
        raise PydanticCustomError("timestamp_range", "timestamp is out of range (1970-01-01 .. 9999-12-31)")
    return ms


EventId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")]
UserId = Annotated[str, StringConstraints(min_length=1, max_length=128)]
EventType = Annotated[str, StringConstraints(min_length=1, max_length=64)]
OptionalStr = Annotated[str, StringConstraints(max_length=128)] | None
TimestampMs = Annotated[
    int,
    BeforeValidator(_timestamp_ms),
    WithJsonSchema(
        {"anyOf": [{"type": "string", "format": "date-time"},
                   {"type": "integer", "minimum": 0, "description": "epoch milliseconds"}]},
        mode="validation",
    ),
]
Price = Annotated[float, Field(ge=0, allow_inf_nan=False, strict=True)] | None  # strict: no bools, no strings


class EventIn(BaseModel):
    """One event as the contract defines it; ``timestamp`` is normalised to epoch ms."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    event_id: EventId
    user_id: UserId
    event_type: EventType
    timestamp: TimestampMs
    item_id: OptionalStr = None
    category_id: OptionalStr = None
    session_id: OptionalStr = None
    device_id: OptionalStr = None
    country: OptionalStr = None
    price: Price = None

    @property
    def timestamp_ms(self) -> int:
        return self.timestamp


def _check_count(value: Any, info: ValidationInfo, default: int) -> Any:
    """Refuse too many events before validating any of them (a 'before' validator)."""
    limit = (info.context or {}).get("max_events", default)
    if isinstance(value, list) and len(value) > limit:
        raise PydanticKnownError("too_long", {"field_type": "List", "max_length": limit, "actual_length": len(value)})
    return value


class EventsBatch(BaseModel):
    """``{"events": [...]}``: 1 to ``max_events`` events (context; default 1000)."""

    model_config = ConfigDict(extra="forbid")

    events: Annotated[list[EventIn], Field(min_length=1)]

    @field_validator("events", mode="before")
    @classmethod
    def _count(cls, v: Any, info: ValidationInfo) -> Any:
        return _check_count(v, info, MAX_EVENTS)


class BatchScoreRequest(BaseModel):
    """Body of ``POST /batch-score``: 1 to ``max_events`` events (context; default 100,000)."""

    model_config = ConfigDict(extra="forbid")

    events: Annotated[list[EventIn], Field(min_length=1)]
    update_windows: bool = False

    @field_validator("events", mode="before")
    @classmethod
    def _count(cls, v: Any, info: ValidationInfo) -> Any:
        return _check_count(v, info, BATCH_MAX_EVENTS)


# Responses ----------------------------------------------------------------------------

Decision = Literal["allow", "review", "block"]


class Thresholds(BaseModel):
    review: float
    block: float


class Reason(BaseModel):
    """An event of the window and how surprising the model found it."""

    event_id: str
    event_type: str
    timestamp: int = Field(description="epoch milliseconds")
    surprise: float


class ScoreResult(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    event_id: str
    user_id: str
    anomaly_probability: float
    decision: Decision
    thresholds: Thresholds
    window_size: int
    model_version: str
    duplicate: bool = False
    reasons: list[Reason] | None = Field(None, description="with ?explain=true only")


class ScoreResults(BaseModel):
    results: list[ScoreResult]


class BatchScoreResult(BaseModel):
    event_id: str
    user_id: str
    anomaly_probability: float
    decision: Decision


class BatchScoreResults(BaseModel):
    results: list[BatchScoreResult]


class Vocabulary(BaseModel):
    """The event types the served model knows, and the names it takes for them."""

    event_types: list[str] = Field(description="the model's event types; any other type is scored with the "
                                               "out-of-vocabulary id")
    aliases: dict[str, str] = Field(description="event type name (lower case) → type, applied first: the "
                                                "bundle's table with the deployment's aliases on top")
    deployment_aliases: dict[str, str] = Field(default_factory=dict,
                                               description="this deployment's aliases (SEQGUARD_EVENT_ALIASES)")


class ModelInfo(BaseModel):
    """``GET /model``: the loaded bundle and how it is served."""

    model_config = ConfigDict(protected_namespaces=())

    version: str
    architecture: str
    window: int
    thresholds: Thresholds
    provider: str = Field(description="execution provider in use, e.g. CUDAExecutionProvider")
    fp16: bool = False
    created_at: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict, description="architecture hyperparameters")
    evaluation: dict[str, Any] = Field(default_factory=dict, description="the bundle's evaluation summary")
    vocabulary: Vocabulary


# Parsing helpers ----------------------------------------------------------------------

_EVENTS_LIST = TypeAdapter(list[EventIn])


def _body_kind(v: Any) -> str:
    return "batch" if isinstance(v, dict) and "events" in v else "event"


# A single event never has an "events" key (extra fields are refused), so the key picks
# the model and errors come from that model alone. The tag is the first element of each
# error location; parse_events strips it.
_EVENTS_BODY: TypeAdapter[EventsBatch | EventIn] = TypeAdapter(
    Annotated[Annotated[EventsBatch, Tag("batch")] | Annotated[EventIn, Tag("event")], Discriminator(_body_kind)]
)


def to_record(e: EventIn) -> dict[str, Any]:
    """The contract dict of an event (``timestamp`` in epoch ms, absent fields left out):
    what the window store and ``Events.from_records`` take."""
    return e.model_dump(exclude_none=True)


def to_records(events: list[EventIn]) -> list[dict[str, Any]]:
    """``to_record`` over a list, in one pydantic-core call."""
    return _EVENTS_LIST.dump_python(events, exclude_none=True)  # type: ignore[no-any-return]


def parse_events(body: bytes | str, *, max_events: int = MAX_EVENTS) -> tuple[list[EventIn], bool]:
    """Body of ``POST /events``: one event, or ``{"events": [...]}``.

    Returns the events and whether the body was a batch (answer with ``results``).
    Raises ``RequestValidationError`` with locations like ``("body", "events", 3, "timestamp")``.
    """
    try:
        body_obj = _EVENTS_BODY.validate_json(body, context={"max_events": max_events})
    except ValidationError as exc:
        raise request_validation_error(exc, strip=1) from None
    if isinstance(body_obj, EventsBatch):
        return body_obj.events, True
    return [body_obj], False


def parse_batch_request(body: bytes | str, *, max_events: int = BATCH_MAX_EVENTS) -> BatchScoreRequest:
    """Body of ``POST /batch-score`` (JSON form). Raises ``RequestValidationError``."""
    try:
        return BatchScoreRequest.model_validate_json(body, context={"max_events": max_events})
    except ValidationError as exc:
        raise request_validation_error(exc) from None


def parse_event_line(line: bytes | str, index: int) -> EventIn:
    """One NDJSON line; errors are located at ``("body", index, ...)`` (``$[index]...``)."""
    try:
        return EventIn.model_validate_json(line)
    except ValidationError as exc:
        raise request_validation_error(exc, ("body", index)) from None


_BOOL = TypeAdapter(bool)


def query_flag(params: Mapping[str, str], name: str) -> bool:
    """A boolean query parameter (``true``/``false``, ``1``/``0``, ``yes``/``no``,
    ``on``/``off``; absent = false), refused like FastAPI's own query parameters."""
    raw = params.get(name)
    if raw is None:
        return False
    try:
        return _BOOL.validate_python(raw)
    except ValidationError as exc:
        raise request_validation_error(exc, ("query", name)) from None


def request_validation_error(
    exc: ValidationError, prefix: tuple[str | int, ...] = ("body",), *, strip: int = 0
) -> RequestValidationError:
    """FastAPI's error for a pydantic error raised while validating (part of) the body:
    each location gets ``prefix`` in front, after dropping its first ``strip`` elements."""
    errors = exc.errors(include_url=False, include_input=False)
    for err in errors:
        err["loc"] = (*prefix, *err["loc"][strip:])
    return RequestValidationError(errors)
