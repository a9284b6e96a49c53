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

The input order is the order of arrival, and the live window store's rules hold (they are
what a backfill must reproduce, whatever its body form, size or chunking):

- Each event is scored on the events of its user that arrived before it (and itself),
  ordered by timestamp, as far back as the store keeps them: the ``history`` newest by
  timestamp (``app/lua/append_events.lua``). Events of one user with the same timestamp
  are taken in input order. For a user whose events arrive in time order this is simply
  the user's time-ordered sequence, scored in chunks as above. A user with an event that
  arrives after a later-stamped one of theirs (a late event) is scored event by event on
  exactly the window the live store would have held (:func:`arrival_windows`), through
  the micro-batcher's input builder (:class:`~app.core.features.WindowInputs`): the late
  event sees only what had arrived, and the earlier arrivals do not see it.
- An event whose (user_id, event_id) came earlier in the input is a repeat (a
  redelivery). It joins no window and is answered with the first occurrence's scores
  and ``duplicate`` set, as ``POST /events`` answers a replay.

``as_arrived=False`` scores a log in time order instead, every event on all the events
of its user before it in time (evaluation and training, where the log is the truth).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from app.core.answers import BLOCK_ROWS, Answers
from app.core.decisions import Thresholds
from app.core.events import Events
from app.core.features import Padding, WindowInputs, chunk_segments
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


def arrived_out_of_order(events: Events) -> np.ndarray:
    """(N,) bool: the events whose live window (:func:`arrival_windows`) is not simply their
    user's events before them in time: late ones (an earlier arrival of their user has a
    later timestamp) and those that a later arrival of their user precedes in time. The
    others' windows hold exactly the events before them in time (the store's trimming
    never reaches them: it drops only events older than what their window reads).

    >>> ev = Events.from_records([{"user_id": u, "event_type": "view", "timestamp": t}
    ...                           for u, t in [("a", 1), ("a", 3), ("b", 1), ("a", 2), ("a", 4), ("b", 1)]])
    >>> arrived_out_of_order(ev).tolist()
    [False, True, False, True, False, False]
    """
    n = len(events)
    if n < 2:
        return np.zeros(n, bool)
    by_user = np.argsort(events.user, kind="stable")  # input order within each user
    ts_rank = np.unique(events.timestamp_ms, return_inverse=True)[1].reshape(-1)[by_user]
    key = events.user[by_user].astype(np.int64) * (n + 1) + ts_rank  # increases with the user
    new_user = np.ones(n, bool)
    new_user[1:] = events.user[by_user][1:] != events.user[by_user][:-1]
    before = np.maximum.accumulate(key)  # the latest stamp so far within the user (keys grow by user)
    late = np.zeros(n, bool)
    late[1:] = (key[1:] < before[:-1]) & ~new_user[1:]
    after = np.minimum.accumulate(key[::-1])[::-1]  # the earliest stamp from here on within the user
    last_of_user = np.append(new_user[1:], True)
    overtaken = np.zeros(n, bool)
    overtaken[:-1] = (after[1:] < key[:-1]) & ~last_of_user[:-1]
    out = np.empty(n, bool)
    out[by_user] = late | overtaken
    return out


