"""Featurizer throughput: events/s on one core, on the real Taobao sample.

    .venv/bin/python tests/benchmarks/bench_features.py
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import time

import numpy as np
from _common import TAOBAO, machine

from app.core.events import Events
from app.core.features import FeatureSpec, group_starts, last_windows
from model_export.data import read_events


def best_of(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ev, _ = read_events(TAOBAO, "taobao")
    # ~1M events: the sample 12 times over, each copy under new user ids.
    big = Events.concat([ev.with_columns(user_ids=np.array([f"{u}-{i}" for u in ev.user_ids], object))
                         for i in range(12)])
    spec = FeatureSpec.fit(ev, utc_offset_minutes=480)
    print(f"machine: {machine()}")
    for name, data in (("taobao 84k", ev), ("taobao x12 (~1M)", big)):
        secs = best_of(lambda data=data: spec.transform(data))
        print(f"transform {name:>18}: {len(data):>9,} events  {len(data) / secs:>12,.0f} events/s")
    # Online shape: a batch of 256 users' last W+R events → (256, W, F) windows.
    rows = np.flatnonzero(np.append(ev.user[1:] != ev.user[:-1], True))[:256]
    lo = np.maximum(group_starts(ev.user)[rows], rows - spec.history + 1)
    idx = np.concatenate([np.arange(a, b + 1) for a, b in zip(lo, rows, strict=True)])
    batch = ev.take(idx)

    def online() -> None:
        f = spec.transform(batch)
        ends = np.flatnonzero(np.append(batch.user[1:] != batch.user[:-1], True))
        last_windows(f, ends, group_starts(batch.user)[ends], spec.window)

    secs = best_of(online, repeat=20)
    print(f"online batch of 256 windows ({len(batch):,} events): {secs * 1e3:.2f} ms "
          f"= {256 / secs:,.0f} windows/s")


if __name__ == "__main__":
    main()
