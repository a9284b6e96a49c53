"""app/openapi.py: the OpenAPI document is complete (request bodies from the very models the
routes validate with, every error as problem+json, the API-key scheme with each route's
scope), booleans are strict, the docs pages load only local assets, and in prod the docs
need a key. Through HTTP (TestClient, lifespan run) on a real Redis and the shipped model."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from e2e.e2e_support import TestClient

from app.openapi import ASSETS, SECURITY_SCHEME
from app.schemas import BatchScoreRequest, EventIn, EventsBatch

PROBLEM = "application/problem+json"
T0 = 1_700_000_000_000
KEYS = {"ev-key": ["events"], "batch-key": ["batch"], "admin-key": ["admin"]}
HASHED = {hashlib.sha256(k.encode()).hexdigest(): s for k, s in KEYS.items()}
PROD = {"environment": "prod", "api_keys": HASHED, "user_hash_key": "a-secret-of-this-deployment"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def event(eid: str, user: str = "u1", ts: int = T0, **fields: Any) -> dict[str, Any]:
    return {"event_id": eid, "user_id": user, "event_type": "pv", "timestamp": ts, **fields}


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            yield path, method, op


def problem(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == PROBLEM
    body: dict[str, Any] = r.json()
    assert body["status"] == status
    return body


# The document ----------------------------------------------------------------------------


def test_request_bodies_are_the_models_the_routes_validate_with(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    schemas = doc["components"]["schemas"]
    ref = "#/components/schemas/{model}"
    assert schemas["EventIn"] == EventIn.model_json_schema(ref_template=ref)
    # The count limits are the deployment's (checked before the events are).
    for model, limit in ((EventsBatch, 1000), (BatchScoreRequest, 100_000)):
        published = model.model_json_schema(ref_template=ref)
        published.pop("$defs")
        published["properties"]["events"]["maxItems"] = limit
        assert schemas[model.__name__] == published
    assert schemas["BatchScoreRequest"]["properties"]["update_windows"] == {
        "default": False, "title": "Update Windows", "type": "boolean"}
    assert schemas["BatchScoreRequest"]["additionalProperties"] is False
    events = doc["paths"]["/events"]["post"]["requestBody"]
    assert events["required"] is True
    assert events["content"]["application/json"]["schema"] == {
        "oneOf": [{"$ref": "#/components/schemas/EventIn"}, {"$ref": "#/components/schemas/EventsBatch"}]}
    batch_body = doc["paths"]["/batch-score"]["post"]["requestBody"]["content"]
    assert batch_body["application/json"]["schema"] == {"$ref": "#/components/schemas/BatchScoreRequest"}
    assert batch_body["application/x-ndjson"]["schema"]["items"] == {"$ref": "#/components/schemas/EventIn"}
    # Every reference resolves.
    text = client.get("/openapi.json").text
    assert set(re.findall(r'#/components/schemas/([A-Za-z]+)"', text)) <= set(schemas)
    assert "HTTPValidationError" not in schemas  # FastAPI's 422 body is not what the service answers


def test_reasons_give_times_as_the_document_says_in_both_forms(client: TestClient) -> None:
    """Issue 9: a reason's time is in the form of the scored event's timestamp, and the
    document says so; answers in either form validate against it."""
    import jsonschema_rs

    doc = client.get("/openapi.json").json()
    timestamp = doc["components"]["schemas"]["Reason"]["properties"]["timestamp"]
    assert timestamp["anyOf"] == [{"type": "integer"}, {"type": "string", "format": "date-time"}]
    assert "form of the timestamp of the request's event being scored" in timestamp["description"]
    answer = doc["paths"]["/events"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    valid = jsonschema_rs.validator_for(answer | {"components": doc["components"]}, validate_formats=True)
    client.post("/events", json=event("e0", ts="2023-11-14T22:13:20Z"))
    for eid, ts, kind in (("e1", T0 + 1000, int), ("e2", "2023-11-14T22:13:22Z", str)):
        for body, results in ((event(eid, ts=ts), lambda r: [r]), ({"events": [event(f"{eid}b", ts=ts)]},
                                                                       lambda r: r["results"])):
            r = client.post("/events?explain=true", json=body)
            assert r.status_code == 200, r.text
            valid.validate(r.json())
            assert {type(x["timestamp"]) for res in results(r.json()) for x in res["reasons"]} == {kind}


def test_limits_in_the_document_follow_the_settings(make_client: Callable[..., TestClient]) -> None:
    doc = make_client(max_events_per_request=50, batch_max_events=70).get("/openapi.json").json()
    assert doc["components"]["schemas"]["EventsBatch"]["properties"]["events"]["maxItems"] == 50
    assert doc["components"]["schemas"]["BatchScoreRequest"]["properties"]["events"]["maxItems"] == 70


def test_the_documented_examples_are_accepted(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    examples = doc["paths"]["/events"]["post"]["requestBody"]["content"]["application/json"]["examples"]
    assert set(examples) == {"event", "batch"}
    for ex in examples.values():
        r = client.post("/events", json=ex["value"])
        assert r.status_code == 200, r.text
    batch = doc["paths"]["/batch-score"]["post"]["requestBody"]["content"]["application/json"]["example"]
    assert client.post("/batch-score", json=batch).status_code == 200


def test_every_error_answer_is_documented_as_a_problem(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    assert doc["components"]["schemas"]["Problem"]["required"] == ["type", "title", "status"]
    statuses = {(path, method): set(op["responses"]) for path, method, op in operations(doc)}
    every = {"200", "400", "401", "403", "408", "413", "415", "422", "503"}
    assert statuses[("/events", "post")] == every
    assert statuses[("/batch-score", "post")] == every
    assert statuses[("/model", "get")] == {"200", "401", "403"}
    assert statuses[("/admin/model", "post")] == every | {"409"}  # promote with no shadow
    assert statuses[("/readyz", "get")] == {"200", "503"}
    assert statuses[("/healthz", "get")] == {"200"}
    for path, method, op in operations(doc):
        for status, resp in op["responses"].items():
            if int(status) >= 400 and path != "/readyz":
                assert resp["content"] == {PROBLEM: {"schema": {"$ref": "#/components/schemas/Problem"}}}, (
                    path, method, status)
                assert resp["description"]
    ready = doc["paths"]["/readyz"]["get"]["responses"]["503"]["content"]["application/json"]["schema"]
    assert ready == {"$ref": "#/components/schemas/Readiness"}


def test_security_scheme_and_the_scope_of_each_route(make_client: Callable[..., TestClient]) -> None:
    secured = make_client(api_keys=HASHED).get("/openapi.json").json()
    scheme = secured["components"]["securitySchemes"][SECURITY_SCHEME]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer"  # as app.deps.authorize reads keys
    needs = {(p, m): op.get("security") for p, m, op in operations(secured)}
    assert needs == {
        ("/events", "post"): [{SECURITY_SCHEME: ["events"]}],
        ("/batch-score", "post"): [{SECURITY_SCHEME: ["batch"]}],
        ("/model", "get"): [{SECURITY_SCHEME: ["events"]}],
        ("/users/{user_id}/window", "get"): [{SECURITY_SCHEME: ["admin"]}],
        ("/users/{user_id}", "delete"): [{SECURITY_SCHEME: ["admin"]}],
        ("/admin/model", "post"): [{SECURITY_SCHEME: ["admin"]}],
        ("/healthz", "get"): None,
        ("/readyz", "get"): None,
    }
    # Without keys configured, the key is optional: the document says so.
    open_doc = make_client().get("/openapi.json").json()
    assert open_doc["paths"]["/events"]["post"]["security"] == [{SECURITY_SCHEME: ["events"]}, {}]


def test_routes_answer_what_the_document_says_about_keys(make_client: Callable[..., TestClient]) -> None:
    c = make_client(api_keys=HASHED)
    doc = c.get("/openapi.json").json()
    from app.core.bundle import DEFAULT_BUNDLE

    bodies = {"/events": event("e1"), "/batch-score": {"events": [event("e2")]},
              "/admin/model": {"bundle": str(DEFAULT_BUNDLE)}}  # the same bundle again
    for path, method, op in operations(doc):
        kw: dict[str, Any] = {"json": bodies[path]} if path in bodies else {}
        if op.get("security"):
            problem(c.request(method, path, **kw), 401)
            scope = op["security"][0][SECURITY_SCHEME][0]
            other = next(k for k, s in KEYS.items() if scope not in s and "admin" not in s)
            problem(c.request(method, path, headers=bearer(other), **kw), 403)
            ok = c.request(method, path, headers=bearer("admin-key"), **kw).status_code
            assert ok == (204 if method == "delete" else 200), (method, path, ok)
        else:
            assert c.request(method, path, **kw).status_code == 200, path


# Strict booleans --------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1, "true", "false", None, [], {}])
def test_update_windows_in_the_body_takes_only_a_boolean(client: TestClient, value: Any) -> None:
    r = client.post("/batch-score", json={"events": [event("e1")], "update_windows": value})
    body = problem(r, 422)
    assert [e["path"] for e in body["errors"]] == ["$.update_windows"]


def test_update_windows_0_does_not_write(client: TestClient, redis_url: str) -> None:
    import redis

    problem(client.post("/batch-score", json={"events": [event("e1")], "update_windows": 0}), 422)
    with redis.Redis.from_url(redis_url) as r:
        assert r.keys("sg:{*") == []  # no user's key (sg:model:* are the service's own)
    r2 = client.post("/batch-score", json={"events": [event("e1")], "update_windows": True})
    assert r2.status_code == 200
    with redis.Redis.from_url(redis_url) as r:
        assert r.keys("sg:{*")


@pytest.mark.parametrize("raw", ["1", "0", "yes", "no", "on", "off", "True", "FALSE", "", "maybe"])
def test_query_flags_take_only_true_or_false(client: TestClient, raw: str) -> None:
    ev = event("e1")
    cases = [
        ("/events", "explain", {"json": ev}),
        ("/batch-score", "update_windows", {"json": {"events": [ev]}}),
        ("/batch-score", "update_windows", {"content": b'{"event_id":"e1","user_id":"u1","event_type":"pv",'
                                                       b'"timestamp":1700000000000}\n',
                                            "headers": {"Content-Type": "application/x-ndjson"}}),
    ]
    for path, flag, kw in cases:
        body = problem(client.post(f"{path}?{flag}={raw}", **kw), 422)
        assert [e["path"] for e in body["errors"]] == [f"query.{flag}"], (path, body)


def test_query_flags_true_and_false(client: TestClient) -> None:
    r = client.post("/events?explain=true", json=event("e1"))
    assert r.status_code == 200 and "reasons" in r.json()
    r = client.post("/events?explain=false", json=event("e2", ts=T0 + 1))
    assert r.status_code == 200 and r.json().get("reasons") is None
    for flag in ("true", "false"):
        assert client.post(f"/batch-score?update_windows={flag}", json={"events": [event("e3")]}).status_code == 200


# The pages --------------------------------------------------------------------------------


def test_docs_pages_load_only_local_assets(client: TestClient) -> None:
    for page, wanted in (("/docs", {"swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"}),
                         ("/redoc", {"redoc.standalone.js", "favicon.png"})):
        r = client.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        html = r.text
        assert "'/openapi.json'" in html or '"/openapi.json"' in html
        urls = set(re.findall(r'(?:src|href)="([^"]+)"', html)) | set(re.findall(r"url: '([^']+)'", html))
        assert urls, html
        assert all(u.startswith("/") for u in urls), urls  # no CDN, no fonts
        assert "http://" not in html and "https://" not in html.replace("https://seqguard.dev", "")
        assert {u.rsplit("/", 1)[1] for u in urls if u.startswith("/docs/assets/")} == wanted
    for name, media_type in ASSETS.items():
        r = client.get(f"/docs/assets/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(media_type)
        assert len(r.content) > 1000
    problem(client.get("/docs/assets/..%2Fopenapi.py"), 404)
    problem(client.get("/docs/assets/index.html"), 404)


def test_swagger_ui_never_asks_an_online_validator(client: TestClient) -> None:
    assert '"validatorUrl": "none"' in client.get("/docs").text


# Prod: the docs need a key ------------------------------------------------------------------

DOCS = ("/docs", "/redoc", "/openapi.json", "/docs/assets/swagger-ui-bundle.js")


def test_prod_docs_need_a_key(make_client: Callable[..., TestClient]) -> None:
    c = make_client(**PROD)
    for path in DOCS:
        for headers in ({}, {"Authorization": "Basic ev-key"}, bearer("nope"), bearer(next(iter(HASHED)))):
            r = c.get(path, headers=headers)
            problem(r, 401)
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert "paths" not in r.json() and "<script" not in r.text  # neither the document nor a page
        for key in KEYS:  # any known key, whatever its scope
            assert c.get(path, headers=bearer(key)).status_code == 200, (path, key)
    # Only the operations endpoints stay open.
    for path in ("/healthz", "/readyz", "/metrics"):
        assert c.get(path).status_code == 200, path
    problem(c.get("/model"), 401)
    problem(c.post("/events", json=event("e1")), 401)
    problem(c.post("/batch-score", json={"events": [event("e1")]}), 401)


def test_dev_docs_stay_open_even_with_keys(make_client: Callable[..., TestClient]) -> None:
    c = make_client(api_keys=HASHED)
    for path in DOCS:
        assert c.get(path).status_code == 200, path
