"""What reason codes cost (issue 11, item 4): one ONNX Runtime call on full windows of the
shipped bundle, asking for its two scoring outputs (an answer without ``?explain``) or for
``feature_surprise`` too (with it); and, with ``--other MODEL``, the same two-output call on
another model file (the bundle's model before the graph gained the output: ``git show
1ffef7d:app/bundles/default/model.onnx > old.onnx``). Alternating, best of ``--repeats``.

    .venv/bin/python tests/benchmarks/bench_explain.py [--other old.onnx] [--repeats 7]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from _common import TAOBAO, machine

from app.core.bundle import DEFAULT_BUNDLE, load_bundle
from app.core.features import group_starts, last_windows
from model_export.data import read_events

SCORES = ["anomaly_probability", "surprise"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--other", type=Path, default=None, help="another model file, asked for the two scores")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    bundle = load_bundle(DEFAULT_BUNDLE)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # as the service runs
    session = ort.InferenceSession(str(DEFAULT_BUNDLE / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    runs = {"scores only": (session, SCORES), "scores + feature_surprise": (session, [*SCORES, "feature_surprise"])}
    if args.other is not None:
        other = ort.InferenceSession(str(args.other), opts, providers=["CPUExecutionProvider"])
        runs = {f"{args.other.name}, scores": (other, SCORES), **runs}
    ev, _ = read_events(TAOBAO, "taobao")
    ev = ev.sorted()
    feats = bundle.spec.transform(ev)
    print(f"machine: {machine()}; bundle {bundle.version}; 1 ONNX Runtime thread; {time.strftime('%Y-%m-%d %H:%M')}")
    for batch, calls in ((1, 200), (64, 20)):
        rows = np.arange(bundle.window, bundle.window * (batch + 1), bundle.window)
        x = last_windows(feats, rows, group_starts(ev.user)[rows], bundle.window)
        best = dict.fromkeys(runs, np.inf)
        for _ in range(args.repeats):
            for name, (sess, outputs) in runs.items():
                t = time.perf_counter()
                for _ in range(calls):
                    sess.run(outputs, {"features": x})
                best[name] = min(best[name], (time.perf_counter() - t) / calls)
        print(f"batch {batch}: " + "; ".join(f"{k} {v * 1000:.3f} ms" for k, v in best.items()))


if __name__ == "__main__":
    main()
