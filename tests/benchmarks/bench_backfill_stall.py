"""Does a large backfill stall live scoring? `seqguard serve` (one worker, default bundle,
embedded Redis) as a subprocess; a 100k-event JSON `POST /batch-score` (the first 100k
events of the real Taobao stream slice, about 12 MB) is sent from a process of its own
while this process posts single events to `POST /events` on a fixed schedule (open loop:
a request is sent when due, whether or not the previous one has been answered) and
records each one's latency from the time it was due. Prints p50 / p99 / max of `/events` with no backfill and
during the backfill, and the backfill's own time. Asserts nothing about time.

With ``--baseline REF`` the same is measured first on the code of git revision REF
(exported with `git archive` into a temporary directory, run with this checkout's
virtual environment), so one run prints before and after.

    .venv/bin/python tests/benchmarks/bench_backfill_stall.py [--events 100000] [--rate 25]
        [--idle 5] [--baseline HEAD] [--repeat 1] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import gzip
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import psutil
from _common import FLINK, REPO, machine

POSTER = """
import sys, time, httpx
body = open(sys.argv[2], "rb").read()
t = time.perf_counter()
r = httpx.post(sys.argv[1] + "/batch-score", content=body, headers={"content-type": "application/json"},
               timeout=600)
print(r.status_code, time.perf_counter() - t, len(r.content))
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(code_dir: Path, tmp: Path) -> Iterator[str]:
    """`seqguard serve` of the code in ``code_dir`` on a free port; yields its URL once ready."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SEQGUARD_", "PROMETHEUS_MULTIPROC"))}
    env |= {"SEQGUARD_REDIS_DATA_DIR": str(tmp / f"redis-{port}"), "SEQGUARD_INFERENCE_THREADS": "1",
            "PYTHONPATH": str(code_dir)}
    log_path = tmp / f"serve-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], cwd=code_dir,
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with suppress(httpx.TransportError):
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.25)
        yield url
    finally:
        children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for child in children:
            with suppress(psutil.NoSuchProcess):
                child.kill()


def backfill_body(n: int) -> bytes:
    events = []
    with gzip.open(FLINK, "rt", newline="") as fh:
        for i, (user, item, category, behavior, seconds) in enumerate(csv.reader(fh)):
            if i == n:
                break
            events.append({"event_id": f"b{i}", "user_id": user, "event_type": behavior,
                           "timestamp": int(seconds) * 1000, "item_id": item, "category_id": category})
    return orjson.dumps({"events": events})


def probe(url: str, rate: float, stop: threading.Event, tag: str) -> list[float]:
    """POST /events on a fixed schedule, ``rate`` a second, until ``stop``: latencies in ms,
    each from the time its request was due. Open loop: a stall delays every request due
    during it, as it would a storefront's, instead of one request of a client that waits."""
    return asyncio.run(_probe(url, rate, stop, tag))


async def _probe(url: str, rate: float, stop: threading.Event, tag: str) -> list[float]:
    out: list[float] = []
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one(i: int, due: float) -> None:
            ev = {"event_id": f"{tag}-{i}", "user_id": f"live-{i % 500}", "event_type": "pv",
                  "timestamp": 1_511_658_000_000 + i * 1000, "item_id": str(i % 977)}
            r = await client.post("/events", content=orjson.dumps(ev), headers={"content-type": "application/json"})
            out.append((time.perf_counter() - due) * 1000)
            if r.status_code != 200:
                raise RuntimeError(f"/events answered {r.status_code}: {r.text[:300]}")

        tasks = []
        start = time.perf_counter()
        i = 0
        while not stop.is_set():
            due = start + i / rate
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i, due)))
            i += 1
        await asyncio.gather(*tasks)
    return out


def stats(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"n": len(a), "p50_ms": round(float(np.percentile(a, 50)), 1),
            "p99_ms": round(float(np.percentile(a, 99)), 1), "max_ms": round(float(a.max()), 1)}


def measure(code_dir: Path, body_path: Path, tmp: Path, *, rate: float, idle_s: float, label: str,
            tag: str) -> dict[str, Any]:
    with server(code_dir, tmp) as url:
        stop = threading.Event()
        lat: list[float] = []
        warm = threading.Thread(target=lambda: lat.extend(probe(url, rate, stop, f"{tag}-w")))
        warm.start()
        time.sleep(idle_s)  # warm-up and the idle figures
        stop.set()
        warm.join()
        idle = stats(lat[len(lat) // 5:])
        stop = threading.Event()
        during: list[float] = []
        prober = threading.Thread(target=lambda: during.extend(probe(url, rate, stop, f"{tag}-b")))
        prober.start()
        time.sleep(0.5)
        out = subprocess.run([sys.executable, "-c", POSTER, url, str(body_path)], capture_output=True, text=True,
                             check=True)
        stop.set()
        prober.join()
        status, seconds, size = out.stdout.split()
        if status != "200":
            raise RuntimeError(f"/batch-score answered {status}")
    return {"label": label, "idle": idle, "during_backfill": stats(during),
            "backfill_s": round(float(seconds), 2), "answer_bytes": int(size)}


def export_tree(ref: str, dest: Path) -> Path:
    archive = subprocess.run(["git", "archive", ref], cwd=REPO, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--rate", type=float, default=25.0, help="/events requests per second (open loop)")
    ap.add_argument("--idle", type=float, default=5.0, help="seconds of /events alone first (warm-up and idle)")
    ap.add_argument("--baseline", help="also measure the code of this git revision (e.g. HEAD), first")
    ap.add_argument("--repeat", type=int, default=1, help="measurements of each code, alternated")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    print(f"machine: {machine()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    with tempfile.TemporaryDirectory(prefix="seqguard-stall-") as d:
        tmp = Path(d)
        body_path = tmp / "backfill.json"
        body_path.write_bytes(backfill_body(args.events))
        print(f"backfill: {args.events:,} events, {body_path.stat().st_size / 1e6:.1f} MB JSON; "
              f"/events probe: {args.rate:g}/s on a fixed schedule")
        runs = []
        base = export_tree(args.baseline, tmp / "baseline") if args.baseline else None
        for _ in range(args.repeat):  # alternated, so that drift in the machine's load hits both alike
            if base is not None:
                runs.append(measure(base, body_path, tmp, rate=args.rate, idle_s=args.idle,
                                    label=f"before ({args.baseline})", tag="base"))
            runs.append(measure(REPO, body_path, tmp, rate=args.rate, idle_s=args.idle, label="this tree",
                                tag="tree"))
    print(f"{'code':<16} {'phase':<16} {'n':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  backfill s")
    for r in runs:
        for phase in ("idle", "during_backfill"):
            s = r[phase]
            took = f"  {r['backfill_s']}" if phase == "during_backfill" else ""
            print(f"{r['label']:<16} {phase:<16} {s['n']:>6} {s['p50_ms']:>8} {s['p99_ms']:>8} {s['max_ms']:>8}{took}")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
