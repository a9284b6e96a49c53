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
from typing import Annotated, Any, Literal

import orjson
from fastapi.exceptions import RequestValidationError
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PlainValidator,
    Strict,
    StringConstraints,
    Tag,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)
from pydantic_core import PydanticCustomError, PydanticKnownError

from app.core.events import PLAUSIBLE_MS, TimestampError, may_repeat_keys, parse_timestamp_ms, repeated_keys

#: Default limits, equal to those of ``Settings`` (``max_events_per_request``, ``batch_max_events``).
MAX_EVENTS = 1000
BATCH_MAX_EVENTS = 100_000


class Rfc3339Ms(int):
    """Epoch milliseconds of a timestamp sent as an RFC 3339 date-time: an ``int`` like any
    other (records, the window store keep only the number), that remembers the form it
    came in, so that an answer can give times back in it (``reasons``)."""

    __slots__ = ()


def _timestamp_ms(value: Any) -> int:
    """``events.parse_timestamp_ms`` with its plausible window: the one grammar of every
    path, its errors as pydantic errors of the same type and message. A date-time string
    gives an :class:`Rfc3339Ms`; a number or a string of digits, a plain ``int``."""
    try:
        ms = parse_timestamp_ms(value, check_range=True)
    except TimestampError as e:
        raise PydanticCustomError(e.kind, str(e)) from None
    return Rfc3339Ms(ms) if isinstance(value, str) and not value.isdigit() else ms


EventId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")]
UserId = Annotated[str, StringConstraints(min_length=1, max_length=128)]
EventType = Annotated[str, StringConstraints(min_length=1, max_length=64)]
OptionalStr = Annotated[str, StringConstraints(max_length=128)] | None
# Plain: the function's int (an Rfc3339Ms kept as such) is the value; it only returns ints.
TimestampMs = Annotated[
    int,
    PlainValidator(_timestamp_ms),
    WithJsonSchema(
        {"anyOf": [{"type": "string", "format": "date-time"},
                   {"type": "integer", "minimum": PLAUSIBLE_MS[0], "exclusiveMaximum": PLAUSIBLE_MS[1],
                    "description": "epoch milliseconds (2000-01-01 to 2100-01-01)"}]},
        mode="validation",
    ),
]
#: Largest price: the float32 the featurizer stores it in (a larger one would overflow to inf).
MAX_PRICE = 3.4028234663852886e38
# strict: no bools, no strings
Price = Annotated[float, Field(ge=0, le=MAX_PRICE, allow_inf_nan=False, strict=True)] | None


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

    @property
    def timestamp_rfc3339(self) -> bool:
        """Whether ``timestamp`` came as an RFC 3339 date-time (else as epoch milliseconds)."""
        return type(self.timestamp) is Rfc3339Ms


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
    update_windows: Annotated[bool, Strict()] = False  # true/false only: 0 is not false

    @field_validator("events", mode="before")
    @classmethod
    def _count(cls, v: Any, info: ValidationInfo) -> Any:
        return _check_count(v, info, BATCH_MAX_EVENTS)


# Responses ----------------------------------------------------------------------------

Decision = Literal["allow", "review", "block"]


class Thresholds(BaseModel):
    review: float
    block: float


class ReasonCode(BaseModel):
    """One (event, feature) pair of the window with a large share of surprise
    (``app.core.reasons.REASON_CODES``)."""

    code: str = Field(description="stable: UNUSUAL_EVENT_TYPE, UNUSUAL_GAP, UNUSUAL_DEVICE_CHANGE, ...")
    feature: str
    event_id: str | None
    event_type: str
    timestamp: int | Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]
    contribution: float = Field(description="nats of the event's surprise due to this feature")


class Reason(BaseModel):
    """An event of the window and how surprising the model found it."""

    event_id: str
    event_type: str
    timestamp: int | Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})] = Field(
        description="the event's time, in the form of the timestamp of the request's event being scored: epoch "
                    "milliseconds (an integer) if that timestamp was a number (or a string of digits), an RFC 3339 "
                    "date-time in UTC to the millisecond (2017-11-25T08:01:10.000Z) if it was a date-time string")
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
    reason_codes: list[ReasonCode] | None = Field(None, description="with ?explain=true only, where the bundle "
                                                                    "gives per-feature surprise (docs/DESIGN.md, "
                                                                    "\"Reason codes\")")


class ScoreResults(BaseModel):
    results: list[ScoreResult]


class BatchScoreResult(BaseModel):
    event_id: str
    user_id: str
    anomaly_probability: float
    decision: Decision
    duplicate: bool = Field(False, description="present, true, on a repeat of an earlier (user_id, event_id) of "
                                               "the request: its first answer, and it joined no window")


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


class ShadowInfo(BaseModel):
    """The shadow model a worker runs beside the live one (``GET /model``)."""

    model_config = ConfigDict(protected_namespaces=())

    version: str
    architecture: str
    thresholds: Thresholds
    provider: str
    bundle: str
    loaded_at: str = Field(description="when this worker loaded it (RFC 3339, UTC)")


