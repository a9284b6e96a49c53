"""The service when its Redis fails, over HTTP, on real redis-server processes: a stalled
Redis (SIGSTOP), a killed embedded Redis, a killed `seqguard serve`, a full Redis; and
what the service leaves in Redis (nothing raw about a user, a small record per event)."""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
import redis
from e2e.e2e_support import T0, LiveServer, TestClient, event, gone, metric, parse_metrics, wait_for, window_len

from app.embedded_redis import AOF_NAME, EmbeddedRedis
from app.main import create_app
from app.settings import Settings
from app.windows import user_keys

MAY_BE_STORED = "may have been stored"


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Callable[..., TestClient]]:
    """Factory of started TestClients (the lifespan runs), closed after the test."""
    clients: list[TestClient] = []

    def make(**settings: Any) -> TestClient:
        client = TestClient(create_app(Settings(**{"inference_threads": 1} | settings)))
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def problem_503(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 503, r.text
    assert r.headers["content-type"].startswith("application/problem+json") and "retry-after" in r.headers
    body: dict[str, Any] = r.json()
    return body


# -------------------------------------------------------------- 9: a stalled Redis


def test_a_stalled_store_answers_503_that_the_event_may_be_stored_and_a_retry_is_safe(
        service: Callable[..., TestClient], tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "redis") as server:
        client = service(redis_url=server.url, redis_timeout_s=0.3)
        assert client.post("/events", json=event("e1", "u1", T0)).json()["window_size"] == 1
        with redis.Redis.from_url(server.url) as r:  # e1's answer saved: its connection is idle in the pool
            wait_for(lambda: not (r.hget(user_keys("u1").ids, "e1") or b"|").endswith(b"|"), what="e1's answer")
        pid = server.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # a stall past the timeout: the scripts already sent run when it resumes
        try:
            body = problem_503(client.post("/events", json=event("e2", "u1", T0 + 1000, "cart")))
            assert MAY_BE_STORED in body["detail"] and "retry with the same event_id" in body["detail"]
            assert "nothing was written" not in body["detail"]
            body = problem_503(client.post("/events", json={"events": [event("e3", "u1", T0 + 2000)]}))
            assert MAY_BE_STORED in body["detail"]
            body = problem_503(client.post("/batch-score?update_windows=true",
                                           json={"events": [event("b1", "u2", T0)]}))
            assert MAY_BE_STORED in body["detail"] and "retry with the same event_id" in body["detail"]
        finally:
            os.kill(pid, signal.SIGCONT)
        # What the 503 said: e2, whose script was sent on an open connection before the
        # timeout, was stored after all once Redis resumed (whether the later requests'
        # scripts were sent depends on where their new connections timed out) ...
        wait_for(lambda: window_len(server.url, "u1") >= 2, what="the stalled script to run")
        # ... and a retry with the same ids is safe: stored once, scored on its window, nothing doubled.
        again = client.post("/events", json=event("e2", "u1", T0 + 1000, "cart"))
        assert again.status_code == 200 and again.json()["duplicate"] is True and again.json()["window_size"] == 2
        again = client.post("/events", json={"events": [event("e3", "u1", T0 + 2000)]}).json()["results"][0]
        assert again["window_size"] == 3
        for _ in range(2):
            assert client.post("/batch-score?update_windows=true",
                               json={"events": [event("b1", "u2", T0)]}).status_code == 200
        assert client.post("/events", json=event("e3", "u1", T0 + 2000)).json()["duplicate"] is True
        assert window_len(server.url, "u1") == 3 and window_len(server.url, "u2") == 1



def test_a_stall_between_one_and_two_timeouts_never_answers_a_first_delivery_as_a_duplicate(
        service: Callable[..., TestClient], tmp_path: Path) -> None:
    """An attack review: Redis paused for 1.5 timeouts under one fresh event. The client
    retried the timed-out script; the first run happened when Redis resumed, the retry found
    the event stored, and the first delivery was answered 200 "duplicate": true (and counted
    as one). A timed-out script is not retried now: a 503 that says the event may be
    stored, and the client's retry gets the stored event's answer."""
    with EmbeddedRedis(tmp_path / "redis") as server:
        client = service(redis_url=server.url, redis_timeout_s=0.4)
        client.post("/events", json=event("warm", "u0", T0))  # a connection in the pool
        pid = server.pid
        assert pid is not None
        for trial in range(3):
            os.kill(pid, signal.SIGSTOP)
            resume = threading.Timer(0.6, os.kill, (pid, signal.SIGCONT))
            resume.start()
            try:
                r = client.post("/events", json=event(f"first-{trial}", f"stall-{trial}", T0))
            finally:
                resume.join()
            assert r.status_code == 503 or r.json()["duplicate"] is False, r.text
        metrics = client.get("/metrics").text
        assert "\nseqguard_duplicate_events_total 0.0" in metrics

# ----------------------------------------------------- 10: the embedded Redis supervised


def test_a_killed_embedded_redis_is_restarted_and_the_service_recovers(service: Callable[..., TestClient],
                                                                        tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="seqguard")
    client = service(redis_url=None, redis_data_dir=tmp_path / "redis", redis_maxmemory="32mb")
    first = client.post("/events", json=event("e1", "u1", T0)).json()
    assert first["window_size"] == 1
    # Where the embedded Redis listens, as the service's log says, and its pid, as Redis says.
    started = [m for r in caplog.records if (m := re.search(r"embedded Redis \(append-only\) at (\S+), data in",
                                                            r.getMessage()))]
    assert len(started) == 1
    url = started[0][1]
    port = urlsplit(url).port
    with redis.Redis.from_url(url) as r:
        pid = int(r.info("server")["process_id"])
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: gone(pid), what="redis-server to die")
    statuses = []

    def ready() -> bool:
        statuses.append(client.get("/readyz").status_code)
        return statuses[-1] == 200

    wait_for(ready, what="/readyz to answer 200 again")
    assert set(statuses) <= {200, 503}
    back = re.compile(rf"the embedded Redis is back \(redis-server pid (\d+), restart 1\) on 127\.0\.0\.1:{port};")

    def said_back() -> re.Match[str] | None:
        return next((m for r in caplog.records if (m := back.search(r.getMessage()))), None)

    wait_for(lambda: said_back() is not None, what="the supervisor to log the restart")  # it answers first
    with redis.Redis.from_url(url) as r:  # the same port, a new redis-server
        new_pid = int(r.info("server")["process_id"])
    said = said_back()
    assert said is not None and new_pid != pid and new_pid == int(said[1])
    # The same data dir: the acknowledged event is back, the replay recognised, the window grows.
    assert client.post("/events", json=event("e1", "u1", T0)).json()["duplicate"] is True
    second = client.post("/events", json=event("e2", "u1", T0 + 1000, "cart"))
    assert second.status_code == 200 and second.json()["window_size"] == 2
    samples = parse_metrics(client.get("/metrics").text)
    assert metric(samples, "seqguard_redis_memory_max_bytes") == 32 << 20
    assert 0 < metric(samples, "seqguard_redis_memory_used_bytes") < 32 << 20


