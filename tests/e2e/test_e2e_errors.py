"""What a client sees when things go wrong: problem details naming every bad field, 400
on malformed JSON, 413 past the body limits, 401/403 by API-key scope, and 503 with
Retry-After while Redis is down, then recovery without restarting the service."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from app.embedded_redis import EmbeddedRedis

from .e2e_support import T0, TestClient, db_size, event, metric, parse_metrics, window_len

PROBLEM = "application/problem+json"


def problem(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body: dict[str, Any] = r.json()
    assert body["status"] == status and body["type"] and body["title"]
    return body


def paths(body: dict[str, Any]) -> set[str]:
    return {e["path"] for e in body["errors"]}


# ------------------------------------------------------------------------ validation


def test_422_names_every_bad_field_of_one_event(client: TestClient, redis_url: str) -> None:
    bad = {"event_id": "has space", "user_id": "", "event_type": "pv", "timestamp": "yesterday",
           "price": -1, "item_id": "x" * 129, "colour": "red"}
    body = problem(client.post("/events", json=bad), 422)
    assert body["type"].endswith("/validation-error")
    assert paths(body) == {"$.event_id", "$.user_id", "$.timestamp", "$.price", "$.item_id", "$.colour"}
    assert {e["type"] for e in body["errors"] if e["path"] == "$.colour"} == {"extra_forbidden"}
    assert all(e["message"] for e in body["errors"])
    assert db_size(redis_url) == 0


def test_422_in_bulk_names_event_index_and_writes_nothing(client: TestClient, redis_url: str) -> None:
    evs = [event("ok", "u1", T0), event("e2", "u1", "2024-13-01T00:00:00Z"), {"user_id": "u1", "event_type": "pv"},
           event("e4", "u1", T0, price="12"), event("e5", "u1", "2024-05-01T12:00:00"), event("e6", "u1", -5)]
    evs[0]["sesion_id"] = "typo"
    body = problem(client.post("/events", json={"events": evs}), 422)
    assert paths(body) == {"$.events[0].sesion_id", "$.events[1].timestamp", "$.events[2].event_id",
                           "$.events[2].timestamp", "$.events[3].price", "$.events[4].timestamp",
                           "$.events[5].timestamp"}
    assert db_size(redis_url) == 0  # the valid event of a refused body is not stored either


@pytest.mark.parametrize("body, where", [
    ({"events": [event(f"e{i}", "u1", T0 + i) for i in range(1001)]}, "$.events"),
    ({"events": []}, "$.events"),
    ({"events": [event("a", "u1", T0)], "explain": True}, "$.explain"),
    ([event("a", "u1", T0)], "$"),
])
def test_422_on_the_body_itself(client: TestClient, body: Any, where: str) -> None:
    assert where in paths(problem(client.post("/events", json=body), 422))


def test_too_many_events_follows_settings(make_client: Callable[..., TestClient]) -> None:
    client = make_client(max_events_per_request=3, batch_max_events=4)
    evs = [event(f"e{i}", "u1", T0 + i) for i in range(5)]
    b = problem(client.post("/events", json={"events": evs[:4]}), 422)
    assert [e["type"] for e in b["errors"]] == ["too_long"]
    assert client.post("/events", json={"events": evs[:3]}).status_code == 200
    assert problem(client.post("/batch-score", json={"events": evs}), 422)["errors"][0]["path"] == "$.events"


def test_batch_score_validation_json_and_ndjson(client: TestClient) -> None:
    body = problem(client.post("/batch-score", json={"events": [event("a", "u1", "soon")], "update": 1}), 422)
    assert paths(body) == {"$.events[0].timestamp", "$.update"}
    lines = [orjson.dumps(event("a", "u1", T0)), orjson.dumps(event("b", "u1", "x")), b'{"user_id": "u1"}']
    r = client.post("/batch-score", content=b"\n".join(lines), headers={"content-type": "application/x-ndjson"})
    body = problem(r, 422)
    assert {"$[1].timestamp", "$[2].event_id", "$[2].event_type", "$[2].timestamp"} <= paths(body)


@pytest.mark.parametrize("route", ["/events", "/batch-score"])
def test_malformed_json_is_400(client: TestClient, route: str) -> None:
    r = client.post(route, content=b'{"event_id": "e1",\n "user_id": }', headers={"content-type": "application/json"})
    body = problem(r, 400)
    assert body["type"].endswith("/malformed-json")
    assert "line 2" in body["detail"]


def test_413_past_the_body_limit(make_client: Callable[..., TestClient], redis_url: str) -> None:
    client = make_client(max_body_bytes=1024, batch_max_body_bytes=2048)
    evs = {"events": [event(f"e{i}", "u1", T0 + i, item_id="i" * 40) for i in range(20)]}
    raw = orjson.dumps(evs)
    assert len(raw) > 2048
    body = problem(client.post("/events", content=raw, headers={"content-type": "application/json"}), 413)
    assert body["type"].endswith("/payload-too-large")

    def chunked() -> Iterator[bytes]:  # no Content-Length: refused while reading
        for i in range(0, len(raw), 256):
            yield raw[i : i + 256]

    problem(client.post("/events", content=chunked(), headers={"content-type": "application/json"}), 413)
    problem(client.post("/batch-score", content=raw, headers={"content-type": "application/json"}), 413)
    assert db_size(redis_url) == 0
    # Under the limit it goes through.
    assert client.post("/events", json={"events": evs["events"][:5]}).status_code == 200


# ------------------------------------------------------------------------------ auth


KEYS = {"ev-key-123": ["events"], "batch-key-456": ["batch"], "admin-key-789": ["admin"]}


@pytest.fixture
def secured(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(api_keys={hashlib.sha256(k.encode()).hexdigest(): s for k, s in KEYS.items()})


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_401_without_a_known_key(secured: TestClient, redis_url: str) -> None:
    ev = event("e1", "u1", T0)
    for headers in ({}, {"Authorization": "Basic ev-key-123"}, bearer(""), bearer("nope"),
                    bearer(hashlib.sha256(b"ev-key-123").hexdigest())):  # the stored hash is not a key
        r = secured.post("/events", json=ev, headers=headers)
        problem(r, 401)
        assert r.headers["www-authenticate"].startswith("Bearer")
    problem(secured.get("/model"), 401)
    problem(secured.post("/batch-score", json={"events": [ev]}), 401)
    assert db_size(redis_url) == 0


def test_scopes(secured: TestClient, redis_url: str) -> None:
    ev = event("e1", "u1", T0)
    # An events key scores events and reads the model, but cannot backfill.
    assert secured.post("/events", json=ev, headers=bearer("ev-key-123")).status_code == 200
    assert secured.get("/model", headers=bearer("ev-key-123")).status_code == 200
    problem(secured.post("/batch-score?update_windows=true", json={"events": [event("e2", "u1", T0 + 1)]},
                         headers=bearer("ev-key-123")), 403)
    # A batch key backfills but cannot post live events.
    assert secured.post("/batch-score", json={"events": [ev]}, headers=bearer("batch-key-456")).status_code == 200
    problem(secured.post("/events", json=event("e3", "u1", T0 + 2), headers=bearer("batch-key-456")), 403)
    assert window_len(redis_url, "u1") == 1  # refused requests wrote nothing
    # Admin does everything.
    admin = bearer("admin-key-789")
    assert secured.post("/events", json=event("e4", "u1", T0 + 3), headers=admin).status_code == 200
    assert secured.post("/batch-score", json={"events": [ev]}, headers=admin).status_code == 200
    assert secured.get("/model", headers=admin).status_code == 200
    # Operations endpoints need no key.
    for path in ("/healthz", "/readyz", "/metrics"):
        assert secured.get(path).status_code == 200, path


# --------------------------------------------------------------------- Redis outage


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A Redis of this test's own, to stop and restart."""
    server = EmbeddedRedis(tmp_path / "redis").start()
    yield server
    server.stop()