class ModelInfo(BaseModel):
    """``GET /model``: the loaded bundle and how it is served."""

    model_config = ConfigDict(protected_namespaces=())

    version: str
    architecture: str
    window: int
    thresholds: Thresholds
    provider: str = Field(description="execution provider in use, e.g. CUDAExecutionProvider")
    precision: str = Field("fp32", description="what the session runs: fp32, fp16 or int8 (SEQGUARD_PRECISION, "
                                               "where the bundle has that file)")
    fp16: bool = Field(False, description="the session runs model.fp16.onnx (deprecated: see precision)")
    model_file: str = Field(description="the bundle's model file the session runs: model.onnx, model.fp16.onnx or "
                                        "model.int8.onnx")
    bundle: str = Field(description="the bundle directory this worker loaded, as named (SEQGUARD_BUNDLE or "
                                    "POST /admin/model)")
    bundle_dir: str = Field(description="the directory that path led to when this worker loaded it (symlinks "
                                        "followed)")
    loaded_at: str = Field(description="when this worker loaded it (RFC 3339, UTC)")
    worker_pid: int = Field(description="the worker process that answered (each worker answers for itself)")
    created_at: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict, description="architecture hyperparameters")
    evaluation: dict[str, Any] = Field(default_factory=dict, description="the bundle's evaluation summary")
    vocabulary: Vocabulary
    shadow: ShadowInfo | None = Field(None, description="the shadow model scoring the same windows after each "
                                                        "answer (app/shadow.py); null: none")