def _redis_pid(data_dir: Path) -> int:
    return int((data_dir / "embedded.lock").read_text().split()[0])


def test_a_sigkilled_serve_takes_its_redis_along_and_the_next_serve_starts(tmp_path: Path) -> None:
    data = tmp_path / "redis"
    first = LiveServer(None, tmp_path, data_dir=data).start()
    try:
        r = httpx.post(first.url + "/events", json=event("e1", "u1", T0), timeout=10)
        assert r.status_code == 200
        redis_pid = _redis_pid(data)
        assert first.proc is not None
        first.proc.kill()  # SIGKILL the service alone: no finally, no atexit
        first.proc.wait(30)
        wait_for(lambda: gone(redis_pid), what="the orphaned redis-server to end")
        with LiveServer(None, tmp_path, data_dir=data) as second:
            assert "Traceback" not in second.log()
            again = httpx.post(second.url + "/events", json=event("e2", "u1", T0 + 1000, "cart"), timeout=10)
            assert again.status_code == 200 and again.json()["window_size"] == 2  # e1 survived
    finally:
        first.stop()


# ------------------------------------------------------------ 14: nothing raw in Redis


def _everything(r: redis.Redis) -> list[bytes]:
    """Every key, member, field, value and score text of the database."""
    out: list[bytes] = []
    for key in r.scan_iter(count=1000):
        out.append(key)
        kind = r.type(key)
        if kind == b"string":
            out.append(r.get(key) or b"")
        elif kind == b"hash":
            for f, v in r.hgetall(key).items():
                out += [f, v]
        elif kind == b"zset":
            out += [m for m, _ in r.zrange(key, 0, -1, withscores=True)]
        elif kind == b"list":
            out += r.lrange(key, 0, -1)
        elif kind == b"set":
            out += list(r.smembers(key))
        else:
            raise AssertionError(f"unexpected key type {kind!r}")
    return out


