"""Plain ASGI middlewares (cheaper than BaseHTTPMiddleware): request metrics, and the
hot routes served directly."""

from __future__ import annotations

import inspect
import time

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import Problems


class RequestMetrics:
    """Counts and times every HTTP request by route template and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            state = getattr(scope["app"].state, "seqguard", None)
            if state is not None:
                route = scope.get("route")
                # The route template, never the raw path: bounded label values.
                label = getattr(route, "path", None) or "unmatched"
                state.metrics.track_request(label, status, time.perf_counter() - started)


class DirectRoutes:
    """Serves a few hot routes straight from the ASGI scope, without FastAPI's per-request
    machinery: its exception and exit-stack middlewares, router and dependency solving,
    about 0.1 ms a request on this service's CPU budget of well under 1 ms.

    Each route stays declared on the FastAPI app (OpenAPI, ``/docs``, 405s for other
    methods) and must take the ``Request`` as its only parameter (authorization and query
    parameters inline), with no dependencies of its own; app-wide dependencies would not
    run either (this app has none). Errors get the same problem+json answers as elsewhere.
    """

    def __init__(self, app: ASGIApp, routes: list[APIRoute], problems: Problems) -> None:
        if not routes:
            raise ValueError("no direct routes given")
        for route in routes:
            params = inspect.signature(route.endpoint).parameters
            if list(params) != ["request"]:
                raise TypeError(f"{route.path}: a direct route takes only the request, not {list(params)}")
            if route.dependencies:
                raise TypeError(f"{route.path}: a direct route cannot have dependencies (nothing would solve them)")
        self.app = app
        self.routes = routes
        self.problems = problems

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for route in self.routes:
                match, child = route.matches(scope)
                if match is Match.FULL:
                    scope.update(child)  # "route", "endpoint", "path_params": as the router would set them
                    await self._serve(route, scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _serve(self, route: APIRoute, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await route.endpoint(Request(scope, receive))
        except Exception as exc:
            response = self.problems.response(exc, scope.get("method"), scope.get("path"))
        await response(scope, receive, send)