def arrival_windows(events: Events, keep: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The window the live store answers each event with, events taken in input order:
    its user's events that arrived before it and are still kept (the ``keep`` newest by
    (timestamp, arrival)), and itself, up to it in that order, the last ``keep`` of them.
    ``keep`` is the store's (``FeatureSpec.history``: ``WindowStore``'s default).

    Parameters
    ----------
    events : in order of arrival.
    keep : events the store keeps per user.
    rows : (N,) bool, the events whose windows are wanted (default: all); every event
        still goes through the store.

    Returns
    -------
    window_rows : int64, the windows' rows one window after another, oldest first.
    lens : int64, per wanted event, its window length (≥ 1; the last row of each is the event).

    >>> ev = Events.from_records([{"user_id": "u", "event_type": "view", "timestamp": t} for t in [10, 30, 20, 5]])
    >>> rows, lens = arrival_windows(ev, keep=2)
    >>> np.split(rows, np.cumsum(lens)[:-1])  # 20 arrives after 30; 5 after 10 was trimmed
    [array([0]), array([0, 1]), array([0, 2]), array([3])]
    """
    ts, user = events.timestamp_ms.tolist(), events.user.tolist()
    wanted = [True] * len(ts) if rows is None else rows.tolist()
    kept: dict[int, list[tuple[int, int]]] = {}
    window_rows: list[int] = []
    lens: list[int] = []
    for i, (t, u, want) in enumerate(zip(ts, user, wanted, strict=True)):
        w = kept.setdefault(u, [])
        at = bisect.bisect(w, (t, i))  # after every kept event at or before it (arrival breaks ties)
        w.insert(at, (t, i))
        if want:
            first = max(0, at - keep + 1)
            window_rows.extend(r for _, r in w[first: at + 1])
            lens.append(at + 1 - first)
        if len(w) > keep:
            del w[0]
    return np.asarray(window_rows, np.int64), np.asarray(lens, np.int64)


def score_events(
    model: OnnxModel,
    events: Events,
    *,
    chunk_len: int = 512,
    batch_tokens: int = 32768,
    on_progress: Callable[[int, int], None] | None = None,
    as_arrived: bool = True,
    context_rows: int = 0,
    keep: int | None = None,
) -> EventScores:
    """Score every event by the live store's rules (module docstring): on its own last W
    events, as they stood when it arrived; a repeat of an earlier (user_id, event_id)
    joins no window and gets the first one's scores.

    Parameters
    ----------
    model : the bundle's ONNX Runtime session.
    events : in order of arrival; rows are grouped by user and time-sorted internally.
    chunk_len : longest chunk, context included (> W - 1).
    batch_tokens : chunk rows × padded length per ONNX Runtime call.
    on_progress : called after each ONNX Runtime call with (events scored, events to
        score); an event that arrived out of order is scored twice, and counted twice.
    as_arrived : False: a log in time order, each event on all its user's events before it
        in time, whatever their input order (evaluation).
    context_rows : the first rows are context carried from an earlier part of a stream
        (scored there; first occurrences, none a repeat): they join windows, and their own
        scores are not wanted, so they are never scored again on an emulated window (an
        attack review: a late event in a later NDJSON chunk re-scored up to ``history``
        carried rows each, at an online window apiece, and threw the results away).
    keep : events the live store keeps per user (``WindowStore.keep``); default the
        bundle's ``history``. A service reloaded to a bundle of a smaller history keeps the
        first one's (an attack review: its backfills trimmed late events' windows shorter
        than the store did).
    """
    n = len(events)
    first = first_occurrences(events)
    repeat = first != np.arange(n)
    if repeat.any():
        kept = score_events(model, events.take(~repeat), chunk_len=chunk_len, batch_tokens=batch_tokens,
                            on_progress=on_progress, as_arrived=as_arrived,
                            context_rows=int((~repeat[:context_rows]).sum()), keep=keep)
        at = np.cumsum(~repeat) - 1  # row -> its place among the kept rows
        return EventScores(kept.probability[at[first]], kept.surprise[at[first]], repeat)
    redo = arrived_out_of_order(events) if as_arrived else np.zeros(n, bool)
    redo[:context_rows] = False
    total = n + int(redo.sum())
    told = 0

    def progress(done: int, _: int) -> None:
        nonlocal told
        told = done
        if on_progress is not None:
            on_progress(done, total)

    scores = _score_in_time_order(model, events, chunk_len, batch_tokens, progress)
    if redo.any():  # their users' events go through the store again; only they are scored again
        users = np.flatnonzero(np.isin(events.user, np.unique(events.user[redo])))
        p, s = _score_as_arrived(model, events.take(users), redo[users], batch_tokens,
                                 lambda done: progress(told + done, total), keep)
        scores.probability[users[redo[users]]] = p
        scores.surprise[users[redo[users]]] = s
    return scores


def _score_in_time_order(model: OnnxModel, events: Events, chunk_len: int, batch_tokens: int,
                         on_progress: Callable[[int, int], None] | None) -> EventScores:
    """Each event on its user's last W events in time order, in chunks (module docstring)."""
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


def _score_as_arrived(model: OnnxModel, events: Events, wanted: np.ndarray, batch_tokens: int,
                      on_progress: Callable[[int], None], keep: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(probability, surprise) of the ``wanted`` events (bool mask) on the window the live
    store would answer each with (:func:`arrival_windows`; ``events``: whole users, in order
    of arrival), built and padded as the micro-batcher does. Costs one window of up to W
    events per event (the online cost), not one position of a chunk."""
    spec = model.bundle.spec
    rows, lens = arrival_windows(events, spec.history if keep is None else keep, wanted)
    ends = np.cumsum(lens)
    prob = np.empty(lens.size, np.float32)
    surprise = np.empty(lens.size, np.float32)
    per_call = max(1, batch_tokens // spec.window)
    for lo in range(0, lens.size, per_call):
        hi = min(lo + per_call, lens.size)
        start = ends[lo] - lens[lo]
        inputs = WindowInputs.build(spec, events.take(rows[start: ends[hi - 1]]), lens[lo:hi])
        for which, x in inputs.calls:
            p, s = model.run(x)  # (b, T) each
            prob[lo + which], surprise[lo + which] = p[:, -1], s[:, -1]
        on_progress(hi)
    return prob, surprise


def answers(events: Events, scores: EventScores, thresholds: Thresholds) -> Answers:
    """The answers of scored ``events`` (:mod:`app.core.answers`), in input order: their ids
    (generated where an event has none) and users, ``scores`` and their decisions."""
    return Answers.of(events.event_ids(), events.user, events.user_ids, scores.probability, scores.is_duplicate(),
                      thresholds)


def results(event_ids: Sequence[str | None], user_ids: Sequence[str], scores: EventScores,
            thresholds: Thresholds) -> list[dict[str, Any]]:
    """The answer of each scored event, in input order, as ``/batch-score`` answers it:
    :meth:`Answers.records <app.core.answers.Answers.records>`, the fields
    :mod:`app.core.answers` defines (``event_id``, ``user_id``, ``anomaly_probability``,
    ``decision``, and ``"duplicate": true`` on a repeat of an earlier (user_id, event_id))."""
    n = len(scores.probability)
    return Answers.of(event_ids, np.arange(n), np.asarray(user_ids, dtype=object).reshape(n), scores.probability,
                      scores.is_duplicate(), thresholds).records()


def result_lines(events: Events, scores: EventScores, thresholds: Thresholds) -> Iterator[bytes]:
    """:func:`answers` of ``events``, one JSON line (without its newline) each."""
    for block in answers(events, scores, thresholds).json_lines():
        yield from block[:-1].split(b"\n")  # JSON escapes every newline inside a string


def write_results(out: Path | IO[bytes], events: Events, scores: EventScores, thresholds: Thresholds,
                  block_rows: int = BLOCK_ROWS) -> int:
    """Write the :func:`answers`: Parquet to a path named ``*.parquet``, else JSON lines
    (:meth:`Answers.write <app.core.answers.Answers.write>`); returns the number written."""
    done = answers(events, scores, thresholds)
    done.write(out, block_rows)
    return len(done)