class ModelChange(BaseModel):
    """``POST /admin/model``: the bundle to serve now, as the live model or as its shadow,
    in every worker and replica on this Redis; or the shadow made live. The path is read by
    the service's own processes (a path on their host).

    - ``{"bundle": DIR}``: serve DIR (``"role": "live"``, the default);
    - ``{"bundle": DIR, "role": "shadow"}``: DIR scores the live windows after each answer;
    - ``{"bundle": null, "role": "shadow"}``: stop shadowing;
    - ``{"promote": true}``: the shadow becomes the live model (no shadow after).
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    bundle: str | None = Field(None, min_length=1, max_length=4096,
                               description="bundle directory, as the workers see it; null with role shadow: "
                                           "stop shadowing")
    role: Literal["live", "shadow"] = Field("live", description="serve the bundle as the live model or as its "
                                                                "shadow")
    promote: bool = Field(False, description="make the shadow the live model (no bundle, no role)")


class ModelChanged(BaseModel):
    """The answer of ``POST /admin/model``: what this worker serves now in ``role``."""

    model_config = ConfigDict(protected_namespaces=())

    role: Literal["live", "shadow"] = Field(description="the role changed (promote: live)")
    version: str | None = Field(description="the model now in that role (model_version of the answers the live "
                                            "one gives); null: no shadow any more")
    previous: str | None = Field(description="the model in that role before (null: none)")
    bundle: str | None
    workers_follow_within_s: float = Field(description="the other workers and replicas follow within this time "
                                                       "(SEQGUARD_MODEL_POLL_S)")


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
    """Body of ``POST /events``: one event, or ``{"events": [...]}``; a leading UTF-8 BOM is
    skipped, a key given twice in one object is refused.

    Returns the events and whether the body was a batch (answer with ``results``).
    Raises ``RequestValidationError`` with locations like ``("body", "events", 3, "timestamp")``.
    """
    body = without_bom(body)
    try:
        body_obj = _EVENTS_BODY.validate_json(body, context={"max_events": max_events})
    except ValidationError as exc:
        raise request_validation_error(exc, strip=1, body=body) from None
    if isinstance(body_obj, EventsBatch):
        _refuse_repeated_keys(body)
        return body_obj.events, True
    _refuse_repeated_keys(body)
    return [body_obj], False


def parse_batch_request(body: bytes | str, *, max_events: int = BATCH_MAX_EVENTS) -> BatchScoreRequest:
    """Body of ``POST /batch-score`` (JSON form), read as :func:`parse_events` reads one.
    Raises ``RequestValidationError``."""
    body = without_bom(body)
    try:
        req = BatchScoreRequest.model_validate_json(body, context={"max_events": max_events})
    except ValidationError as exc:
        raise request_validation_error(exc, body=body) from None
    _refuse_repeated_keys(body)
    return req


def parse_model_change(body: bytes | str) -> ModelChange:
    """Body of ``POST /admin/model``, read as :func:`parse_events` reads one (a repeated key
    refused). Raises ``RequestValidationError``."""
    body = without_bom(body)
    try:
        req = ModelChange.model_validate_json(body)
    except ValidationError as exc:
        raise request_validation_error(exc, body=body) from None
    _refuse_repeated_keys(body)
    fields = orjson.loads(body).keys()
    errors = []
    if req.promote:
        errors = [{"type": "value_error", "loc": ("body", k), "input": getattr(req, k),
                   "msg": f"{k} cannot be given with promote (promote makes the shadow live)"}
                  for k in ("bundle", "role") if k in fields]
    elif "bundle" not in fields:
        errors = [{"type": "missing", "loc": ("body", "bundle"), "input": None,
                   "msg": "bundle is required: the directory to serve"
                          + (", or null to stop shadowing" if req.role == "shadow" else ", unless promote is true")}]
    elif req.role == "live" and req.bundle is None:
        errors = [{"type": "value_error", "loc": ("body", "bundle"), "input": None,
                   "msg": "bundle must name a directory for the live role (null stops a shadow, with role shadow)"}]
    if errors:
        raise RequestValidationError(errors)
    return req


def parse_event_line(line: bytes | str, index: int) -> EventIn:
    """One NDJSON line; errors are located at ``("body", index, ...)`` (``$[index]...``).
    A UTF-8 BOM is skipped on the first line (``index`` 0), the start of the body."""
    if index == 0:
        line = without_bom(line)
    try:
        event = EventIn.model_validate_json(line)
    except ValidationError as exc:
        error = request_validation_error(exc, ("body", index), body=line)
        for err in error.errors():
            # A line that is not JSON is one bad line of the stream, listed with the others
            # (422, at $[index]), not a malformed body (400): its position is within the line.
            if err.get("type") == "json_invalid":
                err["type"] = "json_invalid_line"
                err["msg"] = f"not valid JSON: {(err.get('ctx') or {}).get('error') or err['msg']}"
        raise error from None
    _refuse_repeated_keys(line, ("body", index))
    return event


# Repeated keys ------------------------------------------------------------------------
# JSON leaves repeated keys to the parser, and pydantic's (like orjson) keeps the last one:
# {"user_id": "a", "user_id": "b"} would be stored for "b". A body is refused when any
# object in it repeats a key: app.core.events.may_repeat_keys proves cheaply that none does
# for almost every body, and the others get the exact check (app.core.events.repeated_keys).

_BOM = b"\xef\xbb\xbf"


def without_bom(text: bytes | str) -> bytes | str:
    """``text`` without a leading UTF-8 byte order mark (bytes ``EF BB BF``, or U+FEFF)."""
    if isinstance(text, bytes):
        return text[3:] if text.startswith(_BOM) else text
    return text[1:] if text.startswith("\ufeff") else text


def _refuse_repeated_keys(body: bytes | str, prefix: tuple[str | int, ...] = ("body",)) -> None:
    raw = body.encode() if isinstance(body, str) else body
    if may_repeat_keys(raw) and (errors := repeated_key_errors(raw, prefix)):
        raise RequestValidationError(errors)


def repeated_key_errors(raw: bytes | str, prefix: tuple[str | int, ...] = ("body",)) -> list[dict[str, Any]]:
    """Errors (FastAPI's shape, type ``duplicate_key``) locating every key that an object
    of the JSON text ``raw`` repeats, e.g. ``("body", "events", 2, "user_id")``; ``[]``
    when none does or the text is no JSON at all (its parser says so)."""
    return [{"type": "duplicate_key", "loc": (*prefix, *loc),
             "msg": f"key {loc[-1]!r} is given more than once in this object"} for loc in repeated_keys(raw)]


def _query_bool(value: Any) -> Any:
    return {"true": True, "false": False}.get(value, value) if isinstance(value, str) else value


#: A boolean query parameter: ``true`` or ``false``, nothing else (the OpenAPI type).
QueryFlag = Annotated[bool, BeforeValidator(_query_bool), Strict()]
_BOOL: TypeAdapter[bool] = TypeAdapter(QueryFlag)


def query_flag(params: Mapping[str, str], name: str) -> bool:
    """A boolean query parameter (``true``/``false`` only; absent = false), refused like
    FastAPI's own query parameters."""
    raw = params.get(name)
    if raw is None:
        return False
    try:
        return _BOOL.validate_python(raw)
    except ValidationError as exc:
        raise request_validation_error(exc, ("query", name)) from None


def request_validation_error(
    exc: ValidationError, prefix: tuple[str | int, ...] = ("body",), *, strip: int = 0,
    body: bytes | str | None = None,
) -> RequestValidationError:
    """FastAPI's error for a pydantic error raised while validating (part of) the body:
    each location gets ``prefix`` in front, after dropping its first ``strip`` elements.
    With the ``body``, keys it repeats are listed too (:func:`repeated_key_errors`)."""
    errors: list[Any] = exc.errors(include_url=False, include_input=False)
    for err in errors:
        err["loc"] = (*prefix, *err["loc"][strip:])
    if body is not None:
        errors += repeated_key_errors(body, prefix)
    return RequestValidationError(errors)
