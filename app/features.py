"""The one featurizer: events → integer feature ids, for training, export checks,
online scoring and batch scoring alike (numpy only).

Every event becomes ``F`` categorical ids (column order in :data:`FEATURES`). Id 0 is
padding in every column, so a left-padded window is all zeros where there is no event.
An event's features depend on itself and at most ``lookback`` earlier events of the same
user, so the features of a user's last ``window`` events need only their last
``window + lookback`` events (:attr:`FeatureSpec.history`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from app.events import Events, finalise_hash

PAD = 0
#: Feature columns, in tensor order.
FEATURES = (
    "event_type",  # 1 = out of vocabulary, 2.. = fitted vocabulary
    "category",  # 1 = missing, 2.. = hash bucket
    "item_repeat",  # 1 = missing, 2 = new item, 3 = item seen in the last `lookback` events
    "category_new",  # 1 = missing, 2 = seen in the last `lookback` events, 3 = new
    "gap",  # 1 = first event of the user, 2.. = bucket of seconds since the previous event
    "price",  # 1 = missing, 2.. = price bucket
    "hour",  # 1..24 = local hour of day + 1
    "device_change",  # 1 = missing, 2 = same device as the previous event (or first), 3 = changed
    "country_change",  # as device_change, for country
)

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
    version: int = 1

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
    ) -> FeatureSpec:
        """Fit vocabularies and bucket edges on (normal) training events."""
        counts = np.bincount(events.event_type, minlength=len(events.event_types))
        order = np.argsort(-counts, kind="stable")
        vocab = tuple(events.event_types[i] for i in order if counts[i] >= min_type_count)

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
        )

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
        >>> from app.events import Events, finalise_hash
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

        lut = {t: i + 2 for i, t in enumerate(self.event_types)}
        type_ids = np.array([lut.get(t, 1) for t in events.event_types], dtype=np.int64)
        out[:, 0] = type_ids[events.event_type] if len(type_ids) else 1

        cat = events.category_id
        if cat is None:
            out[:, 1] = 1
            out[:, 3] = 1
        else:
            bucket = finalise_hash(cat ^ np.uint64(self.hash_seed)) % np.uint64(self.category_buckets)
            out[:, 1] = np.where(cat == 0, 1, 2 + bucket.astype(np.int64))
            seen = self._seen_before(cat, same)
            out[:, 3] = np.where(cat == 0, 1, np.where(seen, 2, 3))

        item = events.item_id
        if item is None:
            out[:, 2] = 1
        else:
            seen = self._seen_before(item, same)
            out[:, 2] = np.where(item == 0, 1, np.where(seen, 3, 2))

        ts = events.timestamp_ms
        gap_s = np.zeros(n, dtype=np.float64)
        gap_s[1:] = (ts[1:] - ts[:-1]) / 1000.0
        out[:, 4] = np.where(first, 1, 2 + np.searchsorted(self.gap_edges_s, gap_s, side="right"))

        if events.price is None:
            out[:, 5] = 1
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
        return out

    def _seen_before(self, values: np.ndarray, same: np.ndarray) -> np.ndarray:
        """(N,) bool: the value occurs among the previous ``lookback`` rows of the group."""
        k = self.lookback
        if k == 0:
            return np.zeros(values.shape[0], dtype=bool)
        hit = (_lagged(values, k, fill=0) == values[None, :]) & same[:k]
        return hit.any(axis=0) & (values != 0)


def _lagged(x: np.ndarray, k: int, fill: Any) -> np.ndarray:
    """(k, N) view: ``[j, i]`` is ``x[i - 1 - j]`` (lag j + 1), or ``fill`` before the
    first row.

    >>> _lagged(np.array([5, 6, 7]), 2, fill=0).tolist()
    [[0, 5, 6], [0, 0, 5]]
    """
    padded = np.empty(len(x) + k, dtype=x.dtype)
    padded[:k] = fill
    padded[k:] = x
    # Lag j + 1 is ``padded[k - 1 - j:][:N]``: each row a contiguous slice, every read
    # inside ``padded``. A read-only view, no copy.
    step = padded.strides[0]
    return np.lib.stride_tricks.as_strided(padded[k - 1 :], shape=(k, len(x)), strides=(-step, step),
                                           writeable=False)


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


def group_starts(groups: np.ndarray) -> np.ndarray:
    """(N,) index of the first row of each row's group (rows grouped contiguously)."""
    n = groups.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    new = np.ones(n, dtype=bool)
    new[1:] = groups[1:] != groups[:-1]
    starts = np.flatnonzero(new)
    return starts[np.cumsum(new) - 1]
