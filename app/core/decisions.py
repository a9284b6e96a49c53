"""Decisions from probabilities: a separate step from scoring (river's
``score_one`` vs ``AnomalyFilter.classify``). The thresholds travel as one small typed
object, :class:`Thresholds`, from the bundle (or the settings that override it) to every
place that decides: the micro-batcher, the batch engine, the routes and the evaluation.
``bundle.json`` keeps them as a JSON object (:meth:`Thresholds.from_mapping`,
:meth:`Thresholds.as_dict`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

#: Every decision, mildest first; a probability's decision is the number of thresholds it reaches.
DECISIONS = ("allow", "review", "block")


@dataclass(frozen=True)
class Thresholds:
    """The review and block thresholds: ``block`` at or above ``block``, ``review`` at or
    above ``review``, else ``allow``. ``review <= block`` (neither NaN) is checked on
    creation, so that no decision is ever made on thresholds that could not be served. A
    threshold may lie a hair above 1 (a validation set too small to resolve its target:
    :func:`model_export.calibrate.threshold_at_fpr`), which nothing reaches.

    Examples
    --------
    >>> t = Thresholds(review=0.5, block=0.9)
    >>> t.decide(np.array([0.1, 0.5, 0.6, 0.9])).tolist()
    ['allow', 'review', 'review', 'block']
    >>> t.decide(0.95), t.as_dict()
    ('block', {'review': 0.5, 'block': 0.9})
    >>> Thresholds(review=0.9, block=0.5)
    Traceback (most recent call last):
    ...
    ValueError: review threshold 0.9 exceeds block 0.5
    """

    review: float
    block: float

    def __post_init__(self) -> None:
        for name in ("review", "block"):
            value = float(getattr(self, name))
            if math.isnan(value):
                raise ValueError(f"the {name} threshold is NaN")
            object.__setattr__(self, name, value)  # plain floats, never numpy scalars
        if self.review > self.block:
            raise ValueError(f"review threshold {self.review} exceeds block {self.block}")

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any]) -> Thresholds:
        """From JSON (``bundle.json``, ``run.json``): the ``review`` and ``block`` keys; any
        other key (``unit``, ``chosen``: how they were chosen) is left out."""
        try:
            return cls(review=m["review"], block=m["block"])
        except KeyError as e:
            raise ValueError(f"thresholds need 'review' and 'block', got {sorted(m)}") from e

    def as_dict(self) -> dict[str, float]:
        """``{"review": r, "block": b}``, as answers and ``bundle.json`` carry them."""
        return {"review": self.review, "block": self.block}

    def override(self, *, review: float | None = None, block: float | None = None) -> Thresholds:
        """These thresholds with ``review`` and/or ``block`` replaced (a deployment's own),
        checked again."""
        given = {k: v for k, v in (("review", review), ("block", block)) if v is not None}
        return replace(self, **given) if given else self

    def decide(self, prob: Any) -> Any:
        """Decision of each probability (an array of str objects), or of one (a str).

        The thresholds are Python floats, so a float32 array is compared in float32 (NumPy's
        rule for Python scalars), as it was scored."""
        p = np.asarray(prob)
        level = (p >= self.review).astype(np.int8) + (p >= self.block)
        out = np.asarray(DECISIONS, dtype=object)[level]
        return str(out) if np.ndim(out) == 0 else out