def test_no_raw_user_id_anywhere_in_redis_or_its_append_only_file(service: Callable[..., TestClient],
                                                                  tmp_path: Path) -> None:
    user = "Zq7.alice-unique@example.org"
    with EmbeddedRedis(tmp_path / "redis") as server, redis.Redis.from_url(server.url) as r:
        client = service(redis_url=server.url)
        one = client.post("/events?explain=true", json=event("p1", user, T0, "pv", item_id="i1")).json()
        bulk = client.post("/events", json={"events": [event("p2", user, T0 + 1000, "cart", item_id="i1"),
                                                       event("p3", user, T0 + 2000, "buy", price=9.5)]}).json()
        assert client.post("/batch-score?update_windows=true",
                           json={"events": [event("p4", user, T0 + 3000)]}).status_code == 200
        ndjson = orjson.dumps(event("p5", user, T0 + 4000)) + b"\n"
        assert client.post("/batch-score?update_windows=true", content=ndjson,
                           headers={"content-type": "application/x-ndjson"}).status_code == 200
        ids_key = user_keys(user).ids

        def answers_saved() -> bool:
            records = r.hgetall(ids_key)
            return all(not records.get(e, b"|").endswith(b"|") for e in (b"p1", b"p2", b"p3"))

        wait_for(answers_saved, what="the first answers to be saved")
        everything = _everything(r)
        assert len(everything) >= 4 + 5 + 2 * 5  # 4 keys, 5 window members, 5 records (field and value)
        assert any(b"p3" in v for v in everything)  # the scan sees the events ...
        raw = user.encode()
        assert not [v for v in everything if raw in v]  # ... and never the user id
        aof = (tmp_path / "redis" / AOF_NAME).read_bytes()
        assert b"p3" in aof and b"i1" in aof and raw not in aof
        # A replay's answer carries the user id again (from the request), nothing else changed.
        replay = client.post("/events", json=event("p1", user, T0, "pv", item_id="i1")).json()
        assert replay == {k: v for k, v in one.items() if k not in ("reasons", "reason_codes")} | {"duplicate": True}
        replay = client.post("/events", json=event("p3", user, T0 + 2000, "buy", price=9.5)).json()
        assert replay == bulk["results"][1] | {"duplicate": True}
        assert raw not in (tmp_path / "redis" / AOF_NAME).read_bytes()


# ---------------------------------------------------- 16: a bounded Redis that is full


def test_a_full_redis_refuses_writes_with_503_and_the_metrics_show_it(service: Callable[..., TestClient],
                                                                       tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "redis", maxmemory=64 << 20) as server, redis.Redis.from_url(server.url) as r:
        client = service(redis_url=server.url)
        assert client.post("/events", json=event("e1", "u1", T0)).status_code == 200
        samples = parse_metrics(client.get("/metrics").text)
        assert metric(samples, "seqguard_redis_memory_max_bytes") == 64 << 20
        used = metric(samples, "seqguard_redis_memory_used_bytes")
        assert 0 < used < 64 << 20
        r.config_set("maxmemory", 1)  # full
        try:
            body = problem_503(client.post("/events", json=event("e2", "u1", T0 + 1000)))
            assert MAY_BE_STORED in body["detail"]
            problem_503(client.post("/events", json={"events": [event("e3", "u2", T0)]}))
            samples = parse_metrics(client.get("/metrics").text)
            assert metric(samples, "seqguard_redis_memory_max_bytes") == 1
            assert metric(samples, "seqguard_redis_memory_used_bytes") > 1
            assert metric(samples, "seqguard_requests_total", route="/events", status="503") == 2
        finally:
            r.config_set("maxmemory", 64 << 20)
        # Refused, not evicted: nothing was written, nothing was lost.
        assert window_len(server.url, "u1") == 1 and window_len(server.url, "u2") == 0
        assert client.post("/events", json=event("e2", "u1", T0 + 1000)).json()["window_size"] == 2
