"""Calibration of raw detector scores into probabilities, and threshold choice.

Thresholds are chosen on validation data only, at target false-positive rates.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression


def threshold_at_fpr(normal_scores: np.ndarray, fpr: float) -> float:
    """Smallest threshold ``t`` with ``mean(normal_scores >= t) <= fpr``.

    Examples
    --------
    >>> threshold_at_fpr(np.arange(100, dtype=float), 0.05)
    95.0
    """
    s = np.sort(np.asarray(normal_scores, dtype=np.float64))
    n = s.size
    if n == 0:
        raise ValueError("no normal scores to choose a threshold on")
    allowed = int(np.floor(fpr * n))  # normal events allowed at or above t
    if allowed >= n:
        return float(s[0])
    # t must exceed s[n - allowed - 1]; the next distinct value (or a hair above) works.
    bar = s[n - allowed - 1]
    above = s[s > bar]
    return float(above[0]) if above.size else float(np.nextafter(bar, np.inf))


def fit_calibration(
    calibration: Any,
    kind: str,
    *,
    logit: np.ndarray,
    surprise: np.ndarray,
    label: np.ndarray | None,
    max_knots: int = 128,
) -> dict[str, Any]:
    """Fit the detector's in-graph calibration on validation scores.

    - ``platt``: logistic regression of the label on the anomaly logit (keeps the ranking).
    - ``isotonic``: isotonic regression of the label on the logit, interpolated.
    - ``tail`` (no labels): the distribution function of the surprise under normal
      validation data, so p = 0.99 means "more surprising than 99% of normal events".
    """
    if kind in ("platt", "isotonic") and (label is None or label.min() == label.max()):
        raise ValueError(f"{kind} calibration needs validation labels of both classes")
    if kind == "platt":
        lr = LogisticRegression(C=1e4, max_iter=1000).fit(logit.reshape(-1, 1), label)
        calibration.set("platt", ab=(float(lr.coef_[0, 0]), float(lr.intercept_[0])))
    elif kind == "isotonic":
        iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(logit, label)
        kx, ky = _thin(iso.X_thresholds_, iso.y_thresholds_, max_knots)
        calibration.set("isotonic", knots_x=kx, knots_y=ky)
    elif kind == "tail":
        normal = surprise if label is None else surprise[label == 0]
        qs = np.unique(np.concatenate([np.linspace(0, 0.9, 19), 1 - np.geomspace(0.1, 1e-4, 40), [1.0]]))
        kx = np.quantile(normal.astype(np.float64), qs)
        kx, ky = _thin(kx, qs, max_knots)
        calibration.set("tail", knots_x=kx, knots_y=ky)
    else:
        raise ValueError(f"unknown calibration {kind!r}: platt, isotonic or tail")
    return calibration.describe()


def choose_thresholds(normal_probs: np.ndarray, targets: dict[str, float]) -> dict[str, Any]:
    """Decision thresholds at target false-positive rates on validation normal events."""
    out: dict[str, Any] = {}
    how: dict[str, Any] = {}
    previous = 0.0
    for name, fpr in sorted(targets.items(), key=lambda kv: -kv[1]):  # loosest first
        t = max(threshold_at_fpr(normal_probs, fpr), previous)
        previous = t
        out[name] = t
        how[name] = {
            "target_fpr": fpr,
            "validation_fpr": float(np.mean(normal_probs >= t)),
        }
    out["chosen"] = {
        "on": "validation split (normal events only), never test",
        "n_normal_events": int(normal_probs.size),
        **how,
    }
    return out


def _thin(x: np.ndarray, y: np.ndarray, max_knots: int) -> tuple[list[float], list[float]]:
    """Strictly increasing knots (ties keep the largest y), at most ``max_knots``."""
    x = np.asarray(x, np.float64)
    y = np.maximum.accumulate(np.asarray(y, np.float64))
    keep = np.append(x[1:] > x[:-1], True)
    x, y = x[keep], y[keep]
    if x.size > max_knots:
        pick = np.unique(np.linspace(0, x.size - 1, max_knots).round().astype(int))
        x, y = x[pick], y[pick]
    if x.size == 1:
        x, y = np.array([x[0], x[0] + 1e-6]), np.array([y[0], y[0]])
    return [float(v) for v in x], [float(v) for v in y]
