"""Limits on request bodies at the ASGI level, with real Starlette requests: the NDJSON
line splitter (linear, capped), body reads that time out, the lingering close and the
499 of a client that went away. The live server's side is in
tests/e2e/test_e2e_slow_clients.py."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from starlette.requests import ClientDisconnect, Request
from starlette.types import Message, Receive, Scope, Send

from app import errors
from app.errors import PayloadTooLarge, RequestTimeout
from app.metrics import Metrics
from app.middleware import LingeringClose, RequestMetrics
from app.routes.backfill import _lines
from app.routes.events import body_chunks


async def collect(it: AsyncIterator[bytes]) -> list[bytes]:
    return [x async for x in it]


async def pieces(*parts: bytes) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


def lines(*parts: bytes, max_line: int = 1 << 20, max_body: int = 1 << 30) -> list[bytes]:
    return asyncio.run(collect(_lines(pieces(*parts), max_line=max_line, max_body=max_body)))


def test_lines_are_cut_at_newlines_wherever_the_pieces_end() -> None:
    body = b"".join(b'{"n": %d}\n' % i + (b"\n" if i % 3 == 0 else b"") for i in range(200)) + b'{"n": 200}'
    want = [b'{"n": %d}' % i for i in range(201)]
    for size in (1, 2, 5, 11, 64, len(body)):
        assert lines(*(body[i: i + size] for i in range(0, len(body), size))) == want
    assert lines(b"a\r\n", b"  \n", b"b") == [b"a\r", b"b"]  # blank lines skipped, \r left to JSON


def test_a_leading_bom_goes_before_the_blank_lines_are_skipped() -> None:
    """A BOM then a blank line (as the JSONL loader reads it) was a line of its own: 400."""
    bom = b"\xef\xbb\xbf"
    assert lines(bom + b"\n" + b'{"a": 1}\n') == [b'{"a": 1}']
    assert lines(bom, b"\n\n", b'{"a": 1}') == [b'{"a": 1}']
    assert lines(b'{"a": 1}\n', bom + b'{"b": 2}') == [b'{"a": 1}', bom + b'{"b": 2}']  # only at the start


def test_a_line_past_the_cap_is_refused_as_soon_as_it_is_past() -> None:
    consumed = 0

    async def endless() -> AsyncIterator[bytes]:  # one line that never ends
        nonlocal consumed
        while True:
            consumed += 1
            yield b"x" * 1000

    with pytest.raises(PayloadTooLarge, match="line 0 exceeds the limit of 10000 bytes"):
        asyncio.run(collect(_lines(endless(), max_line=10_000, max_body=1 << 30)))
    assert consumed == 11  # not one piece more than needed
    with pytest.raises(PayloadTooLarge, match="line 2 exceeds"):
        lines(b"a\nb\n", b"c" * 50, b"c" * 51 + b"\n", max_line=100)
    assert lines(b"a\nb\n", b"c" * 50, b"c" * 50 + b"\n", max_line=100) == [b"a", b"b", b"c" * 100]


def test_the_body_cap_holds_for_many_short_lines() -> None:
    with pytest.raises(PayloadTooLarge, match="NDJSON body exceeds the limit of 1000 bytes"):
        lines(*[b"0123456789\n"] * 100, max_body=1000)
    assert len(lines(*[b"0123456789\n"] * 90, max_body=1000)) == 90


def http_scope(headers: list[tuple[bytes, bytes]] | None = None) -> Scope:
    return {"type": "http", "method": "POST", "path": "/x", "headers": headers or [], "query_string": b""}


def test_a_stalled_body_times_out_with_408() -> None:
    async def stalled() -> Message:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def read(receive: Receive, **kw: Any) -> list[bytes]:
        return await collect(body_chunks(Request(http_scope(), receive), **kw))

    with pytest.raises(RequestTimeout, match=r"no part of the body arrived for 0\.05 s") as info:
        asyncio.run(read(stalled, read_timeout_s=0.05))
    assert info.value.status == 408 and info.value.headers["Connection"] == "close"

    async def trickle() -> Message:  # a piece every 20 ms: never idle long, but never done
        await asyncio.sleep(0.02)
        return {"type": "http.request", "body": b"x", "more_body": True}

    with pytest.raises(RequestTimeout, match=r"not received within 0\.2 s"):
        asyncio.run(read(trickle, read_timeout_s=10, total_timeout_s=0.2))

    async def gone() -> Message:
        return {"type": "http.disconnect"}

    with pytest.raises(ClientDisconnect):
        asyncio.run(read(gone, read_timeout_s=10))


def paced(piece: bytes, every_s: float, pieces: int = 1 << 30) -> Receive:
    """A client sending ``piece`` every ``every_s`` seconds, ``pieces`` times."""
    sent = 0

    async def receive() -> Message:
        nonlocal sent
        await asyncio.sleep(every_s)
        sent += 1
        return {"type": "http.request", "body": piece, "more_body": sent < pieces}

    return receive


def test_a_body_under_the_minimum_rate_times_out_after_the_grace() -> None:
    """A piece every 20 ms keeps the per-piece timeout quiet, but 10 bytes a piece is 500
    bytes/s: cut once the grace (0.2 s) and what its bytes bought (1/2000 s each) are spent."""
    async def read() -> tuple[float, str]:
        started = asyncio.get_running_loop().time()
        with pytest.raises(RequestTimeout) as info:
            await collect(body_chunks(Request(http_scope(), paced(b"x" * 10, 0.02)), read_timeout_s=10,
                                      min_rate_bytes_s=2000, min_rate_grace_s=0.2))
        return asyncio.get_running_loop().time() - started, info.value.detail or ""

    took, detail = asyncio.run(read())
    assert detail == "the body arrived at under 2000 bytes/s for longer than 0.2 s"
    # 0.2 s of grace + 500 B/s x t / 2000 B/s = t: cut at about 0.27 s (pieces come each 20 ms).
    assert 0.2 < took < 1.0, took


def test_a_fast_start_buys_no_more_than_the_grace() -> None:
    """10 kB at once, then a trickle: averaged from the start it would pass for 5 s (10 kB at
    2,000 bytes/s), but the time bought is capped at the grace: cut within about 0.2 s."""
    sent = 0

    async def receive() -> Message:
        nonlocal sent
        sent += 1
        if sent > 1:
            await asyncio.sleep(0.02)
        return {"type": "http.request", "body": b"x" * (10_000 if sent == 1 else 1), "more_body": True}

    async def read() -> float:
        started = asyncio.get_running_loop().time()
        with pytest.raises(RequestTimeout, match=r"under 2000 bytes/s for longer than 0\.2 s"):
            await collect(body_chunks(Request(http_scope(), receive), read_timeout_s=10, min_rate_bytes_s=2000,
                                      min_rate_grace_s=0.2))
        return asyncio.get_running_loop().time() - started

    assert 0.15 < asyncio.run(read()) < 1.0


def test_a_body_at_the_minimum_rate_or_faster_is_never_cut() -> None:
    async def read(receive: Receive, pause_s: float = 0.0) -> int:
        size = 0
        async for piece in body_chunks(Request(http_scope(), receive), read_timeout_s=10, min_rate_bytes_s=2500,
                                       min_rate_grace_s=0.1):
            size += len(piece)
            await asyncio.sleep(pause_s)
        return size

    # 5,000 bytes/s for 0.8 s, twice the minimum: well past the grace, never cut.
    assert asyncio.run(read(paced(b"x" * 100, 0.02, pieces=40))) == 4000
    # Pieces that are there at once, but the reader works 0.05 s on each (a chunk being
    # scored): 2,000 bytes/s by the wall clock, yet the client was never waited for.
    assert asyncio.run(read(paced(b"x" * 100, 0.0, pieces=20), pause_s=0.05)) == 2000


class Wire:
    """A client's side of one request: the body as messages, what the app sends back.

    ``then_disconnect``: the client goes away during the upload (the last part says more
    is coming); ``then_leave``: it sends the whole body, then goes away. Once the answer is
    complete, ``receive`` answers ``http.disconnect``, as servers (uvicorn) do.
    """

    def __init__(self, body_parts: list[bytes], *, then_disconnect: bool = False, then_leave: bool = False) -> None:
        self.messages: list[Message] = [
            {"type": "http.request", "body": p, "more_body": i < len(body_parts) - 1 or then_disconnect}
            for i, p in enumerate(body_parts)]
        if then_disconnect or then_leave:
            self.messages.append({"type": "http.disconnect"})
        self.read = 0
        self.answered = False
        self.sent: list[tuple[Message, int]] = []  # each message sent, with the body messages read by then

    async def receive(self) -> Message:
        if self.read < len(self.messages):
            self.read += 1
            return self.messages[self.read - 1]
        if self.answered:
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)  # a client that sends nothing more
        raise AssertionError("unreachable")

    async def send(self, message: Message) -> None:
        self.sent.append((message, self.read))
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            self.answered = True


def answer_at_once(status: int) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"answer"})

    return app


def run_lingering(wire: Wire, headers: list[tuple[bytes, bytes]], *, max_bytes: int = 1000,
                  timeout_s: float = 5.0, status: int = 413) -> None:
    mw = LingeringClose(answer_at_once(status), max_bytes=max_bytes, timeout_s=timeout_s)
    asyncio.run(mw(http_scope(headers), wire.receive, wire.send))


def test_an_early_answer_goes_out_then_the_rest_of_the_body_is_read_before_it_completes() -> None:
    wire = Wire([b"x" * 100] * 5)
    run_lingering(wire, [(b"content-length", b"500")])
    (start, _), (body, read_then), (end, read_at_end) = wire.sent
    assert start["status"] == 413
    assert body == {"type": "http.response.body", "body": b"answer", "more_body": True} and read_then == 0
    assert end == {"type": "http.response.body", "body": b"", "more_body": False} and read_at_end == 5


def test_the_discard_is_bounded_and_skipped_where_it_cannot_help() -> None:
    wire = Wire([b"x" * 100] * 50)  # 5,000 bytes to come, 1,000 allowed: close at once
    run_lingering(wire, [(b"content-length", b"5000")])
    assert [m.get("more_body", False) for m, _ in wire.sent] == [False, False] and wire.read == 0
    wire = Wire([b"x" * 100] * 50)  # chunked, length unknown: read up to the bound, then stop
    run_lingering(wire, [(b"transfer-encoding", b"chunked")])
    assert wire.sent[-1][1] == 10
    wire = Wire([b"x" * 100])  # a client waiting for "100 Continue" never sends its body
    run_lingering(wire, [(b"content-length", b"100"), (b"expect", b"100-continue")])
    assert len(wire.sent) == 2 and wire.read == 0
    wire = Wire([b"x"])  # a client that stalls: the discard ends after timeout_s
    run_lingering(wire, [(b"content-length", b"100")], timeout_s=0.05)
    assert wire.sent[-1][0] == {"type": "http.response.body", "body": b"", "more_body": False}
    wire = Wire([])  # no body at all: nothing to do
    run_lingering(wire, [])
    assert len(wire.sent) == 2 and wire.read == 0


def test_a_408_lingers_briefly_so_that_a_trickling_client_reads_it_before_the_close() -> None:
    """A close while the slow client's bytes still arrive resets the connection, and the
    reset can drop the 408 unread: the 408 goes out, what arrives is dropped for at most
    SLOW_CLIENT_LINGER_S (not the full linger_timeout_s), then the answer completes."""
    from app.middleware import SLOW_CLIENT_LINGER_S

    wire = Wire([b"x"] * 3)  # three more bytes arrive, then the client stalls
    wire.messages[-1]["more_body"] = True
    started = time.monotonic()
    run_lingering(wire, [(b"content-length", b"100")], timeout_s=30.0, status=408)
    took = time.monotonic() - started
    (start, _), (body, read_then), (end, read_at_end) = wire.sent
    assert start["status"] == 408 and body["more_body"] is True and read_then == 0
    assert end["more_body"] is False and read_at_end == 3
    assert SLOW_CLIENT_LINGER_S <= took < 30.0  # bounded by the short linger, not timeout_s


class _State:
    def __init__(self) -> None:
        self.metrics = Metrics()


class _App:
    def __init__(self) -> None:
        self.state = type("S", (), {"seqguard": _State()})()


def counted(app: Callable[[Scope, Receive, Send], Awaitable[None]], wire: Wire,
            headers: list[tuple[bytes, bytes]] | None = None) -> dict[str, float]:
    """Run ``app`` under RequestMetrics; seqguard_requests_total by status."""
    holder = _App()
    scope = http_scope([(b"content-length", b"1000")] if headers is None else headers) | {"app": holder}
    asyncio.run(RequestMetrics(app)(scope, wire.receive, wire.send))
    text = holder.state.seqguard.metrics.render()[0].decode()
    return {line.split('status="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith("seqguard_requests_total{")}


def test_a_client_gone_mid_upload_counts_as_499() -> None:
    problems = errors.Problems(retry_after_s=1)

    async def reads_body(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await Request(scope, receive).body()
        except ClientDisconnect as exc:
            await problems.response(exc, "POST", "/x")(scope, receive, send)

    assert counted(reads_body, Wire([b"x" * 10], then_disconnect=True)) == {"499": 1.0}

    async def streams(scope: Scope, receive: Receive, send: Send) -> None:
        # Started its answer (200), then the client went: still a 499.
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await receive()
        await receive()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    assert counted(streams, Wire([b"x"], then_disconnect=True)) == {"499": 1.0}

    async def completes(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
        await receive()  # servers answer "disconnect" once the answer is complete: not a 499

    assert counted(completes, Wire([b"x"])) == {"200": 1.0}


async def answers_after_the_body(scope: Scope, receive: Receive, send: Send) -> None:
    """Reads the whole body, then answers 200 (in two parts), as the routes do."""
    await Request(scope, receive).body()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"o", "more_body": True})
    await send({"type": "http.response.body", "body": b"k"})


def test_a_client_gone_after_its_whole_upload_counts_as_499(caplog: pytest.LogCaptureFixture) -> None:
    """It sent all of its body and left while the answer was worked on: the server drops
    the answer unsent (uvicorn says nothing), and the request is a 499, not a 200, logged
    at debug level."""
    wire = Wire([b"x" * 10, b"y" * 10], then_leave=True)
    with caplog.at_level(logging.DEBUG, logger="seqguard.errors"):
        assert counted(answers_after_the_body, wire) == {"499": 1.0}
    assert wire.read == 3  # the body, then the disconnect, found without waiting
    [rec] = caplog.records
    assert rec.levelno == logging.DEBUG and "client closed the connection after its request" in rec.getMessage()
    # The same client, still there: a 200, and nothing read that was not there.
    assert counted(answers_after_the_body, Wire([b"x" * 10, b"y" * 10])) == {"200": 1.0}
    # Without a body (a GET): the same look finds the client gone.
    assert counted(answers_after_the_body, Wire([b""], then_leave=True), headers=[]) == {"499": 1.0}
    assert counted(answers_after_the_body, Wire([b""]), headers=[]) == {"200": 1.0}


def test_a_failed_send_counts_as_499() -> None:
    wire = Wire([b"x"])

    async def send_fails(message: Message) -> None:
        if message["type"] == "http.response.body":
            raise ConnectionResetError("gone")
        await wire.send(message)

    holder = _App()
    scope = http_scope() | {"app": holder}
    with pytest.raises(ConnectionResetError):
        asyncio.run(RequestMetrics(answers_after_the_body)(scope, wire.receive, send_fails))
    assert 'status="499"' in holder.state.seqguard.metrics.render()[0].decode()


def test_an_answer_given_before_the_body_was_read_takes_none_of_it() -> None:
    """The last look for a disconnect is taken only once the body has been read: an early
    answer (413) must leave the unread body to the lingering close."""
    wire = Wire([b"x" * 100] * 5)
    assert counted(answer_at_once(413), wire, headers=[(b"content-length", b"500")]) == {"413": 1.0}
    assert wire.read == 0
