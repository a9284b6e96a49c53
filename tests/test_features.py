"""The featurizer: properties that training, online and batch scoring rely on."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from app.events import Events, hash_strings
from app.features import (
    DISTINCT_EDGES,
    FEATURES,
    PAD,
    RECENT_EDGES,
    RECENT_WINDOWS_S,
    FeatureSpec,
    group_starts,
    last_windows,
)

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
