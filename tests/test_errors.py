"""Problem details: a tiny app with ``install()`` and real requests through TestClient."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import orjson
import pytest
from fastapi import FastAPI, HTTPException, Request
from starlette.exceptions import StarletteDeprecationWarning
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from app import errors
from app.errors import (
    Forbidden,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    ServiceUnavailable,
    Unauthorized,
    json_path,
)
from app.schemas import EventIn, EventsBatch, parse_events

with warnings.catch_warnings():  # Starlette asks for httpx2 over httpx; the venv has httpx
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

PROBLEM = "application/problem+json"


def make_app() -> FastAPI:
    app = FastAPI()
    errors.install(app, errors.Problems(retry_after_s=7))
    statuses: list[int] = []
    app.state.statuses = statuses

    @app.middleware("http")  # added after install(): must see the 500 as a response
    async def record(request: Request, call_next):  # type: ignore[no-untyped-def]
        response: Response = await call_next(request)
        statuses.append(response.status_code)
        return response

    @app.post("/native")
    async def native(body: EventsBatch) -> dict[str, int]:
        return {"n": len(body.events)}

    @app.post("/single")
    async def single(body: EventIn) -> dict[str, str]:
        return {"id": body.event_id}

    @app.post("/parsed")
    async def parsed(request: Request) -> dict[str, int]:
        events, _ = parse_events(await request.body())
        return {"n": len(events)}

    @app.get("/explain")
    async def explain(explain: bool = False) -> dict[str, bool]:
        return {"explain": explain}

    @app.get("/fail/{kind}")
    async def fail(kind: str) -> None:
        match kind:
            case "503":
                raise ServiceUnavailable("Redis unreachable")
            case "503-own":
                raise ServiceUnavailable("queue full", retry_after_s=2)
            case "413":
                raise PayloadTooLarge("body over 1048576 bytes")
            case "401":
                raise Unauthorized("missing API key")
            case "401-invalid":
                raise Unauthorized("unknown API key", error="invalid_token")
            case "403":
                raise Forbidden("this key lacks the batch scope", required_scope="batch")
            case "404":
                raise NotFound("no such model")
            case "408":
                raise RequestTimeout("no part of the body arrived for 30 s")
            case "gone":
                raise ClientDisconnect()
            case _:
                raise RuntimeError("secret internals: redis://:hunter2@db")

    return app


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(make_app()) as c:
        yield c


def problem(resp: object, status: int) -> dict[str, object]:
    assert resp.status_code == status, resp.text  # type: ignore[attr-defined]
    assert resp.headers["content-type"] == PROBLEM  # type: ignore[attr-defined]
    body = orjson.loads(resp.content)  # type: ignore[attr-defined]
    assert body["status"] == status and body["title"] and body["type"]
    return body  # type: ignore[no-any-return]


BAD_BATCH = {"events": [
    {"event_id": "ok", "user_id": "u", "event_type": "view", "timestamp": 1511596870001},
    {"event_id": "ok", "user_id": "u", "event_type": "view", "timestamp": 1511596870002},
    {"event_id": "ok", "user_id": "u", "event_type": "view", "timestamp": 1511596870003},
    {"event_id": "a b", "user_id": "u", "timestamp": "noon", "price": -1, "typo": 1},
]}
EXPECTED = [
    ("$.events[3].event_id", "string_pattern_mismatch"),
    ("$.events[3].event_type", "missing"),
    ("$.events[3].timestamp", "timestamp_parsing"),
    ("$.events[3].price", "greater_than_equal"),
    ("$.events[3].typo", "extra_forbidden"),
]


@pytest.mark.parametrize("route", ["/native", "/parsed"])
def test_422_lists_every_bad_field(client: TestClient, route: str) -> None:
    body = problem(client.post(route, content=orjson.dumps(BAD_BATCH), headers={"content-type": "application/json"}),
                   422)
    assert body["type"] == "https://seqguard.dev/problems/validation-error"
    errs = body["errors"]
    assert isinstance(errs, list)
    assert [(e["path"], e["type"]) for e in errs] == EXPECTED
    by_path = {e["path"]: e["message"] for e in errs}
    assert by_path["$.events[3].typo"] == "extra fields not permitted"
    assert by_path["$.events[3].event_type"] == "field required"
    assert "RFC 3339" in by_path["$.events[3].timestamp"]
    assert "5 invalid fields" in str(body["detail"])
    assert "noon" not in str(body)  # inputs are not echoed


def test_422_single_event_and_query(client: TestClient) -> None:
    body = problem(client.post("/single", json={"event_id": "e", "user_id": "u", "event_type": "v",
                                                "timestamp": True, "x y": 1}), 422)
    assert [(e["path"], e["type"]) for e in body["errors"]] == [  # type: ignore[union-attr]
        ("$.timestamp", "timestamp_type"), ('$["x y"]', "extra_forbidden")]
    body = problem(client.get("/explain", params={"explain": "perhaps"}), 422)
    assert body["errors"][0]["path"] == "query.explain"  # type: ignore[index]


@pytest.mark.parametrize("route", ["/native", "/parsed"])
def test_malformed_json(client: TestClient, route: str) -> None:
    body = problem(client.post(route, content=b'{"events": [\n  {"event_id": }', headers={
        "content-type": "application/json"}), 400)
    assert body["type"] == "https://seqguard.dev/problems/malformed-json"
    assert "not valid JSON" in str(body["detail"]) and "line 2 column" in str(body["detail"])


def test_domain_errors(client: TestClient) -> None:
    r = client.get("/fail/503")
    body = problem(r, 503)
    assert r.headers["retry-after"] == "7" and body["detail"] == "Redis unreachable"
    assert body["type"] == "https://seqguard.dev/problems/service-unavailable"
    assert client.get("/fail/503-own").headers["retry-after"] == "2"
    assert problem(client.get("/fail/413"), 413)["type"] == "https://seqguard.dev/problems/payload-too-large"
    r = client.get("/fail/401")
    assert problem(r, 401)["detail"] == "missing API key" and r.headers["www-authenticate"] == "Bearer"
    r = client.get("/fail/401-invalid")
    assert r.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    body = problem(client.get("/fail/403"), 403)
    assert body["required_scope"] == "batch" and body["instance"] == "/fail/403"
    assert problem(client.get("/fail/404"), 404)["type"] == "https://seqguard.dev/problems/not-found"


def test_408_closes_the_connection(client: TestClient) -> None:
    r = client.get("/fail/408")
    body = problem(r, 408)
    assert body["type"] == "https://seqguard.dev/problems/request-timeout" and r.headers["connection"] == "close"


def test_a_client_gone_is_499_logged_at_debug_not_a_500(caplog: pytest.LogCaptureFixture) -> None:
    app = make_app()
    with TestClient(app) as c, caplog.at_level(logging.DEBUG, logger="seqguard.errors"):
        r = c.get("/fail/gone")
    assert r.status_code == 499 and app.state.statuses == [499]
    [rec] = [rec for rec in caplog.records if rec.name == "seqguard.errors"]
    assert rec.levelno == logging.DEBUG and rec.exc_info is None and "client closed" in rec.getMessage()


def test_http_exceptions_keep_status(client: TestClient) -> None:
    body = problem(client.get("/nowhere"), 404)
    assert body["type"] == "https://seqguard.dev/problems/not-found"
    r = client.put("/explain")
    body = problem(r, 405)
    assert body["type"] == "about:blank" and body["title"] == "Method Not Allowed" and r.headers["allow"] == "GET"


def test_http_413_is_payload_too_large() -> None:
    app = make_app()

    @app.post("/upload")
    async def upload() -> None:
        raise HTTPException(status_code=413)

    with TestClient(app) as c:
        body = problem(c.post("/upload"), 413)
    assert body["type"] == "https://seqguard.dev/problems/payload-too-large" and body["title"] == "Payload too large"


def test_500_has_error_id_and_no_internals(caplog: pytest.LogCaptureFixture) -> None:
    app = make_app()
    with TestClient(app) as c, caplog.at_level(logging.ERROR, logger="seqguard.errors"):
        r = c.get("/fail/boom")
    body = problem(r, 500)
    error_id = body["error_id"]
    assert isinstance(error_id, str) and len(error_id) == 32
    assert "hunter2" not in r.text and "RuntimeError" not in r.text and "Traceback" not in r.text
    assert app.state.statuses == [500]  # a middleware added after install() saw the answer
    [rec] = [rec for rec in caplog.records if rec.name == "seqguard.errors"]
    assert error_id in rec.getMessage() and rec.exc_info is not None and rec.exc_info[0] is RuntimeError


def test_500_from_outer_middleware(caplog: pytest.LogCaptureFixture) -> None:
    app = make_app()

    @app.middleware("http")
    async def broken(request: Request, call_next):  # type: ignore[no-untyped-def]
        raise ValueError("middleware internals")

    with TestClient(app, raise_server_exceptions=False) as c, caplog.at_level(logging.ERROR, "seqguard.errors"):
        r = c.get("/explain")
    body = problem(r, 500)
    assert "internals" not in r.text
    assert any(str(body["error_id"]) in rec.getMessage() for rec in caplog.records)


def test_json_path() -> None:
    assert json_path(("body", "events", 3, "timestamp")) == "$.events[3].timestamp"
    assert json_path(("body",)) == "$"
    assert json_path(("body", 2, "price")) == "$[2].price"
    assert json_path(("events", 0)) == "$.events[0]"
    assert json_path(("header", "authorization")) == "header.authorization"
    assert json_path(("body", 'we"ird')) == '$["we\\"ird"]'


def test_parse_events_is_a_fastapi_validation_error(client: TestClient) -> None:
    body = problem(client.post("/parsed", content=orjson.dumps({"events": []})), 422)
    assert body["errors"] == [{"path": "$.events", "type": "too_short",  # type: ignore[comparison-overlap]
                               "message": "List should have at least 1 item after validation, not 0"}]
    with pytest.raises(Exception) as info:
        parse_events(b"{}")
    assert type(info.value).__name__ == "RequestValidationError"
