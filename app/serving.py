"""How uvicorn runs the service: limits for slow clients, and several workers with one
listening socket *each*.

**Slow clients.** uvicorn times out only idle keep-alive connections: a client that
connects and sends nothing, or trickles its headers a byte at a time, holds a connection
(and its memory) for ever. :class:`GuardedHttpToolsProtocol` gives every request head
``header_timeout_s`` to arrive (from the connection's start, or from the first byte of a
later request) and ``max_header_bytes`` of room; past either it answers 408 or 431
(problem+json) and closes. Slow bodies are the routes' business (``body_read_timeout_s``,
``body_timeout_s``, ``body_min_rate_bytes_s``: 408), and idle keep-alive connections close
after ``keep_alive_timeout_s``. :func:`http_options` gives uvicorn all of them.

**Workers.**
uvicorn's own multi-worker mode binds one socket in the parent and shares it: all workers
then race to ``accept()`` on one queue, and the first to wake takes a whole burst of new
connections. Measured here: 64 keep-alive connections split 46/18 between two workers, so
one worker served 72% of the load and set the p99. With ``SO_REUSEPORT`` each worker
listens on its own socket in one group, and the kernel spreads new connections across
them by a hash of the client address and port (Linux).

uvicorn's supervisor (restarts, signals, health pings) is kept: it hands every worker it
starts the same list of "sockets", and :class:`ReusePortListener` is a stand-in that
becomes a fresh ``SO_REUSEPORT`` socket when the worker unpickles it. SIGHUP is passed on
to the workers (:class:`Supervisor`), which reload the model in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.supervisors import Multiprocess

from app.errors import PROBLEM_BASE, PROBLEM_JSON
from app.settings import Settings

#: Whether this platform balances connections across SO_REUSEPORT sockets.
SUPPORTED = sys.platform == "linux" and hasattr(socket, "SO_REUSEPORT")


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``(host, port)`` in the port's SO_REUSEPORT group."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class ReusePortListener:
    """Pickles as "bind a new SO_REUSEPORT socket to this address": each worker that
    receives it gets a listening socket of its own."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    def __reduce__(self) -> tuple[Any, tuple[str, int]]:
        return reuse_port_socket, (self.host, self.port)


class AnnouncingServer(uvicorn.Server):
    """uvicorn's server that calls ``announce(url)`` once it listens (the real port, also
    for port 0), after the app's startup: a line a person or a script can wait for."""

    def __init__(self, config: uvicorn.Config, announce: Callable[[str], None]) -> None:
        super().__init__(config)
        self.announce = announce

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.should_exit or not self.servers:
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        self.announce(f"http://{_url_host(host)}:{port}")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def run_workers(config: uvicorn.Config, announce: Callable[[str], None] | None = None) -> None:
    """Run ``config.workers`` workers under uvicorn's supervisor, each on its own socket.

    The parent binds the address too (without listening) so that a port held by another
    program fails here, at once, and so that the port stays this group's while workers
    restart. Needs a fixed TCP port: port 0 would give every worker a port of its own.
    """
    if not SUPPORTED or config.uds or config.fd is not None or config.port == 0:
        raise ValueError("per-worker sockets need Linux and a fixed TCP host and port")
    with reuse_port_socket(config.host, config.port):
        if announce is not None:
            announce(f"http://{_url_host(config.host)}:{config.port} ({config.workers} workers)")
        Supervisor(config, sockets=[ReusePortListener(config.host, config.port)]).run()  # type: ignore[list-item]


class Supervisor(Multiprocess):
    """uvicorn's supervisor, but SIGHUP reloads the model in place instead of restarting
    the workers: it is passed on to each worker, which loads ``SEQGUARD_BUNDLE`` again
    beside the live model and swaps it in without dropping a request (``app.live``)."""

    def handle_hup(self) -> None:
        for process in self.processes:
            if process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGHUP)


