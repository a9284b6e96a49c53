"""Hot reload through real `seqguard serve` processes on loopback (app/live.py): swaps
under concurrent load, SIGHUP with a re-pointed symlink, and two workers following one
another. Real bundles (copies of the shipped one under other versions), real ONNX
Runtime, the session's real Redis; only correctness is asserted, never speed."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
import pytest
import redis
from bundle_copies import bundle_copy

from app import serving
from app.core.bundle import DEFAULT_BUNDLE, load_bundle
from app.windows import live_model_key

from .e2e_support import T0, LiveServer, event, metric, parse_metrics

SHIPPED = load_bundle(DEFAULT_BUNDLE).version
WAIT_S = 30.0  # bound on every "eventually" of this file (a reload takes well under a second)


def point(link: Path, target: Path) -> None:
    """Make ``link`` a symlink to ``target``, atomically (a new link renamed over the old)."""
    tmp = link.with_name(link.name + ".new")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target, target_is_directory=True)
    os.replace(tmp, link)


def metrics_of(url: str) -> list[tuple[str, dict[str, str], float]]:
    r = httpx.get(url + "/metrics", timeout=10.0)
    assert r.status_code == 200, r.text
    return parse_metrics(r.text)


def eventually(predicate: Callable[[], bool], what: str | Callable[[], str], server: LiveServer,
               timeout_s: float = WAIT_S) -> None:
    """Poll ``predicate`` until true; fail with ``what`` and the server's log after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert server.proc is not None and server.proc.poll() is None, f"the server exited:\n{server.log()[-4000:]}"
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what if isinstance(what, str) else what()}; "
                                 f"log:\n{server.log()[-4000:]}")
        time.sleep(0.05)


# ------------------------------------------------------------------ 1. swaps under load


@dataclass
class Answer:
    sent: float  # time.monotonic() just before the request left
    answered: float  # ... and once its answer had arrived
    status: int
    body: Any