def test_503_while_redis_is_down_then_recovery(make_client: Callable[..., TestClient],
                                                own_redis: EmbeddedRedis) -> None:
    client = make_client(redis_url=own_redis.url, retry_after_s=3, redis_timeout_s=0.5)
    url = own_redis.url
    assert client.post("/events", json=event("e1", "u1", T0)).json()["window_size"] == 1
    own_redis.stop()

    e2 = event("e2", "u1", T0 + 1000, "cart")
    for _ in range(2):  # a retry while still down: the same answer
        r = client.post("/events", json=e2)
        body = problem(r, 503)
        assert r.headers["retry-after"] == "3"
        assert body["type"].endswith("/service-unavailable")
    problem(client.post("/events", json={"events": [e2, event("e3", "u2", T0)]}), 503)
    r = client.get("/readyz")
    assert r.status_code == 503 and r.json()["redis"] is False and r.headers["retry-after"] == "3"
    assert client.get("/healthz").status_code == 200  # alive, just not ready
    # A backfill needs no Redis unless it updates windows.
    assert client.post("/batch-score", json={"events": [e2]}).status_code == 200
    problem(client.post("/batch-score?update_windows=true", json={"events": [e2]}), 503)

    own_redis.start()  # same port, same append-only file; the service was not restarted
    assert client.get("/readyz").status_code == 200
    assert window_len(url, "u1") == 1 and window_len(url, "u2") == 0  # nothing was written while down
    res = client.post("/events", json=e2).json()
    assert res["duplicate"] is False and res["window_size"] == 2
    again = client.post("/events", json=e2).json()
    assert again == res | {"duplicate": True}
    assert window_len(url, "u1") == 2
    samples = parse_metrics(client.get("/metrics").text)
    assert metric(samples, "seqguard_window_store_errors_total") == 4  # every refused write, once
    assert metric(samples, "seqguard_requests_total", route="/events", status="503") == 3


