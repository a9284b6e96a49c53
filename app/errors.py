"""RFC 9457 problem details (``application/problem+json``) for every error the service
answers: a few domain exceptions, each carrying its status and problem type, turned into
a response by one handler; validation errors list every bad field with its JSON path; an
unexpected exception becomes a 500 that names an ``error_id`` and never echoes internals.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import Any, ClassVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("seqguard.errors")

PROBLEM_JSON = "application/problem+json"
PROBLEM_BASE = "https://seqguard.dev/problems/"


class ProblemError(Exception):
    """A failure the client should see as a problem document.

    ``detail`` explains this occurrence; ``extensions`` become extra members of the body
    (e.g. ``required_scope``); ``headers`` are added to the response.
    """

    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal server error"

    def __init__(self, detail: str | None = None, *, headers: Mapping[str, str] | None = None,
                 **extensions: Any) -> None:
        super().__init__(detail or self.title)
        self.detail = detail
        self.headers: dict[str, str] = dict(headers or {})
        self.extensions = extensions

    @property
    def type(self) -> str:
        return PROBLEM_BASE + self.slug


class ServiceUnavailable(ProblemError):
    """A dependency (Redis, the scoring queue) cannot take the request now; retrying is safe.
    The response carries ``Retry-After`` (``retry_after_s`` here, else the configured one)."""

    status, slug, title = 503, "service-unavailable", "Service unavailable"

    def __init__(self, detail: str | None = None, *, retry_after_s: int | None = None, **kw: Any) -> None:
        super().__init__(detail, **kw)
        self.retry_after_s = retry_after_s


class PayloadTooLarge(ProblemError):
    status, slug, title = 413, "payload-too-large", "Payload too large"


class UnsupportedMediaType(ProblemError):
    status, slug, title = 415, "unsupported-media-type", "Unsupported media type"


class RequestTimeout(ProblemError):
    """The client sent its body too slowly (``body_read_timeout_s``, ``body_timeout_s``,
    ``body_min_rate_bytes_s`` after ``body_min_rate_grace_s``).
    The connection is closed after the answer."""

    status, slug, title = 408, "request-timeout", "Request timeout"

    def __init__(self, detail: str | None = None, **kw: Any) -> None:
        super().__init__(detail, **kw)
        self.headers.setdefault("Connection", "close")


#: Status counted (and logged at debug level) for a request whose client went away before
#: its answer (nginx's "client closed request"); nothing can be sent to it.
CLIENT_CLOSED = 499


class Unauthorized(ProblemError):
    """No or an unknown API key. ``error`` is the RFC 6750 code (``invalid_token`` when a
    key was sent but is not known)."""

    status, slug, title = 401, "unauthorized", "Unauthorized"

    def __init__(self, detail: str | None = None, *, error: str | None = None, **kw: Any) -> None:
        super().__init__(detail, **kw)
        self.headers.setdefault("WWW-Authenticate", f'Bearer error="{error}"' if error else "Bearer")


class Forbidden(ProblemError):
    """A known key without the scope the route needs (pass ``required_scope=...``)."""

    status, slug, title = 403, "forbidden", "Forbidden"


class NotFound(ProblemError):
    status, slug, title = 404, "not-found", "Not found"


# Problem types of HTTP errors raised by Starlette/FastAPI themselves (404 of an unknown
# route, 413 of the body limit, ...): the same types as the domain exceptions.
_HTTP_TYPES = {c.status: (c.slug, c.title)
               for c in (PayloadTooLarge, RequestTimeout, Unauthorized, Forbidden, NotFound)}


def problem(status: int, title: str, detail: str | None = None, *, type_: str = "about:blank",
            headers: Mapping[str, str] | None = None, instance: str | None = None, **extensions: Any) -> Response:
    """A problem+json response (serialised with orjson)."""
    body: dict[str, Any] = {"type": type_, "title": title, "status": status}
    if detail is not None:
        body["detail"] = detail
    if instance is not None:
        body["instance"] = instance
    body.update(extensions)
    return Response(orjson.dumps(body), status_code=status, headers=dict(headers or {}), media_type=PROBLEM_JSON)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def json_path(loc: Iterable[str | int]) -> str:
    """JSON path of a FastAPI/pydantic error location.

    >>> json_path(("body", "events", 3, "timestamp"))
    '$.events[3].timestamp'
    >>> json_path(("query", "explain"))
    'query.explain'
    """
    parts = list(loc)
    where = parts.pop(0) if parts and parts[0] in ("body", "query", "path", "header", "cookie") else "body"
    out = "$" if where == "body" else str(where)
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif _IDENT.match(p):
            out += f".{p}"
        else:
            out += "[" + orjson.dumps(p).decode() + "]"
    return out


_MESSAGES = {"extra_forbidden": "extra fields not permitted", "missing": "field required"}


def _validation_errors(errors: Iterable[Mapping[str, Any]]) -> list[dict[str, str]]:
    return [{"path": json_path(e.get("loc", ())), "message": _MESSAGES.get(e["type"], e["msg"]), "type": e["type"]}
            for e in errors]


def _json_error_detail(err: Mapping[str, Any], body: Any) -> str:
    """Where and why a body is not JSON. FastAPI gives a character offset into the body;
    pydantic's own JSON errors already name the line and column."""
    reason = str((err.get("ctx") or {}).get("error") or err.get("msg", "invalid JSON"))
    loc = err.get("loc", ())
    pos = loc[-1] if loc and isinstance(loc[-1], int) else None
    if pos is not None and isinstance(body, str | bytes):
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        line = text.count("\n", 0, pos) + 1
        col = pos - (text.rfind("\n", 0, pos) + 1) + 1
        reason = f"{reason} at line {line} column {col}"
    return f"Request body is not valid JSON: {reason}"


