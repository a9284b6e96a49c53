"""The OpenAPI document and the pages that show it (``/docs``, ``/redoc``, ``/openapi.json``).

FastAPI generates the document from the routes; :func:`document` completes it with what
routes that read their body by hand cannot declare: the request bodies (the same pydantic
models the routes validate with, from ``app.schemas``), every error answer as
``application/problem+json``, and the API-key security scheme with the scope each route
needs. The document describes this deployment: its limits, and whether keys are required.

The pages load Swagger UI and ReDoc from the pinned ``fastapi-offline`` package, served
here: nothing is fetched from a CDN. In prod the pages and the document need an API key.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute, iter_route_contexts
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema
from starlette.responses import FileResponse, HTMLResponse

from app.deps import ScopeCheck, docs_access
from app.errors import PROBLEM_JSON, NotFound
from app.routes import json_response
from app.schemas import BatchScoreRequest, EventIn, EventsBatch, ModelChange
from app.settings import Scope, Settings

NDJSON = "application/x-ndjson"
SECURITY_SCHEME = "apiKey"
#: Swagger UI and ReDoc, as the pinned fastapi-offline wheel ships them (MIT; the bundles
#: carry their own licence headers). Served from /docs/assets/<name>, nothing else.
ASSETS_DIR = Path(str(files("fastapi_offline") / "static"))
ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
          "redoc.standalone.js": "text/javascript", "favicon.png": "image/png"}
#: Routes served without FastAPI's dependency machinery (``DirectRoutes``) check their
#: key inline; their scope is declared here.
DIRECT_SCOPES: dict[tuple[str, str], Scope] = {("/events", "post"): "events"}

_EXAMPLE_EVENT = {"event_id": "ord-1", "user_id": "u-42", "event_type": "cart", "timestamp": "2024-05-01T12:30:00Z",
                  "item_id": "sku-7", "price": 19.9}


# Documentation-only shapes (what errors.py and /readyz write) ---------------------------


class FieldError(BaseModel):
    """One bad field of a 422."""

    path: str = Field(description="JSON path in the body ($.events[3].timestamp) or query.<name>")
    message: str
    type: str = Field(description="pydantic error type, e.g. missing, extra_forbidden, bool_type")


class Problem(BaseModel):
    """RFC 9457 problem details: every 4xx and 5xx answer of the service."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="problem type URI, e.g. https://seqguard.dev/problems/validation-error")
    title: str
    status: int
    detail: str | None = None
    instance: str | None = Field(None, description="the request path")
    errors: list[FieldError] | None = Field(None, description="422 only: every bad field")
    problems: list[str] | None = Field(None, description="bundle-refused (POST /admin/model) only: each check the "
                                                         "bundle failed, one line each")
    error_id: str | None = Field(None, description="500 only: quote it when reporting the error")


class Readiness(BaseModel):
    """``GET /readyz``."""

    model_config = ConfigDict(protected_namespaces=())

    status: Literal["ready", "unavailable"]
    model: str = Field(description="bundle version")
    redis: bool


_ERRORS = {
    400: "Malformed JSON (the body, or an NDJSON line, does not parse).",
    401: "No API key, or an unknown one (when keys are configured).",
    403: "The API key lacks the scope this route needs.",
    408: "The body came too slowly (SEQGUARD_BODY_READ_TIMEOUT_S between pieces, SEQGUARD_BODY_TIMEOUT_S in all); "
         "the connection is closed.",
    413: "The body (or an NDJSON line) exceeds its limit.",
    415: "Content-Type is not one the route reads (send application/json, or application/x-ndjson to "
         "/batch-score; no Content-Type is read as JSON).",
    422: "Invalid fields: each is named in `errors` with its JSON path.",
    503: "Redis or the scoring queue cannot take the request now; retry after `Retry-After` seconds with the "
         "same event_id.",
}
#: Where a route's answer differs from :data:`_ERRORS`.
_ROUTE_ERRORS = {
    ("/admin/model", "post", 422): "Invalid fields (each named in `errors` with its JSON path), or a bundle refused "
                                   "(type …/bundle-refused: each failed check in `problems`; the live model serves "
                                   "on).",
    ("/admin/model", "post", 503): "This worker serves the new model, but Redis could not record it for the other "
                                   "workers and replicas; retry.",
    ("/admin/model", "post", 409): "promote with no shadow served (type …/no-shadow).",
}


def _component_schemas(settings: Settings) -> dict[str, Any]:
    _, top = models_json_schema(
        [(EventIn, "validation"), (EventsBatch, "validation"), (BatchScoreRequest, "validation"),
         (ModelChange, "validation"),
         (Problem, "serialization"), (Readiness, "serialization")],
        ref_template="#/components/schemas/{model}",
    )
    schemas: dict[str, Any] = top["$defs"]
    # The counts are checked against the deployment's settings, before the events are.
    schemas["EventsBatch"]["properties"]["events"]["maxItems"] = settings.max_events_per_request
    schemas["BatchScoreRequest"]["properties"]["events"]["maxItems"] = settings.batch_max_events
    return schemas


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _request_bodies() -> dict[tuple[str, str], dict[str, Any]]:
    one = {"summary": "one event", "value": _EXAMPLE_EVENT}
    many = {"summary": "several events", "value": {"events": [
        _EXAMPLE_EVENT, _EXAMPLE_EVENT | {"event_id": "ord-2", "event_type": "buy", "timestamp": 1714566660000}]}}
    return {
        ("/events", "post"): {"required": True, "content": {"application/json": {
            "schema": {"oneOf": [_ref("EventIn"), _ref("EventsBatch")]},
            "examples": {"event": one, "batch": many},
        }}},
        ("/admin/model", "post"): {"required": True, "content": {"application/json": {
            "schema": _ref("ModelChange"), "example": {"bundle": "/srv/seqguard/bundles/2026-12-01"}}}},
        ("/batch-score", "post"): {"required": True, "content": {
            "application/json": {"schema": _ref("BatchScoreRequest"), "example": many["value"]},
            NDJSON: {"schema": {"type": "array", "items": _ref("EventIn"),
                                "description": "one event (JSON object) per line; any number of lines"}},
        }},
    }


