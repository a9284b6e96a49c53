"""The featurizer: properties that training, online and batch scoring rely on."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.core.batch_engine import score_events
from app.core.events import Events, hash_strings
from app.core.features import (
    BATCH_STEP,
    DISTINCT_EDGES,
    FEATURES,
    PAD,
    RECENT_EDGES,
    RECENT_WINDOWS_S,
    SHORT_LENGTH,
    FeatureSpec,
    Padding,
    chunk_segments,
    group_starts,
    last_windows,
)
from model_export.train import length_batches, make_chunks

TYPES = ["view", "cart", "buy", "fav"]


def record(draw_user, t, etype, item, cat, device, country, price):
    r = {"user_id": draw_user, "event_type": etype, "timestamp": t, "item_id": item,
         "category_id": cat}
    if device is not None:
        r["device_id"] = device
    if country is not None:
        r["country"] = country
    if price is not None:
        r["price"] = price
    return r


records = st.lists(
    st.builds(
        record,
        st.sampled_from(["u1", "u2", "u3"]),
        st.integers(0, 10_000_000),
        st.sampled_from([*TYPES, "login"]),
        st.sampled_from(["i1", "i2", "i3", "i4", "i5", None]),
        st.sampled_from(["c1", "c2", "c3", None]),
        st.sampled_from(["d1", "d2", None]),
        st.sampled_from(["CN", "DE", None]),
        st.one_of(st.none(), st.floats(0, 1e4)),
    ),
    min_size=1,
    max_size=120,
)


def fitted(ev: Events, lookback: int = 4, window: int = 8) -> FeatureSpec:
    base = Events.from_records([{"user_id": "x", "event_type": t, "timestamp": i * 1000, "price": float(i)}
                                for i, t in enumerate(TYPES)])
    spec = FeatureSpec.fit(base, window=window, lookback=lookback)
    return spec


@settings(max_examples=60, deadline=None)
@given(records)
def test_ids_in_range_and_never_padding(recs):
    ev = Events.from_records(recs).sorted()
    spec = fitted(ev)
    f = spec.transform(ev)
    assert f.shape == (len(ev), len(FEATURES))
    assert (f >= 1).all(), "id 0 is reserved for padding"
    assert (f < np.array(spec.cardinalities)).all()


@settings(max_examples=60, deadline=None)
@given(records)
def test_users_do_not_leak_into_each_other(recs):
    ev = Events.from_records(recs).sorted()
    spec = fitted(ev)
    together = spec.transform(ev)
    for u in np.unique(ev.user):
        alone = ev.take(ev.user == u)
        assert np.array_equal(spec.transform(alone), together[ev.user == u])


@settings(max_examples=60, deadline=None)
@given(records, st.integers(1, 12))
def test_last_window_needs_only_window_plus_lookback_events(recs, keep):
    """Online scoring fetches the last W+R events; their last W features must equal the
    features computed on the whole history (the batch path)."""
    ev = Events.from_records([{**r, "user_id": "u"} for r in recs]).sorted()
    spec = fitted(ev)  # window 8, lookback 4 → history 12
    full = spec.transform(ev)
    for end in range(1, len(ev) + 1):
        lo = max(0, end - spec.history)
        part = spec.transform(ev.take(np.arange(lo, end)))
        w = min(spec.window, end - lo)
        assert np.array_equal(part[-w:], full[end - w : end])


@settings(max_examples=60, deadline=None)
@given(records, st.integers(0, 6))
def test_pace_and_variety_columns_equal_a_plain_loop(recs, lookback):
    """recent_1m / recent_5m count the user's earlier events within 60 / 300 s among the
    last `lookback`; distinct_* count distinct items / categories in the event and its
    `lookback` before: checked against the obvious loop."""
    ev = Events.from_records(recs).sorted()
    spec = fitted(ev, lookback=lookback)
    f = spec.transform(ev)
    col = {n: f[:, i] for i, n in enumerate(FEATURES)}
    ts, user = ev.timestamp_ms.tolist(), ev.user.tolist()
    for i in range(len(ev)):
        span = [j for j in range(max(0, i - lookback), i + 1) if user[j] == user[i]]
        for name, seconds in zip(("recent_1m", "recent_5m"), RECENT_WINDOWS_S, strict=True):
            n = sum(1 for j in span if j < i and ts[i] - ts[j] <= seconds * 1000)
            assert col[name][i] == 1 + np.searchsorted(RECENT_EDGES, n, side="right"), (name, i)
        for name, values in (("distinct_items", ev.item_id), ("distinct_categories", ev.category_id)):
            if values is None:  # no event of the batch has one: 0 distinct, as beside events that do
                assert col[name][i] == 2
                continue
            n = len({int(values[j]) for j in span if values[j] != 0})
            assert col[name][i] == 2 + np.searchsorted(DISTINCT_EDGES, n, side="right"), (name, i)


def test_pace_columns_by_hand():
    ev = Events.from_records([{"user_id": "u", "event_type": "view", "timestamp": t * 1000, "item_id": i}
                              for t, i in ((0, "a"), (10, "b"), (20, "a"), (100, "c"), (1000, "d"))])
    f = FeatureSpec.fit(ev, lookback=16).transform(ev)
    col = {n: f[:, i].tolist() for i, n in enumerate(FEATURES)}
    assert col["recent_1m"] == [1, 2, 3, 1, 1]  # 0, 1, 2, 0, 0 earlier events within 60 s
    assert col["recent_5m"] == [1, 2, 3, 4, 1]  # 0, 1, 2, 3 (3-4 bucket), 0
    assert col["distinct_items"] == [3, 4, 4, 5, 5]  # 1, 2, 2, 3, 4 distinct items so far
    assert col["distinct_categories"] == [2] * 5  # no category column: 0 distinct


def test_aliases_map_every_store_onto_one_vocabulary():
    """A model fitted on Taobao names scores RetailRocket's, OTTO's and canonical names
    alike; a name it never saw is unknown, and a deployment alias fixes that."""
    taobao = Events.from_records([{"user_id": "u", "event_type": t, "timestamp": i}
                                  for i, t in enumerate(["pv", "pv", "cart", "fav", "buy"])])
    spec = FeatureSpec.fit(taobao)
    assert set(spec.event_types) == {"view", "cart", "favorite", "purchase"}
    ids = {tuple(spec.type_ids(names).tolist()) for names in (
        ["pv", "cart", "buy"], ["view", "addtocart", "transaction"], ["clicks", "carts", "orders"],
        ["VIEW", "Cart", "purchase"], ["click", "cart", "alipay"])}
    assert len(ids) == 1 and 1 not in next(iter(ids))
    assert spec.type_ids(["checkout"]).tolist() == [1]
    buy = spec.type_ids(["buy"]).tolist()
    assert spec.with_aliases({"checkout": "purchase"}).type_ids(["checkout"]).tolist() == buy
    restored = FeatureSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert restored.aliases == spec.aliases
    assert restored.type_ids(["addtocart"]).tolist() == spec.type_ids(["cart"]).tolist()


def test_an_events_ids_do_not_depend_on_the_rest_of_its_batch():
    """Events without an item, featurized alone (the batch has no item column at all) or
    beside another user's event that has one, get the same ids (found by review: the
    distinct_* ids differed, so one user's score depended on another's request)."""
    alone = [{"user_id": "a", "event_type": "pv", "timestamp": t * 20_000} for t in range(3)]
    other = [{"user_id": "b", "event_type": "pv", "timestamp": 0, "item_id": "x", "category_id": "c"}]
    spec = FeatureSpec.fit(Events.from_records(alone + other))
    together = spec.transform(Events.from_records(alone + other), groups=np.array([0, 0, 0, 1]))
    assert np.array_equal(spec.transform(Events.from_records(alone)), together[:3])


def test_prices_are_missing_to_a_model_that_never_saw_one():
    """A model fitted on a log without prices (Taobao) scoring a store with prices
    (REES46) must not meet price ids it never learnt."""
    no_price = Events.from_records([{"user_id": "u", "event_type": "pv", "timestamp": i} for i in range(3)])
    priced = Events.from_records([{"user_id": "u", "event_type": "pv", "timestamp": 0, "price": 9.5}])
    col = FEATURES.index("price")
    assert FeatureSpec.fit(no_price).transform(priced)[0, col] == 1
    assert FeatureSpec.fit(priced).transform(priced)[0, col] >= 2


def test_repeat_flags_and_changes_by_hand():
    ev = Events.from_records([
        {"user_id": "u", "event_type": "view", "timestamp": 0, "item_id": "a", "category_id": "c1",
         "device_id": "d1", "country": "CN"},
        {"user_id": "u", "event_type": "view", "timestamp": 1_000, "item_id": "a", "category_id": "c1",
         "device_id": "d1", "country": "CN"},
        {"user_id": "u", "event_type": "cart", "timestamp": 61_000, "item_id": "b", "category_id": "c2",
         "device_id": "d2", "country": "DE"},
        {"user_id": "u", "event_type": "teleport", "timestamp": 61_000},
    ])
    spec = FeatureSpec.fit(ev, lookback=4)
    f = spec.transform(ev)
    col = {n: f[:, i].tolist() for i, n in enumerate(FEATURES)}
    assert col["item_repeat"] == [2, 3, 2, 1]  # new, repeat, new, missing
    assert col["category_new"] == [3, 2, 3, 1]
    assert col["device_change"] == [2, 2, 3, 1]
    assert col["country_change"] == [2, 2, 3, 1]
    assert col["gap"][0] == 1  # first event of the user
    assert col["gap"][3] == 2  # zero gap: the lowest bucket
    assert col["gap"][2] > col["gap"][1] > 1
    unseen = FeatureSpec.fit(ev.take(np.arange(3))).transform(ev)
    assert unseen[3, 0] == 1  # an event type unseen in training is out of vocabulary


def test_hour_uses_the_source_time_zone():
    ev = Events.from_records([{"user_id": "u", "event_type": "pv", "timestamp": "2017-11-25T16:30:00Z"}])
    assert FeatureSpec.fit(ev).transform(ev)[0, 6] == 1 + 16
    assert FeatureSpec.fit(ev, utc_offset_minutes=480).transform(ev)[0, 6] == 1 + 0  # 00:30 in Shanghai


def test_spec_round_trips_through_json():
    ev = Events.from_records([{"user_id": "u", "event_type": t, "timestamp": i * 7000, "price": i * 3.5}
                              for i, t in enumerate(TYPES * 10)])
    spec = FeatureSpec.fit(ev, utc_offset_minutes=60)
    again = FeatureSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert np.array_equal(again.transform(ev.sorted()), spec.transform(ev.sorted()))


def test_hash_is_stable_across_releases():
    # Bundles store hash-derived buckets: changing the hash silently breaks every bundle.
    assert hash_strings(["2520377", "a", "", None]).tolist() == GOLDEN_HASHES
    assert hash_strings([]).shape == (0,)


def test_last_windows_left_pads_and_stops_at_the_user():
    f = np.arange(1, 11, dtype=np.int64)[:, None].repeat(2, axis=1)  # rows 1..10
    groups = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    starts = group_starts(groups)
    w = last_windows(f, np.array([1, 9]), starts[[1, 9]], 4)
    assert w[0, :, 0].tolist() == [PAD, PAD, 1, 2]
    assert w[1, :, 0].tolist() == [7, 8, 9, 10]


GOLDEN_HASHES = [984484373781208697, 9266097309480679803, 0, 0]


# -- the windowing rules: chunk segments and padded lengths --------------------------------


def segments_of(sizes: list[int], window: int, chunk_len: int) -> list[tuple[int, int, int]]:
    seg = chunk_segments(np.repeat(np.arange(len(sizes)), sizes), window, chunk_len)
    return list(zip(seg.start.tolist(), seg.end.tolist(), seg.context.tolist(), strict=True))


def test_chunk_segments_at_the_edges():
    """W = 4, chunk_len = 6: stride 3, each chunk carries up to 3 rows of context."""
    assert segments_of([2], 4, 6) == [(0, 2, 0)]  # fewer events than the window: one chunk
    assert segments_of([4], 4, 6) == [(0, 3, 0), (3, 4, 0)]  # exactly the window
    assert segments_of([3], 4, 6) == [(0, 3, 0)]  # exactly one stride
    assert segments_of([6], 4, 6) == [(0, 3, 0), (3, 6, 0)]  # two strides
    assert segments_of([7], 4, 6) == [(0, 3, 0), (3, 6, 0), (6, 7, 3)]  # one past: context W - 1 back
    # another user's rows are never context: user 1 starts at row 5
    assert segments_of([5, 2], 4, 6) == [(0, 3, 0), (3, 5, 0), (5, 7, 5)]
    assert segments_of([1, 1, 1], 4, 4) == [(0, 1, 0), (1, 2, 1), (2, 3, 2)]  # stride 1
    assert segments_of([], 4, 6) == []
    with pytest.raises(ValueError, match="chunk_len must exceed window - 1 = 3"):
        chunk_segments(np.zeros(5, np.int64), 4, 3)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.integers(1, 40), max_size=6), st.integers(1, 10), st.integers(1, 12))
def test_chunks_score_every_row_once_on_exactly_its_window(sizes, window, stride):
    chunk_len = stride + window - 1
    groups = np.repeat(np.arange(len(sizes)), sizes)
    seg = chunk_segments(groups, window, chunk_len)
    starts = group_starts(groups)
    scored = np.concatenate([np.arange(a, b) for a, b in zip(seg.start, seg.end, strict=True)] or [np.zeros(0)])
    assert scored.tolist() == list(range(groups.size)), "each row scored once, in order"
    assert ((seg.end - seg.start >= 1) & (seg.end - seg.start <= stride)).all()
    assert (starts[seg.end - 1] == starts[seg.start]).all(), "one user a chunk"
    assert (seg.context == np.maximum(starts[seg.start], seg.start - (window - 1))).all()
    assert (seg.lengths <= chunk_len).all()
    # a row's chunk holds the W rows up to it (or all of its user's, if fewer)
    for a, b, c in zip(seg.start.tolist(), seg.end.tolist(), seg.context.tolist(), strict=True):
        for r in range(a, b):
            assert r - c + 1 >= min(r - starts[r] + 1, window)


class _RowIds:
    """A featurizer whose one feature is the row's timestamp: the row id + 1 (never 0)."""

    def __init__(self, window: int) -> None:
        self.window = window

    def transform(self, events: Events) -> np.ndarray:
        return events.timestamp_ms[:, None].copy()


