"""Compare the three architectures on the same split: quality on the test users,
parameters, and scoring speed through ONNX Runtime.

    python -m model_export.compare --events PATH --format taobao --epochs 5 --out runs/compare
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from app.core.batch_engine import score_events
from app.core.bundle import load_bundle
from app.core.scorer import OnnxModel
from model_export.dataset import TrainConfig, prepare
from model_export.export import export
from model_export.model import ARCHS
from model_export.report import markdown_table
from model_export.scenarios import parse_inject
from model_export.train import run


def speed(bundle_dir: Path, prep: Any, repeats: int = 200) -> dict[str, float]:
    """Batch-engine events/s on the test users and one-window (1, W) latency."""
    model = OnnxModel(load_bundle(bundle_dir))
    test = prep.splits["test"]
    score_events(model, test, as_arrived=False)  # warm-up
    t = time.perf_counter()
    score_events(model, test, as_arrived=False)
    batch = len(test) / (time.perf_counter() - t)
    x = prep.features["test"][: model.bundle.window][None]
    lat = []
    for _ in range(repeats):
        t = time.perf_counter()
        model.run(x)
        lat.append(time.perf_counter() - t)
    return {"batch_events_per_s": batch, "window_latency_ms_p50": 1e3 * float(np.median(lat))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--events", type=Path, required=True)
    ap.add_argument("--format", default="auto")
    ap.add_argument("--inject", default="all")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--archs", default=",".join(ARCHS))
    ap.add_argument("--out", type=Path, default=Path("runs/compare"))
    args = ap.parse_args()
    names = parse_inject(args.inject)
    rows = []
    for arch in args.archs.split(","):
        cfg = TrainConfig(arch=arch, epochs=args.epochs, seed=args.seed)
        summary = run(args.events, args.format, names, cfg, args.out / f"run-{arch}", progress=False)
        meta = export(args.out / f"run-{arch}", args.out / f"bundle-{arch}")
        det = next(iter(meta["evaluation"]["detectors"].values()))
        prep = prepare(args.events, args.format, names, cfg)
        rows.append({
            "arch": arch,
            "parameters": summary["parameters"],
            "epochs run": len(summary["history"]),
            "train s": summary["train_seconds"],
            "ROC-AUC": det["roc_auc"],
            "PR-AUC": det["pr_auc"],
            "mean scenario ROC-AUC": det["roc_auc_mean_over_scenarios"],
            "recall@1%FPR": det["recall_at_1pct_fpr"],
            "block precision": det["block_precision"],
            "block recall": det["block_recall"],
            "parity fp32": meta["parity"]["fp32"]["max_abs_diff"],
            **speed(args.out / f"bundle-{arch}", prep),
        })
        print(markdown_table(rows, list(rows[0])), flush=True)
    (args.out / "comparison.json").write_bytes(orjson.dumps(rows, option=orjson.OPT_INDENT_2))
    (args.out / "comparison.md").write_text(markdown_table(rows, list(rows[0])) + "\n")


if __name__ == "__main__":
    main()
