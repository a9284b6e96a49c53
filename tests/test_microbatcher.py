"""The micro-batcher on a real ONNX Runtime session (the shipped bundle) and real events."""

from __future__ import annotations

import asyncio
import csv
import gzip
import time
from typing import Any

import numpy as np
import pytest
from conftest import TAOBAO_100

from app.core.bundle import load_bundle
from app.core.events import Events
from app.core.features import Padding, last_windows
from app.core.scorer import OnnxModel
from app.metrics import Metrics
from app.microbatcher import MicroBatcher, QueueFull, Stopped, WindowScores


@pytest.fixture(scope="module")
def model() -> OnnxModel:
    return OnnxModel(load_bundle(), threads=1)


@pytest.fixture(scope="module")
def users() -> list[list[dict[str, Any]]]:
    """Every user of the 100-user Taobao sample as contract events, oldest first."""
    by_user: dict[str, list[dict[str, Any]]] = {}
    with gzip.open(TAOBAO_100, "rt", newline="") as fh:
        for user, item, category, behavior, seconds in csv.reader(fh):
            evs = by_user.setdefault(user, [])
            evs.append({"event_id": f"{user}-{len(evs)}", "user_id": user, "event_type": behavior,
                        "timestamp": int(seconds) * 1000, "item_id": item, "category_id": category})
    return [sorted(evs, key=lambda e: e["timestamp"]) for evs in by_user.values()]


