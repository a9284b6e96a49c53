"""Plain ASGI middlewares (cheaper than BaseHTTPMiddleware): request metrics, the hot
routes served directly, and a lingering close for answers given before the body was read."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import CLIENT_CLOSED, Problems

log = logging.getLogger("seqguard.errors")


class RequestMetrics:
    """Counts and times every HTTP request by route template and status. A request whose
    client went away before its answer was complete counts as 499 (client closed request),
    whatever the application made of it: a disconnect the application saw (a dropped
    upload, a stream abandoned halfway), a failed send, or a client that sent its whole
    body and left while it was answered. For the last the server says nothing (uvicorn
    drops what is sent on a closed connection), so once the body has been read to its end
    the middleware looks for a disconnect without waiting (:func:`_disconnected`): at once,
    and again just before the answer's last part goes out."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        complete = gone = False
        headers = dict(scope.get("headers") or ())
        # Whether the body has been read to its end (a request declaring none has none to read).
        body_read = headers.get(b"content-length", b"0") == b"0" and b"transfer-encoding" not in headers

        def looked(message_type: str) -> None:
            nonlocal gone
            if not gone and _disconnected(receive):
                gone = True
                log.debug("client closed the connection after its request to %s %s, before the %s",
                          scope.get("method"), getattr(scope.get("route"), "path", "an unmatched route"), message_type)

        async def receive_watching() -> Message:
            nonlocal gone, body_read
            message = await receive()
            # Servers also answer "disconnect" once the answer is complete: only before counts.
            if message["type"] == "http.disconnect" and not complete:
                gone = True
            elif message["type"] == "http.request" and not message.get("more_body", False):
                body_read = True
                # A look now, while the answer is worked on: uvicorn stops reading a socket
                # while it holds body the application has not asked for (flow control), and
                # reads on (so sees the client close) only once asked for more.
                looked("answer")
            return message

        async def send_status(message: Message) -> None:
            nonlocal status, complete, gone
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                if body_read:
                    looked("answer was sent")
                complete = True
            try:
                await send(message)
            except OSError:
                gone = True
                raise

        try:
            await self.app(scope, receive_watching, send_status)
        finally:
            state = getattr(scope["app"].state, "seqguard", None)
            if state is not None:
                route = scope.get("route")
                # The route template, never the raw path: bounded label values.
                label = getattr(route, "path", None) or "unmatched"
                state.metrics.track_request(label, CLIENT_CLOSED if gone else status, time.perf_counter() - started)


def _disconnected(receive: Receive) -> bool:
    """Whether ``receive`` has an ``http.disconnect`` ready, found without waiting.

    Called once the body has been read to its end, when all a server has left to give is
    that message (or, for a request without a body, its one empty body message first).
    The call is run up to its first suspension and closed there: the message is taken only
    when it is already there, and nothing is left waiting. Unlike Starlette's
    ``Request.is_disconnected`` (a cancelled scope), it costs no trip through the event
    loop before the answer goes out.
    """
    for _ in range(2):
        call = receive().__await__()
        try:
            next(call)
        except StopIteration as ready:
            message: Message = ready.value
        else:  # suspended: nothing there yet
            call.close()
            return False
        if message["type"] == "http.disconnect":
            return True
        if message["type"] != "http.request" or message.get("more_body", False):
            return False
    return False


#: The longest discard after a 408 (:class:`LingeringClose`), in seconds.
SLOW_CLIENT_LINGER_S = 1.0


class LingeringClose:
    """Lets an answer given before the request body was read (413, 401, 422 of a
    streamed body, ...) reach the client, as nginx's lingering close does.

    Clients such as Python's urllib and requests send the whole body before reading
    the answer; a server that closes the socket with their data unread makes the kernel
    reset the connection, and the client sees ECONNRESET instead of the answer. Here the
    answer's bytes are sent at once, then up to ``max_bytes`` of the rest of the body
    are read and dropped (for at most ``timeout_s`` seconds) before the answer is
    marked complete and the server may close. After a 408 the client is the slow one, and
    the discard lasts at most :data:`SLOW_CLIENT_LINGER_S`: enough for the answer to arrive
    before the close (a close with the trickle still arriving resets the connection, and
    the reset can drop the 408 unread), not enough to hold the connection. Skipped when the
    rest is known to be larger, and when the client waits for ``100 Continue`` (it never
    sends the body). Must be the outermost middleware, so that
    the request metrics see the answer's status, not a disconnect during the discard.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        if max_bytes < 0 or timeout_s <= 0:
            raise ValueError("max_bytes must be >= 0 and timeout_s > 0")
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.max_bytes == 0:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        declared = headers.get(b"content-length", b"")
        size = int(declared) if declared.isdigit() else None
        body_done = size == 0 or (size is None and b"transfer-encoding" not in headers)
        expects_continue = headers.get(b"expect", b"").lower() == b"100-continue"
        asked = False
        received = 0
        status = 0

        async def receive_tracking() -> Message:
            nonlocal body_done, asked, received
            asked = True
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            received += len(message.get("body", b""))
            return message

        async def send_lingering(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif (message["type"] == "http.response.body" and not message.get("more_body", False)
                  and self._should_linger(body_done, status, expects_continue and not asked, size, received)):
                await send({**message, "more_body": True})  # the answer's bytes go out now
                await self._discard(receive_tracking,
                                    min(self.timeout_s, SLOW_CLIENT_LINGER_S) if status == 408 else self.timeout_s)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            await send(message)

        await self.app(scope, receive_tracking, send_lingering)

    def _should_linger(self, body_done: bool, status: int, waiting_for_continue: bool, size: int | None,
                       received: int) -> bool:
        if body_done or waiting_for_continue:
            return False
        return size is None or size - received <= self.max_bytes

    async def _discard(self, receive: Receive, timeout_s: float) -> None:
        left = self.max_bytes
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while left > 0:
                    message = await receive()
                    if message["type"] != "http.request" or not message.get("more_body", False):
                        return
                    left -= len(message.get("body", b""))


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
