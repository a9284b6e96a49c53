"""The HTTP server under big, slow and vanishing clients (issue 8, items 4, 5, 8, 12, 13),
through a real `seqguard serve` (uvicorn, httptools) on loopback and through the app.

- Over-limit bodies get their 413 problem even from clients that send the whole body
  before reading (urllib): the server reads and drops the rest before it closes.
- A client that drops mid-upload is counted as 499, never as 500, and logs no traceback.
- Clients that trickle or stall their head or body get 408 (431 for a huge head) within
  the configured (here: short) timeouts, and their connection is closed; a body must keep
  arriving at the minimum rate (here 16 KiB/s, 2 s behind at most), a steady one is never cut.
- A client that sends its whole body and leaves before the answer is counted as 499 too.
- NDJSON /batch-score: one line over the line cap, or a body over the body cap, is a 413
  before anything streams; past the first chunk, the stream ends with an error line.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from app.windows import user_keys

from .e2e_support import T0, LiveServer, TestClient, event, parse_metrics, wait_for

PROBLEM = "application/problem+json"
LINE_CAP = 4096
BATCH_BODY_CAP = 3 << 20
MIN_RATE, GRACE = 16 << 10, 2.0  # bytes/s, s


@pytest.fixture(scope="module")
def server(redis_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One live server for the module, with short timeouts and small NDJSON caps."""
    env = {"SEQGUARD_HEADER_TIMEOUT_S": "1", "SEQGUARD_BODY_READ_TIMEOUT_S": "1",
           "SEQGUARD_BATCH_MAX_LINE_BYTES": str(LINE_CAP), "SEQGUARD_BATCH_MAX_BODY_BYTES": str(BATCH_BODY_CAP),
           "SEQGUARD_BODY_MIN_RATE_BYTES_S": str(MIN_RATE), "SEQGUARD_BODY_MIN_RATE_GRACE_S": str(GRACE)}
    with LiveServer(redis_server, tmp_path_factory.mktemp("slow-clients"), env=env) as s:
        yield s


def requests_total(server: LiveServer) -> dict[tuple[str, str], float]:
    samples = parse_metrics(httpx.get(server.url + "/metrics", timeout=10).text)
    return {(lab["route"], lab["status"]): v for n, lab, v in samples if n == "seqguard_requests_total"}


