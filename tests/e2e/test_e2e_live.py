"""A real `seqguard serve` (uvicorn in a subprocess) on a loopback port: Redis crashing
under the running service and coming back, two workers sharing their metrics, each on
its own listening socket."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest, multiprocess

from app import serving
from app.embedded_redis import EmbeddedRedis

from .e2e_support import T0, LiveServer, copy_file, db_size, event, metric, parse_metrics, window_len


def wait_ready(http: httpx.Client, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if http.get("/readyz").status_code == 200:
            return
        time.sleep(0.1)
    raise AssertionError("the service did not become ready again")


def test_redis_crash_under_a_live_service_and_recovery(live_server: Callable[..., LiveServer],
                                                       tmp_path: Path) -> None:
    redis_srv = EmbeddedRedis(tmp_path / "redis").start()
    try:
        server = live_server(redis_srv.url)
        with httpx.Client(base_url=server.url, timeout=10.0) as http:
            acked = []
            for i in range(5):
                r = http.post("/events", json=event(f"e{i}", "u1", T0 + 1000 * i))
                assert r.status_code == 200, r.text
                acked.append(r.json())
            keys_before = db_size(redis_srv.url)

            redis_srv.stop(kill=True)  # a crash: SIGKILL
            late = event("e5", "u1", T0 + 5000, "cart")
            newcomer = event("n0", "u2", T0)
            for body in (late, late, {"events": [newcomer, late]}):
                r = http.post("/events", json=body)
                assert r.status_code == 503, r.text
                assert r.headers["content-type"] == "application/problem+json"
                assert int(r.headers["retry-after"]) >= 1
            r = http.get("/readyz")
            assert r.status_code == 503 and "retry-after" in r.headers
            assert http.get("/healthz").status_code == 200

            redis_srv.start()  # same port and append-only file; the service keeps running
            wait_ready(http)
            # Every acknowledged event survived the crash; nothing of the refused ones was written.
            assert window_len(redis_srv.url, "u1") == 5 and window_len(redis_srv.url, "u2") == 0
            assert db_size(redis_srv.url) == keys_before
            # The client retries: stored exactly once, scored on the full window.
            retried = http.post("/events", json=late).json()
            assert retried["duplicate"] is False and retried["window_size"] == 6
            assert http.post("/events", json=late).json() == retried | {"duplicate": True}
            assert http.post("/events", json={"events": [newcomer]}).json()["results"][0]["window_size"] == 1
            assert window_len(redis_srv.url, "u1") == 6 and window_len(redis_srv.url, "u2") == 1
            # An event acknowledged before the crash is still recognised as a replay.
            assert http.post("/events", json=event("e0", "u1", T0)).json() == acked[0] | {"duplicate": True}

            s = parse_metrics(http.get("/metrics").text)
            assert metric(s, "seqguard_requests_total", route="/events", status="503") == 3
            assert metric(s, "seqguard_requests_total", route="/readyz", status="503") >= 1
            assert metric(s, "seqguard_window_store_errors_total") == 3
            assert metric(s, "seqguard_window_store_duration_seconds_count", op="append") == 5 + 4
            assert metric(s, "seqguard_duplicate_events_total") == 2
            assert metric(s, "seqguard_events_scored_total", path="online") == 7
            assert metric(s, "seqguard_model_info", provider="CPUExecutionProvider") == 1
    finally:
        redis_srv.stop()


def test_sigterm_stops_the_embedded_redis_too_and_windows_survive_a_restart(
        live_server: Callable[..., LiveServer], tmp_path: Path) -> None:
    """`seqguard serve` without a Redis URL runs its own (append-only) Redis: a SIGTERM to
    the service, as a process manager sends it, stops that Redis too, and a new service
    on the same data directory still knows every acknowledged event."""
    data = tmp_path / "embedded"
    server = live_server(None, data_dir=data)
    first = httpx.post(server.url + "/events", json=event("e1", "u1", T0), timeout=10.0).json()
    assert first["duplicate"] is False
    port = re.search(r"^port (\d+)$", (data / "redis.conf").read_text(), re.M)  # the embedded server's config
    assert port is not None
    redis_url = f"redis://127.0.0.1:{port.group(1)}/0"
    assert window_len(redis_url, "u1") == 1

    assert f"listening on {server.url}" in server.log()  # issue 9: a line to wait for, with the real address
    assert server.terminate() == 0  # issue 9: a clean stop exits 0 (make printed "Error 143")
    with pytest.raises(redis.ConnectionError), redis.Redis.from_url(redis_url, socket_connect_timeout=1) as r:
        r.ping()  # no orphaned redis-server holds the port and the append-only file

    again = live_server(None, data_dir=data)
    with httpx.Client(base_url=again.url, timeout=10.0) as http:
        assert http.post("/events", json=event("e1", "u1", T0)).json() == first | {"duplicate": True}
        assert http.post("/events", json=event("e2", "u1", T0 + 1000)).json()["window_size"] == 2

    # A second service on the same data directory: one line naming the problem and the fix.
    second = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--port", str(again.port + 1)],
                            env=again._env(), cwd=Path(__file__).resolve().parents[2], capture_output=True,
                            text=True, timeout=60)
    out = " ".join(second.stderr.split())
    assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
    assert f"{data} is in use by another embedded Redis" in out and "SEQGUARD_REDIS_DATA_DIR" in out


def test_ctrl_c_stops_cleanly_and_the_embedded_redis_with_it(live_server: Callable[..., LiveServer],
                                                             tmp_path: Path) -> None:
    """A fresh-user review: Ctrl-C on `make run` (SIGINT to the terminal's foreground group)
    reached the embedded redis-server too, which stopped before the service did; the
    supervisor logged an ERROR and restarted it, and the service exited 130."""
    data = tmp_path / "embedded"
    server = live_server(None, data_dir=data)
    assert httpx.post(server.url + "/events", json=event("c1", "u1", T0), timeout=10.0).status_code == 200
    port = re.search(r"^port (\d+)$", (data / "redis.conf").read_text(), re.M)
    assert port is not None
    assert server.interrupt() == 0
    log = server.log()
    assert " ERROR " not in log and "restarting" not in log, log[-2000:]
    with pytest.raises(redis.ConnectionError), redis.Redis.from_url(
            f"redis://127.0.0.1:{port.group(1)}/0", socket_connect_timeout=1) as r:
        r.ping()


def per_worker_events_requests(prom_dir: Path, scratch: Path) -> dict[str, float]:
    """/events requests counted by each worker, read from its own counter file."""
    out = {}
    for f in sorted(prom_dir.glob("counter_*.db")):
        pid = f.stem.split("_")[-1]
        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg, path=str(copy_file(f, scratch / pid).parent))
        out[pid] = metric(parse_metrics(generate_latest(reg).decode()), "seqguard_requests_total", route="/events")
    return out


def test_two_workers_aggregate_metrics(live_server: Callable[..., LiveServer], redis_url: str,
                                       tmp_path: Path) -> None:
    prom = tmp_path / "prom"
    prom.mkdir()
    server = live_server(redis_url, workers=2, env={"PROMETHEUS_MULTIPROC_DIR": str(prom)})

    def post(i: int) -> dict[str, Any]:
        # A fresh connection per request, so that both workers get some.
        r = httpx.post(server.url + "/events", json=event(f"e{i}", f"user{i}", T0 + i), timeout=20.0)
        assert r.status_code == 200, r.text
        return dict(r.json())

    sent = 0
    with ThreadPoolExecutor(8) as pool:
        while sent < 400:
            answers = list(pool.map(post, range(sent, sent + 40)))
            assert all(a["window_size"] == 1 and not a["duplicate"] for a in answers)
            sent += 40
            workers = per_worker_events_requests(prom, tmp_path / f"scratch{sent}")
            if sum(1 for v in workers.values() if v > 0) >= 2:
                break
    assert sum(1 for v in workers.values() if v > 0) >= 2, f"one worker took every request: {workers}"
    assert sum(workers.values()) == sent

    for _ in range(4):  # whichever worker answers the scrape, it reports all workers' counts
        s = parse_metrics(httpx.get(server.url + "/metrics", timeout=10.0).text)
        assert metric(s, "seqguard_requests_total", route="/events") == sent
        assert metric(s, "seqguard_requests_total", route="/events", status="200") == sent
        assert metric(s, "seqguard_events_scored_total", path="online") == sent
        assert metric(s, "seqguard_decisions_total") == sent
        assert metric(s, "seqguard_request_duration_seconds_count", route="/events") == sent
        assert metric(s, "seqguard_inference_batch_size_sum") == sent
        assert metric(s, "seqguard_scoring_queue_depth") == 0
        info = [(lab, v) for n, lab, v in s if n == "seqguard_model_info"]
        # one series per worker (liveall: what each serves), all the same model
        assert len({lab["pid"] for lab, _ in info}) == len(info) == 2
        assert all(lab["provider"] == "CPUExecutionProvider" and v == 1 for lab, v in info)
    assert db_size(redis_url) > 0


def listening_sockets(pid: int, port: int) -> set[int]:
    """Inodes of the TCP sockets listening on ``port`` that process ``pid`` holds (Linux /proc)."""
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                listening.add(int(fields[9]))
    held = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd))
            if m and int(m.group(1)) in listening:
                held.add(int(m.group(1)))
    return held


@pytest.mark.skipif(not serving.SUPPORTED, reason="per-worker SO_REUSEPORT sockets are Linux-only")
def test_each_worker_listens_on_its_own_socket_and_both_serve(live_server: Callable[..., LiveServer],
                                                              redis_url: str) -> None:
    """Not one socket shared by the workers (whose accept race hands one worker most
    connections) but one each in a SO_REUSEPORT group, so the kernel balances them."""
    server = live_server(redis_url, workers=2)
    assert server.proc is not None
    deadline = time.monotonic() + 60  # /readyz answers once the first worker is up
    while True:
        held = {p: listening_sockets(p.pid, server.port) for p in psutil.Process(server.proc.pid).children()}
        workers = [p for p, sockets in held.items() if sockets]  # not Redis nor multiprocessing's helper
        if len(workers) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(workers) == 2
    assert all(len(held[w]) == 1 for w in workers) and held[workers[0]] != held[workers[1]], held
    # A burst of keep-alive connections, as a storefront's pool opens them: both workers get some.
    served = set()
    clients = [httpx.Client(base_url=server.url, timeout=20.0) for _ in range(32)]
    try:
        for c in clients:
            assert c.get("/healthz").status_code == 200
        for w in workers:
            if any(conn.status == psutil.CONN_ESTABLISHED and conn.laddr.port == server.port
                   for conn in w.net_connections(kind="tcp")):
                served.add(w.pid)
    finally:
        for c in clients:
            c.close()
    assert served == {w.pid for w in workers}


def test_ndjson_backfill_longer_than_a_chunk_streams_through_a_live_server(
        live_server: Callable[..., LiveServer], redis_url: str) -> None:
    """The route reads the request body while it streams its answer: under uvicorn that
    must not hang after the first chunk (regression: Starlette's disconnect listener
    swallowed the rest of the body)."""
    from app.routes.backfill import CHUNK_EVENTS

    server = live_server(redis_url)
    n = CHUNK_EVENTS + 500
    lines = (orjson.dumps(event(f"n{i}", f"u{i % 300}", T0 + i)) + b"\n" for i in range(n))
    with httpx.stream("POST", server.url + "/batch-score", content=lines,
                      headers={"content-type": "application/x-ndjson"}, timeout=60.0) as r:
        assert r.status_code == 200
        got = [orjson.loads(line) for line in r.iter_lines() if line]
    assert len(got) == n
    assert [g["event_id"] for g in got] == [f"n{i}" for i in range(n)]