def _scopes(app: FastAPI) -> dict[tuple[str, str], Scope]:
    """(path, method) → the scope its key needs."""
    needs = dict(DIRECT_SCOPES)
    for route in iter_route_contexts(app.routes):  # included routers are not flattened into app.routes
        if isinstance(route.original_route, APIRoute) and route.include_in_schema:
            for dep in route.dependant.dependencies:
                if isinstance(dep.call, ScopeCheck):
                    needs.update({(str(route.path_format), m.lower()): dep.call.scope for m in route.methods or ()})
    return needs


def document(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The complete OpenAPI document of ``app`` (cached on it, as FastAPI does)."""
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, summary=app.summary, description=app.description,
                      routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(_component_schemas(settings))
    doc["components"]["securitySchemes"] = {SECURITY_SCHEME: {
        "type": "http", "scheme": "bearer",
        "description": "An API key as `Authorization: Bearer <key>`; keys and their scopes (events, batch, "
                       "admin) are set by SEQGUARD_API_KEYS" + ("." if settings.api_keys else
                                                                 ": none are configured, so none is needed."),
    }}
    bodies = _request_bodies()
    scopes = _scopes(app)
    problem = {PROBLEM_JSON: {"schema": _ref("Problem")}}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            key = (path, method)
            responses: dict[str, Any] = op.setdefault("responses", {})
            errors = {int(s) for s in responses if s.isdigit() and int(s) >= 400}
            if key in bodies:
                op["requestBody"] = bodies[key]
                errors |= {400, 408, 413, 415, 422}
            if any(p.get("in") == "query" for p in op.get("parameters", ())):
                errors.add(422)
            if key in scopes:
                # OpenAPI 3.1 lets a non-OAuth requirement list roles: the scope needed.
                op["security"] = [{SECURITY_SCHEME: [scopes[key]]}] + ([] if settings.api_keys else [{}])
                errors |= {401, 403}
                either = "" if scopes[key] == "admin" else " (or `admin`)"
                op["description"] = (op.get("description", "") + f"\n\nNeeds an API key with the `{scopes[key]}`"
                                     f"{either} scope.").strip()
            for code in sorted(errors):
                text = _ROUTE_ERRORS.get((path, method, code)) or _ERRORS.get(code, "Error.")
                responses[str(code)] = {"description": text, "content": problem}
            op["responses"] = dict(sorted(responses.items()))
    readyz = doc["paths"].get("/readyz", {}).get("get")
    if readyz is not None:  # its 503 is a readiness answer, not a problem
        for status in ("200", "503"):
            readyz["responses"][status] = {
                "description": "ready" if status == "200" else "not ready (Redis does not answer); Retry-After set",
                "content": {"application/json": {"schema": _ref("Readiness")}}}
    for unused in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 body, replaced above
        schemas.pop(unused, None)
    app.openapi_schema = doc
    return doc


def install(app: FastAPI, settings: Settings) -> None:
    """Use :func:`document` as ``app.openapi`` and serve it with its pages."""
    app.openapi = lambda: document(app, settings)  # type: ignore[method-assign]
    app.include_router(router)


# Pages -----------------------------------------------------------------------------------

router = APIRouter(include_in_schema=False, dependencies=[Depends(docs_access)])


#: The pages may load only what this service serves. ReDoc's menu shows a logo from its
#: vendor's CDN that no option turns off; this keeps the browser from fetching it. Inline
#: scripts and styles: FastAPI's page templates and ReDoc's styled components use them.
CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


@router.get("/openapi.json")
async def openapi_json(request: Request) -> Response:
    """The OpenAPI document."""
    return json_response(request.app.openapi())


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    """Swagger UI, from local assets."""
    root = _root(request)
    page = get_swagger_ui_html(
        openapi_url=f"{root}/openapi.json", title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js", swagger_css_url=f"{root}/docs/assets/swagger-ui.css",
        swagger_favicon_url=f"{root}/docs/assets/favicon.png",
        # validatorUrl: Swagger UI would send the document to an online validator.
        swagger_ui_parameters={"validatorUrl": "none"},
    )
    page.headers["Content-Security-Policy"] = CSP
    return page


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    """ReDoc, from local assets."""
    root = _root(request)
    page = get_redoc_html(openapi_url=f"{root}/openapi.json", title=f"{request.app.title} - ReDoc",
                          redoc_js_url=f"{root}/docs/assets/redoc.standalone.js",
                          redoc_favicon_url=f"{root}/docs/assets/favicon.png", with_google_fonts=False)
    page.headers["Content-Security-Policy"] = CSP
    return page


@router.get("/docs/assets/{name}")
async def asset(name: str) -> FileResponse:
    """One of the page assets (a fixed list: no path is built from the request)."""
    media_type = ASSETS.get(name)
    if media_type is None:
        raise NotFound(f"no asset {name!r}")
    return FileResponse(ASSETS_DIR / name, media_type=media_type,
                        headers={"Cache-Control": "public, max-age=86400"})