def test_swaps_under_concurrent_load(live_server: Callable[..., LiveServer], redis_url: str,
                                     tmp_path: Path) -> None:
    """12 clients post /events without pause (and one posts /batch-score) while the model
    is swapped 6 times: every answer is a 200 naming a model that was live while it was
    being answered, and a request sent after a swap's answer and answered before the next
    swap was asked for names exactly that swap's model."""
    a, b = bundle_copy(tmp_path, "v-a"), bundle_copy(tmp_path, "v-b")
    # A short poll interval: the worker's follower of the live record (ModelWatch) runs often
    # beside the admin route's swaps (one worker: it must never change the model itself).
    # INFO: the log says each swap ("now serving ..."), named in the failures below.
    server = live_server(redis_url, env={"SEQGUARD_MODEL_POLL_S": "0.05", "SEQGUARD_LOG_LEVEL": "INFO"})
    plan = [(a, "v-a"), (b, "v-b"), (a, "v-a"), (DEFAULT_BUNDLE, SHIPPED), (b, "v-b"), (a, "v-a")]

    stop = threading.Event()
    answers: list[list[Answer]] = [[] for _ in range(12)]
    batches: list[Answer] = []
    errors: list[BaseException] = []

    def timed(http: httpx.Client, route: str, body: dict[str, Any]) -> Answer:
        sent = time.monotonic()
        try:
            r = http.post(route, json=body)
        except httpx.TransportError as e:  # no answer (a timeout, a dropped connection): a failed request
            return Answer(sent, time.monotonic(), 0, f"{type(e).__name__} on {route} {body.get('event_id', '')}")
        return Answer(sent, time.monotonic(), r.status_code, r.json() if r.status_code == 200 else r.text)

    def post_events(k: int) -> None:
        with httpx.Client(base_url=server.url, timeout=10.0) as http:
            i = 0
            while not stop.is_set():
                body = event(f"t{k}-{i}", f"user{k}-{i % 5}", T0 + 1000 * i)
                answers[k].append(timed(http, "/events", body))
                i += 1

    def post_batches() -> None:
        with httpx.Client(base_url=server.url, timeout=10.0) as http:
            j = 0
            while not stop.is_set():
                body = {"events": [event(f"b{j}-{n}", f"bulk{n % 7}", T0 + n) for n in range(50)]}
                batches.append(timed(http, "/batch-score", body))
                j += 1

    def guarded(fn: Callable[..., None], *args: Any) -> Callable[[], None]:
        def run() -> None:
            try:
                fn(*args)
            except BaseException as e:  # anything but a missing answer (recorded as one): reported
                errors.append(e)
        return run

    threads = [threading.Thread(target=guarded(post_events, k)) for k in range(len(answers))]
    threads.append(threading.Thread(target=guarded(post_batches)))
    swaps: list[tuple[float, float, str]] = []  # (sent, answered, version) of each POST /admin/model
    t_start = time.monotonic()
    try:
        for t in threads:
            t.start()
        eventually(lambda: all(len(x) >= 5 for x in answers) and len(batches) >= 1, "traffic", server)
        with httpx.Client(base_url=server.url, timeout=60.0) as admin:
            for path, version in plan:
                time.sleep(0.4)  # traffic on the model just swapped in
                sent = time.monotonic()
                r = admin.post("/admin/model", json={"bundle": str(path)})
                answered = time.monotonic()
                assert r.status_code == 200, r.text
                assert r.json()["version"] == version and r.json()["bundle"] == str(path), r.json()
                swaps.append((sent, answered, version))
            time.sleep(0.4)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)

    def swap_log() -> list[str]:
        return [line for line in server.log().splitlines() if "seqguard.live" in line or "ERROR" in line]

    # Every request answered 200, from a model that was live while it was in flight.
    versions = [SHIPPED] + [v for _, _, v in swaps]  # versions[j]: live after swap j (0: at the start)
    every = [x for per_thread in answers for x in per_thread]
    failed = [(round(x.sent - t_start, 3), x.status, x.body) for x in every + batches if x.status != 200]
    assert not failed, (f"{len(failed)} of {len(every) + len(batches)} requests failed (sent at s, status, "
                        f"answer): {failed[:8]}; swaps (sent, answered) at s: "
                        f"{[(round(a - t_start, 3), round(b - t_start, 3), v) for a, b, v in swaps]}; "
                        f"log: {swap_log()}")
    exact = [0] * len(versions)
    for x in every:
        assert x.body["duplicate"] is False and x.body["model_version"] in set(versions), x.body
        # Swaps answered before it was sent: their model or a later one. Swaps asked for
        # before its answer came: possibly live already.
        lo = sum(1 for _, answered, _ in swaps if answered < x.sent)
        hi = sum(1 for sent, _, _ in swaps if sent < x.answered)
        possible = versions[lo: hi + 1]
        assert x.body["model_version"] in possible, (
            f"{x.body['event_id']} sent {x.sent:.3f}, answered {x.answered:.3f}: {x.body['model_version']}, "
            f"expected one of {possible}; swaps (sent, answered, version): {swaps}; log: {swap_log()}")
        if lo == hi:  # sent after swap lo answered, answered before swap lo + 1 was asked for
            exact[lo] += 1
    assert all(n > 0 for n in exact), f"requests that only one model could answer, per swap: {exact}"
    assert all(len(x.body["results"]) == 50 for x in batches)
    during = [x for x in batches if any(sent < x.answered and x.sent < answered for sent, answered, _ in swaps)]
    assert during, "no /batch-score was in flight during a swap"

    model = httpx.get(server.url + "/model", timeout=10.0).json()
    assert (model["version"], model["bundle"]) == ("v-a", str(a))
    s = metrics_of(server.url)
    # One reload per swap: the worker's follower never reloaded on its own (one worker).
    assert metric(s, "seqguard_model_reloads_total", result="ok") == len(plan), swap_log()
    assert metric(s, "seqguard_model_reloads_total", result="refused") == 0
    info = {lab["version"]: v for n, lab, v in s if n == "seqguard_model_info"}
    assert info == {"v-a": 1.0}, info
    with redis.Redis.from_url(redis_url) as r:
        record = orjson.loads(r.get(live_model_key(str(DEFAULT_BUNDLE))))
    assert (record["bundle"], record["version"]) == (str(a), "v-a")