def _problem_bytes(status: int, reason: bytes, slug: str, title: str, detail: str) -> bytes:
    body = orjson.dumps({"type": PROBLEM_BASE + slug, "title": title, "status": status, "detail": detail})
    head = (b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, reason, PROBLEM_JSON.encode(), len(body)))
    return head + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline and a size limit on request heads.

    The deadline starts when the connection opens, and again at the first byte of each
    later request on it (between requests uvicorn's keep-alive timeout applies).
    """

    def __init__(self, *args: Any, header_timeout_s: float, max_header_bytes: int,
                 unfinished_close_s: float = 10.0, send_timeout_s: float = 60.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.max_header_bytes = max_header_bytes
        self.unfinished_close_s = unfinished_close_s
        self.send_timeout_s = send_timeout_s
        self._send_timer: asyncio.TimerHandle | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._head_tail = b""  # the last 3 bytes of the head so far: its end may span two reads

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head()
        self._stop_send_timer()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        # The send buffer is full: the client is not reading. It has send_timeout_s to start
        # again, else the connection is aborted (the answer, and its memory, are dropped);
        # without this a backfill's answer waited for ever on a client that never reads.
        super().pause_writing()
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.send_timeout_s, self._send_timed_out)

    def resume_writing(self) -> None:
        self._stop_send_timer()
        super().resume_writing()

    def _stop_send_timer(self) -> None:
        _cancel(self._send_timer)
        self._send_timer = None

    def _send_timed_out(self) -> None:
        self._send_timer = None
        if not self.transport.is_closing():
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is not None:  # in a head: count its bytes, up to its end if this data holds it
            seen = self._head_tail + data
            end = seen.find(b"\r\n\r\n")
            self._head_bytes += len(data) if end < 0 else max(0, end + 4 - len(self._head_tail))
            self._head_tail = seen[-3:]
            if self._head_bytes > self.max_header_bytes:  # before the parser sees it: never served
                self._refuse(431, b"Request Header Fields Too Large", "request-header-fields-too-large",
                             f"the request head exceeds {self.max_header_bytes} bytes")
                return
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:  # the first byte of a later request on this connection
            self._start_head()

    def on_headers_complete(self) -> None:
        self._stop_head()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        cycle = self.cycle
        if cycle is not None and cycle.more_body and not self.transport.is_closing():
            # Answered before its body ended (413, 401, 415, a 408 line of a stream, ...):
            # the rest may still trickle in, and every byte of it cancels uvicorn's keep-alive
            # timer while no new request (and so no head deadline) can begin. The answer
            # completes after the lingering close's drain (app.middleware.LingeringClose); the
            # connection then closes after the keep-alive timeout, unless a new request began.
            self.loop.call_later(self.unfinished_close_s, self._close_unfinished, cycle)

    def _close_unfinished(self, cycle: Any) -> None:
        if self.cycle is cycle and not self.transport.is_closing():
            self.transport.close()

    def _start_head(self) -> None:
        self._head_bytes, self._head_tail = 0, b""
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _stop_head(self) -> None:
        _cancel(self._head_timer)
        self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        self._refuse(408, b"Request Timeout", "request-timeout",
                     f"the request head did not arrive within {self.header_timeout_s:g} s")

    def _refuse(self, status: int, reason: bytes, slug: str, detail: str) -> None:
        self._stop_head()
        if not self.transport.is_closing():
            title = reason.decode()
            self.transport.write(_problem_bytes(status, reason, slug, title[0] + title[1:].lower(), detail))
            self.transport.close()


def share_the_gil(settings: Settings) -> None:
    """Set how long a thread may keep the GIL while another waits for it.

    A backfill parses and encodes in a thread of its own (``AppState.batch_executor``), so
    the event loop stays free; but every time the loop's thread gives up the GIL (to
    poll sockets, to hand a batch to the scoring thread) it must take it back from that
    thread, which Python allows only every switch interval (5 ms by default). Each live
    request makes several such round trips, and queued requests wait behind each other:
    with a 100k-event JSON backfill whose work is all off the loop
    (tests/benchmarks/bench_backfill_stall.py, 2 cores), `/events` p99 was 0.3–0.6 s at
    5 ms and 0.17–0.18 s at 0.5 ms, with the backfill's own time unchanged (about 10 s).
    """
    sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)


def _cancel(timer: asyncio.TimerHandle | None) -> None:
    """Cancel ``timer`` if there is one."""
    if timer is not None:
        timer.cancel()


def http_options(settings: Settings) -> dict[str, Any]:
    """uvicorn options (``uvicorn.Config`` keywords) for ``settings``' limits on slow clients:
    the guarded httptools protocol, and the keep-alive timeout."""
    protocol = functools.partial(GuardedHttpToolsProtocol, header_timeout_s=settings.header_timeout_s,
                                 max_header_bytes=settings.max_header_bytes,
                                 unfinished_close_s=settings.keep_alive_timeout_s,
                                 send_timeout_s=settings.send_timeout_s)
    return {"http": protocol, "timeout_keep_alive": settings.keep_alive_timeout_s}