def windows_of(users: list[list[dict[str, Any]]], history: int, seed: int, n: int) -> list[list[dict[str, Any]]]:
    """``n`` windows ending at random events of random users, of every length up to ``history``."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        evs = users[int(rng.integers(len(users)))]
        end = int(rng.integers(1, len(evs) + 1))
        out.append(evs[max(0, end - history):end])
    return out


def one_by_one(model: OnnxModel, window: list[dict[str, Any]]) -> tuple[float, np.ndarray]:
    """The reference: one window featurized and run alone."""
    spec, padding = model.bundle.spec, Padding.online(model.bundle.window)
    feats = spec.transform(Events.from_records(window), groups=np.zeros(len(window), np.int64))
    seen = min(len(window), spec.window)
    t = padding.padded(seen)
    p, s = model.run(last_windows(feats, np.array([len(window) - 1]), np.array([0]), t))
    return float(p[0, -1]), s[0, t - seen:]


def run_batcher(model: OnnxModel, metrics: Metrics, jobs: list[Any], **kw: Any) -> list[WindowScores]:
    async def main() -> list[WindowScores]:
        b = MicroBatcher(model, metrics, thresholds=model.bundle.thresholds,
                         **{"max_batch": 32, "max_wait_ms": 20, "queue_size": 10_000} | kw)
        await b.start()
        try:
            return await asyncio.gather(*(b.score(w) for w in jobs))
        finally:
            await b.stop()

    return asyncio.run(main())


def metric(metrics: Metrics, name: str) -> float:
    body = metrics.render()[0].decode()
    return float(next(line for line in body.splitlines() if line.startswith(name + " ")).split()[-1])


def test_lengths_are_few_and_cover_the_window():
    assert Padding.online(64).lengths == (8, 16, 32, 64)
    assert [Padding.online(64).padded(n) for n in (1, 8, 9, 33, 64)] == [8, 8, 16, 64, 64]


def test_concurrent_requests_share_batches_and_get_their_own_answers(model, users):
    metrics = Metrics()
    history = model.bundle.spec.history
    jobs = [windows_of(users, history, seed=k, n=k % 3 + 1) for k in range(40)]
    lengths = {Padding.online(model.bundle.window).padded(min(len(w), model.bundle.window))
               for job in jobs for w in job}
    assert len(lengths) >= 3, "the jobs mix padded lengths"
    got = run_batcher(model, metrics, jobs)
    th = model.bundle.thresholds
    for job, scored in zip(jobs, got, strict=True):
        assert len(scored.probability) == len(scored.decision) == len(scored.surprise) == len(job)
        for w, p, d, n, s in zip(job, scored.probability, scored.decision, scored.window_size, scored.surprise,
                                 strict=True):
            want_p, want_s = one_by_one(model, w)
            assert abs(p - want_p) <= 1e-6 and np.abs(s - want_s).max() <= 1e-5
            assert n == len(s) == min(len(w), model.bundle.window)
            assert d == ("block" if p >= th.block else "review" if p >= th.review else "allow")
    calls = metric(metrics, "seqguard_inference_batch_size_count")
    assert calls < len(jobs), "requests were batched together"
    windows = sum(len(j) for j in jobs)
    assert metric(metrics, "seqguard_inference_batch_size_sum") == windows
    assert metric(metrics, 'seqguard_events_scored_total{path="online"}') == windows


def test_inference_time_is_the_calls_alone(model, users):
    """The duration metric times the ONNX Runtime calls, not the wait for the executor:
    concurrent jobs cannot add up to more than the wall time they took."""
    metrics = Metrics()
    jobs = [windows_of(users, model.bundle.spec.history, seed=k, n=4) for k in range(60)]
    started = time.perf_counter()
    run_batcher(model, metrics, jobs, max_batch=8, max_wait_ms=0)
    wall = time.perf_counter() - started
    assert 0 < metric(metrics, "seqguard_inference_duration_seconds_sum") <= wall


def test_requests_larger_than_a_batch_are_split(model, users):
    metrics = Metrics()
    job = windows_of(users, model.bundle.spec.history, seed=1, n=30)
    (scored,) = run_batcher(model, metrics, [job], max_batch=8, max_wait_ms=1)
    want = [one_by_one(model, w)[0] for w in job]
    assert np.abs(np.array(scored.probability) - want).max() <= 1e-6
    assert len(scored.surprise) == 30
    assert metric(metrics, "seqguard_inference_batch_size_sum") == 30
    assert metric(metrics, "seqguard_inference_batch_size_count") >= 4  # no call above max_batch


def test_an_empty_window_is_refused(model, users):
    with pytest.raises(ValueError, match="at least the event"):
        run_batcher(model, Metrics(), [[users[0][:1], []]])


def test_a_full_queue_is_refused_at_once(model, users):
    history = model.bundle.spec.history

    async def main() -> None:
        b = MicroBatcher(model, Metrics(), thresholds=model.bundle.thresholds, max_batch=4, max_wait_ms=50,
                         queue_size=6)
        await b.start()
        try:
            first = asyncio.create_task(b.score(windows_of(users, history, seed=2, n=4)))
            await asyncio.sleep(0)
            assert not b.has_room(3)
            with pytest.raises(QueueFull):
                await b.score(windows_of(users, history, seed=3, n=4))
            await first
            assert b.has_room(6)
        finally:
            await b.stop()

    asyncio.run(main())


def test_stopping_answers_every_waiting_window(model, users):
    """A review of hot reload: a swapped-out batcher stopped after its drain time (and any
    batcher at shutdown) cancelled its worker and left the windows still queued, and the
    batch being run, waiting for ever; they get Stopped (a 503) now, and so does a later call."""
    history = model.bundle.spec.history

    async def main() -> None:
        # a batch of up to 64 windows waits a second to fill: stop() lands while the worker
        # holds the jobs it took and more are queued behind them
        b = MicroBatcher(model, Metrics(), thresholds=model.bundle.thresholds, max_batch=64, max_wait_ms=1000,
                         queue_size=64)
        await b.start()
        waiting = [asyncio.create_task(b.score(windows_of(users, history, seed=s, n=2))) for s in range(6)]
        await asyncio.sleep(0.05)
        await b.stop()
        got = await asyncio.wait_for(asyncio.gather(*waiting, return_exceptions=True), 10)  # none waits for ever
        assert all(isinstance(g, Stopped) for g in got), got
        assert b.pending == 0
        with pytest.raises(Stopped):
            await b.score(windows_of(users, history, seed=9, n=1))

    asyncio.run(main())


def test_unknown_types_of_the_scored_events_only_are_counted(model, users):
    """A window's history was counted when it was scored: only each window's last event
    counts, under its raw name; aliased names are known."""
    metrics = Metrics()
    base = users[0][:5]

    def ending(*types: str) -> list[dict[str, Any]]:
        return [dict(e, event_type=t) for e, t in zip(base[-len(types):], types, strict=True)]

    jobs = [[ending("login", "login", "pv")], [ending("pv", "login")], [ending("login", "Login"), ending("signup")],
            [ending("addtocart", "transaction", "clicks")]]
    run_batcher(model, metrics, jobs, max_batch=2)
    body = metrics.render()[0].decode()
    counted = {line.split('"')[1]: float(line.split()[-1]) for line in body.splitlines()
               if line.startswith("seqguard_unknown_event_types_total{")}
    assert counted == {"login": 1.0, "Login": 1.0, "signup": 1.0}


def test_a_job_that_does_not_fit_opens_the_next_batch(model: OnnxModel, users: list[list[dict[str, Any]]]) -> None:
    """An attack review: a job too big for the batch being formed went back to the tail of
    the queue, behind every job queued meanwhile, and under bulk load waited 20 s. It opens
    the next batch: first come, first scored."""
    thresholds = model.bundle.thresholds

    async def main() -> list[str]:
        b = MicroBatcher(model, Metrics(), thresholds=thresholds, max_batch=64, max_wait_ms=5.0, queue_size=10_000)
        await b.start()
        done: list[str] = []

        async def job(name: str, n: int) -> None:
            await b.score(windows_of(users, 80, seed=len(done) + n, n=n))
            done.append(name)

        try:
            tasks = [asyncio.create_task(job("first", 10)), asyncio.create_task(job("big", 64))]
            tasks += [asyncio.create_task(job(f"small-{i}", 10)) for i in range(20)]
            await asyncio.gather(*tasks)
        finally:
            await b.stop()
        return done

    done = asyncio.run(main())
    assert done.index("big") < done.index("small-2"), done
