"""The batch engine: score every event of a log with full-sequence passes in large
batches (ONNX Runtime and the featurizer only). `seqguard score` and `POST /batch-score`
run it.

Each user's sequence is cut into chunks that carry W-1 events of context before the
events they score, so every event gets exactly the output of its own last W events (the
detector's window semantics) while a chunk scores up to ``chunk_len - W + 1`` events in
one pass. Chunks are grouped by length into a few padded shapes. The chunks and their
padded lengths follow the windowing rules of :mod:`app.core.features`
(:func:`~app.core.features.chunk_segments`, :meth:`~app.core.features.Padding.batch`), which
training cuts its chunks by too.

Order within a user is by timestamp; events of one user with the same timestamp are
taken in input order, i.e. the order in which they would have arrived online.

The live window store's rules hold here too: an event whose (user_id, event_id) came
earlier in the input is a repeat (a redelivery). It joins no window and is answered with
the first occurrence's scores and ``duplicate`` set, as ``POST /events`` answers a replay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson

from app.core.decisions import Thresholds
from app.core.events import Events
from app.core.features import Padding, chunk_segments
from app.core.scorer import OnnxModel


@dataclass(frozen=True)
class EventScores:
    """Per-event outputs, in the input row order of the scored events. A repeat gets its
    first occurrence's outputs; ``duplicate`` marks the repeats (``None``: none)."""

    probability: np.ndarray  # (N,) float32
    surprise: np.ndarray  # (N,) float32
    duplicate: np.ndarray | None = None  # (N,) bool

    def __getitem__(self, rows: slice) -> EventScores:
        """The outputs of ``rows`` (e.g. a stream's answered rows after its context)."""
        dup = None if self.duplicate is None else self.duplicate[rows]
        return EventScores(self.probability[rows], self.surprise[rows], dup)

    def is_duplicate(self) -> np.ndarray:
        """(N,) bool: which rows repeat an earlier event."""
        n = len(self.probability)
        return np.zeros(n, bool) if self.duplicate is None else self.duplicate