def _error_id_response(method: str | None, path: str | None, exc: BaseException) -> Response:
    """500 for an unexpected exception: the traceback goes to the log under a fresh id,
    the client gets only the id. Paths carry no user ids (they travel in bodies)."""
    error_id = uuid.uuid4().hex
    log.error("unexpected error %s (%s) on %s %s", error_id, type(exc).__name__, method, path, exc_info=exc)
    return problem(500, "Internal server error", "An unexpected error occurred; quote error_id when reporting it.",
                   type_=PROBLEM_BASE + "internal-error", error_id=error_id)


class Problems:
    """Every exception the service answers, turned into its problem+json response: the
    one translation used by FastAPI's exception handlers, by the catch-all middleware
    and by routes served without FastAPI's machinery (:class:`app.middleware.DirectRoutes`)."""

    def __init__(self, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s

    def response(self, exc: BaseException, method: str | None, path: str | None) -> Response:
        if isinstance(exc, ClientDisconnect):
            # The client left mid-request (a dropped upload): not a fault of the service.
            # The answer goes nowhere; its status is what the request metrics count.
            log.debug("client closed the connection during %s %s", method, path)
            return Response(status_code=CLIENT_CLOSED)
        if isinstance(exc, ProblemError):
            headers = dict(exc.headers)
            if isinstance(exc, ServiceUnavailable):
                headers.setdefault("Retry-After", str(exc.retry_after_s or self.retry_after_s))
            return problem(exc.status, exc.title, exc.detail, type_=exc.type, headers=headers, instance=path,
                           **exc.extensions)
        if isinstance(exc, RequestValidationError):
            errors = exc.errors()
            bad_json = next((e for e in errors if e.get("type") == "json_invalid"), None)
            if bad_json is not None:
                return problem(400, "Malformed JSON", _json_error_detail(bad_json, exc.body),
                               type_=PROBLEM_BASE + "malformed-json", instance=path)
            listed = _validation_errors(errors)
            n = len(listed)
            return problem(422, "Validation failed", f"{n} invalid field{'s' if n != 1 else ''}: see errors",
                           type_=PROBLEM_BASE + "validation-error", instance=path, errors=listed)
        if isinstance(exc, HTTPException):
            if exc.status_code in (204, 304) or exc.status_code < 200:
                return Response(status_code=exc.status_code, headers=exc.headers)
            phrase = _phrase(exc.status_code)
            slug, title = _HTTP_TYPES.get(exc.status_code, (None, phrase))
            detail = exc.detail if exc.detail != phrase else None  # Starlette's default detail is the phrase
            return problem(exc.status_code, title, detail, type_=PROBLEM_BASE + slug if slug else "about:blank",
                           headers=exc.headers, instance=path)
        return _error_id_response(method, path, exc)


class CatchAll:
    """Answers problem+json for exceptions that escape ``app``, so that middlewares
    outside it (request metrics, access logs) see an error response rather than an
    exception. Once a response has started nothing can be sent: re-raise."""

    def __init__(self, app: ASGIApp, problems: Problems) -> None:
        self.app = app
        self.problems = problems

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception as exc:
            if started:
                raise
            response = self.problems.response(exc, scope.get("method"), scope.get("path"))
            await response(scope, receive, send)


def install(app: FastAPI, problems: Problems) -> None:
    """Register the problem+json handlers on ``app``; call it before adding middleware."""

    async def handler(request: Request, exc: Exception) -> Response:
        return problems.response(exc, request.method, request.url.path)

    for exc_type in (ProblemError, RequestValidationError, HTTPException):
        app.add_exception_handler(exc_type, handler)
    # Exceptions raised by middlewares outside CatchAll reach Starlette's
    # ServerErrorMiddleware, which uses this handler (and re-raises for the server's log).
    app.add_exception_handler(Exception, handler)
    app.add_middleware(CatchAll, problems=problems)
