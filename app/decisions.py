"""Decisions from probabilities: a separate step from scoring (river's
``score_one`` vs ``AnomalyFilter.classify``)."""

from __future__ import annotations

import numpy as np

DECISIONS = ("allow", "review", "block")


def decide(prob: np.ndarray, thresholds: dict[str, float]) -> np.ndarray:
    """Decision per probability: ``block`` at or above the block threshold, ``review``
    at or above the review threshold, else ``allow``.

    >>> decide(np.array([0.1, 0.6, 0.95]), {"review": 0.5, "block": 0.9}).tolist()
    ['allow', 'review', 'block']
    """
    level = (prob >= thresholds["review"]).astype(np.int8) + (prob >= thresholds["block"])
    return np.asarray(DECISIONS, dtype=object)[level]