def post_urllib(url: str, body: bytes, content_type: str = "application/json") -> urllib.error.HTTPError:
    """POST as urllib does it: the whole body first, then read (``Connection: close``)."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    return info.value


def connect(server: LiveServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.settimeout(30)  # a guard against hanging, not a measurement: the server's limits are 1 s
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def split_answer(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    return int(status_line.split()[1]), headers, body


# -------------------------------------------------------------- 13: over-limit bodies


def test_a_5mb_event_body_from_urllib_gets_413_not_a_reset(server: LiveServer) -> None:
    for _ in range(3):  # it used to fail 3 tries of 3 with ECONNRESET
        err = post_urllib(server.url + "/events", b"x" * 5_000_000)
        assert err.code == 413 and err.headers["content-type"] == PROBLEM
        problem = orjson.loads(err.read())
        assert problem["status"] == 413 and problem["type"].endswith("/payload-too-large")


def test_over_limit_batch_bodies_from_urllib_get_413(server: LiveServer) -> None:
    big = b"x" * (BATCH_BODY_CAP + 1_000_000)
    for content_type in ("application/json", "application/x-ndjson"):
        err = post_urllib(server.url + "/batch-score", big, content_type)
        assert err.code == 413 and orjson.loads(err.read())["type"].endswith("/payload-too-large")


def test_an_ndjson_line_over_the_cap_gets_413_from_a_live_server(server: LiveServer) -> None:
    # One line, no newline, declared length under the body cap: the line cap refuses it.
    err = post_urllib(server.url + "/batch-score", b"x" * 1_000_000, "application/x-ndjson")
    assert err.code == 413 and err.headers["content-type"] == PROBLEM
    assert f"{LINE_CAP} bytes" in orjson.loads(err.read())["detail"]


# ---------------------------------------------------------- 8: clients that vanish


def test_a_client_dropping_mid_upload_counts_as_499_not_500(server: LiveServer) -> None:
    before = requests_total(server)
    for path, content_type in (("/events", "application/json"), ("/batch-score", "application/json"),
                               ("/batch-score", "application/x-ndjson")):
        with connect(server) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}\r\n"
                         f"Content-Length: 1000000\r\n\r\n".encode() + b'{"event_id": "e1"' + b"\n" * 50_000)
        # The server notices the close when it reads next; /healthz keeps it busy meanwhile.
        for _ in range(200):
            after = requests_total(server)
            if after.get((path, "499"), 0) > before.get((path, "499"), 0):
                break
            httpx.get(server.url + "/healthz", timeout=10)
        before = after
        assert after.get((path, "499"), 0) >= 1, after
    assert not any(status == "500" for _, status in requests_total(server)), requests_total(server)
    log = server.log()
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]


@pytest.mark.parametrize("form", ["json", "ndjson"])
def test_a_client_leaving_after_its_whole_upload_counts_as_499(server: LiveServer, redis_server: str,
                                                               form: str) -> None:
    """The whole body sent, then the socket closed while the answer is worked on: the server
    drops the answer unsent, and counts a 499 for it, not the 200 it would have been. The
    client closes once the first events are in Redis (``update_windows``): by then the body
    has been read to its end, so this is not the mid-upload case above."""
    run = uuid.uuid4().hex[:8]
    events = [event(f"lv-{i}", f"lv-{run}-{i % 50}", T0 + i) for i in range(10_000)]
    if form == "json":
        body, content_type = orjson.dumps({"events": events}), "application/json"
    else:
        body, content_type = b"".join(orjson.dumps(e) + b"\n" for e in events), "application/x-ndjson"
    r = redis.Redis.from_url(redis_server)
    before = requests_total(server)
    with connect(server) as sock:
        sock.sendall(f"POST /batch-score?update_windows=true HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}"
                     f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_for(lambda: bool(r.exists(user_keys(f"lv-{run}-0").ids)), 60, "the first events stored")
    key = ("/batch-score", "499")
    wait_for(lambda: requests_total(server).get(key, 0) > before.get(key, 0), 30, "a 499")
    after = requests_total(server)
    assert after[key] - before.get(key, 0) == 1
    assert after.get(("/batch-score", "200"), 0) == before.get(("/batch-score", "200"), 0), after
    assert r.hexists(user_keys(f"lv-{run}-49").ids, "lv-9999")  # the whole body was read and stored
    log = server.log()
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]


# --------------------------------------------------------------- 12: slow clients


@pytest.mark.parametrize("sent", [b"", b"POST /events HTTP/1.1\r\nHost: t\r\nContent-Ty"],
                         ids=["nothing", "part of the head"])
def test_a_stalled_head_gets_408_and_the_connection_closed(server: LiveServer, sent: bytes) -> None:
    with connect(server) as sock:
        sock.sendall(sent)
        status, headers, body = split_answer(read_all(sock))  # returns: the server closed it
    assert status == 408 and headers["content-type"] == PROBLEM and headers["connection"] == "close"
    assert orjson.loads(body)["type"].endswith("/request-timeout")


@pytest.mark.parametrize("head", [
    b"X-Filler: " + b"a" * 70_000,  # whole heads, ended: the read that ends a head counts too
    b"X-Filler: " + b"a" * 100_000,
    b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 100) for i in range(1_000)).rstrip(b"\r\n"),
], ids=["70k", "100k", "1000-headers"])
def test_a_complete_head_over_the_limit_gets_431(server: LiveServer, head: bytes) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n" + head + b"\r\n\r\n")
        status, headers, _ = split_answer(read_all(sock))
    assert status == 431 and headers["content-type"] == PROBLEM


def test_a_head_under_the_limit_is_served(server: LiveServer) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-Filler: " + b"a" * 60_000
                     + b"\r\n\r\n")
        status, _, _ = split_answer(read_all(sock))
    assert status == 200


def test_a_huge_head_gets_431(server: LiveServer) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Filler: " + b"a" * 100_000)
        status, headers, _ = split_answer(read_all(sock))
    assert status == 431 and headers["content-type"] == PROBLEM


@pytest.mark.parametrize(("path", "head"), [
    ("/events", "Content-Type: application/json\r\nContent-Length: 200"),
    ("/batch-score", "Content-Type: application/json\r\nContent-Length: 200"),
    ("/batch-score", "Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked"),
], ids=["events", "batch-json", "batch-ndjson"])
def test_headers_then_no_body_get_408_and_the_connection_closed(server: LiveServer, path: str, head: str) -> None:
    with connect(server) as sock:
        part = b'4\r\n{"ev\r\n' if "chunked" in head else b'{"ev'  # a start of the body, then nothing
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: t\r\n{head}\r\n\r\n".encode() + part)
        status, headers, body = split_answer(read_all(sock))
    assert status == 408 and headers["content-type"] == PROBLEM and headers["connection"] == "close"
    problem = orjson.loads(body)
    assert problem["type"].endswith("/request-timeout") and "1 s" in problem["detail"]


@pytest.mark.parametrize(("path", "head"), [
    ("/batch-score", "Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked"),
    ("/batch-score", "Content-Type: application/json\r\nContent-Length: 100000"),
    ("/events", "Content-Type: application/json\r\nContent-Length: 100000"),
], ids=["batch-ndjson", "batch-json", "events"])
def test_a_trickling_body_gets_408_within_the_grace(server: LiveServer, path: str, head: str) -> None:
    """A byte every 0.25 s: the per-piece limit (1 s) never fires, but the body falls behind
    the minimum rate at once, and is cut once it is GRACE s behind: 408, connection closed.
    The trickle goes on after the 408: the server's close must not reset the connection
    before the 408 is read (it did about 1 run in 10 on the chunked path)."""
    stop = threading.Event()
    chunked = "chunked" in head
    with connect(server) as sock:
        def write() -> None:
            with contextlib.suppress(OSError):
                sock.sendall(f"POST {path} HTTP/1.1\r\nHost: t\r\n{head}\r\n\r\n".encode())
                for b in itertools.cycle(b'{"event_id": "t1", '):
                    sock.sendall(b"1\r\n%c\r\n" % b if chunked else bytes([b]))
                    if stop.wait(0.25):
                        return

        started = time.monotonic()
        writer = threading.Thread(target=write)
        writer.start()
        try:
            first = sock.recv(65536)  # the answer, then (after at most 1 s of lingering) the close
            took = time.monotonic() - started
            status, headers, body = split_answer(first + read_all(sock))
        finally:
            stop.set()
            writer.join()
    assert status == 408 and headers["content-type"] == PROBLEM and headers["connection"] == "close"
    assert orjson.loads(body)["detail"] == f"the body arrived at under {MIN_RATE} bytes/s for longer than {GRACE:g} s"
    assert GRACE - 0.1 < took < GRACE + 2.0, took


def test_steady_uploads_are_never_cut(server: LiveServer) -> None:
    """A body at twice the minimum rate for twice the grace, and one of more than a chunk
    at full speed (the server stops reading while it scores the first chunk; that time is
    not the client's): both answered whole, in order, without an error line."""
    from app.routes.backfill import CHUNK_EVENTS

    line = [orjson.dumps(event(f"s{i}", f"u{i % 50}", T0 + i)) + b"\n" for i in range(CHUNK_EVENTS + 2_000)]
    per_tick = MIN_RATE * 2 // 8 // len(line[0])  # lines per 1/8 s at twice the minimum rate

    def paced() -> Iterator[bytes]:
        for i in range(0, per_tick * 8 * int(2 * GRACE), per_tick):
            yield b"".join(line[i: i + per_tick])
            time.sleep(1 / 8)

    started = time.monotonic()
    status, out = stream_ndjson(server, paced())
    assert time.monotonic() - started > 2 * GRACE
    assert status == 200 and [o["event_id"] for o in out] == [f"s{i}" for i in range(per_tick * 8 * int(2 * GRACE))]
    status, out = stream_ndjson(server, (b"".join(line[i: i + 500]) for i in range(0, len(line), 500)))
    assert status == 200 and [o["event_id"] for o in out] == [f"s{i}" for i in range(len(line))]


def test_a_connection_answered_before_its_body_ended_is_closed_even_if_bytes_trickle(server: LiveServer) -> None:
    """An attack review: after an early answer (here 415 to a declared 100 kB body), one
    byte every few seconds cancelled uvicorn's keep-alive timer each time and no new request
    could begin, so the connection stayed open for good. It closes after the lingering
    close's drain and then the keep-alive timeout (5 s + 5 s by default)."""
    sock = connect(server)
    sock.sendall(b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
                 b"Content-Length: 100000\r\n\r\nabc")
    sock.settimeout(1.0)
    answer, started, closed_at = b"", time.monotonic(), None
    while time.monotonic() - started < 25:
        with contextlib.suppress(OSError):
            sock.sendall(b"x")  # a byte a second: each one used to cancel the keep-alive timer
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            closed_at = time.monotonic() - started
            break
        if not chunk:
            closed_at = time.monotonic() - started
            break
        answer += chunk
    sock.close()
    assert answer.startswith(b"HTTP/1.1 415"), answer[:200]
    assert closed_at is not None and closed_at < 13, closed_at


def test_a_client_that_never_reads_its_answer_is_cut_off(redis_server: str, tmp_path: Path) -> None:
    """An attack review: a client that posts a large backfill and never reads the answer held
    the connection, and the answer's memory, for as long as it liked. Once the send buffer is
    full, it has SEQGUARD_SEND_TIMEOUT_S (3 s here) to read, else the connection is aborted."""
    n = 60_000  # an answer of about 6 MB: more than the kernel's socket buffers on loopback hold
    body = orjson.dumps({"events": [event(f"nr{i}", f"nr-user-{i % 50}", T0 + i) for i in range(n)]})
    with LiveServer(redis_server, tmp_path, env={"SEQGUARD_SEND_TIMEOUT_S": "3"}) as server:
        sock = connect(server)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the server's buffer fills
        sock.sendall(b"POST /batch-score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(25)  # never read while the answer is built and sent: scoring, then 3 s of a full buffer
        sock.settimeout(10)
        got = b""
        with contextlib.suppress(ConnectionResetError, TimeoutError):
            while chunk := sock.recv(65536):
                got += chunk
        sock.close()
    assert got.count(b'"event_id"') < n  # the answer was dropped, not kept for a reader that never came


def test_a_kept_alive_connection_still_serves_requests_after_its_first(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:  # one connection, several requests
        for _ in range(3):
            assert client.get("/healthz").status_code == 200
        r = client.post("/events", json=event("ka1", "ka-user", T0))
        assert r.status_code == 200 and r.json()["event_id"] == "ka1"


# ------------------------------------------------ 4: NDJSON limits, in the app itself


@pytest.fixture
def small_caps(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(batch_max_line_bytes=LINE_CAP, batch_max_body_bytes=BATCH_BODY_CAP)


def ndjson(client: TestClient, body: Any) -> httpx.Response:
    return client.post("/batch-score", content=body, headers={"content-type": "application/x-ndjson"})


def test_one_ndjson_line_over_the_cap_is_413_before_anything_streams(small_caps: TestClient) -> None:
    r = ndjson(small_caps, b"x" * (100 * LINE_CAP))  # one line, no newline
    assert r.status_code == 413 and r.headers["content-type"] == PROBLEM
    assert r.json()["type"].endswith("/payload-too-large") and "line 0" in r.json()["detail"]
    r = ndjson(small_caps, orjson.dumps(event("ok", "u", T0)) + b"\n" + b"y" * (LINE_CAP + 1) + b"\n")
    assert r.status_code == 413 and "line 1" in r.json()["detail"]


def test_an_ndjson_body_over_the_cap_within_the_first_chunk_is_413(small_caps: TestClient) -> None:
    padded = (orjson.dumps(event(f"p{i}", "u", T0 + i, item_id="i" * 2000)) + b"\n" for i in range(2000))
    r = ndjson(small_caps, padded)
    assert r.status_code == 413 and r.headers["content-type"] == PROBLEM
    assert r.json()["detail"] == f"NDJSON body exceeds the limit of {BATCH_BODY_CAP} bytes"


def dechunk(body: bytes) -> bytes:
    out = b""
    while True:
        size, _, rest = body.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            return out
        out, body = out + rest[:n], rest[n + 2:]


def stream_ndjson(server: LiveServer, pieces: Iterator[bytes],
                  stop: threading.Event | None = None) -> tuple[int, list[dict[str, Any]]]:
    """POST ``pieces`` as a chunked NDJSON body from a thread while the answer is read, as a
    streaming client must (``stop`` is set once the server has closed); the status and the
    answer's lines."""
    with connect(server) as sock:
        def write() -> None:
            with contextlib.suppress(OSError):  # the server may stop reading once it has answered
                sock.sendall(b"POST /batch-score HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                             b"Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n")
                for piece in pieces:
                    sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sock.sendall(b"0\r\n\r\n")

        writer = threading.Thread(target=write)
        writer.start()
        try:
            status, _, body = split_answer(read_all(sock))
        finally:
            if stop is not None:
                stop.set()
            writer.join()
    return status, [orjson.loads(x) for x in dechunk(body).splitlines()]


def test_an_ndjson_body_crossing_the_cap_after_streaming_ends_with_an_error_line(server: LiveServer) -> None:
    """Past the first chunk the answer has started (200): the stream's last line is the
    problem. The client writes and reads at once, as a streaming client must."""
    from app.routes.backfill import CHUNK_EVENTS

    n = BATCH_BODY_CAP // 80
    lines = [orjson.dumps(event(f"c{i}", f"u{i % 50}", T0 + i)) + b"\n" for i in range(n)]
    assert sum(map(len, lines[:CHUNK_EVENTS])) < BATCH_BODY_CAP < sum(map(len, lines))
    with connect(server) as sock:
        def write() -> None:
            with contextlib.suppress(OSError):  # the server may stop reading once it has answered
                sock.sendall(b"POST /batch-score HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                             b"Content-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n")
                for i in range(0, n, 500):
                    piece = b"".join(lines[i: i + 500])
                    sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sock.sendall(b"0\r\n\r\n")

        writer = threading.Thread(target=write)
        writer.start()
        status, _, body = split_answer(read_all(sock))
        writer.join()
    assert status == 200
    out = [orjson.loads(x) for x in dechunk(body).splitlines()]
    assert len(out) - 1 >= CHUNK_EVENTS
    assert [o["event_id"] for o in out[:-1]] == [f"c{i}" for i in range(len(out) - 1)]
    assert out[-1]["error"]["status"] == 413 and out[-1]["error"]["type"].endswith("/payload-too-large")


def test_many_ndjson_lines_in_odd_pieces_are_all_scored_in_order(small_caps: TestClient) -> None:
    body = b"".join(orjson.dumps(event(f"m{i}", f"u{i % 7}", T0 + i * 1000)) + b"\n\n" for i in range(3000))
    sizes = [1, 7, 300, 4096, 65536]

    def pieces() -> Iterator[bytes]:  # pieces that cut lines anywhere, newlines included
        at = k = 0
        while at < len(body):
            yield body[at: at + sizes[k % len(sizes)]]
            at += sizes[k % len(sizes)]
            k += 1

    whole = ndjson(small_caps, body)
    cut = ndjson(small_caps, pieces())
    assert whole.status_code == cut.status_code == 200
    assert [orjson.loads(x)["event_id"] for x in cut.text.splitlines()] == [f"m{i}" for i in range(3000)]
    assert cut.text == whole.text


# ------------------------------------------ 5: live requests first, beside a backfill


def test_the_service_sets_the_gil_switch_interval(make_client: Callable[..., TestClient]) -> None:
    previous = sys.getswitchinterval()
    try:
        client = make_client(gil_switch_interval_ms=0.25)
        assert sys.getswitchinterval() == pytest.approx(0.00025)
        r = client.post("/batch-score", json={"events": [event("g1", "u", T0), event("g2", "u", T0 + 1000)]})
        assert r.status_code == 200 and [x["event_id"] for x in r.json()["results"]] == ["g1", "g2"]
    finally:
        sys.setswitchinterval(previous)


def test_a_store_failure_mid_stream_ends_it_with_a_503_line(server: LiveServer, redis_server: str) -> None:
    """NDJSON with update_windows: Redis refuses writes after the first chunk was stored and
    answered. The answer has started, so its last line is the 503 problem (never a crash
    that cuts the stream off with no word, and no traceback in the log)."""
    run = uuid.uuid4().hex[:8]  # users of this run alone: the Redis outlives it
    first = [event(f"sf-{i}", f"sf-{run}-{i % 50}", T0 + i) for i in range(20_000)]
    rest = [event(f"sf-late-{i}", f"sf-{run}-0", T0 + 30_000 + i) for i in range(50)]
    r = redis.Redis.from_url(redis_server)

    def body() -> Iterator[bytes]:
        yield b"".join(orjson.dumps(e) + b"\n" for e in first)
        for _ in range(300):  # the first chunk is stored before its answer starts
            if r.hexists(user_keys(f"sf-{run}-49").ids, "sf-19999"):  # the last event of the chunk
                break
            threading.Event().wait(0.1)
        r.config_set("maxmemory", 1)  # full: every write refused from now on
        yield b"".join(orjson.dumps(e) + b"\n" for e in rest)

    try:
        res = httpx.post(server.url + "/batch-score?update_windows=true", content=body(),
                         headers={"content-type": "application/x-ndjson"}, timeout=120)
    finally:
        r.config_set("maxmemory", 0)
    lines = [orjson.loads(x) for x in res.content.splitlines()]
    assert res.status_code == 200 and len(lines) == 20_001, lines[-2:]
    assert [x["event_id"] for x in lines[:-1]] == [e["event_id"] for e in first]
    problem = lines[-1]["error"]
    assert problem["status"] == 503 and "may have been stored" in problem["detail"]
    assert "Traceback" not in server.log() and "unexpected error" not in server.log()


@pytest.mark.parametrize("then", ["stalls", "trickles"])
def test_an_ndjson_body_slowing_after_streaming_ends_with_a_408_line(server: LiveServer, then: str) -> None:
    """Past the first chunk, a body that stalls (1 s here) or trickles (a byte every 0.25 s:
    GRACE s behind the minimum rate, however fast it came before) ends the answered stream
    with the 408 problem as its last line: never a stream cut off mid-message."""
    from app.routes.backfill import CHUNK_EVENTS

    lines = [orjson.dumps(event(f"st{i}", f"u{i % 50}", T0 + i)) + b"\n" for i in range(CHUNK_EVENTS)]
    stop = threading.Event()

    def body() -> Iterator[bytes]:
        for i in range(0, len(lines), 500):
            yield b"".join(lines[i: i + 500])
        while then == "trickles" and not stop.wait(0.25):
            yield b"{"
        stop.wait(30)  # then nothing: the body stalls (the server ends it first)

    status, out = stream_ndjson(server, body(), stop)
    assert status == 200
    assert [o["event_id"] for o in out[:-1]] == [f"st{i}" for i in range(CHUNK_EVENTS)]
    assert out[-1]["error"]["status"] == 408
    assert out[-1]["error"]["detail"] == ("no part of the body arrived for 1 s" if then == "stalls" else
                                          f"the body arrived at under {MIN_RATE} bytes/s for longer than {GRACE:g} s")