class _Recorder:
    """The batch engine's model: records every input; outputs each position's row id."""

    def __init__(self, window: int) -> None:
        self.bundle = SimpleNamespace(spec=_RowIds(window), window=window)
        self.inputs: list[np.ndarray] = []

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.inputs.append(x.copy())
        p = x[..., 0].astype(np.float32)
        return p, p


def _chunks(x: np.ndarray) -> list[tuple[int, ...]]:
    return sorted(tuple(v for v in row if v) for row in x[..., 0].tolist())


@pytest.mark.parametrize("chunk_len", [8, 9, 20, 64])
def test_training_and_the_batch_engine_cut_the_same_chunks(chunk_len):
    """A long user and users at the stride's edges: ``make_chunks`` (training) and
    ``score_events`` (the batch engine) read the same rows for the same events, and each
    event's output is its own position's."""
    window = 8
    stride = chunk_len - (window - 1)
    sizes = [300, 1, window - 1, window, window + 1, stride, stride + 1, 2 * stride, 2 * stride + 3]
    user = np.repeat(np.arange(len(sizes)), sizes).astype(np.int32)
    n = user.size
    events = Events(user=user, user_ids=np.array([f"u{i}" for i in range(len(sizes))], dtype=object),
                    timestamp_ms=np.arange(1, n + 1, dtype=np.int64), event_type=np.zeros(n, np.int32),
                    event_types=("view",))
    model = _Recorder(window)
    scores = score_events(model, events, chunk_len=chunk_len, batch_tokens=256)  # type: ignore[arg-type]
    assert scores.probability.tolist() == list(range(1, n + 1)), "each event answered at its own position"

    ids = events.timestamp_ms[:, None]
    x, _, mask = make_chunks(ids, user, None, chunk_len, window)
    assert _chunks(x) == sorted(c for i in model.inputs for c in _chunks(i)), "the same rows read"
    assert sorted(x[..., 0][mask].tolist()) == list(range(1, n + 1)), "training: each event trained on once"
    padding = Padding.batch(chunk_len)
    for i in model.inputs:  # every call at one of the batch policy's lengths, the shortest that holds it
        assert i.shape[1] in padding.lengths
        assert ((i[..., 0] != 0).sum(axis=1) <= i.shape[1]).all()
        assert (padding.padded((i[..., 0] != 0).sum(axis=1)) == i.shape[1]).all()


