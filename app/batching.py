"""The micro-batcher: windows from concurrent requests are gathered into one ONNX
Runtime call, up to ``max_batch`` windows or ``max_wait_ms``, whichever comes first.

Windows are padded in time to one of a few fixed lengths (see :func:`padded_length`), so
the session sees a bounded set of shapes, all warmed up at start and memory stays flat.
Inference runs in a one-thread executor (ONNX Runtime releases the GIL and uses its
own intra-op threads), never on the event loop. A full queue is refused at once
(:class:`QueueFull`), so overload turns into a 503 with ``Retry-After``, not latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from app.metrics import Metrics
from app.scorer import OnnxModel

log = logging.getLogger("seqguard.batching")


class QueueFull(RuntimeError):
    """The scoring queue is full: shed load."""


def time_lengths(window: int) -> tuple[int, ...]:
    """The fixed time lengths windows are padded to: powers of two up to the window."""
    lengths, t = [], 8
    while t < window:
        lengths.append(t)
        t *= 2
    return (*lengths, window)


def padded_length(n: int, lengths: tuple[int, ...]) -> int:
    for t in lengths:
        if n <= t:
            return t
    return lengths[-1]


@dataclass
class _Job:
    windows: np.ndarray  # (n, T, F) left-padded
    future: asyncio.Future[tuple[np.ndarray, np.ndarray]]
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    def __init__(self, model: OnnxModel, metrics: Metrics, *, max_batch: int, max_wait_ms: float,
                 queue_size: int) -> None:
        self.model = model
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.lengths = time_lengths(model.bundle.window)
        self._queues: dict[int, asyncio.Queue[_Job]] = {}
        self._queue_size = queue_size
        self._pending = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxruntime")
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle -------------------------------------------------------------------

    def warm_up(self) -> None:
        """Run every shape the batcher will use once, before taking traffic."""
        f = len(self.model.bundle.spec.cardinalities)
        for t in self.lengths:
            for b in sorted({1, self.max_batch}):
                self.model.run(np.ones((b, t, f), dtype=np.int64))

    async def start(self) -> None:
        for t in self.lengths:
            self._queues[t] = asyncio.Queue()
            self._tasks.append(asyncio.create_task(self._worker(t), name=f"batcher-T{t}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self._executor.shutdown(wait=True)

    # -- scoring -----------------------------------------------------------------------

    def has_room(self, n: int) -> bool:
        """Whether ``n`` more windows fit in the queue now (admission control before any
        write, so a refused request leaves nothing behind)."""
        return self._pending + n <= self._queue_size

    async def score(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, T, F) windows → per-position (probability, surprise), each (n, T).

        ``T`` must be one of :attr:`lengths` (see :func:`padded_length`).
        """
        n = windows.shape[0]
        if self._pending + n > self._queue_size:
            raise QueueFull(f"{self._pending} windows waiting")
        loop = asyncio.get_running_loop()
        self._pending += n
        self.metrics.set_queue_depth(self._pending)
        try:
            # Large requests are cut so that no job is bigger than one batch; the parts are
            # queued at once and counted once (above), not again per part.
            futs: list[asyncio.Future[tuple[np.ndarray, np.ndarray]]] = []
            for i in range(0, n, self.max_batch):
                futs.append(loop.create_future())
                self._queues[windows.shape[1]].put_nowait(_Job(windows[i : i + self.max_batch], futs[-1]))
            if len(futs) == 1:
                return await futs[0]
            done: list[tuple[np.ndarray, np.ndarray]] = []
            for part in await asyncio.gather(*futs, return_exceptions=True):
                if isinstance(part, BaseException):
                    raise part
                done.append(part)
            return np.concatenate([p for p, _ in done]), np.concatenate([s for _, s in done])
        finally:
            self._pending -= n
            self.metrics.set_queue_depth(self._pending)

    async def _worker(self, length: int) -> None:
        queue = self._queues[length]
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await queue.get()]
            size = jobs[0].windows.shape[0]
            deadline = loop.time() + self.max_wait
            while size < self.max_batch:
                if queue.empty():
                    timeout = deadline - loop.time()
                    if timeout <= 0:
                        break
                    try:
                        job = await asyncio.wait_for(queue.get(), timeout)
                    except TimeoutError:
                        break
                else:
                    job = queue.get_nowait()
                if size + job.windows.shape[0] > self.max_batch:
                    queue.put_nowait(job)  # next batch; order within a length barely matters
                    break
                jobs.append(job)
                size += job.windows.shape[0]
            await self._run(jobs, size, loop)

    async def _run(self, jobs: list[_Job], size: int, loop: asyncio.AbstractEventLoop) -> None:
        x = jobs[0].windows if len(jobs) == 1 else np.concatenate([j.windows for j in jobs])
        started = time.perf_counter()
        try:
            prob, surprise = await loop.run_in_executor(self._executor, self.model.run, x)
        except Exception as e:  # resolve every waiter; the route turns it into a 500
            log.exception("inference failed")
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(e)
            return
        self.metrics.track_inference(size, time.perf_counter() - started)
        i = 0
        for j in jobs:
            n = j.windows.shape[0]
            if not j.future.done():
                j.future.set_result((prob[i : i + n], surprise[i : i + n]))
            i += n