# ------------------------------------------------------------------ 2. SIGHUP, one worker


def test_sighup_reloads_the_symlinked_bundle(live_server: Callable[..., LiveServer], redis_url: str,
                                             tmp_path: Path) -> None:
    """SEQGUARD_BUNDLE is a symlink: re-pointed (atomically) and SIGHUP sent, the server
    serves the new target; a SIGHUP onto a bundle without a parity record is refused and
    logged, the model serving on and the server alive; mended, the next SIGHUP reloads."""
    a, b = bundle_copy(tmp_path, "v-a"), bundle_copy(tmp_path, "v-b")
    broken = bundle_copy(tmp_path, "v-broken", lambda m: m.pop("parity"))
    current = tmp_path / "current"
    point(current, a)
    server = live_server(redis_url, env={"SEQGUARD_BUNDLE": str(current)})
    assert server.proc is not None
    with httpx.Client(base_url=server.url, timeout=10.0) as http:
        model = http.get("/model").json()
        assert (model["version"], model["bundle"]) == ("v-a", str(current))
        assert http.post("/events", json=event("h0", "u1", T0)).json()["model_version"] == "v-a"

        def serving_version() -> str:
            return str(http.get("/model").json()["version"])

        def reloads(result: str) -> float:
            return metric(metrics_of(server.url), "seqguard_model_reloads_total", result=result)

        point(current, b)
        os.kill(server.proc.pid, signal.SIGHUP)
        eventually(lambda: serving_version() == "v-b", "v-b after SIGHUP", server)
        answer = http.post("/events", json=event("h1", "u1", T0 + 1000)).json()
        assert answer["model_version"] == "v-b" and answer["window_size"] == 2, answer  # the same stored window
        assert http.get("/model").json()["bundle"] == str(current)
        assert reloads("ok") == 1
        with redis.Redis.from_url(redis_url) as r:
            record = orjson.loads(r.get(live_model_key(str(current))))
        assert (record["bundle"], record["version"], record["base"]) == (str(current), "v-b", str(current))

        # A bundle without a parity record: refused, logged, v-b serves on.
        point(current, broken)
        os.kill(server.proc.pid, signal.SIGHUP)
        eventually(lambda: reloads("refused") == 1, "the broken bundle's refusal", server)
        assert server.proc.poll() is None
        assert http.get("/readyz").status_code == 200
        assert serving_version() == "v-b"
        assert http.post("/events", json=event("h2", "u1", T0 + 2000)).json()["model_version"] == "v-b"
        assert reloads("ok") == 1
        assert re.search(r"SIGHUP: .*no parity record.*still serving v-b", server.log()), server.log()[-2000:]

        # The symlink mended: the next SIGHUP reloads again.
        point(current, a)
        os.kill(server.proc.pid, signal.SIGHUP)
        eventually(lambda: serving_version() == "v-a", "v-a after the third SIGHUP", server)
        assert http.post("/events", json=event("h3", "u1", T0 + 3000)).json()["model_version"] == "v-a"
    assert server.proc.poll() is None


# ---------------------------------------------------------- 3. two workers: POST and SIGHUP


def versions_by_worker(url: str, want: set[int] | None, version: str, server: LiveServer) -> dict[int, str]:
    """GET /model on fresh connections (the kernel spreads them over the workers' sockets)
    until every worker (``want``; ``None``: any two) has been seen serving ``version``;
    what each worker pid said last."""
    seen: dict[int, str] = {}

    def done() -> bool:
        r = httpx.get(url + "/model", timeout=10.0)
        assert r.status_code == 200, r.text
        seen[r.json()["worker_pid"]] = r.json()["version"]
        at = {pid for pid, v in seen.items() if v == version}
        return at >= want if want is not None else len(at) >= 2

    eventually(done, lambda: f"every worker on {version} (last answer of each pid: {seen})", server, timeout_s=60.0)
    return seen


