"""Online scoring: windows read from the store → the one featurizer → the micro-batcher
→ probabilities, decisions and (on request) reasons."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.batching import MicroBatcher, padded_length
from app.bundle import Bundle
from app.decisions import decide
from app.events import Events
from app.features import last_windows


@dataclass(frozen=True)
class WindowScores:
    probability: np.ndarray  # (n,) of each window's last event
    decision: np.ndarray  # (n,) object
    window_size: np.ndarray  # (n,) events the model saw (≤ W)
    surprise: list[np.ndarray]  # per window, (window_size,) per-event surprise, oldest first


class OnlineScorer:
    def __init__(self, bundle: Bundle, batcher: MicroBatcher, thresholds: dict[str, float]) -> None:
        self.bundle = bundle
        self.spec = bundle.spec
        self.batcher = batcher
        self.thresholds = thresholds

    async def score(self, windows: Sequence[Sequence[dict[str, Any]]]) -> WindowScores:
        """Score the last event of each window (events oldest first, contract dicts with
        epoch-millisecond timestamps, at most ``spec.history`` of them).

        A window of a single event gets a defined answer: the model sees one event with
        no history, exactly as the batch engine scores a user's first event.
        """
        lens = np.array([len(w) for w in windows], dtype=np.int64)
        if (lens == 0).any():
            raise ValueError("every window needs at least the event being scored")
        records = [e for w in windows for e in w]
        groups = np.repeat(np.arange(len(windows)), lens)
        feats = self.spec.transform(Events.from_records(records), groups=groups)  # (N, F)
        ends = np.cumsum(lens) - 1
        starts = ends - lens + 1
        seen = np.minimum(lens, self.spec.window)
        t_of = np.array([padded_length(int(n), self.batcher.lengths) for n in seen])
        prob = np.empty(len(windows), np.float32)
        surprise: list[np.ndarray] = [np.empty(0, np.float32)] * len(windows)

        async def run(t: int) -> None:
            sel = np.flatnonzero(t_of == t)
            x = last_windows(feats, ends[sel], starts[sel], t)  # (n, T, F)
            p, s = await self.batcher.score(x)
            prob[sel] = p[:, -1]
            for k, i in enumerate(sel):
                surprise[i] = s[k, t - seen[i] :]

        await asyncio.gather(*(run(int(t)) for t in np.unique(t_of)))
        return WindowScores(prob, decide(prob, self.thresholds), seen, surprise)


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
