"""The batch engine: score every event of a log with full-sequence passes in large
batches (ONNX Runtime and the featurizer only). `seqguard score` and `POST /batch-score`
run it.

Each user's sequence is cut into chunks that carry W-1 events of context before the
events they score, so every event gets exactly the output of its own last W events (the
detector's window semantics) while a chunk scores up to ``chunk_len - W + 1`` events in
one pass. Chunks are grouped by length into a few padded shapes.

Order within a user is by timestamp; events of one user with the same timestamp are
taken in input order, i.e. the order in which they would have arrived online.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import orjson

from app.decisions import decide
from app.events import Events
from app.features import group_starts, last_windows
from app.scorer import OnnxModel

#: Padded chunk lengths are rounded up to a multiple of this (few shapes, little padding)...
LENGTH_QUANTUM = 16
#: ...but chunks this short or shorter run at this length: most users of a day's log have
#: 1-4 events, and ONNX Runtime's cost per row falls with the length (7-15% faster
#: scoring of the Taobao stream slice than padding them all to 16: bench_score.py).
SHORT_LENGTH = 8


@dataclass(frozen=True)
class Scores:
    """Per-event outputs, in the input row order of the scored events."""

    probability: np.ndarray  # (N,) float32
    surprise: np.ndarray  # (N,) float32


def score_events(
    model: OnnxModel,
    events: Events,
    *,
    chunk_len: int = 512,
    batch_tokens: int = 32768,
) -> Scores:
    """Score every event on its own last W events (at or before it in time).

    Parameters
    ----------
    model : the bundle's ONNX Runtime session.
    events : any order; rows are grouped by user and time-sorted internally.
    chunk_len : longest chunk, context included (> W - 1).
    batch_tokens : chunk rows × padded length per ONNX Runtime call.
    """
    window = model.bundle.spec.window
    stride = chunk_len - (window - 1)
    if stride < 1:
        raise ValueError(f"chunk_len must exceed window - 1 = {window - 1}")
    n = len(events)
    prob = np.zeros(n, np.float32)
    surprise = np.zeros(n, np.float32)
    if n == 0:
        return Scores(prob, surprise)
    order = events.order()
    feats = model.bundle.spec.transform(events.take(order))  # (N, F), grouped rows
    starts = group_starts(events.user[order])

    # Segments: the rows each chunk scores, at most `stride` of one user.
    rank = np.arange(n) - starts
    first = (rank % stride) == 0
    seg_start = np.flatnonzero(first)
    seg_end = np.append(seg_start[1:], n)
    ctx_start = np.maximum(starts[seg_start], seg_start - (window - 1))
    length = seg_end - ctx_start
    padded = np.where(length <= SHORT_LENGTH, SHORT_LENGTH, -(-length // LENGTH_QUANTUM) * LENGTH_QUANTUM)

    p_sorted = np.empty(n, np.float32)
    s_sorted = np.empty(n, np.float32)
    for t in np.unique(padded):
        sel = np.flatnonzero(padded == t)
        rows_per_call = max(1, batch_tokens // int(t))
        for i in range(0, sel.size, rows_per_call):
            b = sel[i : i + rows_per_call]
            x = last_windows(feats, seg_end[b] - 1, ctx_start[b], int(t))  # (B, T, F)
            p, s = model.run(x)
            rows = seg_end[b, None] - int(t) + np.arange(int(t))[None, :]  # (B, T)
            keep = rows >= seg_start[b, None]
            p_sorted[rows[keep]] = p[keep]
            s_sorted[rows[keep]] = s[keep]
    prob[order] = p_sorted
    surprise[order] = s_sorted
    return Scores(prob, surprise)


def result_lines(events: Events, scores: Scores, thresholds: dict[str, float]) -> Iterator[bytes]:
    """One JSON object per event, in input order, as `seqguard score` writes them."""
    ids = events.event_ids().tolist()
    users = events.user_id_strings().tolist()
    decisions = decide(scores.probability, thresholds).tolist()
    # The exact float32 value the decision was made on, so readers can re-derive it.
    probs = scores.probability.astype(np.float64).tolist()
    dumps = orjson.dumps
    for eid, uid, p, d in zip(ids, users, probs, decisions, strict=True):
        yield dumps({"event_id": eid, "user_id": uid, "anomaly_probability": p, "decision": d})


def write_results(out: Path | IO[bytes], events: Events, scores: Scores, thresholds: dict[str, float],
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