@pytest.mark.skipif(not serving.SUPPORTED, reason="per-worker SO_REUSEPORT sockets are Linux-only")
def test_two_workers_follow_a_post_and_reload_on_sighup_in_place(
        live_server: Callable[..., LiveServer], redis_url: str, tmp_path: Path) -> None:
    """Two workers (each its own SO_REUSEPORT socket): a POST /admin/model to one, and the
    other follows the record in Redis; a SIGHUP to the supervisor, passed on, and both
    reload the re-pointed symlink in place (the same worker processes, none restarted).
    Each step is seen per worker (/model's worker_pid, seqguard_model_info's pid label)."""
    a, b, c = (bundle_copy(tmp_path, v) for v in ("v-a", "v-b", "v-c"))
    current = tmp_path / "current"
    point(current, a)
    server = live_server(redis_url, workers=2, env={"SEQGUARD_BUNDLE": str(current), "SEQGUARD_WORKERS": "2",
                                                    "SEQGUARD_MODEL_POLL_S": "0.2"})
    assert server.proc is not None
    seen = versions_by_worker(server.url, None, "v-a", server)  # both workers up (/readyz: the first)
    workers = set(seen)
    assert len(workers) == 2
    children = {p.pid for p in psutil.Process(server.proc.pid).children()}
    assert workers <= children, (workers, children)

    # POST to one worker: the other follows the record in Redis.
    r = httpx.post(server.url + "/admin/model", json={"bundle": str(b)}, timeout=60.0)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == "v-b" and r.json()["previous"] == "v-a", r.json()
    assert versions_by_worker(server.url, workers, "v-b", server).keys() == workers

    def model_info(s: list[tuple[str, dict[str, str], float]]) -> dict[tuple[int, str], float]:
        return {(int(lab["pid"]), lab["version"]): v for n, lab, v in s if n == "seqguard_model_info"}

    def serving_per_pid(s: list[tuple[str, dict[str, str], float]]) -> dict[int, str]:
        return {pid: version for (pid, version), v in model_info(s).items() if v == 1}

    s = metrics_of(server.url)
    assert serving_per_pid(s) == dict.fromkeys(workers, "v-b"), model_info(s)
    assert metric(s, "seqguard_model_reloads_total", result="ok") == 2  # one per worker

    # SIGHUP to the supervisor, the symlink re-pointed: passed on, both reload in place.
    point(current, c)
    os.kill(server.proc.pid, signal.SIGHUP)
    assert versions_by_worker(server.url, workers, "v-c", server).keys() == workers
    time.sleep(1.0)  # five poll intervals: no worker goes back to an older record
    s = metrics_of(server.url)
    assert serving_per_pid(s) == dict.fromkeys(workers, "v-c"), model_info(s)
    assert metric(s, "seqguard_model_reloads_total", result="ok") == 4, [x for x in s if "reloads" in x[0]]
    assert metric(s, "seqguard_model_reloads_total", result="refused") == 0
    # Not restarted: the same two worker processes, serving.
    assert {p.pid for p in psutil.Process(server.proc.pid).children()} == children
    for i in range(20):
        r = httpx.post(server.url + "/events", json=event(f"w{i}", f"u{i}", T0), timeout=10.0)
        assert r.status_code == 200 and r.json()["model_version"] == "v-c", r.text
    with redis.Redis.from_url(redis_url) as rc:
        record = orjson.loads(rc.get(live_model_key(str(current))))
    assert (record["bundle"], record["version"], record["base"]) == (str(current), "v-c", str(current))
    assert server.proc.poll() is None