def _old_online_lengths(window: int) -> tuple[int, ...]:
    """The micro-batcher's lengths before they moved here (app/batching.time_lengths)."""
    lengths, t = [], 8
    while t < window:
        lengths.append(t)
        t *= 2
    return (*lengths, window)


def test_online_padding_is_powers_of_two_up_to_the_window():
    for window in range(1, 300):
        assert Padding.online(window).lengths == _old_online_lengths(window), window
    p = Padding.online(64)
    assert [p.padded(n) for n in (1, 8, 9, 16, 17, 33, 64, 65)] == [8, 8, 16, 16, 32, 64, 64, 64]
    assert p.padded(np.array([1, 9, 65])).tolist() == [8, 16, 64]
    assert Padding.online(5).lengths == (5,), "a window under the short length is its own only length"


def test_batch_padding_is_short_then_multiples_of_the_step():
    """The batch engine's numbers, as they were (app/core/batch_engine.py): SHORT_LENGTH for chunks
    that short, else the next multiple of BATCH_STEP. A change here changes float
    rounding in the scores (tests/test_batch_engine.py)."""
    assert (SHORT_LENGTH, BATCH_STEP) == (8, 16)
    for chunk_len in (1, 7, 8, 9, 16, 17, 71, 100, 512, 513):
        n = np.arange(1, chunk_len + 1)
        old = np.where(n <= 8, 8, -(-n // 16) * 16)
        assert Padding.batch(chunk_len).padded(n).tolist() == old.tolist(), chunk_len
    assert Padding.batch(512).lengths == (8, *range(16, 513, 16))


def test_training_batches_pad_in_steps_of_their_quantum():
    x = np.zeros((5, 40, 1), np.int64)
    for k, length in enumerate((1, 8, 9, 17, 40)):
        x[k, -length:] = 1
    got = {int(b[0]): t for b, t in length_batches(x, tokens=1)}  # one chunk a batch
    assert got == {0: 8, 1: 8, 2: 16, 3: 24, 4: 40}


def test_padding_refuses_empty_lengths():
    with pytest.raises(ValueError, match="positive"):
        Padding(0)
    with pytest.raises(ValueError, match="positive"):
        Padding(64, step=0)
