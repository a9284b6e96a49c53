"""The one featurizer: events → integer feature ids, for training, export checks,
online scoring and batch scoring alike (numpy only).

Every event becomes ``F`` categorical ids (column order in :data:`FEATURES`). Id 0 is
padding in every column, so a left-padded window is all zeros where there is no event.
An event's features depend on itself and at most ``lookback`` earlier events of the same
user, so the features of a user's last ``window`` events need only their last
``window + lookback`` events (:attr:`FeatureSpec.history`).

The windowing rules live here too, once for training, online and batch scoring: the
windows (:func:`last_windows`), the chunks a long sequence is cut into
(:func:`chunk_segments`) and the lengths inputs are padded to (:class:`Padding`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from app.core.events import Events, finalise_hash
from app.core.vocabulary import DEFAULT_ALIASES, build_aliases, canonical_names

PAD = 0
#: Feature columns, in tensor order.
FEATURES = (
    "event_type",  # 1 = out of vocabulary, 2.. = fitted vocabulary
    "category",  # 1 = missing, 2.. = hash bucket
    "item_repeat",  # 1 = missing, 2 = new item, 3 = item seen in the last `lookback` events
    "category_new",  # 1 = missing, 2 = seen in the last `lookback` events, 3 = new
    "gap",  # 1 = first event of the user, 2.. = bucket of seconds since the previous event
    "price",  # 1 = missing (or no prices in training), 2.. = price bucket
    "hour",  # 1..24 = local hour of day + 1
    "device_change",  # 1 = missing, 2 = same device as the previous event (or first), 3 = changed
    "country_change",  # as device_change, for country
    "recent_1m",  # 1 + bucket of the user's earlier events in the last 60 s (of the last `lookback`)
    "recent_5m",  # as recent_1m, over 300 s
    "distinct_items",  # 2.. = bucket of distinct items in this event and its `lookback` before (1 unused)
    "distinct_categories",  # as distinct_items, for categories
)
#: Upper edges of the count buckets of ``recent_*`` (0, 1, 2, 3-4, 5-8, 9+ events)...
RECENT_EDGES = (1, 2, 3, 5, 9)
#: ...and of ``distinct_*`` (0, 1, 2, 3-4, 5-8, 9-16, 17 values).
DISTINCT_EDGES = (1, 2, 3, 5, 9, 17)
RECENT_WINDOWS_S = (60, 300)

@dataclass(frozen=True)
class FeatureSpec:
    """What the featurizer learned from training data; serialised into the bundle."""

    event_types: tuple[str, ...]
    gap_edges_s: tuple[float, ...]
    price_edges: tuple[float, ...]
    window: int = 64
    lookback: int = 16
    category_buckets: int = 512
    hash_seed: int = 0x5E96A2D
    utc_offset_minutes: int = 0
    version: int = 2
    #: event type name (lower case) → canonical type; applied before the vocabulary lookup
    aliases: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ALIASES))

    # -- fitting and serialisation -------------------------------------------------

    @classmethod
    def fit(
        cls,
        events: Events,
        *,
        window: int = 64,
        lookback: int = 16,
        category_buckets: int = 512,
        utc_offset_minutes: int = 0,
        n_gap_buckets: int = 16,
        n_price_buckets: int = 12,
        min_type_count: int = 1,
        aliases: dict[str, str] | None = None,
    ) -> FeatureSpec:
        """Fit vocabularies and bucket edges on (normal) training events.

        The vocabulary holds canonical names (``aliases`` applied; default: the project's
        table, :data:`app.core.vocabulary.DEFAULT_ALIASES`), most frequent first.
        """
        table = dict(DEFAULT_ALIASES if aliases is None else aliases)
        names = canonical_names(events.event_types, table)
        counts: Counter[str] = Counter()
        for name, c in zip(names, np.bincount(events.event_type, minlength=len(names)).tolist(), strict=True):
            counts[name] += c
        vocab = tuple(t for t, c in sorted(counts.items(), key=lambda kv: -kv[1]) if c >= min_type_count)

        ev = events.sorted()
        same = np.zeros(len(ev), bool)
        same[1:] = ev.user[1:] == ev.user[:-1]
        gaps = (np.diff(ev.timestamp_ms, prepend=0)[same] / 1000.0).astype(np.float64)
        gap_edges = _quantile_edges(gaps, n_gap_buckets, always=(0.5, 1.0, 2.0, 5.0))

        price_edges: tuple[float, ...] = ()
        if ev.price is not None:
            p = ev.price[np.isfinite(ev.price)].astype(np.float64)
            price_edges = _quantile_edges(p, n_price_buckets)
        return cls(
            event_types=vocab,
            gap_edges_s=gap_edges,
            price_edges=price_edges,
            window=window,
            lookback=lookback,
            category_buckets=category_buckets,
            utc_offset_minutes=utc_offset_minutes,
            aliases=table,
        )

    def with_aliases(self, extra: dict[str, str] | None) -> FeatureSpec:
        """This spec with ``extra`` aliases on top of its own (a deployment's names)."""
        return self if not extra else replace(self, aliases=build_aliases(extra, base=self.aliases))

    def type_ids(self, names: tuple[str, ...] | list[str]) -> np.ndarray:
        """Feature id of each event type name: 2.. in the vocabulary, 1 = unknown."""
        lut = {t: i + 2 for i, t in enumerate(self.event_types)}
        return np.array([lut.get(t, 1) for t in canonical_names(names, self.aliases)], dtype=np.int64)

    def unknown_types(self, events: Events, rows: np.ndarray | None = None) -> dict[str, int]:
        """Event type names of ``events`` (of its ``rows`` only, if given: the events being
        scored, not their history) unknown to the model after aliases, with their number
        of events. The lookup runs on the distinct names, never per event.

        >>> ev = Events.from_records([{"user_id": "u", "event_type": t, "timestamp": 0}
        ...                           for t in ("pv", "login", "login")])
        >>> spec = FeatureSpec(("view",), (), ())
        >>> spec.unknown_types(ev), spec.unknown_types(ev, rows=np.array([0, 2]))
        ({'login': 2}, {'login': 1})
        """
        ids = self.type_ids(events.event_types)
        if not (ids == 1).any():
            return {}
        codes = events.event_type if rows is None else events.event_type[rows]
        counts = np.bincount(codes, minlength=len(ids))
        return {events.event_types[i]: int(counts[i]) for i in np.flatnonzero((ids == 1) & (counts > 0))}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["features"] = list(FEATURES)
        d["cardinalities"] = list(self.cardinalities)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeatureSpec:
        if tuple(d.get("features", FEATURES)) != FEATURES:
            raise ValueError(f"bundle features {d.get('features')} differ from this featurizer's {FEATURES}")
        keys = cls.__dataclass_fields__
        kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in keys}
        kw.setdefault("aliases", {})  # a spec saved without a table was fitted on raw names
        return cls(**kw)

    @property
    def cardinalities(self) -> tuple[int, ...]:
        """Number of ids of each feature column (padding included)."""
        return (
            2 + len(self.event_types),
            2 + self.category_buckets,
            4,
            4,
            2 + len(self.gap_edges_s) + 1,
            2 + len(self.price_edges) + 1,
            25,
            4,
            4,
            *(2 + len(RECENT_EDGES),) * len(RECENT_WINDOWS_S),
            *(3 + len(DISTINCT_EDGES),) * 2,
        )

    @property
    def history(self) -> int:
        """Events of a user needed to featurize its last ``window`` events exactly."""
        return self.window + self.lookback

    # -- transform -------------------------------------------------------------------

    def transform(self, events: Events, groups: np.ndarray | None = None) -> np.ndarray:
        """Feature ids of every event.

        Rows must be grouped by ``groups`` (default: ``events.user``) and in time order
        within a group; an event's context is the rows before it in its group.

        Returns
        -------
        (N, F) int64 array of feature ids.

        Examples
        --------
        >>> from app.core.events import Events, finalise_hash
        >>> ev = Events.from_records([
        ...     {"user_id": "u", "event_type": "view", "timestamp": 0, "item_id": "a"},
        ...     {"user_id": "u", "event_type": "view", "timestamp": 2000, "item_id": "a"},
        ... ])
        >>> spec = FeatureSpec.fit(ev)
        >>> spec.transform(ev)[:, FEATURES.index("item_repeat")].tolist()
        [2, 3]
        """
        n = len(events)
        g = events.user if groups is None else groups
        out = np.empty((n, len(FEATURES)), dtype=np.int64)
        if n == 0:
            return out
        # same[k-1, i]: row i-k exists and belongs to the same group as row i.
        same = _lagged(g, max(1, self.lookback), fill=g.min() - 1) == g[None, :]
        first = ~same[0]

        type_ids = self.type_ids(events.event_types)
        out[:, 0] = type_ids[events.event_type] if len(type_ids) else 1

        # back[c]: (N,) rows back to the previous occurrence of the row's item / category
        # within `lookback` rows of its group (lookback + 1 if none, or missing).
        back: dict[int, np.ndarray] = {}
        cat = events.category_id
        if cat is None:
            out[:, 1] = 1
            out[:, 3] = 1
        else:
            bucket = finalise_hash(cat ^ np.uint64(self.hash_seed)) % np.uint64(self.category_buckets)
            out[:, 1] = np.where(cat == 0, 1, 2 + bucket.astype(np.int64))
            back[12] = self._rows_back(cat, same)
            out[:, 3] = np.where(cat == 0, 1, np.where(back[12] <= self.lookback, 2, 3))

        item = events.item_id
        if item is None:
            out[:, 2] = 1
        else:
            back[11] = self._rows_back(item, same)
            out[:, 2] = np.where(item == 0, 1, np.where(back[11] <= self.lookback, 3, 2))

        ts = events.timestamp_ms
        gap_s = np.zeros(n, dtype=np.float64)
        gap_s[1:] = (ts[1:] - ts[:-1]) / 1000.0
        out[:, 4] = np.where(first, 1, 2 + np.searchsorted(self.gap_edges_s, gap_s, side="right"))

        if events.price is None or not self.price_edges:
            out[:, 5] = 1  # no prices now, or none in training: the model never saw a price id
        else:
            p = events.price
            out[:, 5] = np.where(
                np.isfinite(p), 2 + np.searchsorted(self.price_edges, np.nan_to_num(p), side="right"), 1
            )

        local_s = ts // 1000 + self.utc_offset_minutes * 60
        out[:, 6] = 1 + (local_s // 3600) % 24

        for col, values in ((7, events.device_id), (8, events.country)):
            if values is None:
                out[:, col] = 1
                continue
            prev = np.zeros(n, dtype=np.uint64)
            prev[1:] = values[:-1]
            changed = same[0] & (prev != 0) & (values != prev)
            out[:, col] = np.where(values == 0, 1, np.where(changed, 3, 2))

        # What a rule would look at: recent pace and variety, over the `lookback` events
        # before each event (so online windows of `history` events featurize exactly).
        for j, seconds in enumerate(RECENT_WINDOWS_S):
            recent = _recent_counts(g, ts, seconds * 1000, self.lookback)
            out[:, 9 + j] = 1 + np.searchsorted(RECENT_EDGES, recent, side="right")
        for col, values in ((11, item), (12, cat)):
            # A batch without the column is a batch of events without values: 0 distinct
            # (id 2), as each such event gets beside events that have one. An event's ids
            # never depend on the other users in its batch.
            distinct = np.zeros(n, np.int64) if values is None else self._distinct(values != 0, back[col], same)
            out[:, col] = 2 + np.searchsorted(DISTINCT_EDGES, distinct, side="right")
        return out

    def _rows_back(self, values: np.ndarray, same: np.ndarray) -> np.ndarray:
        """(N,) rows back to the previous row of the group with the same non-missing
        value, among the previous ``lookback`` rows; ``lookback + 1`` where there is none."""
        k = self.lookback
        if k == 0:
            return np.ones(values.shape[0], dtype=np.int64)
        hit = (_lagged(values, k, fill=0) == values[None, :]) & same[:k]  # (k, N)
        return np.where(hit.any(axis=0) & (values != 0), hit.argmax(axis=0) + 1, k + 1)

    def _distinct(self, present: np.ndarray, back: np.ndarray, same: np.ndarray) -> np.ndarray:
        """(N,) number of distinct non-missing values among each row and the previous
        ``lookback`` rows of its group, from each row's ``back`` (:meth:`_rows_back`).

        A value counts once, at its latest row: row i-a of row i's span (a < lookback) is
        a repeat when its previous occurrence, ``back[i-a]`` rows before it, is still in
        the span, i.e. ``back[i-a] <= lookback - a``. Only ``lookback`` comparisons of (N,)
        arrays, no sort.
        """
        k = self.lookback
        in_span = present.astype(np.int64)
        if k == 0:
            return in_span
        in_span = in_span + (_lagged(present, k, fill=False) & same[:k]).sum(axis=0)
        lag_back = np.concatenate([back[None, :], _lagged(back, k - 1, fill=k + 1)]) if k > 1 else back[None, :]
        in_group = np.concatenate([np.ones((1, back.shape[0]), bool), same[: k - 1]])  # row i-a is in i's group
        repeats = ((lag_back <= (k - np.arange(k))[:, None]) & in_group).sum(axis=0)
        return in_span - repeats


def _recent_counts(groups: np.ndarray, ts: np.ndarray, span_ms: int, cap: int) -> np.ndarray:
    """(N,) earlier rows of each row's group at most ``span_ms`` before it, at most
    ``cap`` of them (rows grouped, time-ordered within a group): one binary search of
    the times made increasing across groups.

    >>> _recent_counts(np.array([0, 0, 0, 1]), np.array([0, 30_000, 90_000, 90_000]), 60_000, 16).tolist()
    [0, 1, 1, 0]
    """
    n = ts.shape[0]
    if n == 0 or cap == 0:
        return np.zeros(n, dtype=np.int64)
    gid = np.concatenate([[0], np.cumsum(groups[1:] != groups[:-1])])
    rel = ts - ts.min()
    stride = int(rel.max()) + span_ms + 1  # each group's times in a band of their own
    if (int(gid[-1]) + 1) * stride >= 1 << 62:  # decades of milliseconds times millions of users
        lagged = _lagged(ts, cap, fill=0)
        in_group = _lagged(gid, cap, fill=-1) == gid[None, :]
        return ((ts[None, :] - lagged <= span_ms) & in_group).sum(axis=0)
    key = gid * stride + rel
    first = np.searchsorted(key, key - span_ms, side="left")
    return np.minimum(np.arange(n) - first, cap)


def _lagged(x: np.ndarray, k: int, fill: Any) -> np.ndarray:
    """(k, N) view: ``[j, i]`` is ``x[i - 1 - j]`` (lag j + 1), or ``fill`` before the
    first row.

    >>> _lagged(np.array([5, 6, 7]), 2, fill=0).tolist()
    [[0, 5, 6], [0, 0, 5]]
    """
    padded = np.empty(len(x) + k, dtype=x.dtype)
    padded[:k] = fill
    padded[k:] = x
    # Lag j + 1 is ``padded[k - 1 - j:][:N]``: the k windows of length N over
    # ``padded[:-1]``, last first. A read-only view, no copy; sliding_window_view checks
    # the bounds that a hand-written as_strided would leave to us.
    return sliding_window_view(padded[:-1], len(x))[::-1]


def _quantile_edges(x: np.ndarray, n_buckets: int, always: tuple[float, ...] = ()) -> tuple[float, ...]:
    """Distinct quantile edges of ``x`` (rounded to 3 significant digits) plus ``always``."""
    edges = set(always)
    if x.size:
        qs = np.quantile(x, np.linspace(0.0, 1.0, n_buckets + 1)[1:-1])
        edges.update(float(f"{q:.3g}") for q in qs if q > 0)
    return tuple(sorted(edges))


def last_windows(
    features: np.ndarray, rows: np.ndarray, group_start: np.ndarray, length: int
) -> np.ndarray:
    """Windows of ``length`` feature rows ending at each of ``rows``, left-padded.

    Parameters
    ----------
    features : (N, F) int64 feature ids of grouped, time-ordered rows.
    rows : (B,) index of the last row of each window.
    group_start : (B,) index of the first row of that row's group; rows before it are
        another user's and become padding.
    length : T, the window length.

    Returns
    -------
    (B, T, F) int64, padding (0) where the group has fewer than T rows up to ``rows``.
    """
    offsets = np.arange(length, dtype=np.int64) - (length - 1)  # (T,)
    idx = rows[:, None] + offsets[None, :]  # (B, T)
    valid = idx >= group_start[:, None]
    out = features[np.clip(idx, 0, None)]  # (B, T, F)
    out[~valid] = PAD
    return out


@dataclass(frozen=True)
class WindowInputs:
    """Model inputs for the last event of each of B windows (the online path's rule): one
    featurizer pass over every window's events, then one left-padded (b, T, F) array per
    padded length T in use (:meth:`Padding.online`). The micro-batcher and the batch
    engine's arrival-order path (events late for their user) build their inputs here, so
    an event's answer does not depend on which of them scored it.

    ``calls`` holds (rows, x) per T: the windows (indices into the B) and their inputs;
    ``seen`` (B,) the events of each window the model reads (at most W); ``last`` (B,)
    the row of each window's last event in ``events``.
    """

    calls: list[tuple[np.ndarray, np.ndarray]]
    seen: np.ndarray
    last: np.ndarray

    @classmethod
    def build(cls, spec: FeatureSpec, events: Events, lens: np.ndarray) -> WindowInputs:
        """``events``: the windows' events one window after another, each oldest first;
        ``lens`` (B,): events per window (≥ 1 each)."""
        groups = np.repeat(np.arange(lens.size), lens)
        feats = spec.transform(events, groups=groups)  # (N, F)
        last = np.cumsum(lens) - 1
        first = last - lens + 1
        seen = np.minimum(lens, spec.window)
        padding = Padding.online(spec.window)
        t_of = padding.padded(seen)
        calls = []
        for t in sorted(set(t_of.tolist())):
            rows = np.flatnonzero(t_of == t)
            calls.append((rows, last_windows(feats, last[rows], first[rows], t)))
        return cls(calls, seen, last)


def group_starts(groups: np.ndarray) -> np.ndarray:
    """(N,) index of the first row of each row's group (rows grouped contiguously)."""
    n = groups.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    new = np.ones(n, dtype=bool)
    new[1:] = groups[1:] != groups[:-1]
    starts = np.flatnonzero(new)
    return starts[np.cumsum(new) - 1]


# -- windowing rules: chunks and padded lengths, shared by training, online and batch ----


@dataclass(frozen=True)
class Segments:
    """Chunks of grouped, time-ordered rows (:func:`chunk_segments`): chunk ``k`` scores
    (or trains on) rows ``[start[k], end[k])``, all of one group, and reads rows
    ``[context[k], end[k])``: up to W - 1 rows of context before ``start[k]``, so that every
    row it scores has its whole window in the chunk (its own last W rows, or all of its
    group's up to it). The detector looks no further back than W rows.
    """

    start: np.ndarray  # (M,) int64, first row scored
    end: np.ndarray  # (M,) int64, one past the last row scored (and read)
    context: np.ndarray  # (M,) int64, first row read: max(group start, start - (W - 1))

    def __len__(self) -> int:
        return int(self.start.shape[0])

    def __getitem__(self, which: np.ndarray | slice) -> Segments:
        return Segments(self.start[which], self.end[which], self.context[which])

    @property
    def lengths(self) -> np.ndarray:
        """(M,) rows each chunk reads, context included: what its padded length must hold."""
        return self.end - self.context

    def positions(self, length: int) -> np.ndarray:
        """(M, T) row at each position of the chunks as inputs of ``length`` T, right-aligned
        (the last position is ``end - 1``); rows before ``context`` are padding."""
        return self.end[:, None] - length + np.arange(length)[None, :]

    def scored(self, length: int) -> np.ndarray:
        """(M, T) bool: the positions of :meth:`positions` whose output the chunk keeps."""
        return self.positions(length) >= self.start[:, None]

    def windows(self, features: np.ndarray, length: int) -> np.ndarray:
        """(M, T, F) the chunks' feature rows, left-padded to ``length`` (:func:`last_windows`)."""
        return last_windows(features, self.end - 1, self.context, length)


def chunk_segments(groups: np.ndarray, window: int, chunk_len: int) -> Segments:
    """Cut grouped, time-ordered rows into chunks of at most ``chunk_len`` rows read, context
    included: each group's rows go ``stride = chunk_len - (window - 1)`` at a time, and each
    chunk carries up to ``window - 1`` rows of its own group before them. Training
    (``model_export.train.make_chunks``) and the batch engine (``app.core.batch_engine``) cut here,
    so that a row is trained on, and scored, on the same W rows the online window holds.

    Examples
    --------
    >>> seg = chunk_segments(np.array([0, 0, 0, 0, 0, 1]), window=3, chunk_len=4)  # stride 2
    >>> seg.start.tolist(), seg.end.tolist(), seg.context.tolist()
    ([0, 2, 4, 5], [2, 4, 5, 6], [0, 0, 2, 5])
    """
    stride = chunk_len - (window - 1)
    if stride < 1:
        raise ValueError(f"chunk_len must exceed window - 1 = {window - 1}")
    n = groups.shape[0]
    starts = group_starts(groups)
    rank = np.arange(n) - starts  # 0 at each group's first row
    start = np.flatnonzero(rank % stride == 0)
    end = np.append(start[1:], n).astype(np.int64) if n else np.zeros(0, np.int64)
    context = np.maximum(starts[start], start - (window - 1))
    return Segments(start, end, context)


#: The online micro-batcher's shortest padded length, and the batch engine's shortest:
#: most users of a day's log have 1-4 events, and ONNX Runtime's cost per row falls with
#: the length (7-15% faster scoring of the Taobao stream slice than padding them all to
#: 16: tests/benchmarks/bench_score.py).
SHORT_LENGTH = 8
#: The batch engine's chunks are padded to multiples of this beyond :data:`SHORT_LENGTH`
#: (few shapes, little padding).
BATCH_STEP = 16


@dataclass(frozen=True)
class Padding:
    """The time lengths model inputs are padded to, so that ONNX Runtime (and PyTorch in
    training) sees a few shapes: ``short``, then each length the one before plus at most
    ``step`` (doubling while that is less; ``None``: always doubling), then ``longest``.
    An input of ``n`` events runs at the shortest of :attr:`lengths` that holds it.

    Two policies, one rule: online (:meth:`online`), a handful of lengths up to the
    window, every one warmed up at start; batch (:meth:`batch`), finer steps for chunks of
    up to ``chunk_len`` rows, where padding costs more than a new shape. Padding never
    changes a score: inputs are left-padded and the model masks padding; only the speed
    differs.

    Examples
    --------
    >>> Padding.online(64).lengths, Padding.online(100).lengths
    ((8, 16, 32, 64), (8, 16, 32, 64, 100))
    >>> Padding.batch(100).lengths
    (8, 16, 32, 48, 64, 80, 96, 112)
    >>> Padding.online(64).padded(9), Padding.online(64).padded(np.array([1, 8, 33, 65])).tolist()
    (16, [8, 8, 64, 64])
    """

    longest: int
    short: int = SHORT_LENGTH
    step: int | None = None

    def __post_init__(self) -> None:
        if self.longest < 1 or self.short < 1 or (self.step is not None and self.step < 1):
            raise ValueError(f"padded lengths must be positive: {self}")

    @classmethod
    def online(cls, window: int) -> Padding:
        """The micro-batcher's: powers of two from :data:`SHORT_LENGTH` up to the window."""
        return cls(window)

    @classmethod
    def batch(cls, chunk_len: int) -> Padding:
        """The batch engine's: :data:`SHORT_LENGTH`, then multiples of :data:`BATCH_STEP`
        up to ``chunk_len`` rounded up to one."""
        return cls(-(-chunk_len // BATCH_STEP) * BATCH_STEP, step=BATCH_STEP)

    @property
    def lengths(self) -> tuple[int, ...]:
        """Every padded length, shortest first."""
        out, t = [], self.short
        while t < self.longest:
            out.append(t)
            t += t if self.step is None else min(t, self.step)
        return (*out, self.longest)

    def padded(self, n: Any) -> Any:
        """The shortest of :attr:`lengths` that holds ``n`` events (the longest for more):
        an int, or an int64 array of them for an array of ``n``."""
        lengths = self.lengths
        at = np.minimum(np.searchsorted(lengths, n), len(lengths) - 1)
        return np.asarray(lengths, np.int64)[at] if np.ndim(at) else lengths[int(at)]
