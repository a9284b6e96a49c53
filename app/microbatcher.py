"""The micro-batcher: windows from concurrent requests are gathered into one batch, up
to ``max_batch`` windows or ``max_wait_ms``, whichever comes first.

A batch is featurized once (one pass of the featurizer over all its events: per-call
numpy overhead is paid per batch, not per request), then cut by padded time length
(:meth:`app.core.features.Padding.online`) into one ONNX Runtime call per length, so the
session sees a bounded set of shapes, all warmed up at start, and memory stays flat.
Inference runs in a one-thread executor (ONNX Runtime releases the GIL and uses its own
intra-op threads), never on the event loop; all the calls of a batch go in one hop. A
full queue is refused at once (:class:`QueueFull`), so overload turns into a 503 with
``Retry-After``, not latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.core.decisions import Thresholds
from app.core.events import Events
from app.core.features import Padding, WindowInputs
from app.core.scorer import OnnxModel
from app.metrics import Metrics

log = logging.getLogger("seqguard.batching")

Window = Sequence[Mapping[str, Any]]


class QueueFull(RuntimeError):
    """The scoring queue is full: shed load."""


class Stopped(QueueFull):
    """The micro-batcher stopped before scoring these windows (shut down, or its model
    swapped out and its drain time over): the caller answers 503 like a full queue."""


@dataclass(frozen=True)
class WindowScores:
    """Per window: the anomaly probability of its last event, its decision, the events
    the model saw (at most its window) and their per-event surprise, oldest first."""

    probability: list[float]
    decision: list[str]
    window_size: list[int]
    surprise: list[np.ndarray]
    #: Per window, (events seen, targets) each feature's share of each event's surprise,
    #: oldest first; ``None`` where not asked for (``explain``) or the bundle has none.
    feature_surprise: list[np.ndarray | None]

    def __getitem__(self, part: slice) -> WindowScores:
        return WindowScores(self.probability[part], self.decision[part], self.window_size[part], self.surprise[part],
                            self.feature_surprise[part])

    @staticmethod
    def concat(parts: Sequence[WindowScores]) -> WindowScores:
        return WindowScores([p for s in parts for p in s.probability], [d for s in parts for d in s.decision],
                            [n for s in parts for n in s.window_size], [x for s in parts for x in s.surprise],
                            [x for s in parts for x in s.feature_surprise])


@dataclass
class _Job:
    windows: Sequence[Window]
    future: asyncio.Future[WindowScores]
    explain: bool = False


# One ONNX Runtime call of a batch: the batch rows it scores, and their padded windows.
_ModelInput = tuple[np.ndarray, np.ndarray]


class MicroBatcher:
    """Scores windows of contract events (oldest first, the last one being scored, at most
    the featurizer's ``history`` of them) in shared batches, and decides on them with
    ``thresholds``. Decisions and the scoring metrics are computed once per batch."""

    def __init__(self, model: OnnxModel, metrics: Metrics | None, *, thresholds: Thresholds, max_batch: int,
                 max_wait_ms: float, queue_size: int, background: bool = False) -> None:
        """``metrics``: the scoring metrics this batcher feeds (``None``: none, a shadow's).
        ``background``: a shadow's batcher, which must not slow the live one down: it
        featurizes in its own thread too (not on the event loop), and that thread runs at
        a lower CPU priority (nice +:data:`BACKGROUND_NICE`), so that the live model's
        thread and the event loop win the cores when both want them."""
        self.model = model
        self.thresholds = thresholds
        self.spec = model.bundle.spec
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.padding = Padding.online(model.bundle.window)
        self.background = background
        self._queue: asyncio.Queue[_Job] | None = None
        self._queue_size = queue_size
        self._pending = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxruntime",
                                            initializer=_lower_priority if background else None)
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------

    def warm_up(self) -> None:
        """Run every shape the batcher will use once, before taking traffic, and check what
        the model gives back.

        Raises:
            ValueError: an output that is not (B, T) floats, or a probability outside [0, 1]
                (a model of another contract would fail every request later, not now).
        """
        f = len(self.spec.cardinalities)
        for t in self.padding.lengths:
            for b in sorted({1, self.max_batch}):
                outputs = self.model.run(np.ones((b, t, f), dtype=np.int64))
                for name, out in zip(("anomaly_probability", "surprise"), outputs, strict=True):
                    out = np.asarray(out)
                    if out.shape != (b, t) or out.dtype.kind != "f":
                        raise ValueError(f"{name} is {out.dtype}{list(out.shape)} for input [{b}, {t}, {f}], "
                                         f"expected float[{b}, {t}]")
                if not np.all((outputs[0] >= 0) & (outputs[0] <= 1)):
                    raise ValueError("anomaly_probability outside [0, 1]")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._worker(self._queue), name="micro-batcher")

    async def stop(self) -> None:
        """Stop scoring: every window not answered yet, queued or in the batch being run,
        gets :class:`Stopped` (never a wait for ever), and so does every later call."""
        queue, self._queue = self._queue, None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while queue is not None and not queue.empty():
            _fail([queue.get_nowait()])
        self._executor.shutdown(wait=True)

    # -- scoring -----------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Windows queued or being scored now."""
        return self._pending

    def has_room(self, n: int) -> bool:
        """Whether ``n`` more windows fit in the queue now (admission control before any
        write, so a refused request leaves nothing behind)."""
        return self._pending + n <= self._queue_size

    async def score(self, windows: Sequence[Window], explain: bool = False) -> WindowScores:
        """Score the last event of each window; with ``explain``, also each feature's share
        of each event's surprise (``WindowScores.feature_surprise``), where the bundle's
        graph has it: a batch asks ONNX Runtime for that output only when one of its jobs
        explains, so an answer without ``explain`` costs what it did.

        A window of a single event gets a defined answer: the model sees one event with
        no history, exactly as the batch engine scores a user's first event.
        """
        n = len(windows)
        if any(not w for w in windows):
            raise ValueError("every window needs at least the event being scored")
        if self._queue is None:
            raise Stopped("the micro-batcher is not running")
        if self._pending + n > self._queue_size:
            raise QueueFull(f"{self._pending} windows waiting")
        loop = asyncio.get_running_loop()
        self._pending += n
        if self.metrics is not None:
            self.metrics.set_queue_depth(self._pending)
        try:
            # Large requests are cut so that no job is bigger than one batch; the parts are
            # queued at once and counted once (above), not again per part.
            futs: list[asyncio.Future[WindowScores]] = []
            for i in range(0, n, self.max_batch):
                futs.append(loop.create_future())
                self._queue.put_nowait(_Job(windows[i : i + self.max_batch], futs[-1], explain))
            if len(futs) == 1:
                return await futs[0]
            done: list[WindowScores] = []
            for part in await asyncio.gather(*futs, return_exceptions=True):
                if isinstance(part, BaseException):
                    raise part
                done.append(part)
            return WindowScores.concat(done)
        finally:
            self._pending -= n
            if self.metrics is not None:
                self.metrics.set_queue_depth(self._pending)

    async def _worker(self, queue: asyncio.Queue[_Job]) -> None:
        loop = asyncio.get_running_loop()
        jobs: list[_Job] = []
        held: list[_Job] = []
        try:
            await self._batches(queue, loop, jobs, held)
        except asyncio.CancelledError:  # stopped: the jobs taken from the queue get an answer too
            _fail(jobs + held)
            raise

    async def _batches(self, queue: asyncio.Queue[_Job], loop: asyncio.AbstractEventLoop, jobs: list[_Job],
                       held: list[_Job]) -> None:
        """Form and run batches for ever; ``jobs`` holds the batch taken from the queue, and
        ``held`` the job that did not fit in it, which opens the next batch. (It went back
        to the tail of the queue, behind every job queued meanwhile: under bulk load an
        attack review saw a 64-window job deferred 96 times, 20 s.)"""
        while True:
            jobs[:] = [held.pop() if held else await queue.get()]
            size = len(jobs[0].windows)
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
                if size + len(job.windows) > self.max_batch:
                    held.append(job)  # the first of the next batch: first come, first scored
                    break
                jobs.append(job)
                size += len(job.windows)
            await self._run(jobs, loop)
            jobs.clear()

    async def _run(self, jobs: list[_Job], loop: asyncio.AbstractEventLoop) -> None:
        windows = [w for j in jobs for w in j.windows]
        try:
            # On the loop: the featurizer is numpy calls with the GIL held; a thread
            # would only contend for it.
            if self.background:  # a shadow's: the loop is the live model's
                calls, seen, unknown = await loop.run_in_executor(self._executor, self._featurize, windows)
            else:
                calls, seen, unknown = self._featurize(windows)
            explain = self.model.explains and any(j.explain for j in jobs)
            outputs = await loop.run_in_executor(self._executor, self._infer, calls, explain)
            scored = self._answers(windows, calls, seen, unknown, outputs)
        except Exception as e:  # resolve every waiter; the route turns it into a 500
            log.exception("scoring a batch of %d windows failed", len(windows))
            for j in jobs:
                if not j.future.done():
                    j.future.set_exception(e)
            return
        i = 0
        for j in jobs:
            n = len(j.windows)
            if not j.future.done():
                j.future.set_result(scored[i : i + n])
            i += n

    def _answers(self, windows: list[Window], calls: list[_ModelInput], seen: list[int], unknown: dict[str, int],
                 outputs: list[tuple[np.ndarray, np.ndarray, np.ndarray | None, float]]) -> WindowScores:
        """The batch's probabilities, decisions and surprises, and its metrics."""
        prob = np.empty(len(windows), np.float32)
        surprise: list[np.ndarray] = [np.empty(0, np.float32)] * len(windows)
        per_feature: list[np.ndarray | None] = [None] * len(windows)
        for (rows, x), (p, s, fs, seconds) in zip(calls, outputs, strict=True):
            if self.metrics is not None:
                self.metrics.track_inference(len(rows), seconds)
            t = x.shape[1]
            prob[rows] = p[:, -1]
            for k, i in enumerate(rows.tolist()):
                surprise[i] = s[k, t - seen[i]:]
                if fs is not None:
                    per_feature[i] = fs[k, t - seen[i]:]
        decision = self.thresholds.decide(prob)
        if self.metrics is not None:
            self.metrics.track_scored("online", prob, decision)
            if unknown:
                self.metrics.track_unknown_types(unknown)
        return WindowScores(prob.tolist(), decision.tolist(), seen, surprise, per_feature)

    def _featurize(self, windows: list[Window]) -> tuple[list[_ModelInput], list[int], dict[str, int]]:
        """One featurizer pass over every event of the batch → one padded (n, T, F) array
        per time length in use, the events each window's model input holds, and the event
        types unknown to the model among the events scored (each window's last)."""
        lens = np.fromiter((len(w) for w in windows), np.int64, len(windows))
        events = Events.from_records([e for w in windows for e in w])
        inputs = WindowInputs.build(self.spec, events, lens)
        # history events are not counted: they were counted when they were scored
        return inputs.calls, inputs.seen.tolist(), self.spec.unknown_types(events, rows=inputs.last)

    def _infer(self, calls: list[_ModelInput],
               explain: bool = False) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None, float]]:
        """The batch's ONNX Runtime calls, in the executor thread: each call's
        (probability, surprise, per-feature surprise or None) and its own duration (not
        the time spent queued)."""
        out = []
        for _, x in calls:
            started = time.perf_counter()
            if explain:
                p, s, fs = self.model.run_explained(x)
            else:
                (p, s), fs = self.model.run(x), None
            out.append((p, s, fs, time.perf_counter() - started))
        return out


#: How much lower a background (shadow) batcher's thread runs: ``nice`` +10.
BACKGROUND_NICE = 10


def _lower_priority() -> None:
    """Lower the calling thread's CPU priority (Linux: a thread is a task of its own)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)


def _fail(jobs: list[_Job]) -> None:
    for j in jobs:
        if not j.future.done():
            j.future.set_exception(Stopped("the model scoring these events was stopped before it answered"))
