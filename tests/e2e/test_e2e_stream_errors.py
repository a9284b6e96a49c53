"""NDJSON /batch-score streams that a problem ends after their 200 went out: the stream's
last line is the problem, ``seqguard_requests_total`` counts the request as the 200 that
was sent, and ``seqguard_stream_errors_total{route, status}`` counts the cut stream under
the problem's status (413 body or line over the cap, 408 body too slow, 503 window store
down, 500 an unexpected error). A stream that ends normally, invalid-line error lines
included, is not counted there; neither is a client that leaves mid-stream (a 499).

Through a real `seqguard serve` on loopback with small caps and short timeouts (the module
server of ``test_e2e_slow_clients``), and through the app in process where a fault must be
injected.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
import redis

from app.routes import backfill
from app.routes.backfill import CHUNK_EVENTS
from app.windows import user_keys

from . import test_e2e_slow_clients as slow_clients
from .e2e_support import T0, LiveServer, TestClient, event, metric, parse_metrics, wait_for
from .test_e2e_slow_clients import BATCH_BODY_CAP, LINE_CAP, connect, stream_ndjson

#: That module's live server (small caps, 1 s body timeout), one for this module: pytest
#: finds a fixture by its name here.
server = slow_clients.server
ROUTE = "/batch-score"
STATUSES = ("408", "413", "500", "503")


def counts(samples: list[tuple[str, dict[str, str], float]]) -> dict[str, float]:
    """``/batch-score``'s requests by status (``req <status>``) and cut streams by status (``cut <status>``)."""
    out = {f"req {lab['status']}": v for n, lab, v in samples
           if n == "seqguard_requests_total" and lab["route"] == ROUTE}
    out |= {f"cut {s}": metric(samples, "seqguard_stream_errors_total", route=ROUTE, status=s) for s in STATUSES}
    return out


def scrape(server: LiveServer) -> dict[str, float]:
    return counts(parse_metrics(httpx.get(server.url + "/metrics", timeout=10).text))