class FirstAnswers:
    """The first answers of a stream's events by (user_id, event_id), for a stream scored
    chunk by chunk (NDJSON ``/batch-score``): a repeat of an event of any earlier chunk is
    answered as the first, as the live store answers a replay. Keys are 64-bit hashes
    (the process's ``hash``), 16 bytes an event, kept sorted."""

    def __init__(self) -> None:
        self._keys = np.zeros(0, np.int64)
        self._probability = np.zeros(0, np.float32)
        self._surprise = np.zeros(0, np.float32)

    def __len__(self) -> int:
        return int(self._keys.size)

    @staticmethod
    def keys(records: list[dict[str, Any]]) -> np.ndarray:
        """(N,) int64 keys of contract dicts."""
        return np.fromiter((hash((r["user_id"], r["event_id"])) for r in records), np.int64, len(records))

    def find(self, keys: np.ndarray) -> np.ndarray:
        """(N,) int64: where each key's first answer is kept, -1 where none is."""
        at = np.searchsorted(self._keys, keys)
        hit = at < self._keys.size
        hit[hit] = self._keys[at[hit]] == keys[hit]
        return np.where(hit, at, -1)

    def answers(self, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probability, surprise) kept at ``at`` (from :meth:`find`)."""
        return self._probability[at], self._surprise[at]

    def add(self, keys: np.ndarray, probability: np.ndarray, surprise: np.ndarray) -> None:
        """Keep the answers of new keys (distinct, none kept yet)."""
        keys = np.concatenate([self._keys, keys])
        order = np.argsort(keys, kind="stable")
        self._keys = keys[order]
        self._probability = np.concatenate([self._probability, probability])[order]
        self._surprise = np.concatenate([self._surprise, surprise])[order]


def first_occurrences(events: Events) -> np.ndarray:
    """(N,) int64: for each row, the row of the first event (input order) with its user and
    ``event_id``: the row itself unless it repeats one. Rows without an id repeat nothing.

    >>> ev = Events.from_records([{"event_id": e, "user_id": u, "event_type": "view", "timestamp": 0}
    ...                           for e, u in [("a", "u"), ("a", "u"), ("a", "v"), ("b", "u"), ("a", "u")]])
    >>> first_occurrences(ev).tolist()
    [0, 0, 2, 3, 0]
    """
    n = len(events)
    rows = np.arange(n)
    if events.event_id is None or n < 2:
        return rows
    users, ids = events.user.tolist(), events.event_id.tolist()
    keys: list[Any] = list(zip(users, ids, strict=True))
    if None in ids:
        keys = [k if k[1] is not None else i for i, k in enumerate(keys)]
    first = dict(zip(reversed(keys), range(n - 1, -1, -1), strict=True))  # the earliest row wins
    if len(first) == n:
        return rows
    return np.fromiter(map(first.__getitem__, keys), np.int64, n)


def score_events(
    model: OnnxModel,
    events: Events,
    *,
    chunk_len: int = 512,
    batch_tokens: int = 32768,
    on_progress: Callable[[int, int], None] | None = None,
) -> EventScores:
    """Score every event on its own last W events (at or before it in time); a repeat of an
    earlier (user_id, event_id) joins no window and gets the first one's scores.

    Parameters
    ----------
    model : the bundle's ONNX Runtime session.
    events : any order; rows are grouped by user and time-sorted internally.
    chunk_len : longest chunk, context included (> W - 1).
    batch_tokens : chunk rows × padded length per ONNX Runtime call.
    on_progress : called after each ONNX Runtime call with (events scored, events to score).
    """
    first = first_occurrences(events)
    repeat = first != np.arange(len(events))
    if repeat.any():
        kept = score_events(model, events.take(~repeat), chunk_len=chunk_len, batch_tokens=batch_tokens,
                            on_progress=on_progress)
        at = np.cumsum(~repeat) - 1  # row -> its place among the kept rows
        return EventScores(kept.probability[at[first]], kept.surprise[at[first]], repeat)
    window = model.bundle.spec.window
    n = len(events)
    order = events.order()
    seg = chunk_segments(events.user[order], window, chunk_len)  # refuses a bad chunk_len, even for no events
    prob = np.zeros(n, np.float32)
    surprise = np.zeros(n, np.float32)
    if n == 0:
        return EventScores(prob, surprise)
    feats = model.bundle.spec.transform(events.take(order))  # (N, F), grouped rows
    padded = Padding.batch(chunk_len).padded(seg.lengths)  # (M,)

    p_sorted = np.empty(n, np.float32)
    s_sorted = np.empty(n, np.float32)
    done = 0
    for t in np.unique(padded).tolist():
        sel = np.flatnonzero(padded == t)
        rows_per_call = max(1, batch_tokens // t)
        for i in range(0, sel.size, rows_per_call):
            part = seg[sel[i : i + rows_per_call]]
            p, s = model.run(part.windows(feats, t))  # (B, T, F) in
            rows, keep = part.positions(t), part.scored(t)  # (B, T)
            p_sorted[rows[keep]] = p[keep]
            s_sorted[rows[keep]] = s[keep]
            if on_progress is not None:
                done += int(np.count_nonzero(keep))
                on_progress(done, n)
    prob[order] = p_sorted
    surprise[order] = s_sorted
    return EventScores(prob, surprise)


def results(event_ids: Sequence[str | None], user_ids: Sequence[str], scores: EventScores,
            thresholds: Thresholds) -> list[dict[str, Any]]:
    """The answer of each scored event, in input order, as `seqguard score` writes it and
    ``/batch-score`` answers it: ``event_id``, ``user_id``, ``anomaly_probability`` (the
    exact float32 value the decision was made on, so readers can re-derive it) and
    ``decision``; a repeat of an earlier (user_id, event_id) also has ``"duplicate": true``."""
    decisions = thresholds.decide(scores.probability).tolist()
    probs = scores.probability.astype(np.float64).tolist()
    out = [{"event_id": e, "user_id": u, "anomaly_probability": p, "decision": d}
           for e, u, p, d in zip(event_ids, user_ids, probs, decisions, strict=True)]
    if scores.duplicate is not None:
        for i in np.flatnonzero(scores.duplicate).tolist():
            out[i]["duplicate"] = True
    return out


def result_lines(events: Events, scores: EventScores, thresholds: Thresholds) -> Iterator[bytes]:
    """:func:`results` of ``events``, one JSON line (without its newline) each."""
    dumps = orjson.dumps
    for res in results(events.event_ids().tolist(), events.user_id_strings().tolist(), scores, thresholds):
        yield dumps(res)


def write_results(out: Path | IO[bytes], events: Events, scores: EventScores, thresholds: Thresholds,
                  block_rows: int = 65536) -> int:
    """Write JSONL results; returns the number of lines written."""
    fh = out.open("wb") if isinstance(out, Path) else out
    written = 0
    try:
        buf: list[bytes] = []
        for line in result_lines(events, scores, thresholds):
            buf.append(line)
            if len(buf) >= block_rows:
                fh.write(b"\n".join(buf) + b"\n")
                written += len(buf)
                buf.clear()
        if buf:
            fh.write(b"\n".join(buf) + b"\n")
            written += len(buf)
    finally:
        if isinstance(out, Path):
            fh.close()
    return written
