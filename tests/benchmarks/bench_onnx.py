"""Raw ONNX Runtime throughput of the default bundle on this machine: the ceiling of the
service. Windows/s for (B, 64, F) batches at several B, intra-op threads = all cores (the
service's default), and per-call p50/p99 at the micro-batcher's shapes (what the
service's ``seqguard_inference_duration_seconds`` measures). A window scores one event
online (its last); the batch engine gets all 64 positions of a window at once.

    .venv/bin/python tests/benchmarks/bench_onnx.py [--bundle DIR] [--seconds 2] [--threads 0]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from _common import machine

from app.core.bundle import load_bundle
from app.core.features import Padding
from app.core.scorer import OnnxModel

BATCHES = (1, 8, 32, 64, 128, 256)


def windows(rng: np.random.Generator, cards: list[int], b: int, t: int) -> np.ndarray:
    """(b, t, F) int64 features, each column within its vocabulary."""
    return np.stack([rng.integers(0, c, size=(b, t)) for c in cards], axis=-1).astype(np.int64)


def timed_calls(model: OnnxModel, x: np.ndarray, seconds: float, min_calls: int = 20) -> np.ndarray:
    """Seconds of each call, calling for about ``seconds`` (after three warm-up calls)."""
    for _ in range(3):
        model.run(x)
    out: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(out) < min_calls:
        t = time.perf_counter()
        model.run(x)
        out.append(time.perf_counter() - t)
    return np.asarray(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--seconds", type=float, default=2.0, help="timing per shape")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = all cores)")
    ap.add_argument("--cpu", action="store_true", help="CPU even where CUDA is available")
    args = ap.parse_args()
    bundle = load_bundle(args.bundle)
    model = OnnxModel(bundle, threads=args.threads, prefer_cuda=not args.cpu)
    cards = list(bundle.spec.cardinalities)
    rng = np.random.default_rng(0)
    w = bundle.window
    print(f"machine: {machine()}; load average {os.getloadavg()[0]:.2f}")
    print(f"bundle {bundle.version} ({bundle.arch}, window {w}, F={len(cards)}) on {model.provider}, "
          f"intra-op threads {args.threads or 'all'} ({os.cpu_count()} cores)")
    print(f"\nthroughput at (B, {w}, F):")
    print(f"{'B':>5} {'ms/call p50':>12} {'p99':>8} {'windows/s':>11} {'events/s (online)':>18} "
          f"{'positions/s (batch)':>20}")
    for b in BATCHES:
        secs = timed_calls(model, windows(rng, cards, b, w), args.seconds)
        wps = b * len(secs) / secs.sum()
        p50, p99 = np.percentile(secs, [50, 99]) * 1e3
        print(f"{b:>5} {p50:>12.2f} {p99:>8.2f} {wps:>11,.0f} {wps:>18,.0f} {wps * w:>20,.0f}")

    # What the micro-batcher runs: batches padded in time to 8, 16, 32 or 64 events.
    print("\nper call, at the micro-batcher's padded shapes (seqguard_inference_duration_seconds):")
    print(f"{'B':>5} {'T':>4} {'p50 ms':>8} {'p99 ms':>8} {'windows/s':>11}")
    for b in (1, 8, 64):
        for t in Padding.online(w).lengths:
            secs = timed_calls(model, windows(rng, cards, b, t), args.seconds / 2)
            p50, p99 = np.percentile(secs, [50, 99]) * 1e3
            print(f"{b:>5} {t:>4} {p50:>8.2f} {p99:>8.2f} {b * len(secs) / secs.sum():>11,.0f}")


if __name__ == "__main__":
    main()
