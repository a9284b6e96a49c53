"""`seqguard replay`: a storefront simulator. It streams an event log from disk and posts
it to a running service's ``POST /events``, one event a request or ``{"events": [...]}``
bulks, paced at a rate with a bounded number of requests in flight (HTTP/1.1 keep-alive),
and sums up what came back: status counts, 503 retries, decisions and latency.

A 503 is retried after its ``Retry-After`` (a bounded number of times): safe, because the
event ids make posts idempotent. The same machinery drives the service benchmark
(``tests/benchmarks/bench_service.py``) through :func:`replay`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import time
from collections import Counter
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from app.core.decisions import DECISIONS

_TAG = re.compile(r"^[A-Za-z0-9._:-]*$")  # a tag prefixes event ids, which the contract restricts


@dataclass(frozen=True)
class ReplayConfig:
    """What to replay, where and how fast."""

    url: str  # base URL of the service, e.g. http://127.0.0.1:8000
    events: Path
    format: str = "auto"
    rate: float = 0.0  # events per second; 0 = as fast as the service answers
    bulk: int = 1  # events per request; 1 = single-event bodies
    concurrency: int = 16  # requests in flight (one keep-alive connection each)
    api_key: str | None = None
    limit: int = 0  # stop after this many events; 0 = no limit
    duration_s: float = 0.0  # stop sending after this long; 0 = no limit
    loop: bool = False  # start the file again (with fresh ids) until limit or duration
    tag: str = ""  # prefix of event and user ids: replays a file again as new traffic
    retries: int = 5  # retries of a 503, each after its Retry-After
    max_retry_wait_s: float = 10.0  # longest Retry-After honoured
    timeout_s: float = 10.0  # per request
    engine: str = "httpx"  # httpx.AsyncClient, or "raw": a minimal asyncio HTTP/1.1 client for load tests

    def __post_init__(self) -> None:
        if self.rate < 0:
            raise ValueError(f"--rate must be ≥ 0, got {self.rate}")
        if not 1 <= self.bulk <= 1000:
            raise ValueError(f"--bulk must be within 1..1000 (the service's limit), got {self.bulk}")
        if self.concurrency < 1:
            raise ValueError(f"--concurrency must be ≥ 1, got {self.concurrency}")
        if self.limit < 0 or self.duration_s < 0 or self.retries < 0:
            raise ValueError("--limit, --duration and --retries must be ≥ 0")
        if self.loop and not (self.limit or self.duration_s):
            raise ValueError("--loop needs --limit or --duration, else it never ends")
        if not _TAG.match(self.tag):
            raise ValueError(f"--tag {self.tag!r}: only letters, digits and . _ : - (it prefixes event ids)")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"--url {self.url!r}: expected http://host:port")
        if self.engine not in ("httpx", "raw"):
            raise ValueError(f"--engine {self.engine!r}: expected httpx or raw")
        if self.engine == "raw" and not self.url.startswith("http://"):
            raise ValueError("--engine raw speaks plain HTTP only; use --engine httpx for https")


@dataclass
class ReplayStats:
    """Running tallies of one replay."""

    events_sent: int = 0  # events in requests that got an answer or failed for good
    events_ok: int = 0  # events in 2xx answers
    requests: int = 0
    status: Counter[int] = field(default_factory=Counter)  # final status of each request
    transport_errors: int = 0  # no HTTP answer at all (refused, reset, timeout)
    retries: int = 0  # 503s retried
    decisions: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0  # answers flagged "duplicate": the event id was seen before
    latencies: list[float] = field(default_factory=list)  # seconds, every HTTP exchange
    elapsed_s: float = 0.0
    malformed: int = 0  # rows of the file skipped as malformed (first pass)

    def count_answer(self, status: int, n: int, body: bytes) -> None:
        self.requests += 1
        self.events_sent += n
        self.status[status] += 1
        if not 200 <= status < 300:
            return
        self.events_ok += n
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        for r in doc.get("results", [doc]) if isinstance(doc, dict) else ():
            self.decisions[r.get("decision", "?")] += 1
            self.duplicates += bool(r.get("duplicate"))

    def summary(self) -> dict[str, Any]:
        """The figures, as plain JSON-able values."""
        lat = np.asarray(self.latencies, dtype=np.float64) * 1e3
        q = np.percentile(lat, [50, 90, 99]).tolist() if lat.size else [float("nan")] * 3
        classes = Counter(f"{s // 100}xx" for s in self.status.elements())
        secs = max(self.elapsed_s, 1e-9)
        scored = sum(self.decisions.values())
        return {
            "events_sent": self.events_sent, "events_ok": self.events_ok, "requests": self.requests,
            "2xx": classes["2xx"], "4xx": classes["4xx"], "5xx": classes["5xx"],
            "status": {str(k): v for k, v in sorted(self.status.items())},
            "transport_errors": self.transport_errors, "retries_503": self.retries,
            "errors": self.requests - classes["2xx"] + self.transport_errors,
            "decisions": {d: self.decisions[d] for d in DECISIONS},
            "decision_pct": {d: 100.0 * self.decisions[d] / scored if scored else 0.0 for d in DECISIONS},
            "duplicates": self.duplicates,
            "latency_ms": {"p50": q[0], "p90": q[1], "p99": q[2], "max": float(lat.max()) if lat.size else float("nan"),
                           "mean": float(lat.mean()) if lat.size else float("nan")},
            "events_per_s": self.events_ok / secs, "requests_per_s": self.requests / secs,
            "elapsed_s": self.elapsed_s, "malformed_rows": self.malformed,
        }


class Replayer:
    """One replay of ``config``; :meth:`run` returns its :class:`ReplayStats`.

    ``transport`` replaces the network (tests); ``progress`` shows a rich progress bar.
    """

    def __init__(self, config: ReplayConfig, *, transport: httpx.AsyncBaseTransport | None = None,
                 progress: bool = True, console: Console | None = None) -> None:
        self.config = config
        self.stats = ReplayStats()
        self._transport = transport
        self._progress = progress
        self._console = console or Console(stderr=True)
        self._started = 0.0  # perf_counter() of the first request
        self._headers = {"content-type": "application/json"}
        if config.api_key:
            self._headers["authorization"] = f"Bearer {config.api_key}"

    async def run(self) -> ReplayStats:
        cfg = self.config
        bar = _bar(self._console) if self._progress else None
        task = bar.add_task("replay", total=cfg.limit or None) if bar else None
        queue: asyncio.Queue[tuple[bytes, int] | None] = asyncio.Queue(maxsize=cfg.concurrency)
        async with contextlib.AsyncExitStack() as stack:
            if cfg.engine == "httpx":  # one client, a pool of keep-alive connections
                limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
                client = await stack.enter_async_context(httpx.AsyncClient(
                    base_url=cfg.url.rstrip("/"), limits=limits, timeout=cfg.timeout_s, transport=self._transport,
                    headers=self._headers))
                posters: list[_Poster] = [_HttpxPoster(client)] * cfg.concurrency
            else:  # one connection per worker
                posters = [_RawPoster(cfg.url, self._headers, cfg.timeout_s) for _ in range(cfg.concurrency)]
            for p in dict.fromkeys(posters):
                stack.push_async_callback(p.aclose)
            stack.enter_context(bar or contextlib.nullcontext())
            self._started = time.perf_counter()
            workers = [asyncio.create_task(self._worker(p, queue, bar, task)) for p in posters]
            try:
                await self._produce(queue)
                for _ in workers:
                    await queue.put(None)
                await asyncio.gather(*workers)
            finally:
                for w in workers:
                    w.cancel()
            self.stats.elapsed_s = time.perf_counter() - self._started
        return self.stats

    def run_sync(self) -> ReplayStats:
        """:meth:`run` on a fresh event loop (uvloop: a cheaper load generator)."""
        try:
            import uvloop

            factory: Any = uvloop.new_event_loop
        except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
            factory = None
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(self.run())

    async def _produce(self, queue: asyncio.Queue[tuple[bytes, int] | None]) -> None:
        """Bodies into the queue, paced at ``rate`` events/s, until the file, limit or time runs out.

        The clock starts at the first request, not before the file's first chunk is read:
        else pacing would open with a burst to catch up with the time spent reading.
        """
        cfg = self.config
        sent = 0
        async with contextlib.aclosing(self._batches()) as batches:
            async for batch in batches:
                if cfg.limit:
                    batch = batch[: cfg.limit - sent]
                now = time.perf_counter()
                if not sent:
                    self._started = now
                if not batch or (cfg.duration_s and now - self._started >= cfg.duration_s):
                    break
                if cfg.rate:
                    delay = self._started + sent / cfg.rate - now
                    if delay > 0.0005:  # below that, sleeping costs more than it paces
                        await asyncio.sleep(delay)
                body = orjson.dumps(batch[0] if cfg.bulk == 1 else {"events": batch})
                await queue.put((body, len(batch)))  # waits while `concurrency` are in flight
                sent += len(batch)
                if cfg.limit and sent >= cfg.limit:
                    break

    async def _batches(self) -> AsyncGenerator[list[dict[str, Any]], None]:
        """Request-sized lists of events; the file is read in a thread, chunk by chunk."""
        from model_export.data import iter_records  # pyarrow, loaded only when replaying

        cfg = self.config
        pending: list[dict[str, Any]] = []
        for k in itertools.count() if cfg.loop else (0,):
            stream = iter_records(cfg.events, cfg.format)
            prefix = cfg.tag + (f"r{k}." if k else "")  # a fresh pass over the file is new traffic
            while (chunk := await asyncio.to_thread(next, stream, None)) is not None:
                if prefix:
                    chunk = [r | {"event_id": prefix + r["event_id"], "user_id": prefix + r["user_id"]}
                             for r in chunk]
                pending.extend(chunk)
                while len(pending) >= cfg.bulk:
                    yield pending[: cfg.bulk]
                    del pending[: cfg.bulk]
            if k == 0:
                self.stats.malformed = stream.report.malformed
        if pending:
            yield pending

    async def _worker(self, poster: _Poster, queue: asyncio.Queue[tuple[bytes, int] | None],
                      bar: Progress | None, task: Any) -> None:
        while (item := await queue.get()) is not None:
            body, n = item
            await self._post(poster, body, n)
            if bar is not None:
                bar.update(task, advance=n)

    async def _post(self, poster: _Poster, body: bytes, n: int) -> None:
        cfg, stats = self.config, self.stats
        for attempt in range(cfg.retries + 1):
            t0 = time.perf_counter()
            try:
                status, retry, content = await poster.post(body)
            except _NoAnswer:
                stats.transport_errors += 1
                stats.events_sent += n
                return
            stats.latencies.append(time.perf_counter() - t0)
            if status == 503 and attempt < cfg.retries:
                stats.retries += 1
                await asyncio.sleep(retry_after(retry, cfg.max_retry_wait_s))
                continue
            stats.count_answer(status, n, content)
            return


class _NoAnswer(Exception):
    """No HTTP answer: refused, reset, timed out or garbled."""


class _Poster:
    """POSTs a JSON body to /events: (status, Retry-After, body)."""

    async def post(self, body: bytes) -> tuple[int, str | None, bytes]:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


class _HttpxPoster(_Poster):
    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def post(self, body: bytes) -> tuple[int, str | None, bytes]:
        try:
            r = await self.client.post("/events", content=body)
        except httpx.TransportError as e:
            raise _NoAnswer(str(e)) from e
        return r.status_code, r.headers.get("retry-after"), r.content


class _RawPoster(_Poster):
    """HTTP/1.1 over one keep-alive asyncio connection, nothing more: Content-Length or
    chunked answers. About ten times less client CPU per request than httpx, which matters
    when the load generator shares the machine with the service (benchmarks)."""

    def __init__(self, url: str, headers: dict[str, str], timeout: float) -> None:
        u = httpx.URL(url)
        self.host, self.port, self.timeout = u.host, u.port or 80, timeout
        lines = [f"POST {u.path.rstrip('/')}/events HTTP/1.1", f"Host: {u.host}:{self.port}",
                 *(f"{k}: {v}" for k, v in headers.items()), "Content-Length: "]
        self._head = "\r\n".join(lines).encode("latin-1")
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, body: bytes) -> tuple[int, str | None, bytes]:
        try:
            async with asyncio.timeout(self.timeout):
                if self._conn is None:
                    self._conn = await asyncio.open_connection(self.host, self.port)
                reader, writer = self._conn
                writer.write(b"%s%d\r\n\r\n%s" % (self._head, len(body), body))
                head = await reader.readuntil(b"\r\n\r\n")
                status, headers = _parse_head(head)
                if "content-length" in headers:
                    content = await reader.readexactly(int(headers["content-length"]))
                elif headers.get("transfer-encoding", "").lower() == "chunked":
                    content = await _read_chunked(reader)
                else:
                    raise ValueError("answer without a length")
                if headers.get("connection", "").lower() == "close":
                    await self.aclose()
                return status, headers.get("retry-after"), content
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            await self.aclose()  # a fresh connection for the next request
            raise _NoAnswer(type(e).__name__) from e

    async def aclose(self) -> None:
        if self._conn is not None:
            writer = self._conn[1]
            self._conn = None
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    status_line, *lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP/1.x status line: {status_line[:60]!r}")
    headers = {}
    for line in lines:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return int(parts[1]), headers


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        parts.append(await reader.readexactly(size + 2))
    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
        pass
    return b"".join(p[:-2] for p in parts)


def retry_after(value: str | None, cap: float, default: float = 1.0) -> float:
    """Seconds to wait from a ``Retry-After`` header (delay seconds or an HTTP date), at most ``cap``."""
    if value is None:
        return min(default, cap)
    value = value.strip()
    try:
        secs = float(value)
    except ValueError:
        try:
            secs = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            secs = default
    return min(max(secs, 0.0), cap)


def replay(config: ReplayConfig, *, progress: bool = False) -> dict[str, Any]:
    """Run one replay and return its :meth:`ReplayStats.summary`."""
    return Replayer(config, progress=progress).run_sync().summary()


def summary_table(s: dict[str, Any], config: ReplayConfig) -> Table:
    """The end-of-replay table."""
    mode = "single events" if config.bulk == 1 else f"bulks of {config.bulk}"
    rate = f"{config.rate:,.0f} events/s" if config.rate else "as fast as possible"
    t = Table(title=f"replay → {config.url.rstrip('/')}/events ({mode}, {config.concurrency} in flight, {rate})",
              show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_row("events sent", f"{s['events_sent']:,} in {s['requests']:,} requests")
    t.add_row("OK (2xx) / 4xx / 5xx", f"{s['2xx']:,} / {s['4xx']:,} / {s['5xx']:,}")
    t.add_row("transport errors", f"{s['transport_errors']:,}")
    t.add_row("503 retries", f"{s['retries_503']:,}")
    for d in DECISIONS:
        t.add_row(f"decision {d}", f"{s['decisions'][d]:,} ({s['decision_pct'][d]:.1f}%)")
    t.add_row("duplicates", f"{s['duplicates']:,}")
    lat = s["latency_ms"]
    t.add_row("latency p50 / p90 / p99 / max",
              f"{lat['p50']:.2f} / {lat['p90']:.2f} / {lat['p99']:.2f} / {lat['max']:.2f} ms")
    t.add_row("throughput", f"{s['events_per_s']:,.0f} events/s ({s['requests_per_s']:,.0f} requests/s)")
    t.add_row("elapsed", f"{s['elapsed_s']:.2f} s")
    if s["malformed_rows"]:
        t.add_row("malformed rows skipped", f"{s['malformed_rows']:,}")
    return t


class _Speed(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.speed or 0:,.0f} events/s", style="progress.data.speed")


def _bar(console: Console) -> Progress:
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    _Speed(), TimeElapsedColumn(), console=console, transient=False)
