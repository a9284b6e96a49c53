"""Parity of the exported graph with the PyTorch detector on held-out windows.

The raw outputs are held to :data:`FP32_TOLERANCE` (relative to their size past 1), and
the calibrated probability to that tolerance plus what the calibration map can make of
its input's float error: ``lipschitz(map) × FP32_TOLERANCE × max(1, |input|)`` at each
position (a steep tail map turns a 2e-6 surprise difference into a larger probability
difference; the map's knots are spaced so its slope is bounded).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from app.core.features import group_starts, last_windows
from model_export.calibrate import lipschitz
from model_export.model import Detector

#: Largest |PyTorch − ONNX Runtime| an fp32 export may show; beyond it export fails.
FP32_TOLERANCE = 1e-4
OUTPUTS = ("anomaly_probability", "surprise", "feature_surprise")


#: What a smaller variant (fp16, int8) may change, against fp32, on the test users' events
#: (:func:`decision_agreement`): below this share of equal decisions, or past this change in
#: the share flagged (review or block) or blocked, a variant is recorded as out of
#: tolerance and not offered as a default (docs/PERFORMANCE.md, "Model variants").
VARIANT_TOLERANCE = {"min_agreement": 0.999, "max_flagged_change": 0.001, "max_blocked_change": 0.0005}


class ParityError(RuntimeError):
    pass


def decision_agreement(bundle_dir: Path, variant: str, events: Any) -> dict[str, Any]:
    """How the ``variant`` model file of the bundle at ``bundle_dir`` decides ``events``
    (the test users, injected scenarios included, scored by the batch engine in time
    order) against the bundle's fp32 model: the share of equal decisions, the shares
    flagged and blocked by each, the largest probability difference, and whether all is
    within :data:`VARIANT_TOLERANCE`."""
    from app.core.batch_engine import score_events
    from app.core.bundle import load_bundle
    from app.core.scorer import OnnxModel

    bundle = load_bundle(bundle_dir)
    probs = {p: score_events(OnnxModel(bundle, precision=p, prefer_cuda=False), events, as_arrived=False).probability
             for p in ("fp32", variant)}
    decided = {p: bundle.thresholds.decide(x) for p, x in probs.items()}
    flagged = {p: float((d != "allow").mean()) for p, d in decided.items()}
    blocked = {p: float((d == "block").mean()) for p, d in decided.items()}
    agreement = float((decided["fp32"] == decided[variant]).mean())
    tol = VARIANT_TOLERANCE
    return {
        "events": len(events),
        "agreement": agreement,
        "flagged": flagged,
        "blocked": blocked,
        "max_abs_diff_probability": float(np.abs(probs["fp32"] - probs[variant]).max()) if len(events) else 0.0,
        "tolerance": tol,
        "within_tolerance": bool(agreement >= tol["min_agreement"]
                                 and abs(flagged[variant] - flagged["fp32"]) <= tol["max_flagged_change"]
                                 and abs(blocked[variant] - blocked["fp32"]) <= tol["max_blocked_change"]),
    }


def held_out_windows(features: np.ndarray, groups: np.ndarray, n: int, window: int, seed: int) -> np.ndarray:
    """``n`` left-padded windows (n, W, F) ending at random events of held-out users."""
    rng = np.random.default_rng(seed)
    ends = np.sort(rng.choice(features.shape[0], size=min(n, features.shape[0]), replace=False))
    return last_windows(features, ends, group_starts(groups)[ends], window)


@torch.no_grad()
def check(model: Detector, onnx_path: Path, windows: np.ndarray, tolerance: float | None) -> dict[str, Any]:
    """Max |diff| per output over every real (non-padding) position of ``windows``.

    Raises :class:`ParityError` when ``tolerance`` is given and exceeded.
    """
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref = model(torch.from_numpy(windows))
    got = dict(zip(OUTPUTS, sess.run(list(OUTPUTS), {"features": windows}), strict=True))
    valid = windows[..., 0] != 0
    diff = {k: np.abs(ref[k].numpy()[valid] - got[k].astype(np.float32)[valid]) for k in OUTPUTS}
    diffs = {k: float(d.max()) if d.size else 0.0 for k, d in diff.items()}
    result: dict[str, Any] = {
        "max_abs_diff": max(diffs.values()),
        "per_output": diffs,
        "n_windows": int(windows.shape[0]),
        "n_positions": int(valid.sum()),
        "provider": "CPUExecutionProvider",
    }
    if tolerance is not None:
        cal = model.calibration.describe()
        slope = lipschitz(cal)
        sources = {"tail": ("surprise",), "fisher": ("logit", "recent_surprise")}.get(cal["kind"], ("logit",))
        # each input's float error, as large as the surprise's own tolerance allows
        size = sum(np.maximum(1.0, np.abs(ref[k].numpy()[valid])) for k in sources)
        allowed = {
            "surprise": tolerance * np.maximum(1.0, np.abs(ref["surprise"].numpy()[valid])),
            "feature_surprise": tolerance * np.maximum(1.0, np.abs(ref["feature_surprise"].numpy()[valid])),
            "anomaly_probability": tolerance + slope * tolerance * size,
        }
        worst = {k: float((diff[k] / allowed[k]).max()) if diff[k].size else 0.0 for k in OUTPUTS}
        result |= {"tolerance": tolerance, "calibration_lipschitz": slope,
                   "max_diff_over_allowed": worst}
        if max(worst.values()) > 1.0:
            raise ParityError(
                f"{onnx_path.name}: |PyTorch - ONNX Runtime| beyond tolerance: max diffs {diffs}, "
                f"worst diff / allowed {worst} (tolerance {tolerance:g}, calibration slope {slope:.3g})"
            )
    return result