def grown(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """The counts that changed, and by how much."""
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def counted_as(server: LiveServer, before: dict[str, float], request_status: str) -> dict[str, float]:
    """What changed once the request's own count (``request_status``) is in: the request
    metrics count it after the answer's last byte went out, so maybe after the client read it."""
    key = f"req {request_status}"
    wait_for(lambda: scrape(server).get(key, 0) > before.get(key, 0), 30, f"a {request_status} counted")
    return grown(before, scrape(server))


def first_chunk(prefix: str) -> list[bytes]:
    """One full chunk of valid lines: the answer has started once it is scored."""
    return [orjson.dumps(event(f"{prefix}{i}", f"u{i % 50}", T0 + i)) + b"\n" for i in range(CHUNK_EVENTS)]


def in_pieces(lines: list[bytes], size: int = 500) -> Iterator[bytes]:
    for i in range(0, len(lines), size):
        yield b"".join(lines[i: i + size])


def assert_answered_then_cut(out: list[dict[str, Any]], prefix: str, status: int) -> dict[str, Any]:
    """The first chunk's answers, then the problem as the last line; the problem."""
    assert [o.get("event_id") for o in out[:-1]] == [f"{prefix}{i}" for i in range(CHUNK_EVENTS)], out[-3:]
    problem: dict[str, Any] = out[-1]["error"]
    assert problem["status"] == status, problem
    return problem


# ---------------------------------------------------- cut streams: counted by status


@pytest.mark.parametrize("cap", ["line", "body"])
def test_a_stream_cut_by_a_413_line_is_counted_under_413(server: LiveServer, cap: str) -> None:
    """A line over SEQGUARD_BATCH_MAX_LINE_BYTES, or a body over SEQGUARD_BATCH_MAX_BODY_BYTES,
    after the first chunk was answered."""
    lines = first_chunk(f"l413{cap}-")
    if cap == "line":
        rest = [b"x" * (2 * LINE_CAP) + b"\n"]
    else:
        rest = [orjson.dumps(event(f"over{i}", "u0", T0 + CHUNK_EVENTS + i)) + b"\n"
                for i in range(BATCH_BODY_CAP // 80)]
        assert sum(map(len, lines)) < BATCH_BODY_CAP < sum(map(len, lines + rest))
    before = scrape(server)
    status, out = stream_ndjson(server, in_pieces(lines + rest))
    assert status == 200
    problem = assert_answered_then_cut(out, f"l413{cap}-", 413)
    assert problem["type"].endswith("/payload-too-large")
    assert (f"{LINE_CAP} bytes" if cap == "line" else f"{BATCH_BODY_CAP} bytes") in problem["detail"]
    assert counted_as(server, before, "200") == {"req 200": 1, "cut 413": 1}


def test_a_stream_cut_by_a_408_line_is_counted_under_408(server: LiveServer) -> None:
    """The body stalls (1 s here) after the first chunk was answered."""
    lines = first_chunk("l408-")
    stop = threading.Event()

    def body() -> Iterator[bytes]:
        yield from in_pieces(lines)
        stop.wait(30)  # then nothing: the server ends it first

    before = scrape(server)
    status, out = stream_ndjson(server, body(), stop)
    assert status == 200
    assert assert_answered_then_cut(out, "l408-", 408)["detail"] == "no part of the body arrived for 1 s"
    assert counted_as(server, before, "200") == {"req 200": 1, "cut 408": 1}


def test_a_stream_cut_by_a_503_line_is_counted_under_503(server: LiveServer, redis_server: str) -> None:
    """update_windows, and Redis refuses writes once the first chunk was stored and answered
    (as ``test_a_store_failure_mid_stream_ends_it_with_a_503_line``)."""
    run = uuid.uuid4().hex[:8]  # users of this run alone: the Redis outlives it
    first = [event(f"sf-{i}", f"sf-{run}-{i % 50}", T0 + i) for i in range(CHUNK_EVENTS)]
    rest = [event(f"sf-late-{i}", f"sf-{run}-0", T0 + CHUNK_EVENTS + i) for i in range(50)]
    r = redis.Redis.from_url(redis_server)

    def body() -> Iterator[bytes]:
        yield b"".join(orjson.dumps(e) + b"\n" for e in first)
        wait_for(lambda: bool(r.hexists(user_keys(f"sf-{run}-49").ids, f"sf-{CHUNK_EVENTS - 1}")), 30,
                 "the first chunk stored")
        r.config_set("maxmemory", 1)  # full: every write refused from now on
        yield b"".join(orjson.dumps(e) + b"\n" for e in rest)

    before = scrape(server)
    try:
        res = httpx.post(server.url + "/batch-score?update_windows=true", content=body(),
                         headers={"content-type": "application/x-ndjson"}, timeout=120)
    finally:
        r.config_set("maxmemory", 0)
    assert res.status_code == 200
    out = [orjson.loads(x) for x in res.content.splitlines()]
    assert [o.get("event_id") for o in out[:-1]] == [e["event_id"] for e in first]
    assert out[-1]["error"]["status"] == 503
    assert counted_as(server, before, "200") == {"req 200": 1, "cut 503": 1}


# ---------------------------------------------- streams that are not cut: not counted


def test_a_stream_ending_normally_is_not_counted_even_with_invalid_line_errors(server: LiveServer) -> None:
    """Two chunks, the second with invalid lines: each gets its ``{"error": {"line", ...}}``
    lines where it stood, and the stream still ends normally, so no cut stream is counted."""
    lines = [*first_chunk("ok-"), b'{"event_id": "bad"}\n',
             orjson.dumps(event("ok-last", "u0", T0 + CHUNK_EVENTS)) + b"\n"]
    before = scrape(server)
    status, out = stream_ndjson(server, in_pieces(lines))
    assert status == 200
    assert out[-1]["event_id"] == "ok-last" and out[CHUNK_EVENTS]["error"]["line"] == CHUNK_EVENTS
    assert counted_as(server, before, "200") == {"req 200": 1}


def test_a_client_leaving_mid_stream_is_a_499_not_a_cut_stream(server: LiveServer) -> None:
    """The client reads the start of its answer, then closes the connection mid-upload:
    the request metrics count a 499, and no stream error is added to it."""
    before = scrape(server)
    with connect(server) as sock:
        sock.sendall(b"POST /batch-score HTTP/1.1\r\nHost: t\r\nContent-Type: application/x-ndjson\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        for piece in in_pieces(first_chunk("gone-")):
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # the answer has started
    assert counted_as(server, before, "499") == {"req 499": 1}


# ------------------------------------------ an unexpected error mid-stream: a 500 line


def test_an_unexpected_error_mid_stream_ends_it_with_a_counted_500_line(
        make_client: Callable[..., TestClient], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Scoring fails on the second chunk. It used to cut the stream off with no last line
    (and, on a real server, no terminating chunk: the client saw a broken answer), counted
    as a plain 200. Now: a 500 line naming an error_id, the traceback logged once under
    that id, and the cut stream counted under 500."""
    monkeypatch.setattr(backfill, "CHUNK_EVENTS", 10)
    real, calls = backfill.score_events, []

    def failing_on_the_second_chunk(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("scoring failed")
        return real(*args, **kwargs)

    monkeypatch.setattr(backfill, "score_events", failing_on_the_second_chunk)
    client = make_client()
    body = b"".join(orjson.dumps(event(f"x{i}", "u", T0 + i)) + b"\n" for i in range(25))
    with caplog.at_level(logging.ERROR, logger="seqguard"):
        r = client.post("/batch-score", content=body, headers={"content-type": "application/x-ndjson"})
    out = [orjson.loads(x) for x in r.content.splitlines()]
    assert r.status_code == 200 and [o.get("event_id") for o in out[:-1]] == [f"x{i}" for i in range(10)]
    problem = out[-1]["error"]
    assert problem["status"] == 500 and problem["type"].endswith("/internal-error")
    assert "scoring failed" not in r.text  # a 500 never echoes internals
    logged = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert len(logged) == 1 and logged[0].exc_info is not None, [rec.getMessage() for rec in logged]
    assert problem["error_id"] in logged[0].getMessage()
    s = counts(parse_metrics(client.get("/metrics").text))
    assert grown({}, s) == {"req 200": 1, "cut 500": 1}
