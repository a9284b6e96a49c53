"""Leave one scenario out: what the detector catches that it was never taught.

For each injected scenario S: train on both Taobao files with every scenario but S (and
S's look-alikes, which come with S), export, and score the test users with S injected
(lengths matched, as in the report). Prints S's event-level ROC-AUC against the test
split's normal events, its recall at the run's own review and block thresholds (chosen on
validation data without S), and the same for the shipped bundle, trained with S.

    .venv/bin/python tests/benchmarks/bench_loso.py [--epochs 4] [--out docs/loso.md]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "taobao_userbehavior"
FILES = [DATA / "UserBehavior_head_84k.csv.gz", DATA / "UserBehavior_flink_course_slice_110k.csv.gz"]


def detection(bundle_dir: Path, prep, scenario: str) -> dict[str, float]:
    """ROC-AUC and recall at review/block of ``scenario``'s anomalous test events."""
    from app.core.batch_engine import score_events
    from app.core.bundle import load_bundle
    from app.core.scorer import OnnxModel

    bundle = load_bundle(bundle_dir)
    test = prep.splits["test"]
    p = score_events(OnnxModel(bundle, threads=0), test, as_arrived=False).probability
    pos = (test.label == 1) & (test.scenario == test.scenarios.index(scenario))
    neg = test.label == 0
    y = np.r_[np.zeros(neg.sum()), np.ones(pos.sum())]
    t = bundle.thresholds
    return {"roc_auc": float(roc_auc_score(y, np.r_[p[neg], p[pos]])),
            "recall_review": float(np.mean(p[pos] >= t.review)),
            "recall_block": float(np.mean(p[pos] >= t.block)),
            "events": int(pos.sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--bundle", type=Path, default=None, help="bundle trained with every scenario (default: shipped)")
    ap.add_argument("--out", type=Path, default=None, help="also write the table here (Markdown)")
    args = ap.parse_args()

    from app.core.bundle import DEFAULT_BUNDLE
    from model_export.dataset import TrainConfig, prepare
    from model_export.export import export
    from model_export.scenarios import SCENARIOS
    from model_export.train import run

    shipped = args.bundle or DEFAULT_BUNDLE
    rows = []
    for scenario in SCENARIOS:
        started = time.perf_counter()
        others = [s for s in SCENARIOS if s != scenario]
        cfg = TrainConfig(epochs=args.epochs, seed=args.seed)
        with tempfile.TemporaryDirectory(prefix="seqguard-loso-") as tmp:
            run(FILES, "taobao", others, cfg, Path(tmp) / "run", progress=False)
            export(Path(tmp) / "run", Path(tmp) / "bundle", evaluate=False)
            prep = prepare(FILES, "taobao", [scenario], cfg)
            left_out = detection(Path(tmp) / "bundle", prep, scenario)
        taught = detection(shipped, prep, scenario)
        rows.append((scenario, left_out, taught, time.perf_counter() - started))
        print(f"{scenario}: left out ROC-AUC {left_out['roc_auc']:.4f} (recall at review "
              f"{left_out['recall_review']:.3f}, block {left_out['recall_block']:.3f}); taught "
              f"{taught['roc_auc']:.4f}; {rows[-1][3]:.0f}s", flush=True)

    lines = [
        f"Leave one scenario out ({args.epochs} epochs each, seed {args.seed}; `tests/benchmarks/bench_loso.py`).",
        "",
        "| scenario left out | anomalous test events | ROC-AUC, never taught | recall at review | recall at block "
        "| ROC-AUC, shipped bundle (taught) |",
        "|---|---|---|---|---|---|",
    ]
    for scenario, lo, taught, _ in rows:
        lines.append(f"| {scenario} | {lo['events']} | {lo['roc_auc']:.4f} | {lo['recall_review']:.3f} | "
                     f"{lo['recall_block']:.3f} | {taught['roc_auc']:.4f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
