"""Online scoring: windows read from the store → the micro-batcher (one featurizer pass
and ONNX Runtime per batch) → probabilities, decisions and (on request) reasons."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.batching import MicroBatcher
from app.bundle import Bundle
from app.decisions import decide


@dataclass(frozen=True)
class WindowScores:
    probability: np.ndarray  # (n,) of each window's last event
    decision: np.ndarray  # (n,) object
    window_size: np.ndarray  # (n,) events the model saw (≤ W)
    surprise: list[np.ndarray]  # per window, (window_size,) per-event surprise, oldest first


class OnlineScorer:
    def __init__(self, bundle: Bundle, batcher: MicroBatcher, thresholds: dict[str, float]) -> None:
        self.bundle = bundle
        self.batcher = batcher
        self.thresholds = thresholds

    async def score(self, windows: Sequence[Sequence[dict[str, Any]]]) -> WindowScores:
        """Score the last event of each window (events oldest first, contract dicts with
        epoch-millisecond timestamps, at most ``spec.history`` of them).

        A window of a single event gets a defined answer: the model sees one event with
        no history, exactly as the batch engine scores a user's first event.
        """
        scored = await self.batcher.score(windows)
        seen = np.minimum(np.fromiter((len(w) for w in windows), np.int64, len(windows)), self.bundle.window)
        return WindowScores(scored.probability, decide(scored.probability, self.thresholds), seen,
                            scored.surprise)


def reasons(window: Sequence[dict[str, Any]], surprise: np.ndarray, top: int = 5) -> list[dict[str, Any]]:
    """The events of the window that drove the score: the most surprising ones, with
    their per-event surprise (next-event negative log-likelihood, nats)."""
    events = list(window)[-len(surprise):]
    order = np.argsort(-surprise, kind="stable")[:top]
    return [
        {"event_id": events[i].get("event_id"), "event_type": events[i]["event_type"],
         "timestamp": events[i]["timestamp"], "surprise": round(float(surprise[i]), 4)}
        for i in sorted(order.tolist())
    ]
