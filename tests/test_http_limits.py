"""Limits on request bodies at the ASGI level, with real Starlette requests: the NDJSON
line splitter (linear, capped), body reads that time out, the lingering close and the
499 of a client that went away. The live server's side is in
tests/e2e/test_e2e_slow_clients.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from starlette.requests import ClientDisconnect, Request
from starlette.types import Message, Receive, Scope, Send

from app import errors
from app.errors import PayloadTooLarge, RequestTimeout
from app.metrics import Metrics
from app.middleware import LingeringClose, RequestMetrics
from app.routes.batch import _lines
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


class Wire:
    """A client's side of one request: the body as messages, what the app sends back."""

    def __init__(self, body_parts: list[bytes], *, then_disconnect: bool = False) -> None:
        self.messages: list[Message] = [
            {"type": "http.request", "body": p, "more_body": i < len(body_parts) - 1 or then_disconnect}
            for i, p in enumerate(body_parts)]
        if then_disconnect:
            self.messages.append({"type": "http.disconnect"})
        self.read = 0
        self.sent: list[tuple[Message, int]] = []  # each message sent, with the body messages read by then

    async def receive(self) -> Message:
        if self.read < len(self.messages):
            self.read += 1
            return self.messages[self.read - 1]
        await asyncio.sleep(3600)  # a client that sends nothing more
        raise AssertionError("unreachable")

    async def send(self, message: Message) -> None:
        self.sent.append((message, self.read))


def answer_413_at_once() -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 413, "headers": []})
        await send({"type": "http.response.body", "body": b"too large"})

    return app


def run_lingering(wire: Wire, headers: list[tuple[bytes, bytes]], *, max_bytes: int = 1000,
                  timeout_s: float = 5.0) -> None:
    mw = LingeringClose(answer_413_at_once(), max_bytes=max_bytes, timeout_s=timeout_s)
    asyncio.run(mw(http_scope(headers), wire.receive, wire.send))


def test_an_early_answer_goes_out_then_the_rest_of_the_body_is_read_before_it_completes() -> None:
    wire = Wire([b"x" * 100] * 5)
    run_lingering(wire, [(b"content-length", b"500")])
    (start, _), (body, read_then), (end, read_at_end) = wire.sent
    assert start["status"] == 413
    assert body == {"type": "http.response.body", "body": b"too large", "more_body": True} and read_then == 0
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


class _State:
    def __init__(self) -> None:
        self.metrics = Metrics()


class _App:
    def __init__(self) -> None:
        self.state = type("S", (), {"seqguard": _State()})()


def counted(app: Callable[[Scope, Receive, Send], Awaitable[None]], wire: Wire) -> dict[str, float]:
    """Run ``app`` under RequestMetrics; seqguard_requests_total by status."""
    holder = _App()
    scope = http_scope([(b"content-length", b"1000")]) | {"app": holder}
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

    wire = Wire([b"x"])
    wire.messages.append({"type": "http.disconnect"})
    assert counted(completes, wire) == {"200": 1.0}
