"""The service end to end on loopback: `seqguard serve` (default bundle, embedded Redis) as
a subprocess, loaded by `seqguard replay --engine raw` in a process of its own (the raw
HTTP/1.1 client costs about a tenth of httpx's CPU per request, and the generator shares
the machine with the service), on the real Taobao stream slice (time-ordered, 66k users).
Phases: single events with N connections as fast as answered, single events paced at a
rate, single events with long per-user histories, bulks of 100. For each: a warm-up, then
a fixed duration measured: events/s, requests/s, client-side p50/p99, errors; and, from /metrics scraped
before and after (and polled during), where the server's time went: mean inference batch
size and time, inference thread busy share, mean window-store append time, server-side
request time, queue depth; plus the CPU each process used. Then `/batch-score` events/s
for a JSON body and an NDJSON stream. Prints figures; asserts nothing about time.

    .venv/bin/python tests/benchmarks/bench_service.py [--duration 20] [--warmup 4] [--workers 1 2]
        [--single 16 64] [--paced 400 1500] [--bulk 4 16] [--env SEQGUARD_MAX_WAIT_MS=0 ...]
        [--profile] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pstats
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
from _common import FLINK, REPO, TAOBAO, machine
from prometheus_client.parser import text_string_to_metric_families

from model_export.data import iter_records

TARGETS = {"single": (1500.0, 20.0), "bulk": (4000.0, None)}  # events/s, p99 ms
PY = [sys.executable, "-m", "app.cli"]


# ---- the server --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(workers: int, env_over: dict[str, str], tmp: Path,
           profile: Path | None = None) -> Iterator[tuple[str, int]]:
    """`seqguard serve` on a free port; yields (URL, pid) once /readyz answers 200."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEQGUARD_", "PROMETHEUS_MULTIPROC"))}
    env |= {"SEQGUARD_REDIS_DATA_DIR": str(tmp / f"redis-{port}"), **env_over}
    prefix = [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "app.cli"] if profile else PY
    log = open(tmp / f"serve-{port}.log", "wb")  # noqa: SIM115 - closed below, after the process
    proc = subprocess.Popen([*prefix, "serve", "--port", str(port), "--workers", str(workers)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{(tmp / f'serve-{port}.log').read_text()[-3000:]}")
            time.sleep(0.25)
        yield url, proc.pid
    finally:
        children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        proc.send_signal(signal.SIGINT)  # graceful: the profile (if any) is written on the way out
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for child in children:  # workers and the embedded Redis, if the graceful path left any
            with suppress(psutil.NoSuchProcess):
                child.kill()
        log.close()


def proc_tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its live children."""
    try:
        root = psutil.Process(pid)
        total = 0.0
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total
    except psutil.NoSuchProcess:
        return 0.0


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metric(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in m.items() if n == name and want <= set(lab))


# ---- one load phase ----------------------------------------------------------------------


def run_phase(url: str, server_pid: int, tmp: Path, *, name: str, events: Path, bulk: int, concurrency: int,
              duration: float, warmup: float, tag: str, engine: str = "raw", rate: float = 0) -> dict[str, Any]:
    def replay_cmd(secs: float, tag_: str, out: Path) -> list[str]:
        return [*PY, "replay", "--url", url, "--events", str(events), "--bulk", str(bulk), "--concurrency",
                str(concurrency), "--duration", str(secs), "--loop", "--tag", tag_, "--retries", "0",
                "--engine", engine, "--rate", str(rate), "--json", str(out)]

    warm = tmp / f"{tag}warm.json"
    subprocess.run(replay_cmd(warmup, tag + "w", warm), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=False)
    out = tmp / f"{tag}.json"
    before, cpu0 = scrape(url), proc_tree_cpu(server_pid)
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    gen = subprocess.Popen(replay_cmd(duration, tag, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    depth: list[float] = []
    t0 = time.perf_counter()
    while gen.poll() is None:  # poll the queue depth while it runs
        time.sleep(0.5)
        with suppress(httpx.HTTPError):
            depth.append(metric(scrape(url), "seqguard_scoring_queue_depth"))
    wall = time.perf_counter() - t0
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the generator, reaped by poll()
    gen_cpu = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
    after, cpu1 = scrape(url), proc_tree_cpu(server_pid)
    s = json.loads(out.read_text())

    def d(n: str, **lab: str) -> float:
        return metric(after, n, **lab) - metric(before, n, **lab)

    calls = d("seqguard_inference_duration_seconds_count")
    appends = d("seqguard_window_store_duration_seconds_count", op="append")
    reqs = d("seqguard_request_duration_seconds_count", route="/events")
    s |= {
        "phase": name, "bulk": bulk, "concurrency": concurrency, "rate": rate,
        "server": {
            "inference_calls": calls,
            "mean_batch": d("seqguard_inference_batch_size_sum") / calls if calls else 0.0,
            "mean_inference_ms": 1e3 * d("seqguard_inference_duration_seconds_sum") / calls if calls else 0.0,
            "inference_busy": d("seqguard_inference_duration_seconds_sum") / s["elapsed_s"],
            "mean_append_ms": 1e3 * d("seqguard_window_store_duration_seconds_sum", op="append") / appends
            if appends else 0.0,
            "mean_request_ms": 1e3 * d("seqguard_request_duration_seconds_sum", route="/events") / reqs
            if reqs else 0.0,
            "queue_depth_mean": sum(depth) / len(depth) if depth else 0.0,
            "queue_depth_max": max(depth, default=0.0),
            "cpu_cores": (cpu1 - cpu0) / wall,
        },
        "generator_cpu_cores": gen_cpu / wall,
    }
    return s


def print_phase(s: dict[str, Any]) -> None:
    lat, srv = s["latency_ms"], s["server"]
    kind = "single" if s["bulk"] == 1 else "bulk"
    target, p99_target = TARGETS[kind]
    ok = s["events_per_s"] >= target and (p99_target is None or lat["p99"] <= p99_target) and not s["errors"]
    goal = f"≥ {target:,.0f} events/s" + (f" at p99 ≤ {p99_target:.0f} ms" if p99_target else "") + ", no errors"
    paced = f", paced at {s['rate']:,.0f} events/s" if s.get("rate") else ", as fast as answered"
    print(f"\n{s['phase']}: {s['concurrency']} connections{paced}, {s['elapsed_s']:.1f} s")
    print(f"  {s['events_per_s']:>9,.0f} events/s  {s['requests_per_s']:>8,.0f} requests/s  "
          f"p50 {lat['p50']:.2f} ms  p99 {lat['p99']:.2f} ms  max {lat['max']:.1f} ms  "
          f"errors {s['errors']} (of {s['requests']:,} requests)")
    print(f"  target {goal}: {'reached' if ok else 'NOT reached'}")
    print(f"  server: inference {srv['inference_calls']:,.0f} calls, mean batch {srv['mean_batch']:.1f} windows, "
          f"mean {srv['mean_inference_ms']:.2f} ms/call, thread busy {100 * srv['inference_busy']:.0f}%; "
          f"append {srv['mean_append_ms']:.2f} ms; request {srv['mean_request_ms']:.2f} ms (server side); "
          f"queue depth mean {srv['queue_depth_mean']:.1f} max {srv['queue_depth_max']:.0f}")
    print(f"  CPU: server (incl. Redis) {srv['cpu_cores']:.2f} cores, load generator {s['generator_cpu_cores']:.2f}"
          f" cores; decisions {s['decisions']}")


# ---- /batch-score --------------------------------------------------------------------------


def records(n: int, tag: str) -> list[dict[str, Any]]:
    """``n`` events of the stream slice (looped with fresh ids past its end)."""
    out: list[dict[str, Any]] = []
    k = 0
    while len(out) < n:
        pre = f"{tag}{k}."
        for chunk in iter_records(FLINK, "taobao", chunk_rows=50_000):
            out.extend(r | {"event_id": pre + r["event_id"], "user_id": pre + r["user_id"]} for r in chunk)
        k += 1
    return out[:n]


def batch_score(url: str, json_events: int, ndjson_events: int, timeout_s: float = 60.0) -> dict[str, Any]:
    res: dict[str, Any] = {}
    with httpx.Client(base_url=url, timeout=timeout_s) as client:
        if json_events:
            body = orjson.dumps({"events": records(json_events, "bj")})
            t = time.perf_counter()
            r = client.post("/batch-score", content=body, headers={"content-type": "application/json"})
            secs = time.perf_counter() - t
            n = len(r.json()["results"]) if r.status_code == 200 else 0
            res["json"] = {"events": n, "status": r.status_code, "seconds": secs, "events_per_s": n / secs,
                           "body_mb": len(body) / 1e6}
        if ndjson_events:
            body = b"".join(orjson.dumps(e) + b"\n" for e in records(ndjson_events, "bn"))
            res["ndjson"] = asyncio.run(ndjson_duplex(url, body, timeout_s))
    return res


async def ndjson_duplex(url: str, body: bytes, timeout_s: float) -> dict[str, Any]:
    """POST an NDJSON stream and read the streamed answer WHILE sending (full duplex).

    httpx, like most clients, sends the whole body before it reads the answer; the route
    answers chunk by chunk as it reads, so once an answer outgrows the socket buffers both
    sides wait on each other. A storefront-sized stream needs a client that reads as it writes.
    """
    u = httpx.URL(url)
    reader, writer = await asyncio.open_connection(u.host, u.port)
    head = (f"POST /batch-score HTTP/1.1\r\nHost: {u.host}:{u.port}\r\nContent-Type: application/x-ndjson\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()

    async def send() -> None:
        writer.write(head)
        for i in range(0, len(body), 1 << 16):
            writer.write(body[i : i + (1 << 16)])
            await writer.drain()

    lines, first, status, error = 0, None, 0, None
    t = time.perf_counter()
    sender = asyncio.create_task(send())
    try:
        async with asyncio.timeout(timeout_s * 10):
            status_line, *header_lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            status = int(status_line.split()[1])
            chunked = any(h.lower().startswith("transfer-encoding:") and "chunked" in h.lower() for h in header_lines)
            if not chunked:
                raise ValueError(f"HTTP {status} without a chunked stream")
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                lines += (await reader.readexactly(size + 2))[:-2].count(b"\n")  # one result per line
                first = first or time.perf_counter() - t
            await sender
    except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as e:
        error = f"{type(e).__name__} after {lines:,} result lines"
    finally:
        sender.cancel()
        writer.close()
    secs = time.perf_counter() - t
    return {"events": lines, "status": status, "seconds": secs, "events_per_s": lines / secs, "first_line_s": first,
            "body_mb": len(body) / 1e6, "error": error}


# ---- profile -------------------------------------------------------------------------------


#: Where a request's event-loop time goes: (label, file suffix, function) of cProfile entries.
PROFILE_PARTS = (
    ("whole ASGI app (per request)", "fastapi/applications.py", "__call__"),
    ("  POST /events handler (served by DirectRoutes)", "app/routes/events.py", "post_events"),
    ("    parse + validate body", "app/schemas.py", "parse_events"),
    ("    JSON answer", "app/routes/__init__.py", "json_response"),
    ("  request metrics", "app/metrics.py", "track_request"),
    ("window store pipelines (shared by concurrent requests)", "app/redis_scripts.py", "_pipeline"),
    ("micro-batches (featurize once, ONNX Runtime call, decide)", "app/microbatcher.py", "_run"),
    ("  Events.from_records", "app/core/events.py", "from_records"),
    ("  featurizer transform", "app/core/features.py", "transform"),
    ("HTTP parsing (httptools protocol)", "uvicorn/protocols/http/httptools_impl.py", "data_received"),
    ("socket writes", "asyncio/streams.py", "writelines"),
)
#: Not request work: the idle event loop (inside uvloop's run, below the lifespan) and start-up.
_IDLE = {"lifespan", "<built-in method marshal.loads>", "<built-in method builtins.compile>",
         "<built-in method builtins.exec>"}


def profile_summary(path: Path, requests: int, top: int = 15) -> None:
    """Per-request event-loop time by part of the request path, then the top functions."""
    st = pstats.Stats(str(path))
    stats = st.stats  # type: ignore[attr-defined]
    print(f"\ncProfile of the server's event-loop thread, {requests:,} single-event requests "
          "(cProfile slows Python ~2x; read the shares, not the absolute times):")
    base = None
    for label, suffix, fn in PROFILE_PARTS:
        cum = sum(v[3] for (f, _l, name), v in stats.items() if f.endswith(suffix) and name == fn)
        base = base or cum
        if cum:
            print(f"  {label:<46} {1e3 * cum / requests:6.3f} ms/request  {100 * cum / base:5.1f}%")
    busy = [(k, v) for k, v in stats.items() if k[2] not in _IDLE]
    total = sum(v[2] for _k, v in busy)
    print(f"  top functions by own time ({total:.1f} s of main-thread work, idle loop and start-up left out):")
    for (file, line, fn), (_cc, nc, tt, _ct, _) in sorted(busy, key=lambda kv: kv[1][2], reverse=True)[:top]:
        where = file.replace(str(REPO) + "/", "").split("site-packages/")[-1].split("lib/python3")[-1]
        print(f"    {100 * tt / total:5.1f}%  {1e3 * tt / requests:6.3f} ms/request  {nc:>9,} calls  "
              f"{where}:{line} {fn}")


# ---- main ----------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds measured per phase")
    ap.add_argument("--warmup", type=float, default=4.0, help="seconds of warm-up before each phase")
    ap.add_argument("--workers", type=int, nargs="*", default=[1], help="worker counts to run (e.g. 1 2)")
    ap.add_argument("--single", type=int, nargs="*", default=[16, 64], help="connections of the single phases")
    ap.add_argument("--bulk", type=int, nargs="*", default=[4, 16], help="connections of the bulk-100 phases")
    ap.add_argument("--paced", type=float, nargs="*", default=[400, 1500],
                    help="single events paced at these rates (64 connections): latency at a given load")
    ap.add_argument("--batch-json", type=int, default=50_000, help="events in the /batch-score JSON body")
    ap.add_argument("--batch-ndjson", type=int, default=200_000, help="events in the /batch-score NDJSON stream")
    ap.add_argument("--long", action=argparse.BooleanOptionalAction, default=True,
                    help="also a single phase on the 84k head file (long per-user histories)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="server setting, e.g. SEQGUARD_MAX_WAIT_MS=4 (repeatable)")
    ap.add_argument("--profile", action="store_true", help="also profile the server under cProfile")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = ap.parse_args()
    env = dict(kv.split("=", 1) for kv in args.env)

    print(f"machine: {machine()}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"server settings: {env or 'defaults'}")
    print(f"data: {FLINK.name} (single and bulk), {TAOBAO.name} (long histories)")
    print("targets: single ≥ 1,500 events/s at p99 ≤ 20 ms; bulk ≥ 4,000 events/s; no errors")
    report: dict[str, Any] = {"machine": machine(), "env": env, "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-service-") as d:
        tmp = Path(d)
        for workers in args.workers:
            print(f"\n=== seqguard serve --workers {workers} ===")
            run: dict[str, Any] = {"workers": workers, "phases": [], "load_start": os.getloadavg()}
            with server(workers, env, tmp) as (url, pid):
                phases = [("single", FLINK, 1, c, 0.0) for c in args.single]
                phases += [("single", FLINK, 1, 64, r) for r in args.paced]
                if args.long:
                    phases.append(("single, long histories", TAOBAO, 1, (args.single or [16])[0], 0.0))
                phases += [("bulk 100", FLINK, 100, c, 0.0) for c in args.bulk]
                for i, (name, events, bulk, conc, rate) in enumerate(phases):
                    s = run_phase(url, pid, tmp, name=name, events=events, bulk=bulk, concurrency=conc,
                                  duration=args.duration, warmup=args.warmup, tag=f"w{workers}p{i}-", rate=rate)
                    s["load_avg"] = os.getloadavg()
                    print_phase(s)
                    print(f"  load average now {s['load_avg'][0]:.2f}")
                    run["phases"].append(s)
                if args.batch_json or args.batch_ndjson:
                    b = batch_score(url, args.batch_json, args.batch_ndjson)
                    run["batch_score"] = b
                    for kind, r in b.items():
                        extra = f", first line after {r['first_line_s']:.2f} s" if r.get("first_line_s") else ""
                        print(f"\n/batch-score {kind}: {r['events']:,} events ({r['body_mb']:.1f} MB) in "
                              f"{r['seconds']:.2f} s = {r['events_per_s']:,.0f} events/s (HTTP {r['status']}{extra})")
                        if r.get("error"):
                            print(f"  FAILED: {r['error']}")
            report["runs"].append(run)
        if args.profile:
            prof = tmp / "serve.prof"
            with server(1, env, tmp, profile=prof) as (url, pid):
                s = run_phase(url, pid, tmp, name="profiled", events=FLINK, bulk=1, concurrency=16,
                              duration=min(args.duration, 10), warmup=2, tag="prof-")
                warm = json.loads((tmp / "prof-warm.json").read_text())
            profile_summary(prof, s["requests"] + warm["requests"])
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
