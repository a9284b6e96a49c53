"""Request schemas: every rule of the contract's event table, accepted and refused with the
right error location; body parsing helpers; records for the window store."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from app.core.events import PLAUSIBLE_MS, Events, parse_timestamp_ms
from app.schemas import (
    BatchScoreRequest,
    EventIn,
    EventsBatch,
    ModelInfo,
    ScoreResult,
    parse_batch_request,
    parse_event_line,
    parse_events,
    to_record,
    to_records,
)

T0 = 1_714_566_600_000  # 2024-05-01T12:30:00Z


def ev(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"event_id": "e-1", "user_id": "u1", "event_type": "view", "timestamp": T0}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not ...}


def errors(data: dict[str, Any]) -> list[tuple[tuple[Any, ...], str]]:
    with pytest.raises(ValidationError) as info:
        EventIn.model_validate_json(orjson.dumps(data))
    return [(e["loc"], e["type"]) for e in info.value.errors()]


def test_minimal_and_full_event() -> None:
    e = EventIn.model_validate_json(orjson.dumps(ev()))
    assert (e.event_id, e.user_id, e.event_type, e.timestamp, e.timestamp_ms) == ("e-1", "u1", "view", T0, T0)
    full = ev(item_id="i" * 128, category_id="c", session_id="s", device_id="d", country="DE", price=0)
    e = EventIn.model_validate_json(orjson.dumps(full))
    assert e.price == 0.0 and e.item_id == "i" * 128 and e.country == "DE"


@pytest.mark.parametrize("event_id", ["a", "A.b_c:d-9", "x" * 128, "user:42.evt-0001_x"])
def test_event_id_accepted(event_id: str) -> None:
    assert EventIn.model_validate(ev(event_id=event_id)).event_id == event_id


@pytest.mark.parametrize(("event_id", "kind"), [
    ("", "string_too_short"), ("x" * 129, "string_too_long"), ("a b", "string_pattern_mismatch"),
    ("a/b", "string_pattern_mismatch"), ("é", "string_pattern_mismatch"), ("a\n", "string_pattern_mismatch"),
    (12, "string_type"), (..., "missing"),
])
def test_event_id_refused(event_id: Any, kind: str) -> None:
    assert errors(ev(event_id=event_id)) == [(("event_id",), kind)]


@pytest.mark.parametrize(("field", "limit"), [("user_id", 128), ("event_type", 64)])
def test_required_string_lengths(field: str, limit: int) -> None:
    assert getattr(EventIn.model_validate(ev(**{field: "ü" * limit})), field) == "ü" * limit  # any characters
    assert errors(ev(**{field: "x" * (limit + 1)})) == [((field,), "string_too_long")]
    assert errors(ev(**{field: ""})) == [((field,), "string_too_short")]
    assert errors(ev(**{field: ...})) == [((field,), "missing")]
    assert errors(ev(**{field: 7})) == [((field,), "string_type")]  # the contract says string


@pytest.mark.parametrize("field", ["item_id", "category_id", "session_id", "device_id", "country"])
def test_optional_strings(field: str) -> None:
    assert getattr(EventIn.model_validate(ev(**{field: "x" * 128})), field) == "x" * 128
    assert getattr(EventIn.model_validate(ev(**{field: None})), field) is None
    assert errors(ev(**{field: "x" * 129})) == [((field,), "string_too_long")]
    assert errors(ev(**{field: 5})) == [((field,), "string_type")]


@pytest.mark.parametrize(("value", "ms"), [
    (T0, T0),
    (float(T0), T0),
    (str(T0), T0),
    ("2024-05-01T12:30:00Z", T0),
    ("2024-05-01T12:30:00.250Z", T0 + 250),
    ("2024-05-01T14:30:00+02:00", T0),
    ("2024-05-01T07:30:00.5-05:00", T0 + 500),
    ("2024-05-01 12:30:00+00:00", T0),
])
def test_timestamp_accepted(value: Any, ms: int) -> None:
    e = EventIn.model_validate_json(orjson.dumps(ev(timestamp=value)))
    assert e.timestamp == ms
    if isinstance(value, str) and not value.isdigit():  # the offline loaders read it the same way
        assert parse_timestamp_ms(value) == ms


@pytest.mark.parametrize(("value", "kind"), [
    (True, "timestamp_type"),
    (False, "timestamp_type"),
    (1.5, "timestamp_type"),
    (None, "timestamp_type"),
    ([T0], "timestamp_type"),
    ({"ms": T0}, "timestamp_type"),
    ("2024-05-01T12:30:00", "timestamp_naive"),
    ("2024-05-01", "timestamp_naive"),
    ("yesterday", "timestamp_parsing"),
    ("", "timestamp_parsing"),
    ("2024-13-01T00:00:00Z", "timestamp_parsing"),
    (-1, "timestamp_range"),
    ("1969-12-31T23:59:59Z", "timestamp_range"),
    (10**16, "timestamp_range"),
])
def test_timestamp_refused(value: Any, kind: str) -> None:
    assert errors(ev(timestamp=value)) == [(("timestamp",), kind)]


def test_timestamp_errors_explain_themselves() -> None:
    with pytest.raises(ValidationError) as info:
        EventIn.model_validate(ev(timestamp="2024-05-01T12:30:00"))
    assert "offset" in info.value.errors()[0]["msg"]
    with pytest.raises(ValidationError) as info:
        EventIn.model_validate(ev(timestamp=float("nan")))
    assert "whole number" in info.value.errors()[0]["msg"]


def test_price() -> None:
    assert EventIn.model_validate_json(orjson.dumps(ev(price=19))).price == 19.0
    assert EventIn.model_validate_json(orjson.dumps(ev(price=0.5))).price == 0.5
    assert errors(ev(price=-0.01)) == [(("price",), "greater_than_equal")]
    assert errors(ev(price=True)) == [(("price",), "float_type")]
    assert errors(ev(price="1.5")) == [(("price",), "float_type")]
    for bad in (b"NaN", b"Infinity", b"1e400"):
        body = orjson.dumps(ev())[:-1] + b',"price":' + bad + b"}"
        with pytest.raises(ValidationError) as info:
            EventIn.model_validate_json(body)
        assert [(e["loc"], e["type"]) for e in info.value.errors()] == [(("price",), "finite_number")]
    with pytest.raises(ValidationError):
        EventIn.model_validate(ev(price=float("nan")))


def test_unknown_fields_refused_each_with_its_path() -> None:
    got = errors(ev(eventtype="view", label=1))
    assert sorted(got) == [(("eventtype",), "extra_forbidden"), (("label",), "extra_forbidden")]


def test_every_bad_field_reported() -> None:
    got = errors({"event_id": "a b", "user_id": "", "timestamp": True, "price": -1, "x": 1})
    assert sorted(loc for loc, _ in got) == sorted(
        [("event_id",), ("user_id",), ("event_type",), ("timestamp",), ("price",), ("x",)]
    )


def test_batch_count_limits() -> None:
    body = {"events": [ev(event_id=f"e{i}") for i in range(1000)]}
    assert len(EventsBatch.model_validate_json(orjson.dumps(body)).events) == 1000
    body["events"].append(ev(event_id="e1000"))
    with pytest.raises(ValidationError) as info:
        EventsBatch.model_validate_json(orjson.dumps(body))
    err = info.value.errors()[0]
    assert (err["loc"], err["type"], err["ctx"]["max_length"]) == (("events",), "too_long", 1000)
    # The configured limit comes in the validation context.
    small = orjson.dumps({"events": [ev(event_id=f"e{i}") for i in range(3)]})
    with pytest.raises(ValidationError):
        EventsBatch.model_validate_json(small, context={"max_events": 2})
    with pytest.raises(ValidationError) as info:
        EventsBatch.model_validate_json(b'{"events": []}')
    assert info.value.errors()[0]["type"] == "too_short"


def test_count_checked_before_events_are_validated() -> None:
    body = orjson.dumps({"events": [{"bad": i} for i in range(1001)]})
    with pytest.raises(ValidationError) as info:
        EventsBatch.model_validate_json(body)
    assert [e["type"] for e in info.value.errors()] == ["too_long"]


def test_batch_score_request() -> None:
    req = BatchScoreRequest.model_validate({"events": [ev()]})
    assert req.update_windows is False and len(req.events) == 1
    assert BatchScoreRequest.model_validate({"events": [ev()], "update_windows": True}).update_windows
    with pytest.raises(ValidationError):
        BatchScoreRequest.model_validate({"events": [ev()], "update_window": True})
    with pytest.raises(ValidationError):
        BatchScoreRequest.model_validate({"events": [ev(), ev()]}, context={"max_events": 1})


def test_parse_events_single_and_batch() -> None:
    events, batched = parse_events(orjson.dumps(ev(event_type="events")))  # "events" as a value is no batch
    assert not batched and events[0].event_type == "events"
    events, batched = parse_events(orjson.dumps({"events": [ev(event_id="a"), ev(event_id="b")]}))
    assert batched and [e.event_id for e in events] == ["a", "b"]


def locs(exc: RequestValidationError) -> list[tuple[Any, ...]]:
    return [tuple(e["loc"]) for e in exc.errors()]


def test_parse_events_error_locations() -> None:
    with pytest.raises(RequestValidationError) as info:
        parse_events(orjson.dumps({"events": [ev(), ev(timestamp="now", zz=1), {"user_id": "u"}]}))
    assert locs(info.value) == [
        ("body", "events", 1, "timestamp"), ("body", "events", 1, "zz"),
        ("body", "events", 2, "event_id"), ("body", "events", 2, "event_type"), ("body", "events", 2, "timestamp"),
    ]
    with pytest.raises(RequestValidationError) as info:
        parse_events(orjson.dumps(ev(price=-1)))
    assert locs(info.value) == [("body", "price")]
    with pytest.raises(RequestValidationError) as info:
        parse_events(orjson.dumps({"events": [ev()] * 3}), max_events=2)
    assert locs(info.value) == [("body", "events")]
    with pytest.raises(RequestValidationError) as info:
        parse_events(b'{"event_id": ')
    assert info.value.errors()[0]["type"] == "json_invalid"
    assert "line 1 column" in info.value.errors()[0]["msg"]
    with pytest.raises(RequestValidationError) as info:
        parse_events(b"[1, 2]")
    assert locs(info.value) == [("body",)]


def test_parse_batch_request_and_lines() -> None:
    req = parse_batch_request(orjson.dumps({"events": [ev()], "update_windows": True}))
    assert req.update_windows and req.events[0].timestamp == T0
    with pytest.raises(RequestValidationError) as info:
        parse_batch_request(orjson.dumps({"events": [ev()] * 3}), max_events=2)
    assert locs(info.value) == [("body", "events")]
    assert parse_event_line(orjson.dumps(ev()), 0).event_id == "e-1"
    with pytest.raises(RequestValidationError) as info:
        parse_event_line(orjson.dumps(ev(price=-1)), 7)
    assert locs(info.value) == [("body", 7, "price")]


def test_records_feed_the_columnar_events() -> None:
    a = EventIn.model_validate(ev(timestamp="2024-05-01T14:30:00+02:00", item_id="i1", price=3.5))
    b = EventIn.model_validate(ev(event_id="e-2", user_id="u2", timestamp=T0 + 1000))
    rec = to_record(a)
    assert rec == {"event_id": "e-1", "user_id": "u1", "event_type": "view", "timestamp": T0, "item_id": "i1",
                   "price": 3.5}
    assert to_records([a, b]) == [rec, to_record(b)]
    cols = Events.from_records(to_records([a, b]))
    assert cols.timestamp_ms.tolist() == [T0, T0 + 1000]
    assert cols.user_id_strings().tolist() == ["u1", "u2"]
    assert datetime.fromtimestamp(rec["timestamp"] / 1000, UTC).hour == 12


def test_response_models() -> None:
    r = ScoreResult(event_id="e1", user_id="u1", anomaly_probability=0.031, decision="allow",
                    thresholds={"review": 0.5, "block": 0.9}, window_size=17, model_version="v", duplicate=False)
    assert r.model_dump(exclude_none=True) == {
        "event_id": "e1", "user_id": "u1", "anomaly_probability": 0.031, "decision": "allow",
        "thresholds": {"review": 0.5, "block": 0.9}, "window_size": 17, "model_version": "v", "duplicate": False}
    with pytest.raises(ValidationError):
        ScoreResult.model_validate({**r.model_dump(), "decision": "maybe"})
    info = ModelInfo(version="v", architecture="transformer", window=64, thresholds={"review": 0.1, "block": 0.5},
                     provider="CPUExecutionProvider", model_file="model.onnx", bundle="/b", bundle_dir="/b",
                     worker_pid=7, loaded_at="2026-11-30T01:00:00.000Z",
                     vocabulary={"event_types": ["view"], "aliases": {"pv": "view"}})
    assert info.model_dump()["evaluation"] == {}
    assert info.model_dump()["vocabulary"] == {"event_types": ["view"], "aliases": {"pv": "view"},
                                               "deployment_aliases": {}}
    schema = EventIn.model_json_schema()
    assert schema["additionalProperties"] is False
    ms = {"type": "integer", "minimum": PLAUSIBLE_MS[0], "exclusiveMaximum": PLAUSIBLE_MS[1],
          "description": "epoch milliseconds (2000-01-01 to 2100-01-01)"}
    assert ms in schema["properties"]["timestamp"]["anyOf"]
