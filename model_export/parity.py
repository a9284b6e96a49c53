"""Parity of the exported graph with the PyTorch detector on held-out windows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from app.features import group_starts, last_windows
from model_export.model import Detector

#: Largest |PyTorch − ONNX Runtime| an fp32 export may show; beyond it export fails.
FP32_TOLERANCE = 1e-4
OUTPUTS = ("anomaly_probability", "surprise")


class ParityError(RuntimeError):
    pass


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
    diffs = {
        k: float(np.abs(ref[k].numpy()[valid] - got[k].astype(np.float32)[valid]).max())
        for k in OUTPUTS
    }
    result: dict[str, Any] = {
        "max_abs_diff": max(diffs.values()),
        "per_output": diffs,
        "n_windows": int(windows.shape[0]),
        "n_positions": int(valid.sum()),
        "provider": "CPUExecutionProvider",
    }
    if tolerance is not None:
        result["tolerance"] = tolerance
        if result["max_abs_diff"] > tolerance:
            raise ParityError(
                f"{onnx_path.name}: max |PyTorch - ONNX Runtime| = {result['max_abs_diff']:.3g} "
                f"exceeds {tolerance:g} ({diffs})"
            )
    return result
