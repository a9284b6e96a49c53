"""The micro-batcher on a real ONNX Runtime session (the shipped bundle)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from app.batching import MicroBatcher, QueueFull, padded_length, time_lengths
from app.bundle import load_bundle
from app.metrics import Metrics
from app.scorer import OnnxModel


@pytest.fixture(scope="module")
def model() -> OnnxModel:
    return OnnxModel(load_bundle(), threads=1)


CARD = load_bundle().spec.cardinalities


def windows(n: int, t: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.stack([rng.integers(1, c, size=(n, t)) for c in CARD], axis=-1)
    x[:, : t // 3] = 0  # some left padding, as short windows have
    return x.astype(np.int64)


def test_lengths_are_few_and_cover_the_window():
    assert time_lengths(64) == (8, 16, 32, 64)
    assert [padded_length(n, (8, 16, 32, 64)) for n in (1, 8, 9, 33, 64)] == [8, 8, 16, 64, 64]


def test_concurrent_requests_share_batches_and_get_their_own_answers(model):
    metrics = Metrics()
    jobs = [windows(k % 3 + 1, 16, seed=k) for k in range(40)]

    async def main() -> list[tuple[np.ndarray, np.ndarray]]:
        b = MicroBatcher(model, metrics, max_batch=32, max_wait_ms=20, queue_size=1000)
        await b.start()
        try:
            return await asyncio.gather(*(b.score(x) for x in jobs))
        finally:
            await b.stop()

    got = asyncio.run(main())
    for x, (p, s) in zip(jobs, got, strict=True):
        want_p, want_s = model.run(x)
        assert np.abs(p - want_p).max() <= 1e-6 and np.abs(s - want_s).max() <= 1e-5
    body = metrics.render()[0].decode()
    count = next(line for line in body.splitlines() if line.startswith("seqguard_inference_batch_size_count"))
    calls = float(count.split()[-1])
    assert calls < len(jobs), "requests were batched together"


def test_requests_larger_than_a_batch_are_split(model):
    async def main() -> tuple[np.ndarray, np.ndarray]:
        b = MicroBatcher(model, Metrics(), max_batch=8, max_wait_ms=1, queue_size=1000)
        await b.start()
        try:
            return await b.score(windows(30, 32, seed=1))
        finally:
            await b.stop()

    p, _ = asyncio.run(main())
    assert np.abs(p - model.run(windows(30, 32, seed=1))[0]).max() <= 1e-6


def test_a_full_queue_is_refused_at_once(model):
    async def main() -> None:
        b = MicroBatcher(model, Metrics(), max_batch=4, max_wait_ms=50, queue_size=6)
        await b.start()
        try:
            first = asyncio.create_task(b.score(windows(4, 8, seed=2)))
            await asyncio.sleep(0)
            with pytest.raises(QueueFull):
                await b.score(windows(4, 8, seed=3))
            await first
        finally:
            await b.stop()

    asyncio.run(main())
