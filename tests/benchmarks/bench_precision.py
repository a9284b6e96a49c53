"""The shipped bundle's model files compared (docs/PERFORMANCE.md, "Model variants"):
fp32 (model.onnx), fp16 (model.fp16.onnx) and int8 (model.int8.onnx) on size, latency of
one ONNX Runtime call at batch 1 and 64 (full windows), batch engine events/s, and the
evaluation report's quality figures on the same split (the training run's test users,
prepared again from the shared data as `seqguard export` does without a run directory).
Variants alternate within each measurement, so that the machine's drift hits all alike.

    .venv/bin/python tests/benchmarks/bench_precision.py [--rows 200000] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import FLINK, TAOBAO, machine, replicated_taobao

from app.core.batch_engine import score_events
from app.core.bundle import DEFAULT_BUNDLE, MODEL_FILES, load_bundle
from app.core.scorer import OnnxModel
from model_export.data import read_events
from model_export.dataset import TrainConfig, prepare
from model_export.evaluate import evaluate_bundle

PRECISIONS = ("fp32", "fp16", "int8")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000, help="events for the batch engine's speed")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (the service's default: 1)")
    ap.add_argument("--no-quality", action="store_true", help="skip the evaluation (speed only)")
    args = ap.parse_args()
    bundle = load_bundle(DEFAULT_BUNDLE)
    models = {p: OnnxModel(bundle, precision=p, threads=args.threads, prefer_cuda=False) for p in PRECISIONS}
    print(f"machine: {machine()}; bundle {bundle.version}; {args.threads} ONNX Runtime thread(s); "
          f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
    rows: dict[str, dict[str, str]] = {p: {"file": MODEL_FILES[p]} for p in PRECISIONS}
    for p in PRECISIONS:
        size = (DEFAULT_BUNDLE / MODEL_FILES[p]).stat().st_size
        rows[p]["size"] = f"{size / 1024:,.0f} KiB"

    ev, _ = read_events(TAOBAO, "taobao")
    spec = bundle.spec
    feats = spec.transform(ev.sorted())
    w = bundle.window
    for batch in (1, 64):
        x = np.stack([feats[i: i + w] for i in range(0, batch * w, w)])  # (batch, W, F) real windows
        best = {p: np.inf for p in PRECISIONS}
        for p in PRECISIONS:
            models[p].run(x)  # warm-up
        for _ in range(args.repeats):
            for p in PRECISIONS:
                t = time.perf_counter()
                for _ in range(20):
                    models[p].run(x)
                best[p] = min(best[p], (time.perf_counter() - t) / 20)
        for p in PRECISIONS:
            rows[p][f"batch {batch}"] = f"{best[p] * 1000:.2f} ms"

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "events.csv"
        n = replicated_taobao(src, args.rows)
        big, _ = read_events(src, "taobao", dedupe=False, sort=False)
    best = {p: np.inf for p in PRECISIONS}
    for p in PRECISIONS:
        score_events(models[p], big.take(np.arange(5000)))  # warm-up: the padded shapes
    for _ in range(max(1, args.repeats // 2)):
        for p in PRECISIONS:
            t = time.perf_counter()
            score_events(models[p], big)
            best[p] = min(best[p], time.perf_counter() - t)
    for p in PRECISIONS:
        rows[p]["batch engine"] = f"{n / best[p]:,.0f} events/s"

    if not args.no_quality:
        cfg = TrainConfig.from_dict(bundle.meta["training"]["train_config"])
        prep = prepare([TAOBAO, FLINK], "taobao", list(bundle.meta["training_data"]["inject"]), cfg)
        with tempfile.TemporaryDirectory() as tmp:
            for p in PRECISIONS:
                s = evaluate_bundle(DEFAULT_BUNDLE, prep, Path(tmp) / p, precision=p)
                d = s["detectors"][f"seqguard-{bundle.arch}"]
                rt = s["real_traffic"]
                rows[p] |= {
                    "ROC-AUC (mean over scenarios)": f"{d['roc_auc_mean_over_scenarios']:.4f}",
                    "recall at 1% FPR": f"{d['recall_at_1pct_fpr']:.4f}",
                    "held-out real flagged": f"{rt['flagged_share']:.3%}",
                    "held-out real blocked": f"{rt['blocked_share']:.3%}",
                    "worst type flagged": f"{rt['worst_type']} {rt['worst_type_flagged_share']:.2%}",
                }
                if p == "fp32":
                    shipped = bundle.meta["evaluation"]["detectors"][f"seqguard-{bundle.arch}"]
                    same = abs(shipped["roc_auc_mean_over_scenarios"] - d["roc_auc_mean_over_scenarios"]) < 1e-9
                    print(f"fp32 evaluation {'matches' if same else 'DIFFERS FROM'} the shipped report")
        for p in PRECISIONS:
            agreement = bundle.meta["parity"].get(p, {}).get("decisions")
            rows[p]["decisions equal to fp32 (export)"] = (
                "—" if agreement is None else f"{agreement['agreement']:.4%}"
                + ("" if agreement["within_tolerance"] else " (out of tolerance)"))

    keys = list(rows["fp32"])
    print("| | " + " | ".join(PRECISIONS) + " |")
    print("|---|" + "---|" * len(PRECISIONS))
    for k in keys:
        print(f"| {k} | " + " | ".join(rows[p].get(k, "") for p in PRECISIONS) + " |")


if __name__ == "__main__":
    main()
