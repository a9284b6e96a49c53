"""DirectRoutes: hot routes served without FastAPI's per-request machinery, on a tiny app
with real requests through TestClient."""

from __future__ import annotations

import warnings

import orjson
import pytest
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.routing import APIRoute
from prometheus_client.parser import text_string_to_metric_families
from starlette.exceptions import StarletteDeprecationWarning
from starlette.types import ASGIApp, Receive, Scope, Send

from app import errors
from app.errors import Forbidden
from app.metrics import Metrics
from app.middleware import DirectRoutes, RequestMetrics
from app.schemas import parse_events, query_flag

with warnings.catch_warnings():  # Starlette asks for httpx2 over httpx; the venv has httpx
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

router = APIRouter()


@router.post("/hot/{name}")
async def hot(request: Request) -> Response:
    if request.headers.get("x-key") == "wrong":
        raise Forbidden("no")
    if request.headers.get("x-boom"):
        raise RuntimeError("secret internals")
    events, _ = parse_events(await request.body())
    body = {"name": request.path_params["name"], "n": len(events),
            "explain": query_flag(request.query_params, "explain")}
    return Response(orjson.dumps(body), media_type="application/json")


@router.get("/cold")
async def cold() -> dict[str, str]:
    return {"ok": "yes"}


class Seen:
    """An inner middleware: records the paths that reached FastAPI's own stack."""

    def __init__(self, app: ASGIApp, paths: list[str]) -> None:
        self.app, self.paths = app, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.paths.append(scope["path"])
        await self.app(scope, receive, send)


@pytest.fixture
def client() -> TestClient:
    app = FastAPI()
    problems = errors.Problems(retry_after_s=3)
    errors.install(app, problems)
    app.include_router(router)
    app.state.inner = []
    app.add_middleware(Seen, paths=app.state.inner)
    app.add_middleware(DirectRoutes, routes=[r for r in router.routes if r.endpoint is hot], problems=problems)
    app.state.metrics = Metrics()

    class State:  # what RequestMetrics reads of the service's state
        metrics = app.state.metrics

    app.state.seqguard = State()
    app.add_middleware(RequestMetrics)
    return TestClient(app)


def requests(client: TestClient) -> dict[tuple[str, str], float]:
    """seqguard_requests_total by (route, status), from the real metrics' exposition."""
    body = client.app.state.metrics.render()[0].decode()  # type: ignore[attr-defined]
    return {(s.labels["route"], s.labels["status"]): s.value for fam in text_string_to_metric_families(body)
            for s in fam.samples if s.name == "seqguard_requests_total" and s.value}


EVENT = {"event_id": "e1", "user_id": "u1", "event_type": "view", "timestamp": 1511596870000}


def test_the_hot_route_skips_fastapi_and_keeps_route_labels(client: TestClient) -> None:
    r = client.post("/hot/a?explain=true", json=EVENT)
    assert r.status_code == 200 and r.json() == {"name": "a", "n": 1, "explain": True}
    assert client.get("/cold").json() == {"ok": "yes"}
    assert client.app.state.inner == ["/cold"]  # type: ignore[attr-defined]
    assert requests(client) == {("/hot/{name}", "200"): 1, ("/cold", "200"): 1}


def test_errors_of_the_hot_route_are_problems(client: TestClient) -> None:
    r = client.post("/hot/a", json={"event_id": "e1"})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert {e["path"] for e in r.json()["errors"]} >= {"$.user_id", "$.event_type", "$.timestamp"}
    r = client.post("/hot/a?explain=maybe", json=EVENT)
    assert r.status_code == 422 and [e["path"] for e in r.json()["errors"]] == ["query.explain"]
    r = client.post("/hot/a", content=b"{nope")
    assert r.status_code == 400 and r.json()["title"] == "Malformed JSON"
    r = client.post("/hot/a", json=EVENT, headers={"x-key": "wrong"})
    assert r.status_code == 403 and r.json()["detail"] == "no"
    r = client.post("/hot/a", json=EVENT, headers={"x-boom": "1"})
    assert r.status_code == 500 and "secret" not in r.text and r.json()["error_id"]
    # Other methods fall through to FastAPI: 405, a problem too.
    r = client.get("/hot/a")
    assert r.status_code == 405 and r.headers["content-type"] == "application/problem+json"
    assert client.app.state.inner == ["/hot/a"]  # type: ignore[attr-defined]
    assert requests(client) == {("/hot/{name}", "422"): 2, ("/hot/{name}", "400"): 1, ("/hot/{name}", "403"): 1,
                                ("/hot/{name}", "500"): 1, ("/hot/{name}", "405"): 1}


def test_only_request_only_routes_without_dependencies_can_be_direct() -> None:
    r = APIRouter()

    @r.post("/a")
    async def with_param(request: Request, explain: bool = False) -> None: ...

    async def dep() -> None: ...

    @r.post("/b", dependencies=[Depends(dep)])
    async def with_dep(request: Request) -> None: ...

    problems = errors.Problems(retry_after_s=1)
    routes = [x for x in r.routes if isinstance(x, APIRoute)]
    with pytest.raises(TypeError, match="only the request"):
        DirectRoutes(FastAPI(), routes[:1], problems)
    with pytest.raises(TypeError, match="dependencies"):
        DirectRoutes(FastAPI(), routes[1:], problems)
    with pytest.raises(ValueError, match="no direct routes"):
        DirectRoutes(FastAPI(), [], problems)
