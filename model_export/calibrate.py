"""Calibration of raw detector scores into probabilities, and threshold choice.

Thresholds are chosen on validation data only, at target false-positive rates.
"""

from __future__ import annotations

import numpy as np


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
