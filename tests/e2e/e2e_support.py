"""Helpers of the end-to-end tests: events, Redis peeks, metrics parsing, a live server
(`python -m app.cli serve` in a subprocess of its own process group)."""

from __future__ import annotations

import contextlib
import csv
import gzip
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families
from starlette.exceptions import StarletteDeprecationWarning

from app.embedded_redis import free_port
from app.metrics import MULTIPROC_ENV
from app.windows import user_keys

with warnings.catch_warnings():  # Starlette asks for httpx2 over httpx; the venv has httpx
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

__all__ = ["TestClient"]

ROOT = Path(__file__).resolve().parents[2]
TAOBAO_100 = ROOT / "tests" / "data" / "taobao_100users.csv.gz"
_SERVERS = itertools.count()
TOL = 1e-4  # online vs batch parity
T0 = 1_700_000_000_000  # epoch ms of synthetic events


# ------------------------------------------------------------------------------ events


def event(eid: str, user: str, ts: int, event_type: str = "pv", **fields: Any) -> dict[str, Any]:
    """A contract event (epoch-ms timestamp)."""
    return {"event_id": eid, "user_id": user, "event_type": event_type, "timestamp": ts, **fields}


def taobao_events(users: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Contract events of some users of the shared Taobao sample, in file order (timestamp
    order per user; equal timestamps kept in file order). Ids: ``<user>-<row of user>``."""
    wanted = set(users)
    out: dict[str, list[dict[str, Any]]] = {u: [] for u in users}
    with gzip.open(TAOBAO_100, "rt", newline="") as fh:
        for user, item, category, behavior, seconds in csv.reader(fh):
            if user in wanted:
                evs = out[user]
                evs.append(event(f"{user}-{len(evs)}", user, int(seconds) * 1000, behavior,
                                 item_id=item, category_id=category))
    return out


def expected_decision(p: float, thresholds: dict[str, float]) -> str:
    return "block" if p >= thresholds["block"] else "review" if p >= thresholds["review"] else "allow"


# ------------------------------------------------------------------------------- Redis


def window_len(redis_url: str, user: str) -> int:
    """Events the store holds for ``user`` (read straight from Redis)."""
    with redis.Redis.from_url(redis_url) as r:
        return int(r.zcard(user_keys(user).window))


def db_size(redis_url: str) -> int:
    """Keys of users in the store (the service's own sg:model:* records not counted)."""
    with redis.Redis.from_url(redis_url) as r:
        return len(r.keys("sg:{*"))


# ----------------------------------------------------------------------------- metrics


Samples = list[tuple[str, dict[str, str], float]]


def parse_metrics(text: str) -> Samples:
    """Every sample of a Prometheus text exposition as (name, labels, value)."""
    return [(s.name, dict(s.labels), float(s.value)) for fam in text_string_to_metric_families(text)
            for s in fam.samples]


def metric(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


def metric_names(samples: Samples) -> set[str]:
    return {n for n, _, _ in samples}


# ------------------------------------------------------------------------ the service


class LiveServer:
    """`python -m app.cli serve` on a free loopback port, in its own process group. With no
    ``redis_url`` the server starts its own embedded Redis, with its data in ``data_dir``."""

    def __init__(self, redis_url: str | None, log_dir: Path, *, workers: int = 1, env: dict[str, str] | None = None,
                 data_dir: Path | None = None) -> None:
        self.redis_url = redis_url
        self.workers = workers
        self.data_dir = data_dir or log_dir / "redis"
        self.log_path = log_dir / f"serve-{next(_SERVERS)}.log"
        self.extra_env = env or {}
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SEQGUARD_") and k != MULTIPROC_ENV}
        env |= {"SEQGUARD_INFERENCE_THREADS": "1", "SEQGUARD_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1",
                "SEQGUARD_REDIS_DATA_DIR": str(self.data_dir)}
        return env | self.extra_env

    def start(self, timeout_s: float = 90.0) -> LiveServer:
        for _ in range(3):  # a port picked free may be taken before uvicorn binds it
            self.port = free_port()
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                     "--workers", str(self.workers), *(["--redis-url", self.redis_url] if self.redis_url else [])],
                    cwd=ROOT, env=self._env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    if httpx.get(self.url + "/readyz", timeout=2.0).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
            self.stop()
            if "address already in use" not in self.log().lower():
                break
        raise AssertionError(f"seqguard serve did not become ready on {self.url}; log:\n{self.log()[-4000:]}")

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM to the server process alone (as a process manager sends it); its exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def interrupt(self, timeout_s: float = 30.0) -> int:
        """SIGINT to the server's whole process group, as Ctrl-C in a terminal sends it; its exit status."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.proc.wait(timeout=timeout_s)

    def stop(self) -> None:
        """Stop the server and everything it started (its process group)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):  # the group this server started (workers, Redis)
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()




def copy_file(src: Path, dst_dir: Path) -> Path:
    dst_dir.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy2(src, dst_dir / src.name))


def wait_for(predicate: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition") -> None:
    """Poll ``predicate`` every 10 ms until true; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def gone(pid: int) -> bool:
    """The process ended (an unreaped zombie counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
