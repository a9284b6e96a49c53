"""Labelled injection of realistic e-commerce abuse into real event logs.

:func:`inject` adds five kinds of abuse to a real log, for training and evaluating the
sequence detector. Every scenario is randomised within the ranges of :class:`InjectConfig`
and reuses the log's own item/category hashes, prices, time range and timestamp
resolution, so the detector has to learn behaviour, not artefacts of the injection.

scraping_bot
    A new account crawling the catalogue: 80–400 item views at machine pace (a per-bot
    mean gap of 0.3–3 s, jittered), every item distinct and spread over many categories,
    never a cart or a purchase, starting at any hour of day or night.
click_farming
    Campaigns inflating a few real items' popularity: 3–8 farm accounts per campaign,
    active around the same time, each run 1–3 short sessions of 8–30 views and
    favourites of the campaign's 2–5 target items, 2–20 s apart.
order_brushing
    Fake orders boosting a shop's sales rank: rings of 3–8 new accounts each buy the
    shop's 1–3 items 2–6 times, 20 s–4 min apart, mostly without browsing (a bare buy,
    or a view a few seconds before it). With prices, the items are cheap ones (bottom
    quartile) of one category, so the order values are low with a tiny spread.
account_takeover
    Inside real users: after a session break, an attacker on a new device (and, 80% of
    the time, from another country) quickly carts and buys 2–8 items from categories
    the victim never used (pricier ones where prices exist). The victim's own events
    stay label 0. Where the log lacks device/country columns, victims get a stable home
    device/country on their history, and as many decoy users get a benign switch (new
    phone, travel, or travel with a new phone) with their normal behaviour continuing,
    all label 0, so "has a device" or "device changed" alone is no shortcut.
cart_stuffing
    Inventory hoarding: 20–120 add-to-carts 0.5–10 s apart over a pool of 5–40 popular
    items, never a purchase; half as new accounts, half as a burst inside a real user
    (on the device and session of the real event it follows).

Each chosen scenario also gets look-alike decoys, labelled normal (label 0, scenario
``<name>_lookalike``):
what real shoppers do that resembles it (browsing sprees at human pace, repeat views of
one item and favourite sprees, quick view → cart → purchase funnels, real shoppers' own
runs of events up to a purchase replayed at brushing pace, checkout bursts of
several purchases and purchases followed by browsing, new interests after a break,
carting sprees), half as new accounts and half inside real
users, so that no event type, short history or single trait is evidence by itself.

For evaluation, ``InjectConfig.match_lengths`` cuts every new account to a history
length drawn from the real users with at least 3 events, so that an account's number of
events, which a counter could read, says nothing about it.

Injected rows get label 1 and their scenario's code, except the first two events of a
new account, which are labelled 0 (nothing about a new shopper's first view and a
favourite 20 s later, or two quick views, tells them from an attack's), and a brushing
account's events up to its first purchase (a quick view and buy is what new shoppers do;
the ring shows itself from the second purchase); real rows keep their label (0 if none)
and scenario 0. New accounts are named
``sg-inj-<scenario>-<n>``, have no event id, and get a device/country/session only where
the log has those columns. Injected times are floored to the log's resolution (whole
seconds for Taobao and REES46), as its logger would have recorded them.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import numpy as np

from app.core.events import Events, hash_strings

#: User ids of injected new accounts start with this.
NEW_ACCOUNT_PREFIX = "sg-inj-"
SCENARIOS: tuple[str, ...] = (
    "scraping_bot", "click_farming", "order_brushing", "account_takeover", "cart_stuffing",
)
#: Scenario codes of look-alike decoys (label 0): ``<scenario>_lookalike``.
LOOKALIKES: tuple[str, ...] = tuple(f"{s}_lookalike" for s in SCENARIOS)
ALL_SCENARIOS: tuple[str, ...] = ("none", *SCENARIOS, *LOOKALIKES)  # Events.scenarios of every result
ROLES = ("view", "cart", "fav", "purchase")
VIEW, CART, FAV, BUY = range(4)
_COUNTRIES = ("CN", "US", "GB", "DE", "FR", "IN", "BR", "JP", "RU", "NG", "VN", "ID")
_BREAK_MS = 30 * 60_000  # takeovers and benign device switches start after such a pause
_HOUR_MS = 3_600_000.0


@dataclass(frozen=True)
class InjectConfig:
    """Amounts and parameter ranges; ``(low, high)`` ranges are inclusive.

    ``user_fraction`` is, per scenario, the number of new accounts (or real users touched:
    takeover victims, and as many decoys; cart-stuffing hosts) relative to the real users,
    up to ``max_event_share`` of the real events (account takeover is never capped).
    """

    user_fraction: float = 0.03
    seed: int = 0
    max_event_share: float = 0.08  # per scenario, of the real events; drops accounts beyond it
    bot_events: tuple[int, int] = (80, 400)  # log-uniform run length
    bot_gap_s: tuple[float, float] = (0.3, 3.0)  # per-bot mean gap, jittered ×lognormal(0, 0.3)
    farm_targets: tuple[int, int] = (2, 5)  # target items per campaign
    farm_accounts: tuple[int, int] = (3, 8)  # accounts per campaign
    farm_sessions: tuple[int, int] = (1, 3)  # sessions per account, 20 min–4 h apart
    farm_session_events: tuple[int, int] = (8, 30)
    farm_gap_s: tuple[float, float] = (2.0, 20.0)
    farm_fav_share: float = 0.25
    brush_items: tuple[int, int] = (1, 3)  # items of the brushed shop
    brush_accounts: tuple[int, int] = (3, 8)  # accounts per ring, all within 2 h
    brush_purchases: tuple[int, int] = (2, 6)  # purchases per account
    brush_gap_s: tuple[float, float] = (20.0, 240.0)  # between an account's purchases
    brush_view_p: float = 0.4  # a purchase is preceded by a view 3–30 s earlier
    brush_price_quantile: float = 0.25  # brushed items are priced below this quantile
    ato_min_history: int = 8  # victim events before the takeover
    ato_items: tuple[int, int] = (2, 8)  # items carted by the attacker
    ato_gap_s: tuple[float, float] = (2.0, 40.0)
    ato_buy_p: float = 0.7  # each carted item is bought (at least one is)
    ato_country_change_p: float = 0.8
    ato_decoys: bool = True  # benign switches, where device/country columns are synthesised
    cart_events: tuple[int, int] = (20, 120)  # log-uniform burst length
    cart_gap_s: tuple[float, float] = (0.5, 10.0)
    cart_pool: tuple[int, int] = (5, 40)  # popular items the carts cycle over
    cart_real_user_share: float = 0.5  # bursts inside real users rather than new accounts
    decoy_ratio: float = 1.0  # normal look-alikes per scenario, relative to its actors (0 = none)
    match_lengths: bool = False  # cut new accounts to history lengths of real users (evaluation)
    match_min_events: int = 3  # ...drawn from the real users with at least this many events

    def __post_init__(self) -> None:
        if not 0.0 <= self.user_fraction <= 1.0 or self.seed < 0:
            raise ValueError("user_fraction must be in [0, 1] and seed >= 0")
        for f in fields(self):
            v = getattr(self, f.name)
            counts = isinstance(v, tuple) and isinstance(v[0], int)
            if isinstance(v, tuple) and not (int(counts) <= v[0] <= v[1]):
                raise ValueError(f"{f.name} must be a range (low, high), 0 <= low <= high, "
                                 f"low >= 1 for counts; got {v}")
            if f.name.endswith(("_p", "_share", "_quantile")) and not 0.0 <= v <= 1.0:
                raise ValueError(f"{f.name} must be in [0, 1], got {v}")


def parse_inject(spec: str) -> list[str]:
    """Scenario names from ``"all"``, ``"none"`` or ``"name,name,..."``.

    >>> parse_inject("cart_stuffing, scraping_bot")
    ['cart_stuffing', 'scraping_bot']
    """
    s = spec.strip().lower().replace("-", "_")
    if s in ("", "none"):
        return []
    if s == "all":
        return list(SCENARIOS)
    return _check(list(dict.fromkeys(p.strip() for p in s.split(",") if p.strip())))


def _check(names: Sequence[str]) -> list[str]:
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s): {', '.join(map(str, unknown))}; "
                         f"valid: all, none, {', '.join(SCENARIOS)}")
    return list(names)


_STEMS = {  # most specific role first: "view_cart" is a cart event, "order_viewed" a purchase
    "purchase": ("buy", "purchas", "transact", "order", "checkout", "paid", "payment"),
    "cart": ("cart", "basket"),
    "fav": ("fav", "wish", "like", "bookmark", "save"),
    "view": ("view", "pv", "visit", "click", "detail", "impression", "browse"),
}
_UNDO = ("remove", "delete", "cancel", "refund", "return", "clear")


def resolve_roles(event_types: Sequence[str]) -> dict[str, str]:
    """Map the roles view/cart/fav/purchase to a vocabulary's own event type names.

    ``event_types`` is the vocabulary most frequent first, or every event's type (counted
    here). Roles are found by stem, most frequent type first (``pv``, ``product_view``;
    ``addtocart``; ``fav``, ``wishlist``; ``buy``, ``transaction``, ``order_completed``;
    never ``remove_from_cart``); else ``view`` is the most frequent unclaimed type and
    the other roles fall back to the view type.

    >>> resolve_roles(["view", "addtocart", "transaction"])["purchase"]
    'transaction'
    """
    counts = Counter(map(str, event_types))
    if not counts:
        raise ValueError("no event types")
    names = sorted(counts, key=lambda t: -counts[t])  # stable: ties keep first appearance
    norm = {t: re.sub(r"[^a-z0-9]", "", t.lower()) for t in names}
    roles: dict[str, str] = {}
    for role, stems in _STEMS.items():
        hit = [t for t in names if t not in roles.values() and any(s in norm[t] for s in stems)
               and not any(u in norm[t] for u in _UNDO)]
        if hit:
            roles[role] = hit[0]
    if "view" not in roles:
        free = [t for t in names if t not in roles.values()]
        roles["view"] = free[0] if free else names[0]
    return {r: roles.get(r, roles["view"]) for r in ROLES}


def user_labels(events: Events) -> np.ndarray:
    """(U,) int8: 1 where any event of the user is labelled anomalous."""
    out = np.zeros(events.n_users, np.int8)
    if events.label is not None:
        out[np.unique(events.user[events.label != 0])] = 1
    return out


class _Piece(NamedTuple):
    """One account's or one burst's injected events; scalar columns broadcast."""

    user: str
    ts: np.ndarray  # (n,) float epoch ms
    role: np.ndarray  # (n,) int index into ROLES
    src: np.ndarray  # (n,) real row whose item, category and price the event reuses
    device: Any = 0
    country: Any = 0
    session: Any = 0


class _Ctx:
    """What scenarios draw from: the real log's catalogue, times, users and columns."""

    def __init__(self, ev: Events, cfg: InjectConfig) -> None:
        self.ev, self.cfg = ev, cfg
        self.k = round(cfg.user_fraction * np.unique(ev.user).size)
        if cfg.user_fraction > 0:
            self.k = max(1, self.k)
        ts = ev.timestamp_ms
        self.lo, self.hi = float(np.quantile(ts, 0.001)), float(ts.max())
        self.resolution = 1 if np.any(ts % 1000) else 1000
        counts = np.bincount(ev.event_type, minlength=len(ev.event_types))
        roles = resolve_roles([ev.event_types[i] for i in np.argsort(-counts, kind="stable")])
        self.role_type = np.array([ev.event_types.index(roles[r]) for r in ROLES], np.int32)
        item = ev.item_id  # popular: a row per event (weighted); catalog: a row per item
        self.popular = self.catalog = np.arange(len(ev))
        if item is not None and item.any():
            self.popular = np.flatnonzero(item)
            self.catalog = self.popular[np.unique(item[self.popular], return_index=True)[1]]
        self.cheap = self.pricey = self.catalog
        if ev.price is not None and np.isfinite(ev.price[self.catalog]).any():
            p = ev.price[self.catalog]
            q_lo, q_mid = np.nanquantile(p, [cfg.brush_price_quantile, 0.5])
            self.cheap, self.pricey = self.catalog[p <= q_lo], self.catalog[p >= q_mid]
        self.order = ev.order()
        self.bounds = np.searchsorted(ev.user[self.order], np.arange(ev.n_users + 1))
        self.taken = np.zeros(ev.n_users, bool)
        self.countries = hash_strings(_COUNTRIES)
        if ev.country is not None:  # the log's own countries, plus ours if it has only one
            known = np.unique(ev.country[ev.country != 0])
            self.countries = known if known.size > 1 else np.union1d(known, self.countries)
        self.real_ids = set(ev.user_ids.tolist())
        buy = self.role_type[BUY]
        self.buy_rows = np.flatnonzero(ev.event_type == buy) if buy != self.role_type[VIEW] else np.zeros(0, np.int64)
        self.role_of = np.full(len(ev.event_types), -1, np.int64)
        for role in (VIEW, FAV, CART, BUY):  # a type that is two roles (a fallback) is the more specific one
            self.role_of[self.role_type[role]] = role

    def rows(self, u: int) -> np.ndarray:
        """Rows of real user ``u``, in time order."""
        return self.order[self.bounds[u]:self.bounds[u + 1]]

    def pick_users(self, rng: np.random.Generator, min_events: int) -> np.ndarray:
        """Untouched real users with at least ``min_events`` events, in random order."""
        ok = ~self.taken & (np.diff(self.bounds) >= min_events)
        return rng.permutation(np.flatnonzero(ok))

    def actor_ids(self, name: str, k: int) -> list[str]:
        ids = (f"{NEW_ACCOUNT_PREFIX}{name}-{n}" for n in itertools.count())
        return list(itertools.islice((u for u in ids if u not in self.real_ids), k))

    def hash(self, tag: str) -> np.uint64:
        return hash_strings([f"sg-{self.cfg.seed}-{tag}"])[0]

    def real_time(self, rng: np.random.Generator) -> float:
        """A start time following the log's own (diurnal) distribution."""
        return float(self.ev.timestamp_ms[rng.integers(len(self.ev))])

    def fit(self, ts: np.ndarray) -> np.ndarray:
        """Shift a block of times into the log's time range."""
        ts = ts - max(0.0, ts.max() - self.hi)
        return ts + max(0.0, self.lo - ts.min())

    def actor_columns(self, rng: np.random.Generator, uid: str, sizes: Sequence[int]) -> tuple:
        """Device, country and per-session ids of a new account, where the log has them."""
        ev = self.ev
        dev = self.hash(f"dev-{uid}") if ev.device_id is not None else 0
        country = rng.choice(self.countries) if ev.country is not None else 0
        sess: Any = 0
        if ev.session_id is not None:
            sess = np.repeat([self.hash(f"sess-{uid}-{i}") for i in range(len(sizes))], sizes)
        return dev, country, sess

    def purchase_run(self, rng: np.random.Generator, before: int = 8, within_ms: float = _HOUR_MS) -> tuple:
        """A real purchase and up to ``before`` of its user's events in the hour before it,
        and any purchases of the same second after it (a checkout of several items): their
        roles and rows as they happened, each gap cut to at most 2–60 s (log-uniform).
        Repeat views of one item, purchases of items never viewed, several purchases at
        once: what real shoppers do before buying, at the pace of a brushing ring."""
        ev, r = self.ev, self.buy_rows[rng.integers(self.buy_rows.size)]
        rows = self.rows(int(ev.user[r]))
        i = int(np.flatnonzero(rows == r)[0])
        t = ev.timestamp_ms[rows].astype(np.float64)
        lo = i
        while lo > 0 and i - lo < before and t[i] - t[lo - 1] <= within_ms:
            lo -= 1
        hi = i + 1
        while hi < rows.size and t[hi] == t[i] and self.role_of[ev.event_type[rows[hi]]] == BUY:
            hi += 1
        run = rows[lo:hi][self.role_of[ev.event_type[rows[lo:hi]]] >= 0]
        gaps = np.diff(ev.timestamp_ms[run].astype(np.float64)) / 1e3
        cap = np.exp(rng.uniform(np.log(2.0), np.log(60.0), gaps.size))
        return self.role_of[ev.event_type[run]], run, np.minimum(gaps, cap)

    def shop_items(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` catalogue rows of one shop: a cheap item and cheap others of its category."""
        anchor = self.cheap[rng.integers(len(self.cheap))]
        cat = self.ev.category_id
        others = self.cheap[self.cheap != anchor]
        if cat is not None and (cat[others] == cat[anchor]).sum() >= n - 1:
            others = others[cat[others] == cat[anchor]]
        return np.append(anchor, rng.choice(others, min(n - 1, len(others)), replace=False))

    def foreign_items(self, rng: np.random.Generator, rows: np.ndarray, n: int) -> np.ndarray:
        """``n`` catalogue rows from categories (else items) a user never touched."""
        ev, pool = self.ev, self.pricey
        key = ev.category_id if ev.category_id is not None else ev.item_id
        if key is not None:
            fresh = pool[~np.isin(key[pool], key[rows])]
            pool = fresh if fresh.size else pool
        return rng.choice(pool, n, replace=n > pool.size)


def _int(rng: np.random.Generator, lo_hi: tuple[int, int]) -> int:
    return int(rng.integers(lo_hi[0], lo_hi[1] + 1))


def _log_int(rng: np.random.Generator, lo_hi: tuple[int, int]) -> int:
    return round(np.exp(rng.uniform(np.log(lo_hi[0]), np.log(lo_hi[1]))))


def _cum_ms(gaps_s: np.ndarray) -> np.ndarray:
    """Offsets (ms) of events separated by ``gaps_s``, the first at 0."""
    return np.concatenate([[0.0], np.cumsum(gaps_s)]) * 1000.0


def _scraping_bot(ctx: _Ctx, rng: np.random.Generator) -> list[_Piece]:
    """New accounts crawling the catalogue at machine pace, around the clock."""
    c, pieces = ctx.cfg, list[_Piece]()
    for uid in ctx.actor_ids("scraping_bot", ctx.k):
        n = min(_log_int(rng, c.bot_events), len(ctx.catalog))
        gaps = rng.uniform(*c.bot_gap_s) * rng.lognormal(0.0, 0.3, n - 1)
        ts = ctx.fit(rng.uniform(ctx.lo, ctx.hi) + _cum_ms(gaps))
        src = rng.choice(ctx.catalog, n, replace=False)
        pieces.append(_Piece(uid, ts, np.full(n, VIEW), src, *ctx.actor_columns(rng, uid, [n])))
    return pieces


def _click_farming(ctx: _Ctx, rng: np.random.Generator) -> list[_Piece]:
    """Farm accounts repeatedly viewing and favouriting a campaign's few target items."""
    c, pieces = ctx.cfg, list[_Piece]()
    ids = ctx.actor_ids("click_farming", ctx.k)
    while len(pieces) < len(ids):
        n_targets = min(_int(rng, c.farm_targets), len(ctx.catalog))
        targets = rng.choice(ctx.catalog, n_targets, replace=False)
        t0 = ctx.real_time(rng)
        for uid in ids[len(pieces):len(pieces) + _int(rng, c.farm_accounts)]:
            start, sessions = t0 + rng.uniform(0, 2 * _HOUR_MS), []
            for _ in range(_int(rng, c.farm_sessions)):
                gaps = rng.uniform(*c.farm_gap_s, _int(rng, c.farm_session_events) - 1)
                sessions.append(start + _cum_ms(gaps))
                start = sessions[-1][-1] + rng.uniform(_HOUR_MS / 3, 4 * _HOUR_MS)
            ts = ctx.fit(np.concatenate(sessions))
            role = np.where(rng.random(len(ts)) < c.farm_fav_share, FAV, VIEW)
            cols = ctx.actor_columns(rng, uid, [len(s) for s in sessions])
            pieces.append(_Piece(uid, ts, role, rng.choice(targets, len(ts)), *cols))
    return pieces


def _order_brushing(ctx: _Ctx, rng: np.random.Generator) -> list[_Piece]:
    """Rings of new accounts buying one shop's few cheap items within minutes."""
    c, pieces = ctx.cfg, list[_Piece]()
    ids = ctx.actor_ids("order_brushing", ctx.k)
    while len(pieces) < len(ids):
        items = ctx.shop_items(rng, _int(rng, c.brush_items))
        t0 = ctx.real_time(rng)
        for uid in ids[len(pieces):len(pieces) + _int(rng, c.brush_accounts)]:
            p = _int(rng, c.brush_purchases)
            buys = t0 + rng.uniform(0, 2 * _HOUR_MS) + _cum_ms(rng.uniform(*c.brush_gap_s, p - 1))
            bought = rng.choice(items, p)
            seen = rng.random(p) < c.brush_view_p
            ts = np.concatenate([buys, buys[seen] - rng.uniform(3e3, 30e3, seen.sum())])
            role = np.concatenate([np.full(p, BUY), np.full(seen.sum(), VIEW)])
            src = np.concatenate([bought, bought[seen]])
            cols = ctx.actor_columns(rng, uid, [len(ts)])
            pieces.append(_Piece(uid, ctx.fit(ts), role, src, *cols))
    return pieces


def _account_takeover(ctx: _Ctx, rng: np.random.Generator) -> tuple[list[_Piece], dict]:
    """Attackers carting and buying in new categories from a new device inside real users.

    Also returns the edits of real rows' device/country columns that the log lacks
    (victims' home values, decoys' benign switches): ``{column: (rows, values)}``.
    """
    c, ev, pieces = ctx.cfg, ctx.ev, list[_Piece]()
    synth = [col for col in ("device_id", "country") if getattr(ev, col) is None]
    edits: dict[str, tuple[list, list]] = {col: ([], []) for col in synth}
    for u in ctx.pick_users(rng, c.ato_min_history):
        if len(pieces) == ctx.k:
            break
        rows, uid = ctx.rows(u), str(ev.user_ids[u])
        t = ev.timestamp_ms[rows]
        n_items = _int(rng, c.ato_items)
        script = [(r, i) for i in range(n_items)
                  for r in ((VIEW, CART) if rng.random() < 0.5 else (CART,))]
        bought = [i for i in range(n_items) if rng.random() < c.ato_buy_p] or [n_items - 1]
        role, item = np.array(script + [(BUY, i) for i in bought]).T
        offsets = _cum_ms(rng.uniform(*c.ato_gap_s, len(role) - 1))
        room = np.append(np.diff(t), ctx.hi - t[-1]) - offsets[-1] - 2 * _BREAK_MS
        ok = np.flatnonzero(room[c.ato_min_history - 1:] >= 0) + c.ato_min_history - 1
        if not ok.size:
            continue
        j = int(rng.choice(ok))
        start = t[j] + _BREAK_MS + rng.uniform(0, min(room[j], 6 * _HOUR_MS))
        src = ctx.foreign_items(rng, rows, n_items)[item]
        home = {"device_id": ctx.hash(f"home-dev-{uid}"), "country": rng.choice(ctx.countries)}
        for col in synth:
            edits[col][0].append(rows)
            edits[col][1].append(np.full(len(rows), home[col]))
        here = home["country"] if ev.country is None else ev.country[rows[j]]
        away = ctx.countries[ctx.countries != here]
        country = rng.choice(away) if away.size and rng.random() < c.ato_country_change_p else here
        session = ctx.hash(f"ato-sess-{uid}") if ev.session_id is not None else 0
        device = ctx.hash(f"ato-dev-{uid}")
        pieces.append(_Piece(uid, start + offsets, role, src, device, country, session))
        ctx.taken[u] = True
    if synth and c.ato_decoys:
        _decoys(ctx, rng, len(pieces), synth, edits)
    return pieces, {k: (np.concatenate(r), np.concatenate(v)) for k, (r, v) in edits.items() if r}


def _decoys(ctx: _Ctx, rng: np.random.Generator, k: int, synth: list[str], edits: dict) -> None:
    """``k`` other real users get a home device/country and, at a session break, a
    benign switch (new phone, travel, or both); their behaviour and labels stay as they are."""
    ev, m = ctx.ev, ctx.cfg.ato_min_history
    for u in ctx.pick_users(rng, m + 2)[:k]:
        rows, uid = ctx.rows(u), str(ev.user_ids[u])
        breaks = np.flatnonzero(np.diff(ev.timestamp_ms[rows]) >= _BREAK_MS) + 1
        breaks = breaks[(breaks >= m) & (breaks <= len(rows) - 2)]
        j = int(rng.choice(breaks)) if breaks.size else max(m, len(rows) // 2)
        kind = rng.choice(3, p=(0.4, 0.3, 0.3))  # new phone, travel, travel with a new phone
        switch = {"device_id": kind != 1, "country": kind != 0}
        if not any(switch[col] for col in synth):
            switch = dict.fromkeys(synth, True)
        home = rng.choice(ctx.countries)
        values = {"device_id": (ctx.hash(f"home-dev-{uid}"), ctx.hash(f"new-dev-{uid}")),
                  "country": (home, rng.choice(ctx.countries[ctx.countries != home]))}
        for col in synth:
            v = np.full(len(rows), values[col][0])
            if switch[col]:
                v[j:] = values[col][1]
            edits[col][0].append(rows)
            edits[col][1].append(v)
        ctx.taken[u] = True


def _cart_stuffing(ctx: _Ctx, rng: np.random.Generator) -> list[_Piece]:
    """Bursts of add-to-carts over a pool of popular items, never bought."""
    c, ev, pieces = ctx.cfg, ctx.ev, list[_Piece]()
    hosts = ctx.pick_users(rng, 2)[:round(ctx.k * c.cart_real_user_share)]
    ctx.taken[hosts] = True
    uids = [str(ev.user_ids[u]) for u in hosts] + ctx.actor_ids("cart_stuffing", ctx.k - len(hosts))
    for i, uid in enumerate(uids):
        m = _log_int(rng, c.cart_events)
        src = rng.choice(rng.choice(ctx.popular, _int(rng, c.cart_pool)), m)
        offsets = _cum_ms(rng.uniform(*c.cart_gap_s, m - 1))
        if i < len(hosts):  # the burst follows one of the host's real events, on its device
            rows = ctx.rows(hosts[i])
            a = rows[rng.integers(len(rows))]
            ts = ev.timestamp_ms[a] + rng.uniform(2e3, 60e3) + offsets
            cols = tuple(0 if getattr(ev, n) is None else getattr(ev, n)[a]
                         for n in ("device_id", "country", "session_id"))
        else:
            ts, cols = rng.uniform(ctx.lo, ctx.hi) + offsets, ctx.actor_columns(rng, uid, [m])
        pieces.append(_Piece(uid, ctx.fit(ts), np.full(m, CART), src, *cols))
    return pieces


def _matched_lengths(ctx: _Ctx, rng: np.random.Generator, pieces: list[_Piece]) -> list[_Piece]:
    """New accounts cut to history lengths drawn from the real users with at least
    ``match_min_events`` events (every real user if none has), never under 3 events:
    then "how many events" cannot tell an injected account from a real user of the
    same population (the report's user-level negatives), and an evaluation measures
    behaviour, not length."""
    lengths = np.diff(ctx.bounds)
    pool = lengths[lengths >= ctx.cfg.match_min_events]
    pool = pool if pool.size else lengths[lengths > 0]
    out = []
    for p in pieces:
        if not p.user.startswith(NEW_ACCOUNT_PREFIX) or not pool.size:
            out.append(p)
            continue
        n = min(len(p.ts), max(3, int(rng.choice(pool))))
        keep = np.argsort(p.ts, kind="stable")[:n]  # the account's first n events
        cut = [np.asarray(v)[keep] if np.ndim(v) else v for v in (p.ts, p.role, p.src, p.device, p.country, p.session)]
        out.append(_Piece(p.user, *cut))
    return out


def _lookalikes(ctx: _Ctx, rng: np.random.Generator, name: str) -> list[_Piece]:
    """Normal look-alikes of scenario ``name`` (labelled 0 by the caller): half inside
    real users, after one of their events and on its device, half as new accounts."""
    ev, n = ctx.ev, round(ctx.k * ctx.cfg.decoy_ratio)
    hosts = ctx.pick_users(rng, 8 if name == "account_takeover" else 1)[:n if name == "account_takeover" else n // 2]
    ctx.taken[hosts] = True  # a victim of another scenario would get rows with no device of its own
    ids = ctx.actor_ids(f"decoy-{name}", n - len(hosts))
    pieces = []
    for i in range(len(hosts) + len(ids)):
        role, src, gaps_s = _LOOKALIKES[name](ctx, rng, ctx.rows(hosts[i]) if i < len(hosts) else None)
        offsets = _cum_ms(gaps_s)
        if i < len(hosts):
            rows = ctx.rows(hosts[i])
            a = rows[rng.integers(len(rows))] if name != "account_takeover" else rows[-1]
            gap = _BREAK_MS if name == "account_takeover" else 2e3
            ts = ev.timestamp_ms[a] + rng.uniform(gap, gap + 60e3) + offsets
            uid = str(ev.user_ids[hosts[i]])
            cols = tuple(0 if getattr(ev, col) is None else getattr(ev, col)[a]
                         for col in ("device_id", "country", "session_id"))
        else:
            uid = ids[i - len(hosts)]
            ts, cols = ctx.real_time(rng) + offsets, ctx.actor_columns(rng, ids[i - len(hosts)], [len(role)])
        pieces.append(_Piece(uid, ctx.fit(ts), np.asarray(role), np.asarray(src), *cols))
    return pieces


def _browse_spree(ctx: _Ctx, rng: np.random.Generator, rows: np.ndarray | None) -> tuple:
    """(Scraping look-alike) 8–60 views of popular items at human pace, some repeated."""
    m = _log_int(rng, (8, 60))
    return np.full(m, VIEW), rng.choice(ctx.popular, m), rng.uniform(2.0, 30.0, m - 1)


def _repeat_views(ctx: _Ctx, rng: np.random.Generator, rows: np.ndarray | None) -> tuple:
    """(Click-farming look-alike) half the time 2–10 views of 1–3 items, 1 s–5 min apart,
    maybe a favourite, maybe a cart at the end; half the time a favourite spree: 3–12
    favourites of distinct items of one or two categories, 3–30 s apart, among views."""
    if rng.random() < 0.5:
        m = _int(rng, (2, 10))
        items = rng.choice(ctx.popular, _int(rng, (1, 3)))
        role = np.where(rng.random(m) < 0.15, FAV, VIEW)
        if rng.random() < 0.3:
            role[-1] = CART
        # 1 s (a reload) to 5 min apart, log-uniform
        return role, rng.choice(items, m), np.exp(rng.uniform(0.0, np.log(300.0), m - 1))
    m = _int(rng, (3, 12))
    src = ctx.shop_items(rng, m) if ctx.cheap.size > m else rng.choice(ctx.popular, m)
    role = np.where(rng.random(len(src)) < 0.75, FAV, VIEW)
    return role, src, rng.uniform(3.0, 30.0, len(src) - 1)


def _quick_funnel(ctx: _Ctx, rng: np.random.Generator, rows: np.ndarray | None) -> tuple:
    """(Brushing look-alike) view → (cart) → purchase of 1–3 items within minutes, a
    checkout burst (several carted items bought in the same second), a purchase first
    and then browsing, as a user we first see at checkout, or a comparison: views of a
    few items of one category, then a purchase of another item of it that the log never
    showed (over half of real Taobao purchases after some history are of an item the
    user's earlier events never touched: seen on another device, in the cart from
    before, a variant), sometimes two such purchases seconds apart; or, 30% of the time,
    a real shopper's own run of events up to a purchase (:meth:`_Ctx.purchase_run`, from
    the split being injected), its gaps cut to brushing pace."""
    items = rng.choice(ctx.popular, _int(rng, (1, 3)))
    kind = rng.random()
    if kind >= 0.7 and ctx.buy_rows.size:  # a real shopper's own run up to a purchase, at brushing pace
        return ctx.purchase_run(rng)
    if kind < 0.2 and len(items) > 1:  # cart them all, then one checkout (or one each)
        role = [CART] * len(items) + [BUY] * len(items)
        apart = rng.uniform(20.0, 180.0, len(items) - 1) if rng.random() < 0.5 else np.zeros(len(items) - 1)
        gaps = [*rng.uniform(10.0, 120.0, len(items)), *apart]
        return np.array(role), np.concatenate([items, items]), np.array(gaps)
    cat = ctx.ev.category_id
    if kind < 0.4:  # compared a few, bought one (or two) the log never showed
        near = ctx.popular if cat is None else ctx.popular[cat[ctx.popular] == cat[items[0]]]
        near = near if near.size > 1 else ctx.popular
        viewed = rng.choice(near, _int(rng, (1, 6)))
        bought = rng.choice(near, 2 if rng.random() < 0.25 else 1)
        role = np.r_[np.full(len(viewed), VIEW), np.full(len(bought), BUY)]
        gaps = np.r_[np.exp(rng.uniform(np.log(2.0), np.log(60.0), len(viewed) - 1)),
                     np.exp(rng.uniform(np.log(10.0), np.log(300.0), 1)),
                     rng.uniform(2.0, 60.0, len(bought) - 1)]
        return role, np.r_[viewed, bought], gaps
    if kind < 0.55:  # bought, then browsing on, mostly in the same category
        m = _int(rng, (2, 8))
        near = ctx.popular if cat is None else ctx.popular[cat[ctx.popular] == cat[items[0]]]
        browse = np.r_[items[:1], rng.choice(near if near.size else ctx.popular, m)]
        return np.r_[BUY, np.full(m, VIEW)], browse, rng.uniform(10.0, 300.0, m)
    role, src = [], []
    for it in items:
        steps = [VIEW, CART, BUY] if rng.random() < 0.5 else [VIEW, BUY]
        role += steps
        src += [it] * len(steps)
    return np.array(role), np.array(src), rng.uniform(3.0, 120.0, len(role) - 1)


def _new_interest(ctx: _Ctx, rng: np.random.Generator, rows: np.ndarray | None) -> tuple:
    """(Takeover look-alike) after a break, on the user's own device, views, carts and
    buys 1–4 items of categories the user never touched."""
    n = _int(rng, (1, 4))
    items = ctx.foreign_items(rng, rows if rows is not None else np.zeros(0, np.int64), n)
    role, src = [], []
    for it in items:
        steps = [VIEW, CART, BUY] if rng.random() < 0.6 else [VIEW, VIEW, CART]
        role += steps
        src += [it] * len(steps)
    return np.array(role), np.array(src), rng.uniform(5.0, 90.0, len(role) - 1)


def _cart_spree(ctx: _Ctx, rng: np.random.Generator, rows: np.ndarray | None) -> tuple:
    """(Cart-stuffing look-alike) 3–15 add-to-carts of distinct items 3 s–1 min apart,
    some bought at the end; in 40% of sprees an item is carted again at once, 2–4 times
    (a quantity raised one click at a time)."""
    m = _int(rng, (3, 15))
    items = rng.choice(ctx.popular, m)
    if rng.random() < 0.4:
        items = np.repeat(items, np.where(rng.random(m) < 0.3, rng.integers(2, 5, m), 1))[:15]
        m = len(items)
    bought = items[rng.random(m) < 0.3]
    role = np.r_[np.full(m, CART), np.full(len(bought), BUY)]
    cart_gaps = rng.uniform(3.0, 60.0, m - 1)
    again = items[1:] == items[:-1]
    cart_gaps[again] = rng.uniform(1.0, 10.0, int(again.sum()))
    gaps = np.r_[cart_gaps, rng.uniform(30.0, 300.0, min(1, len(bought))), np.zeros(max(0, len(bought) - 1))]
    return role, np.r_[items, bought], gaps


_LOOKALIKES = {"scraping_bot": _browse_spree, "click_farming": _repeat_views, "order_brushing": _quick_funnel,
               "account_takeover": _new_interest, "cart_stuffing": _cart_spree}


def _assemble(ctx: _Ctx, name: str, pieces: list[_Piece], anomalous: bool = True) -> Events:
    """Events of one scenario's pieces (or of its look-alikes: ``anomalous=False``,
    label 0, scenario ``<name>_lookalike``), columns taken from their source rows."""
    ev, sizes = ctx.ev, [len(p.ts) for p in pieces]
    users = np.repeat(np.array([p.user for p in pieces], dtype=object), sizes)
    ids, user = np.unique(users, return_inverse=True)
    src = np.concatenate([p.src for p in pieces]).astype(np.int64)
    ts = np.concatenate([p.ts for p in pieces]) // ctx.resolution * ctx.resolution
    cols: dict[str, Any] = {
        "user": user.astype(np.int32), "user_ids": ids.astype(object),
        "timestamp_ms": ts.astype(np.int64),
        "event_type": ctx.role_type[np.concatenate([p.role for p in pieces])],
        "event_types": ev.event_types,
        "label": np.full(len(ts), int(anomalous), np.int8),
        "scenario": np.full(len(ts), ALL_SCENARIOS.index(name if anomalous else f"{name}_lookalike"), np.int8),
        "scenarios": ALL_SCENARIOS,
    }
    for col in ("item_id", "category_id", "price"):
        if getattr(ev, col) is not None:
            cols[col] = getattr(ev, col)[src]
    for col, attr in (("device_id", "device"), ("country", "country"), ("session_id", "session")):
        vals = np.concatenate([np.broadcast_to(np.asarray(getattr(p, attr), np.uint64), (n,))
                               for p, n in zip(pieces, sizes, strict=True)])
        if vals.any():
            cols[col] = vals
    return Events(**cols)


_BUILDERS = {"scraping_bot": _scraping_bot, "click_farming": _click_farming,
             "order_brushing": _order_brushing, "cart_stuffing": _cart_stuffing}


def inject(events: Events, names: Sequence[str], config: InjectConfig = InjectConfig()) -> Events:
    """Real events plus the named scenarios' injected ones, as a new ``Events``.

    The result is sorted by (user, time); ``label`` (1 = injected) and ``scenario`` (code
    into ``scenarios == ("none", *SCENARIOS)``) are set on every row; real rows keep their
    labels and are unchanged but for the device/country that account takeover gives its
    victims and decoys where the log has none (0 = missing on every other row). The same
    ``config.seed`` gives the same result; each scenario draws from its own random stream,
    so the new-account scenarios come out the same whichever others are chosen.
    """
    chosen = _check(list(dict.fromkeys(names)))
    label = (np.zeros(len(events), np.int8) if events.label is None
             else events.label.astype(np.int8, copy=True))
    scenario = np.zeros(len(events), np.int8)
    if events.scenario is not None:
        lut = [ALL_SCENARIOS.index(s) if s in ALL_SCENARIOS else 0 for s in events.scenarios]
        scenario = np.array(lut, np.int8)[events.scenario]
    base = events.with_columns(label=label, scenario=scenario, scenarios=ALL_SCENARIOS)
    if not chosen or not len(events):
        return base.sorted()
    ctx, parts, edits = _Ctx(base, config), list[Events](), dict[str, tuple]()
    for i, name in enumerate(SCENARIOS):
        if name not in chosen:
            continue
        rng = np.random.default_rng([config.seed, i])
        if name == "account_takeover":
            pieces, edits = _account_takeover(ctx, rng)
        else:  # whole accounts/bursts within the cap, so logs of short sequences aren't swamped
            pieces = _BUILDERS[name](ctx, rng)
            total = np.cumsum([len(p.ts) for p in pieces])
            pieces = pieces[:max(1, int(np.searchsorted(total, config.max_event_share * len(events),
                                                        side="right")))]
            if config.match_lengths:
                pieces = _matched_lengths(ctx, rng, pieces)
        if pieces:
            parts.append(_assemble(ctx, name, pieces))
        if config.decoy_ratio > 0 and (decoys := _lookalikes(ctx, np.random.default_rng([config.seed, i, 1]), name)):
            parts.append(_assemble(ctx, name, decoys, anomalous=False))
    for col, (rows, values) in edits.items():
        column = np.zeros(len(base), np.uint64)
        column[rows] = values
        base = base.with_columns(**{col: column})
    out = Events.concat([base, *parts]).sorted()
    # A new account's first event carries no behavioural evidence: it is labelled normal
    # (still marked with its scenario), or the detector learns "new account = suspicious"
    # and flags every new shopper's first event.
    first = np.ones(len(out), bool)
    first[1:] = out.user[1:] != out.user[:-1]
    new_account = np.char.startswith(out.user_ids.astype(str), NEW_ACCOUNT_PREFIX)[out.user]
    label = out.label.copy()
    # Nor do a new account's first two events: two events are evidence of nothing (a view
    # and a favourite 20 s later, two views within a second, are what new shoppers do).
    second = np.zeros(len(out), bool)
    second[1:] = first[:-1] & ~first[1:]
    label[(first | second) & new_account & (out.scenario != 0)] = 0
    # Nor does a brushing account's first purchase: a new shopper who views an item and
    # buys it a minute later is ordinary. The ring shows itself from the second purchase.
    brush = out.scenario == ALL_SCENARIOS.index("order_brushing")
    if brush.any():
        buy = brush & (out.event_type == out.event_types.index(ctx.ev.event_types[ctx.role_type[BUY]]))
        upto = np.cumsum(buy)  # brushing purchases so far, counted from the start of the log...
        start = np.flatnonzero(first)
        before = (upto - buy)[start][np.cumsum(first) - 1]  # ...minus those before the user's first row
        label[brush & (upto - before <= 1)] = 0
    return out.with_columns(label=label)
