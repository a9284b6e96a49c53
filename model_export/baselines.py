"""Classical baselines for the sequence detector: Isolation Forest and ECOD on aggregates
of the same causal window the detector sees (so a comparison measures the model, not extra
information), and a velocity rule. Aggregates are cumulative sums over grouped rows.

Also the per-user rules a storefront could write in an afternoon (:func:`user_rule_scores`):
one number per user over all its events, compared with the detector user by user."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
from pyod.models.ecod import ECOD
from pyod.models.iforest import IForest

from app.core.events import Events
from app.core.features import group_starts

#: Columns of :func:`window_aggregates`, in order. Over the event's window: its length;
#: the share of each of the 4 most common training event types; events in the last 60 s
#: and 10 min; mean and min log1p(seconds between consecutive events); distinct items and
#: categories per event (missing counts as one value); device and country changes per
#: gap; mean known price (0 if none); and the event's UTC hour.
AGGREGATE_FEATURES: tuple[str, ...] = (
    "n_events", "type_frac_0", "type_frac_1", "type_frac_2", "type_frac_3",
    "n_last_60s", "n_last_10min", "mean_log_gap", "min_log_gap",
    "distinct_item_frac", "distinct_category_frac", "device_change_frac",
    "country_change_frac", "mean_price", "hour",
)
N_TYPES = 4
#: log1p gap of a one-event window: a first event reads as after a quiet day, not a burst.
NO_GAP_LOG = float(np.log1p(86_400.0))


def top_type_names(events: Events, k: int = N_TYPES) -> tuple[str, ...]:
    """The ``k`` most frequent event type names (ties in dictionary order)."""
    counts = np.bincount(events.event_type, minlength=len(events.event_types))
    order = np.argsort(-counts, kind="stable")
    return tuple(events.event_types[i] for i in order[:k] if counts[i] > 0)


def window_aggregates(
    events: Events, window: int = 64, *, type_names: Sequence[str] | None = None
) -> np.ndarray:
    """Per-event aggregates over the event's last ``window`` events of its user.

    Parameters
    ----------
    events : rows sorted by (user, time), as ``Events.sorted()`` returns them.
    window : window length, the event itself included.
    type_names : event type names for the ``type_frac_*`` columns (a missing name gives
        0); default the 4 most frequent types of ``events``.

    Returns
    -------
    (N, D) float32, columns :data:`AGGREGATE_FEATURES`.

    Examples
    --------
    >>> ev = Events.from_records([
    ...     {"user_id": "u", "event_type": "view", "timestamp": t} for t in (0, 30_000, 200_000)
    ... ]).sorted()
    >>> window_aggregates(ev)[:, AGGREGATE_FEATURES.index("n_last_60s")].tolist()
    [1.0, 2.0, 1.0]
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if not _is_sorted(events):
        raise ValueError("events must be sorted by (user, time): use Events.sorted()")
    n = len(events)
    out = np.zeros((n, len(AGGREGATE_FEATURES)), dtype=np.float32)
    if n == 0:
        return out
    col = {name: j for j, name in enumerate(AGGREGATE_FEATURES)}
    idx, gs, start, first = _windows(events.user, window)
    count = idx - start + 1
    n_gaps = count - 1  # gaps between consecutive rows inside the window

    def window_sum(x: np.ndarray, lo: np.ndarray = start) -> np.ndarray:
        acc = np.int64 if x.dtype.kind in "bi" else np.float64
        c = np.concatenate(([0], np.cumsum(x, dtype=acc)))
        return c[idx + 1] - c[lo]

    out[:, col["n_events"]] = count
    names = top_type_names(events) if type_names is None else tuple(type_names)[:N_TYPES]
    for j, name in enumerate(names):
        if name in events.event_types:
            hit = events.event_type == events.event_types.index(name)
            out[:, col[f"type_frac_{j}"]] = window_sum(hit) / count

    ts = events.timestamp_ms
    for name, seconds in (("n_last_60s", 60), ("n_last_10min", 600)):
        out[:, col[name]] = recent_counts(ts, first, start, seconds)

    gap_log = np.log1p(np.maximum(np.diff(ts, prepend=ts[0]), 0) / 1000.0)
    gap_log[first] = 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_gap = window_sum(gap_log, start + 1) / n_gaps
    out[:, col["mean_log_gap"]] = np.where(n_gaps > 0, mean_gap, NO_GAP_LOG)
    gaps_only = np.where(first, np.inf, gap_log)
    out[:, col["min_log_gap"]] = _range_min(gaps_only, start + 1, idx, NO_GAP_LOG)

    for name, values in (("item", events.item_id), ("category", events.category_id)):
        if values is not None:
            distinct = _distinct_in_window(values, events.user, start, gs)
            out[:, col[f"distinct_{name}_frac"]] = distinct / count

    for name, values in (("device", events.device_id), ("country", events.country)):
        if values is not None:
            prev = np.zeros(n, dtype=np.uint64)
            prev[1:] = values[:-1]
            changed = ~first & (prev != 0) & (values != 0) & (values != prev)
            changes = window_sum(changed, start + 1)
            out[:, col[f"{name}_change_frac"]] = changes / np.maximum(n_gaps, 1)

    if events.price is not None:
        known = np.isfinite(events.price)
        total = window_sum(np.where(known, events.price, 0.0).astype(np.float64))
        out[:, col["mean_price"]] = total / np.maximum(window_sum(known), 1)  # 0 if none known

    out[:, col["hour"]] = (ts // 3_600_000) % 24
    return out


def recent_counts(ts: np.ndarray, first: np.ndarray, start: np.ndarray, secs: float) -> np.ndarray:
    """(N,) events from ``start`` up to each row whose time is within ``secs`` of it.

    Gaps are clipped at ``secs`` (a longer gap cuts the count anyway) and a group start
    counts as such a gap, so one monotone key serves every user with a binary search and
    stays far from int64 overflow whatever the time span.
    """
    lim = round(secs * 1000)
    step = np.full(ts.shape[0], lim + 1, dtype=np.int64)
    step[1:] = np.minimum(np.diff(ts), lim + 1)
    step[first] = lim + 1
    key = np.cumsum(step)
    lo = np.maximum(np.searchsorted(key, key - lim, side="left"), start)
    return np.arange(ts.shape[0]) - lo + 1


def _windows(user: np.ndarray, window: int) -> tuple[np.ndarray, ...]:
    """(N,) row index, first row of its user, first row of its window, is-first-of-user."""
    idx = np.arange(user.shape[0], dtype=np.int64)
    gs = group_starts(user)
    return idx, gs, np.maximum(gs, idx - window + 1), gs == idx


def _is_sorted(events: Events) -> bool:
    du = np.diff(events.user.astype(np.int64))
    return not np.any((du < 0) | ((du == 0) & (np.diff(events.timestamp_ms) < 0)))


def _range_min(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, empty: float) -> np.ndarray:
    """min(x[lo_i..hi_i]) per row (``empty`` where lo_i > hi_i), by a sparse table built
    one level at a time so memory stays O(N)."""
    length = hi - lo + 1
    res = np.full(x.shape[0], empty, dtype=np.float64)
    level = np.floor(np.log2(np.maximum(length, 1))).astype(np.int64)
    table = x.astype(np.float64, copy=True)  # table[j] = min(x[j - 2^k + 1 .. j])
    for k in range(int(level.max()) + 1):
        if k:
            half = 1 << (k - 1)
            table[half:] = np.minimum(table[half:], table[:-half])
        q = (length > 0) & (level == k)
        res[q] = np.minimum(table[hi[q]], table[lo[q] + (1 << k) - 1])
    return res


def _distinct_in_window(
    values: np.ndarray, user: np.ndarray, start: np.ndarray, gs: np.ndarray
) -> np.ndarray:
    """(N,) exact number of distinct ``values`` in each row's window.

    The count changes by +1 when the new row's value is not already in the window and by
    -1 when the row sliding out had no later copy inside it, so it is a per-user cumsum.
    """
    n, idx = values.shape[0], np.arange(values.shape[0], dtype=np.int64)
    order = np.lexsort((idx, values, user))  # (user, value) runs in time order
    tie = (values[order][1:] == values[order][:-1]) & (user[order][1:] == user[order][:-1])
    prev = np.full(n, -1, dtype=np.int64)
    nxt = np.full(n, n, dtype=np.int64)
    prev[order[1:][tie]] = order[:-1][tie]
    nxt[order[:-1][tie]] = order[1:][tie]
    slid = start > gs  # window is full and row start-1 just left it
    left_out = np.where(slid, start - 1, 0)
    delta = (prev < start).astype(np.int64) - (slid & (nxt[left_out] >= idx))
    c = np.concatenate(([0], np.cumsum(delta)))
    return c[idx + 1] - c[gs]


class Baseline(Protocol):
    """Fitted on training events; scores (user, time)-sorted events, higher = more anomalous."""

    name: str
    def fit(self, events: Events) -> Baseline: ...
    def score(self, events: Events) -> np.ndarray: ...


class _AggregateDetector:
    """Fit on window aggregates of the training normal events (subclasses give the
    detector as ``_fit(x)`` and ``_score(x)``)."""

    name = "aggregate"
    _fit: Callable[[np.ndarray], None]  # (M, D) training aggregates
    _score: Callable[[np.ndarray], np.ndarray]  # (N, D) -> (N,)

    def __init__(self, *, window: int = 64, max_rows: int = 50_000, seed: int = 0) -> None:
        self.window, self.max_rows, self.seed = window, max_rows, seed
        self.type_names_: tuple[str, ...] = ()
        self.columns_: np.ndarray = np.ones(len(AGGREGATE_FEATURES), dtype=bool)

    def fit(self, events: Events) -> _AggregateDetector:
        ev = events if _is_sorted(events) else events.sorted()
        self.type_names_ = top_type_names(ev)
        x = window_aggregates(ev, self.window, type_names=self.type_names_)
        if ev.label is not None and np.any(ev.label == 0):
            x = x[ev.label == 0]
        if x.shape[0] == 0:
            raise ValueError(f"{self.name}: no training events to fit on")
        if x.shape[0] > self.max_rows:
            rng = np.random.default_rng(self.seed)
            x = x[np.sort(rng.choice(x.shape[0], self.max_rows, replace=False))]
        # Constant columns (a field the data lacks) carry nothing; ECOD's skew needs std > 0.
        self.columns_ = x.max(axis=0) > x.min(axis=0)
        if not self.columns_.any():
            self.columns_[0] = True
        self._fit(x[:, self.columns_].astype(np.float64))
        return self

    def score(self, events: Events) -> np.ndarray:
        """(N,) anomaly scores of events sorted by (user, time)."""
        if len(events) == 0:
            return np.zeros(0, dtype=np.float64)
        x = window_aggregates(events, self.window, type_names=self.type_names_)
        return self._score(x[:, self.columns_].astype(np.float64))


class IsolationForestBaseline(_AggregateDetector):
    """PyOD's Isolation Forest on window aggregates of training normal events."""

    name = "iforest"

    def _fit(self, x: np.ndarray) -> None:
        self.model_ = IForest(n_estimators=100, random_state=self.seed, n_jobs=1).fit(x)

    def _score(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.model_.decision_function(x), dtype=np.float64)


class ECODBaseline(_AggregateDetector):
    """ECOD (empirical-CDF outlier detection), fitted with PyOD but scored inductively:
    tail probabilities come from the training sample's CDFs only, so a score does not
    depend on the other events scored with it (PyOD's ``decision_function`` re-fits the
    CDFs on train + test, which lets a batch full of attacks hide itself)."""

    name = "ecod"

    def _fit(self, x: np.ndarray) -> None:
        self.model_ = ECOD(n_jobs=1).fit(x)
        self.sorted_ = np.sort(x, axis=0)  # (M, D) per-column training values
        z = (x - x.mean(axis=0)) / x.std(axis=0)  # std > 0: constant columns were dropped
        self.skew_sign_ = np.sign(np.mean(z**3, axis=0))

    def _score(self, x: np.ndarray) -> np.ndarray:
        ref, m, cols = self.sorted_, self.sorted_.shape[0], range(x.shape[1])
        below = np.stack([np.searchsorted(ref[:, j], x[:, j], side="right") for j in cols], 1)
        above = m - np.stack([np.searchsorted(ref[:, j], x[:, j], side="left") for j in cols], 1)
        # Add-one smoothing keeps values beyond the training range finite.
        u_left = -np.log((below + 1) / (m + 1))
        u_right = -np.log((above + 1) / (m + 1))
        u_skew = np.where(self.skew_sign_ < 0, u_left, u_right)
        return np.maximum(np.maximum(u_left, u_right), u_skew).sum(axis=1)


class RateRule:
    """The classic velocity rule: events of the user in the last 60 s of its window, with
    events in the last 10 min as a tie-break; scaled to [0, 1). Nothing to fit."""

    name = "rate_rule"

    def __init__(self, *, window: int = 64) -> None:
        self.window = window

    def fit(self, events: Events) -> RateRule:
        return self

    def score(self, events: Events) -> np.ndarray:
        """(N,) velocity scores of events sorted by (user, time)."""
        if not _is_sorted(events):
            raise ValueError("events must be sorted by (user, time): use Events.sorted()")
        if len(events) == 0:
            return np.zeros(0, dtype=np.float64)
        _, _, start, first = _windows(events.user, self.window)
        n60, n600 = (recent_counts(events.timestamp_ms, first, start, s) for s in (60, 600))
        return (n60 + n600 / (self.window + 1)) / (self.window + 1)


# -- per-user rules ----------------------------------------------------------------------

#: What each per-user rule of :func:`user_rule_scores` counts over all of a user's events.
USER_RULES: dict[str, str] = {
    "user_events": "events of the user",
    "max_events_5min": "most events within any 5 minutes",
    "distinct_categories": "distinct categories",
    "distinct_items": "distinct items (the log has no category column)",
}
RULE_WINDOW_S = 300


def max_events_within(events: Events, seconds: float = RULE_WINDOW_S) -> np.ndarray:
    """(U,) most events of each user within any ``seconds`` (first to last event at most
    ``seconds`` apart, both ends included); 0 for a user without events.

    Parameters
    ----------
    events : any row order; ``U = events.n_users``.

    Examples
    --------
    >>> ev = Events.from_records([{"user_id": "u", "event_type": "view", "timestamp": 1000 * t}
    ...                           for t in (0, 100, 300, 301, 900)])
    >>> max_events_within(ev).tolist()
    [3]
    """
    out = np.zeros(events.n_users, dtype=np.int64)
    if len(events) == 0:
        return out
    order = events.order()
    user = events.user[order]
    gs = group_starts(user)
    idx = np.arange(user.shape[0])
    counts = recent_counts(events.timestamp_ms[order], gs == idx, gs, seconds)  # (N,) ending at each row
    np.maximum.at(out, user, counts)
    return out


def distinct_per_user(values: np.ndarray, user: np.ndarray, n_users: int) -> np.ndarray:
    """(U,) distinct non-missing ``values`` (hashes, 0 = missing) of each user's events.

    Examples
    --------
    >>> distinct_per_user(np.array([5, 5, 7, 0, 7], np.uint64), np.array([0, 0, 0, 1, 1]), 3).tolist()
    [2, 1, 0]
    """
    keep = values != 0
    u, v = user[keep].astype(np.int64), values[keep]
    o = np.lexsort((v, u))
    u, v = u[o], v[o]
    new = np.ones(u.shape[0], dtype=bool)
    new[1:] = (u[1:] != u[:-1]) | (v[1:] != v[:-1])
    return np.bincount(u[new], minlength=n_users)


def user_rule_scores(events: Events) -> dict[str, np.ndarray]:
    """Per-user rule statistics, each (U,) float64 indexed by user code (``U = events.n_users``):
    the user's event count, its most events within any 5 minutes, and its distinct
    categories (distinct items where the log has no category column; neither: no such
    rule). Higher = more suspicious; nothing to fit.

    Examples
    --------
    >>> ev = Events.from_records([
    ...     {"user_id": u, "event_type": "view", "timestamp": t, "category_id": c}
    ...     for u, t, c in (("a", 0, "x"), ("a", 1000, "y"), ("b", 0, "x"))])
    >>> {k: v.tolist() for k, v in user_rule_scores(ev).items()}
    {'user_events': [2.0, 1.0], 'max_events_5min': [2.0, 1.0], 'distinct_categories': [2.0, 1.0]}
    """
    n = events.n_users
    out = {
        "user_events": np.bincount(events.user, minlength=n).astype(np.float64),
        "max_events_5min": max_events_within(events, RULE_WINDOW_S).astype(np.float64),
    }
    for name, values in (("distinct_categories", events.category_id), ("distinct_items", events.item_id)):
        if values is not None:
            out[name] = distinct_per_user(values, events.user, n).astype(np.float64)
            break
    return out


def default_baselines(seed: int = 0, window: int = 64) -> list[Baseline]:
    """The baselines every report compares the detector with."""
    kw = {"window": window, "seed": seed}
    return [IsolationForestBaseline(**kw), ECODBaseline(**kw), RateRule(window=window)]