# ----------------------------------------------------------------------- media type


@pytest.mark.parametrize("path", ["/events", "/batch-score"])
@pytest.mark.parametrize("declared", ["application/x-www-form-urlencoded", "text/plain", "application/xml"])
def test_a_body_declared_as_something_else_gets_415(client: TestClient, redis_url: str, path: str,
                                                    declared: str) -> None:
    """curl -d without a content-type header declares a form; the 415 says what to send."""
    e = event("mt-1", "mt-user", T0, "pv")
    body = orjson.dumps(e if path == "/events" else {"events": [e]})
    before = db_size(redis_url)
    p = problem(client.post(path, content=body, headers={"content-type": declared}), 415)
    assert declared in p["detail"] and "application/json" in p["detail"]
    assert db_size(redis_url) == before, "nothing written"


@pytest.mark.parametrize("declared", [None, "application/json; charset=utf-8", "Application/JSON",
                                      "application/vnd.shop.event+json"])
def test_json_or_no_declared_type_is_accepted(client: TestClient, declared: str | None) -> None:
    headers = {} if declared is None else {"content-type": declared}
    e = event("mt-ok-" + hashlib.sha1(str(declared).encode()).hexdigest()[:8], "mt-user-2", T0, "pv")
    assert client.post("/events", content=orjson.dumps(e), headers=headers).status_code == 200
    r = client.post("/batch-score", content=orjson.dumps({"events": [e]}), headers=headers)
    assert r.status_code == 200 and len(r.json()["results"]) == 1


@pytest.mark.parametrize("flag", ["true", "false"])
def test_explain_on_batch_score_is_refused_not_ignored(client: TestClient, flag: str) -> None:
    """Issue 9: /batch-score?explain=true was silently ignored."""
    body = problem(client.post(f"/batch-score?explain={flag}", json={"events": [event("x1", "u1", T0)]}), 422)
    assert paths(body) == {"query.explain"}
    assert "POST /events" in body["errors"][0]["message"]
