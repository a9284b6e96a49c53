"""Window aggregates (hand-checked and against a per-event loop) and the baselines."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from app.core.events import Events
from model_export.baselines import (
    AGGREGATE_FEATURES,
    NO_GAP_LOG,
    ECODBaseline,
    IsolationForestBaseline,
    RateRule,
    default_baselines,
    distinct_per_user,
    max_events_within,
    top_type_names,
    user_rule_scores,
    window_aggregates,
)

COL = {name: j for j, name in enumerate(AGGREGATE_FEATURES)}
T0 = 1_704_114_000_000  # 2024-01-01T13:00:00Z


def _hand_events() -> Events:
    rows = [  # user, seconds after T0, type, item, device, price
        ("a", 0, "view", "i1", "d1", 10.0),
        ("a", 10, "view", "i2", "d1", None),
        ("a", 20, "cart", "i1", "d2", 30.0),
        ("a", 100, "view", "i1", "d2", None),
        ("a", 700, "buy", "i3", None, None),
        ("b", 5, "view", "i1", "d9", 4.0),
        ("b", 6, "view", "i1", "d9", 6.0),
    ]
    return Events.from_records([
        {"user_id": u, "timestamp": T0 + 1000 * t, "event_type": e, "item_id": i,
         "device_id": d, "price": p}
        for u, t, e, i, d, p in rows[::-1]  # reversed: .sorted() must restore the order
    ]).sorted()


def test_window_aggregates_by_hand() -> None:
    ev = _hand_events()
    x = window_aggregates(ev, window=3)
    assert x.shape == (7, len(AGGREGATE_FEATURES)) and x.dtype == np.float32

    def c(name: str) -> list[float]:
        return np.round(x[:, COL[name]], 5).tolist()

    # user a: the window cuts at 3 events; user b never sees a's events (a at t=0 and
    # t=10 s would count in b's last 60 s if users leaked).
    assert c("n_events") == [1, 2, 3, 3, 3, 1, 2]
    assert c("n_last_60s") == [1, 2, 3, 1, 1, 1, 2]
    # row 3 (t=100 s): a's event at t=0 is within 10 min but outside the window.
    assert c("n_last_10min") == [1, 2, 3, 3, 2, 1, 2]
    lg = np.log1p
    mean_gap = [NO_GAP_LOG, lg(10), lg(10), (lg(10) + lg(80)) / 2, (lg(80) + lg(600)) / 2,
                NO_GAP_LOG, lg(1)]
    np.testing.assert_allclose(x[:, COL["mean_log_gap"]], mean_gap, rtol=1e-6)
    min_gap = [NO_GAP_LOG, lg(10), lg(10), lg(10), lg(80), NO_GAP_LOG, lg(1)]
    np.testing.assert_allclose(x[:, COL["min_log_gap"]], min_gap, rtol=1e-6)
    np.testing.assert_allclose(x[:, COL["distinct_item_frac"]], [1, 1, 2 / 3, 2 / 3, 2 / 3, 1, 0.5])
    # d1 d1 d2 d2 - : one change in a's 3rd window; a missing device is no change.
    np.testing.assert_allclose(x[:, COL["device_change_frac"]], [0, 0, 0.5, 0.5, 0, 0, 0])
    np.testing.assert_allclose(x[:, COL["mean_price"]], [10, 10, 20, 30, 30, 4, 5])
    # Most common types: view (5), then buy and cart (1 each) in dictionary order.
    assert top_type_names(ev) == ("view", "buy", "cart")
    np.testing.assert_allclose(x[:, COL["type_frac_0"]], [1, 1, 2 / 3, 2 / 3, 1 / 3, 1, 1])
    assert c("type_frac_3") == [0] * 7
    assert c("hour") == [13] * 7
    assert c("distinct_category_frac") == [0] * 7  # no category column at all
    named = window_aggregates(ev, window=3, type_names=["cart", "missing"])
    np.testing.assert_allclose(named[:, COL["type_frac_0"]], [0, 0, 1 / 3, 1 / 3, 1 / 3, 0, 0])
    assert not named[:, COL["type_frac_1"]].any()


def _reference(ev: Events, window: int, names: tuple[str, ...]) -> np.ndarray:
    """window_aggregates, one event at a time."""
    out = np.zeros((len(ev), len(AGGREGATE_FEATURES)))
    t, types = ev.timestamp_ms, ev.event_type_names()
    for i in range(len(ev)):
        js = [j for j in range(max(0, i - window + 1), i + 1) if ev.user[j] == ev.user[i]]
        gaps = [np.log1p((t[b] - t[a]) / 1000) for a, b in pairwise(js)]
        row = {"n_events": len(js), "n_last_60s": sum(t[j] >= t[i] - 60_000 for j in js),
               "n_last_10min": sum(t[j] >= t[i] - 600_000 for j in js),
               "mean_log_gap": np.mean(gaps) if gaps else NO_GAP_LOG,
               "min_log_gap": min(gaps) if gaps else NO_GAP_LOG,
               "distinct_item_frac": len({ev.item_id[j] for j in js}) / len(js),
               "distinct_category_frac": len({ev.category_id[j] for j in js}) / len(js),
               "hour": (t[i] // 3_600_000) % 24}
        for k, name in enumerate(names):
            row[f"type_frac_{k}"] = np.mean([types[j] == name for j in js])
        for name, v in (("device", ev.device_id), ("country", ev.country)):
            ch = [v[a] != v[b] and v[a] != 0 and v[b] != 0 for a, b in pairwise(js)]
            row[f"{name}_change_frac"] = sum(ch) / max(len(ch), 1)
        prices = [ev.price[j] for j in js if np.isfinite(ev.price[j])]
        row["mean_price"] = np.mean(prices) if prices else 0.0
        out[i] = [row[name] for name in AGGREGATE_FEATURES]
    return out


def test_window_aggregates_match_a_per_event_loop() -> None:
    rng = np.random.default_rng(3)
    pick = rng.choice
    records = [{"user_id": f"u{rng.integers(6)}", "timestamp": int(rng.integers(0, 3 * 3_600_000)),
                "event_type": str(pick(["pv", "cart", "fav", "buy", "login"])),
                "item_id": f"i{rng.integers(12)}" if rng.random() < 0.9 else None,
                "category_id": f"c{rng.integers(4)}",
                "device_id": f"d{rng.integers(3)}" if rng.random() < 0.8 else None,
                "country": str(pick(["DE", "FR"])),
                "price": float(rng.random() * 100) if rng.random() < 0.5 else None}
               for _ in range(400)]
    ev = Events.from_records(records).sorted()
    for window in (1, 2, 5, 64):
        want = _reference(ev, window, top_type_names(ev))
        np.testing.assert_allclose(window_aggregates(ev, window), want, rtol=1e-5, atol=1e-5)


def test_window_aggregates_edge_cases() -> None:
    ev = _hand_events()
    with pytest.raises(ValueError, match="sorted"):
        window_aggregates(ev.take(np.arange(len(ev))[::-1]))
    with pytest.raises(ValueError, match="window"):
        window_aggregates(ev, window=0)
    assert window_aggregates(ev.take(np.zeros(len(ev), bool))).shape == (0, len(AGGREGATE_FEATURES))


def _synthetic(n_users: int, seed: int, *, bots: int = 0) -> Events:
    """Shoppers browsing every few minutes across many items; bots hit one item every second."""
    rng = np.random.default_rng(seed)
    user, ts, etype, item, label = [], [], [], [], []
    for u in range(n_users + bots):
        bot = u >= n_users
        n = 60 if bot else int(rng.integers(20, 60))
        gaps = np.full(n, 1_000) if bot else rng.exponential(240_000, n).astype(np.int64) + 1_000
        user += [u] * n
        ts += list(T0 + int(rng.integers(0, 86_400_000)) + np.cumsum(gaps))
        etype += [0] * n if bot else list(rng.choice(4, n, p=[0.7, 0.15, 0.1, 0.05]))
        item += [1] * n if bot else list(rng.integers(1, 500, n))
        label += [int(bot)] * n
    return Events(
        user=np.array(user, np.int32),
        user_ids=np.array([f"u{seed}-{u}" for u in range(n_users + bots)], object),
        timestamp_ms=np.array(ts, np.int64), event_type=np.array(etype, np.int32),
        event_types=("pv", "cart", "fav", "buy"), item_id=np.array(item, np.uint64),
        label=np.array(label, np.int8),
    ).sorted()


@pytest.fixture(scope="module")
def train() -> Events:
    return _synthetic(150, seed=1, bots=10)  # labelled bots: fit must leave them out


@pytest.fixture(scope="module")
def test_events() -> Events:
    return _synthetic(80, seed=2, bots=8)


def test_baselines_fit_and_score_shapes(train: Events, test_events: Events) -> None:
    for baseline in default_baselines(seed=0):
        assert baseline.fit(train) is baseline
        s = baseline.score(test_events)
        assert s.shape == (len(test_events),) and np.all(np.isfinite(s))
        assert baseline.score(test_events.take(np.zeros(len(test_events), bool))).shape == (0,)


@pytest.mark.parametrize("cls", [IsolationForestBaseline, ECODBaseline])
def test_learned_baselines_score_planted_outliers_higher(
    cls: type, train: Events, test_events: Events
) -> None:
    model = cls(seed=0).fit(train)
    s = model.score(test_events)
    late = np.r_[False, test_events.user[1:] == test_events.user[:-1]]  # skip each first event
    y = test_events.label[late]
    assert roc_auc_score(y, s[late]) > 0.95
    assert model.type_names_ == ("pv", "cart", "fav", "buy")
    np.testing.assert_array_equal(cls(seed=0).fit(train).score(test_events), s)  # fixed seed


def test_ecod_scores_do_not_depend_on_the_batch(train: Events, test_events: Events) -> None:
    model = ECODBaseline().fit(train)
    full = model.score(test_events)
    normal_only = test_events.label == 0  # whole users: their windows are unchanged
    np.testing.assert_allclose(model.score(test_events.take(normal_only)), full[normal_only])
    # On its own training sample it ranks like PyOD's (transductive) ECOD.
    x = window_aggregates(train, type_names=model.type_names_)[train.label == 0][:, model.columns_]
    ours = model._score(x.astype(np.float64))
    rank = np.argsort(np.argsort(ours)), np.argsort(np.argsort(model.model_.decision_scores_))
    assert np.corrcoef(*rank)[0, 1] > 0.99


def test_type_fractions_follow_names_not_codes(train: Events) -> None:
    model = IsolationForestBaseline().fit(train)
    one = train.take(train.user == train.user[0])
    recoded = Events.from_records([  # dictionary in another order: ("buy", "cart", "fav", "pv")
        {"user_id": "x", "timestamp": int(t), "event_type": one.event_types[c], "item_id": str(i)}
        for t, c, i in zip(one.timestamp_ms, one.event_type, one.item_id, strict=True)
    ]).sorted()
    assert recoded.event_types != one.event_types
    want = window_aggregates(one, type_names=model.type_names_)
    got = window_aggregates(recoded, type_names=model.type_names_)
    cols = [COL[f"type_frac_{k}"] for k in range(4)]
    np.testing.assert_allclose(got[:, cols], want[:, cols])


def test_rate_rule_ranks_a_burst_above_a_slow_user() -> None:
    recs = [{"user_id": user, "event_type": "pv", "timestamp": T0 + gap_ms * k}
            for user, gap_ms in (("burst", 1_000), ("slow", 300_000)) for k in range(30)]
    ev = Events.from_records(recs).sorted()
    s = RateRule().fit(ev).score(ev)
    burst, slow = s[ev.user_id_strings() == "burst"], s[ev.user_id_strings() == "slow"]
    assert np.all(np.diff(burst) > 0)  # more events in the last minute, then in 10 min
    assert burst[5:].min() > slow.max()
    assert np.all((s > 0) & (s < 1))
    with pytest.raises(ValueError, match="sorted"):
        RateRule().score(ev.take(np.arange(len(ev))[::-1]))


# -- per-user rules ------------------------------------------------------------------------


def _rule_events(**extra: list) -> Events:
    rows = [  # user, seconds after T0, category, item
        ("a", 0, "c1", "i1"), ("a", 100, "c2", "i1"), ("a", 300, "c1", "i2"),  # 0..300 s: 3 (ends included)
        ("a", 301, None, "i3"), ("a", 1000, "c3", "i3"),
        ("b", 50, "c1", "i9"),
        ("c", 0, "c1", "i1"), ("c", 301, "c1", "i1"), ("c", 602, "c2", None),  # always > 300 s apart
        ("d", 7, None, None), ("d", 7, None, None),  # same second
    ]
    records = [{"user_id": u, "event_type": "view", "timestamp": T0 + 1000 * t, "category_id": c,
                "item_id": i} for u, t, c, i in rows]
    for name, values in extra.items():
        for r, v in zip(records, values, strict=True):
            r[name] = v
    ev = Events.from_records(records[::-1])  # any row order
    return ev.take(np.argsort(ev.user_id_strings(), kind="stable"))


def test_max_events_within_5_minutes_by_hand() -> None:
    ev = _rule_events()
    assert ev.user_ids.tolist() == ["a", "b", "c", "d"]
    # a: 0,100,300 (3) and 100,300,301 (3); c: never two within 300 s; d: two at once.
    assert max_events_within(ev).tolist() == [3, 1, 1, 2]
    assert max_events_within(ev, 301).tolist() == [4, 1, 2, 2]  # a: 0..301
    assert max_events_within(ev, 0).tolist() == [1, 1, 1, 2]
    none = ev.take(np.zeros(len(ev), bool))
    assert max_events_within(none).tolist() == [0, 0, 0, 0]  # dictionary kept, no events


def test_distinct_categories_and_items_by_hand() -> None:
    ev = _rule_events()
    scores = user_rule_scores(ev)
    assert list(scores) == ["user_events", "max_events_5min", "distinct_categories"]
    assert scores["user_events"].tolist() == [5, 1, 3, 2]
    assert scores["max_events_5min"].tolist() == [3, 1, 1, 2]
    assert scores["distinct_categories"].tolist() == [3, 1, 2, 0]  # a missing category is no category
    no_category = ev.with_columns(category_id=None)
    assert "distinct_categories" not in user_rule_scores(no_category)
    assert user_rule_scores(no_category)["distinct_items"].tolist() == [3, 1, 1, 0]
    assert list(user_rule_scores(no_category.with_columns(item_id=None))) == ["user_events", "max_events_5min"]
    users = np.array([1, 1, 1, 0])
    assert distinct_per_user(np.array([4, 4, 0, 0], np.uint64), users, 3).tolist() == [0, 1, 0]
