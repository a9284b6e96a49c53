"""Scenario injection on the real Taobao sample and on generated REES46-like and
arbitrary-vocabulary logs."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from app.core.events import Events, hash_strings
from model_export.scenarios import (
    LOOKALIKES,
    NEW_ACCOUNT_PREFIX,
    SCENARIOS,
    InjectConfig,
    inject,
    parse_inject,
    resolve_roles,
    user_labels,
)

TAOBAO = (Path(__file__).resolve().parents[1].parent / "shared" / "data"
          / "taobao_userbehavior" / "UserBehavior_head_84k.csv.gz")
CODE = {name: i + 1 for i, name in enumerate(SCENARIOS)}


@pytest.fixture(scope="module")
def taobao() -> Events:
    if not TAOBAO.exists():
        pytest.skip(f"{TAOBAO} not present")
    pd = pytest.importorskip("pandas")
    df = pd.read_csv(TAOBAO, header=None, dtype=str,
                     names=["user", "item", "category", "type", "ts"]).dropna()  # cut-off line
    users, user = np.unique(df["user"].to_numpy(object), return_inverse=True)
    types, etype = np.unique(df["type"].to_numpy(object), return_inverse=True)
    return Events(user=user.astype(np.int32), user_ids=users,
                  timestamp_ms=df["ts"].to_numpy(np.int64) * 1000,
                  event_type=etype.astype(np.int32), event_types=tuple(types),
                  item_id=hash_strings(df["item"]), category_id=hash_strings(df["category"]))


@pytest.fixture(scope="module")
def injected(taobao: Events) -> Events:
    return inject(taobao, SCENARIOS)


def rees_like(n_users: int = 80, seed: int = 1) -> Events:
    """A REES46-shaped log: view/cart/purchase, prices, sessions, second resolution."""
    rng = np.random.default_rng(seed)
    price = np.round(rng.lognormal(3.5, 1.0, 400), 2)
    records = []
    for u in range(n_users):
        t = 1_569_888_000 + rng.integers(0, 5 * 86_400)
        for k in range(int(rng.integers(12, 60))):
            t += int(rng.integers(1, 120) if rng.random() < 0.85 else rng.integers(3_600, 30_000))
            item = int(rng.integers(400))
            etype = rng.choice(["view", "cart", "purchase"], p=[0.85, 0.1, 0.05])
            records.append({"user_id": f"u{u}", "timestamp": int(t) * 1000, "item_id": f"i{item}",
                            "event_type": etype,
                            "category_id": f"c{item % 25}", "price": float(price[item]),
                            "session_id": f"s{u}-{k // 15}", "event_id": f"e{u}-{k}"})
    return Events.from_records(records)


def rows_of(ev: Events, name: str) -> dict[str, np.ndarray]:
    """Injected rows of one scenario, per user id, in time order."""
    out: dict[str, list[int]] = {}
    for i in np.flatnonzero(ev.scenario == CODE[name]):
        out.setdefault(str(ev.user_ids[ev.user[i]]), []).append(int(i))
    return {u: np.array(r) for u, r in out.items()}


def real_multiset(ev: Events, mask: np.ndarray | None = None) -> Counter:
    m = np.ones(len(ev), bool) if mask is None else mask
    cols = [ev.user_id_strings()[m], ev.timestamp_ms[m], ev.event_type_names()[m]]
    cols += [c[m] for c in (ev.item_id, ev.category_id, ev.price, ev.session_id) if c is not None]
    return Counter(zip(*(c.tolist() for c in cols), strict=True))


def gaps_s(ev: Events, rows: np.ndarray) -> np.ndarray:
    return np.diff(ev.timestamp_ms[rows]) / 1000.0


# -- labels, real events, order ------------------------------------------------------


def test_labels_mark_exactly_the_injected_events(taobao: Events, injected: Events) -> None:
    assert injected.scenarios == ("none", *SCENARIOS, *LOOKALIKES)
    assert injected.label.dtype == np.int8 and injected.scenario.dtype == np.int8
    new = np.char.startswith(injected.user_id_strings().astype(str), "sg-inj-")
    first = np.append(True, injected.user[1:] != injected.user[:-1])
    attack = np.isin(injected.scenario, [CODE[n] for n in SCENARIOS])
    # Injected rows carry their scenario; all are labelled but a new account's first event
    # and a brushing account's events up to its first purchase.
    brush = injected.scenario == CODE["order_brushing"]
    before_second_buy = np.zeros(len(injected), bool)
    for rows in rows_of(injected, "order_brushing").values():
        buys = np.cumsum(injected.event_type_names()[rows] == "buy")
        before_second_buy[rows[buys <= 1]] = True
    second = np.append(False, first[:-1] & ~first[1:])
    assert np.array_equal(injected.label == 1, attack & ~((first | second) & new) & ~(brush & before_second_buy))
    # every ring account with a second purchase past its first two events shows it
    for r in rows_of(injected, "order_brushing").values():
        buys = np.cumsum(injected.event_type_names()[r] == "buy")
        assert injected.label[r].any() == bool(((buys >= 2) & (np.arange(len(r)) >= 2)).any())
    assert not injected.label[~attack].any(), "look-alikes are normal"
    assert (injected.scenario == 0).sum() == len(taobao)
    assert injected.label[new & attack & ~first & ~second & ~brush].all()
    assert not injected.label[new & (first | second)].any()
    assert not set(taobao.user_ids) & {u for u in injected.user_ids if u.startswith("sg-inj-")}


def test_real_events_unchanged(taobao: Events, injected: Events) -> None:
    assert real_multiset(injected, injected.scenario == 0) == real_multiset(taobao)


def test_sorted_by_user_then_time(injected: Events) -> None:
    u, t = injected.user, injected.timestamp_ms
    assert np.all(np.diff(u) >= 0)
    assert np.all((np.diff(t) >= 0) | (np.diff(u) > 0))


def test_injected_times_follow_the_log(taobao: Events, injected: Events) -> None:
    t = injected.timestamp_ms[injected.scenario != 0]
    assert t.min() >= taobao.timestamp_ms.min() and t.max() <= taobao.timestamp_ms.max()
    assert not np.any(t % 1000)  # Taobao logs whole seconds; so do the injected events


def test_default_amounts(taobao: Events, injected: Events) -> None:
    k = round(0.03 * taobao.n_users)
    for name in SCENARIOS:
        assert len(rows_of(injected, name)) == k, name
    assert 0.02 < injected.label.mean() < 0.12
    # accounts whose evidence starts after their last event (a 2-event brushing account)
    # carry no label; all others do
    assert len(SCENARIOS) * k - 3 <= user_labels(injected).sum() <= len(SCENARIOS) * k


def test_fast_enough(taobao: Events) -> None:
    start = time.perf_counter()
    inject(taobao, SCENARIOS, InjectConfig(seed=5))
    assert time.perf_counter() - start < 5.0  # ~0.2 s on a laptop


# -- each scenario's character ---------------------------------------------------------


def test_scraping_bot(injected: Events) -> None:
    names = injected.event_type_names()
    hours = set()
    for uid, r in rows_of(injected, "scraping_bot").items():
        assert uid.startswith("sg-inj-scraping_bot-")
        assert 80 <= len(r) <= 400 and set(names[r]) == {"pv"}
        assert np.unique(injected.item_id[r]).size == len(r)  # every item distinct
        assert np.unique(injected.category_id[r]).size >= 20
        assert np.median(gaps_s(injected, r)) <= 3.0 and gaps_s(injected, r).max() <= 15.0
        hours.add(int(injected.timestamp_ms[r[0]] // 3_600_000 % 24))
    assert len(hours) >= 10  # round the clock


def test_click_farming(injected: Events) -> None:
    names = injected.event_type_names()
    for r in rows_of(injected, "click_farming").values():
        items, counts = np.unique(injected.item_id[r], return_counts=True)
        assert 2 <= items.size <= 5 and counts.max() >= 2 and len(r) >= 8
        assert set(names[r]) <= {"pv", "fav"}
        g = gaps_s(injected, r)
        assert np.all((g <= 20) | (g >= 20 * 60))  # quick clicks within, breaks between sessions


def test_order_brushing(injected: Events) -> None:
    names = injected.event_type_names()
    for r in rows_of(injected, "order_brushing").values():
        buys = r[names[r] == "buy"]
        assert len(buys) >= 2 and set(names[r]) <= {"pv", "buy"}
        assert np.ptp(injected.timestamp_ms[buys]) <= 5 * 240_000  # within minutes
        assert np.unique(injected.item_id[r]).size <= 3
        assert set(injected.item_id[r]) == set(injected.item_id[buys])  # views only of bought items


def test_account_takeover(injected: Events) -> None:
    names = injected.event_type_names()
    abroad = []
    for uid, attack in rows_of(injected, "account_takeover").items():
        assert not uid.startswith("sg-inj-")
        r = np.flatnonzero(injected.user == np.flatnonzero(injected.user_ids == uid)[0])
        lab, dev, cty = injected.label[r], injected.device_id[r], injected.country[r]
        first = int(np.argmax(lab))
        assert first >= 8 and lab[first:].sum() == len(attack)
        home = dev[0]
        assert home != 0 and np.all(dev[lab == 0] == home) and np.unique(cty[lab == 0]).size == 1
        assert np.all(dev[lab == 1] == dev[first]) and dev[first] != home  # a new device
        assert {"cart", "buy"} <= set(names[attack])
        own = injected.category_id[r[lab == 0]]
        assert not np.isin(injected.category_id[attack], own).any()  # never-used categories
        assert gaps_s(injected, attack).max() <= 40.0  # rapid
        abroad.append(injected.country[attack[0]] != cty[0])
    assert 0.4 < np.mean(abroad) < 1.0  # mostly from another country, sometimes a local proxy


def test_decoys_have_benign_switches(taobao: Events, injected: Events) -> None:
    has_device = np.zeros(injected.n_users, bool)
    has_device[injected.user[injected.device_id != 0]] = True
    bad = user_labels(injected).astype(bool)
    decoys = np.flatnonzero(has_device & ~bad)
    victims = np.flatnonzero(has_device & bad)
    assert len(decoys) == len(victims) == len(rows_of(injected, "account_takeover"))
    for u in decoys:
        r = np.flatnonzero(injected.user == u)
        assert injected.label[r].sum() == 0 and np.all(injected.device_id[r] != 0)
        changes = ((np.diff(injected.device_id[r]) != 0) | (np.diff(injected.country[r]) != 0))
        assert changes.sum() == 1 and 8 <= np.argmax(changes) + 1 <= len(r) - 2
    others = ~has_device[injected.user]
    assert np.all(injected.country[others] == 0)  # untouched rows: missing, not invented


def test_cart_stuffing(injected: Events) -> None:
    names = injected.event_type_names()
    bursts = rows_of(injected, "cart_stuffing")
    for r in bursts.values():
        assert 20 <= len(r) <= 120 and set(names[r]) == {"cart"}
        assert np.unique(injected.item_id[r]).size <= 40 and gaps_s(injected, r).max() <= 10.0
    hosts = [u for u in bursts if not u.startswith("sg-inj-")]
    assert 0 < len(hosts) < len(bursts)  # some inside real users, some new accounts


# -- determinism and selection ---------------------------------------------------------


def same(a: Events, b: Events) -> bool:
    cols = ("user", "timestamp_ms", "event_type", "item_id", "label", "scenario", "device_id")
    return len(a) == len(b) and all(np.array_equal(getattr(a, c), getattr(b, c)) for c in cols)


def test_deterministic_for_a_seed(taobao: Events, injected: Events) -> None:
    assert same(inject(taobao, list(reversed(SCENARIOS)), InjectConfig(seed=0)), injected)
    assert not same(inject(taobao, SCENARIOS, InjectConfig(seed=1)), injected)


def test_one_scenario_alone(taobao: Events, injected: Events) -> None:
    alone = inject(taobao, ["scraping_bot"])
    assert set(np.unique(alone.scenario)) == {0, CODE["scraping_bot"], alone.scenarios.index("scraping_bot_lookalike")}
    assert alone.device_id is None and alone.country is None
    for code in (CODE["scraping_bot"], injected.scenarios.index("scraping_bot_lookalike")):
        assert real_multiset(alone, alone.scenario == code) == real_multiset(
            injected, injected.scenario == code)  # its own random stream
    nothing = inject(taobao, [])
    assert len(nothing) == len(taobao) and not nothing.label.any()
    assert nothing.scenarios == ("none", *SCENARIOS, *LOOKALIKES)


def test_parse_inject() -> None:
    assert parse_inject("all") == list(SCENARIOS)
    assert parse_inject("none") == []
    assert parse_inject(" cart_stuffing,scraping-bot ") == ["cart_stuffing", "scraping_bot"]
    with pytest.raises(ValueError, match=r"unknown scenario\(s\): phishing; valid: all, none, "):
        parse_inject("scraping_bot,phishing")
    with pytest.raises(ValueError, match="phishing"):
        inject(rees_like(5), ["phishing"])


@pytest.mark.parametrize(("vocab", "expected"), [
    (["pv", "cart", "fav", "buy"], ("pv", "cart", "fav", "buy")),
    (["view", "cart", "remove_from_cart", "purchase"], ("view", "cart", "view", "purchase")),
    (["view", "addtocart", "transaction"], ("view", "addtocart", "view", "transaction")),
    (["page_view", "login", "add_to_wishlist", "add_to_cart", "order_completed"],
     ("page_view", "add_to_cart", "add_to_wishlist", "order_completed")),
    (["alpha", "beta", "gamma"], ("alpha",) * 4),
])
def test_resolve_roles(vocab: list[str], expected: tuple[str, ...]) -> None:
    roles = resolve_roles(vocab)
    assert tuple(roles[r] for r in ("view", "cart", "fav", "purchase")) == expected


def test_resolve_roles_counts_event_streams() -> None:
    assert resolve_roles(["b", "a", "a", "c", "a"])["view"] == "a"


# -- other vocabularies and inputs -----------------------------------------------------


def test_rees46_like_log_with_prices_and_sessions() -> None:
    ev = rees_like()
    before = {n: getattr(ev, n).copy() for n in ("timestamp_ms", "price", "session_id", "user")}
    out = inject(ev, SCENARIOS, InjectConfig(user_fraction=0.05))
    assert all(np.array_equal(getattr(ev, n), v) for n, v in before.items())  # input untouched
    assert ev.label is None and ev.device_id is None
    assert real_multiset(out, out.scenario == 0) == real_multiset(ev)
    inj = out.scenario != 0
    assert set(np.unique(out.scenario[inj])) == set(range(1, len(out.scenarios)))  # every attack and look-alike
    assert np.isfinite(out.price[inj]).all() and np.all(out.session_id[inj] != 0)
    assert all(e is None for e in out.event_id[inj]) and all(e for e in out.event_id[~inj])
    buys = out.scenario == CODE["order_brushing"]
    assert out.price[buys].max() <= np.quantile(np.unique(ev.price), 0.3)  # cheap items
    assert "purchase" in set(out.event_type_names()[buys])
    for uid, r in rows_of(out, "cart_stuffing").items():  # bursts ride the host's session
        if not uid.startswith("sg-inj-"):
            host = (out.user == out.user[r[0]]) & (out.scenario == 0)
            assert out.session_id[r[0]] in set(out.session_id[host])


def test_arbitrary_vocabulary_without_items() -> None:
    rng = np.random.default_rng(3)
    records = [{"user_id": f"u{u}", "event_type": str(rng.choice(["alpha", "beta", "gamma"])),
                "timestamp": 1_700_000_000_000 + u * 1_000_003 + k * int(rng.integers(1, 10**6))}
               for u in range(40) for k in range(int(rng.integers(10, 30)))]
    ev = Events.from_records(records)
    out = inject(ev, SCENARIOS)
    assert out.item_id is None and out.category_id is None and out.price is None
    assert set(np.unique(out.scenario)) == set(range(len(out.scenarios)))
    assert real_multiset(out, out.scenario == 0) == real_multiset(ev)
    alpha = out.event_types.index("alpha")
    assert np.all(out.event_type[out.scenario != 0] == alpha)


def test_log_with_devices_gets_no_decoys() -> None:
    ev = rees_like(60)
    rng = np.random.default_rng(0)
    device = hash_strings([f"d{u}-{rng.integers(2)}" for u in ev.user])
    country = hash_strings(["PL" if u % 3 else "DE" for u in ev.user])
    out = inject(ev.with_columns(device_id=device, country=country), SCENARIOS)
    real = out.scenario == 0
    assert real_multiset(out, real) == real_multiset(ev)
    key = Counter(zip(out.user_id_strings()[real], out.timestamp_ms[real], out.device_id[real],
                      out.country[real], strict=True))
    assert key == Counter(zip(ev.user_id_strings(), ev.timestamp_ms, device, country, strict=True))
    attack = out.scenario == CODE["account_takeover"]
    assert attack.any() and not np.isin(out.device_id[attack], device).any()
    assert np.all(out.device_id[out.scenario != 0] != 0)  # new accounts bring their own device


def test_event_cap_keeps_short_logs_from_being_swamped() -> None:
    ev = rees_like(40)
    out = inject(ev, ["scraping_bot"], InjectConfig(user_fraction=0.5, max_event_share=0.01))
    assert len(rows_of(out, "scraping_bot")) == 1  # at least one account, whole


def test_existing_labels_are_kept() -> None:
    ev = rees_like(20)
    label = (np.arange(len(ev)) % 7 == 0).astype(np.int8)
    out = inject(ev.with_columns(label=label), ["cart_stuffing"])
    assert real_multiset(out, (out.scenario == 0) & (out.label == 1)) == real_multiset(
        ev, label == 1)
    assert user_labels(out).shape == (out.n_users,)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="user_fraction"):
        InjectConfig(user_fraction=1.5)
    with pytest.raises(ValueError, match="bot_events"):
        InjectConfig(bot_events=(400, 80))
    with pytest.raises(ValueError, match="ato_buy_p"):
        InjectConfig(ato_buy_p=2.0)


# -- look-alikes and length-matched evaluation ----------------------------------------


def test_every_scenario_has_normal_lookalikes(taobao: Events, injected: Events) -> None:
    """Each scenario's decoys are labelled normal and share the trait a shortcut would
    read: new accounts buying within minutes, repeat views, carting sprees."""
    names = injected.event_type_names()
    ids = injected.user_id_strings().astype(str)
    for name in SCENARIOS:
        rows = injected.scenario == injected.scenarios.index(f"{name}_lookalike")
        assert rows.sum() >= 10, name
        assert not injected.label[rows].any(), name
    brush = injected.scenario == injected.scenarios.index("order_brushing_lookalike")
    new_buyers = {u for u, t in zip(ids[brush], names[brush], strict=True) if t == "buy" and u.startswith("sg-inj-")}
    assert new_buyers, "new accounts that buy within minutes of arriving are ordinary shoppers too"
    carts = injected.scenario == injected.scenarios.index("cart_stuffing_lookalike")
    assert (names[carts] == "cart").mean() > 0.5
    # real rows are untouched by the decoys
    assert real_multiset(injected, injected.scenario == 0) == real_multiset(taobao)


def test_no_lookalikes_when_asked(taobao: Events) -> None:
    out = inject(taobao, ["scraping_bot"], InjectConfig(decoy_ratio=0.0))
    assert not np.isin(out.scenario, [out.scenarios.index(n) for n in LOOKALIKES]).any()


def test_matched_lengths_take_account_lengths_from_real_users(taobao: Events) -> None:
    """With match_lengths, an injected account is as long as a real user with a complete
    history: its number of events tells nothing."""
    out = inject(taobao, ["scraping_bot", "cart_stuffing"], InjectConfig(match_lengths=True, seed=5))
    plain = inject(taobao, ["scraping_bot", "cart_stuffing"], InjectConfig(seed=5))
    ids = out.user_id_strings().astype(str)
    attack = np.isin(out.scenario, [CODE["scraping_bot"], CODE["cart_stuffing"]])
    new = np.char.startswith(ids, NEW_ACCOUNT_PREFIX) & attack
    lengths = np.bincount(out.user[new])[np.unique(out.user[new])]
    real = np.bincount(taobao.user)
    assert lengths.min() >= 3
    assert np.median(lengths) < np.median(real[real >= 3]) * 1.5
    plain_new = np.char.startswith(plain.user_id_strings().astype(str), NEW_ACCOUNT_PREFIX) & (plain.scenario == 1)
    assert np.median(np.bincount(plain.user[plain_new])[np.unique(plain.user[plain_new])]) > np.median(lengths)


def test_purchase_runs_are_real_shoppers_runs_at_brushing_pace(taobao: Events) -> None:
    """Brushing look-alikes include real shoppers' own runs up to a purchase (repeat views of
    one item, purchases of items never viewed, several purchases in one second, as the log
    has them), so the supervised head cannot read such a run at brushing pace as a ring."""
    from model_export.scenarios import BUY, _Ctx

    ctx = _Ctx(taobao, InjectConfig())
    rng = np.random.default_rng(0)
    kinds = Counter()
    for _ in range(300):
        role, rows, gaps = ctx.purchase_run(rng)
        assert len(role) == len(rows) == len(gaps) + 1 >= 1
        assert np.unique(taobao.user[rows]).size == 1  # one real user's events...
        assert np.all(np.diff(taobao.timestamp_ms[rows]) >= 0)  # ...in their order
        assert role[-1] == BUY and np.array_equal(role, ctx.role_of[taobao.event_type[rows]])
        real = np.diff(taobao.timestamp_ms[rows]) / 1e3
        assert np.all(gaps <= np.minimum(real, 60.0) + 1e-9)  # at most the real gap, at most a minute
        assert taobao.timestamp_ms[rows[-1]] - taobao.timestamp_ms[rows[0]] <= 3_600_000
        viewed = taobao.item_id[rows][role != BUY]
        kinds["bought unseen"] += not np.isin(taobao.item_id[rows[-1]], viewed)
        kinds["repeat views"] += len(viewed) > np.unique(viewed).size
        kinds["several purchases"] += (role == BUY).sum() > 1
    assert all(kinds[k] > 0 for k in ("bought unseen", "repeat views", "several purchases")), kinds
