"""One event vocabulary: the canonical event types and every known source's names for them.

Stores name the same actions differently (Taobao ``pv``/``buy``, RetailRocket
``addtocart``/``transaction``, OTTO ``clicks``/``orders``, ...). Loaders, the API, the
batch engine and the featurizer all map event types through one alias table, so a model
trained on one store's log scores another store's events in their own names. The table a
model was trained with travels in its bundle (``feature_spec.aliases``); a deployment adds
its own aliases by setting (``SEQGUARD_EVENT_ALIASES``) or CLI flag (``--alias``).

Names that are neither canonical nor aliased pass through as themselves; if the model
never saw them, the featurizer gives them the out-of-vocabulary id, whose meaning the
detector learns in training (see ``TrainConfig.unknown_type_rate``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

#: The canonical event types, in the order a storefront funnel goes.
CANONICAL: tuple[str, ...] = ("view", "cart", "remove_from_cart", "favorite", "purchase")

#: Each known source's event names → canonical type. Matching ignores case and
#: surrounding blanks.
SOURCE_ALIASES: dict[str, dict[str, str]] = {
    # Alibaba UserBehavior (Zhu et al., KDD 2018)
    "taobao": {"pv": "view", "cart": "cart", "fav": "favorite", "buy": "purchase"},
    # Tmall repeat buyers, IJCAI-15: action_type names and codes 0 click, 1 cart, 2 purchase, 3 favourite
    "tmall": {"click": "view", "cart": "cart", "collect": "favorite", "alipay": "purchase",
              "0": "view", "1": "cart", "2": "purchase", "3": "favorite"},
    "retailrocket": {"view": "view", "addtocart": "cart", "transaction": "purchase"},
    "rees46": {"view": "view", "cart": "cart", "remove_from_cart": "remove_from_cart", "purchase": "purchase"},
    "otto": {"clicks": "view", "carts": "cart", "orders": "purchase"},
    # YOOCHOOSE (RecSys Challenge 2015) and DIGINETICA (CIKM Cup 2016)
    "yoochoose": {"click": "view", "buy": "purchase"},
    "diginetica": {"view": "view", "click": "view", "buy": "purchase"},
    # Common spellings of the canonical types themselves
    "canonical": {"favourite": "favorite", "add_to_cart": "cart", "removefromcart": "remove_from_cart"},
}


def _key(name: str) -> str:
    return name.strip().lower()


def printable(name: str) -> str:
    r"""``name`` as it may be shown in a log line, a terminal or a metric label: control,
    format and separator characters (newlines, escape sequences, zero-width and
    non-breaking spaces) written as Python escapes, everything else as it is.

    >>> print(printable("checkout"), printable("a\nb"), printable("\x1b[31mred"), printable("视图\u200b"))
    checkout a\nb \x1b[31mred 视图\u200b
    """
    if name.isprintable():
        return name
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in name)


def _merged() -> dict[str, str]:
    out = {t: t for t in CANONICAL}
    for table in SOURCE_ALIASES.values():
        for name, canon in table.items():
            if out.setdefault(_key(name), canon) != canon:
                raise AssertionError(f"alias {name!r} maps to {out[_key(name)]!r} and {canon!r}")
    return out


#: The merged table every component starts from.
DEFAULT_ALIASES: dict[str, str] = _merged()


def build_aliases(extra: Mapping[str, str] | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The alias table ``base`` (default :data:`DEFAULT_ALIASES`) with ``extra`` on top.

    Keys are matched case-insensitively; an ``extra`` entry overrides the base. The type an
    ``extra`` entry names may itself be a name the base table knows: it is resolved one
    step, through the base table (never through the other ``extra`` entries), so a
    Taobao-minded ``checkout=buy`` means ``purchase``, and the result does not depend on
    the order of the entries. Two entries for one name (in any letter case) with different
    types are refused.

    >>> build_aliases({"Checkout": "purchase"})["checkout"]
    'purchase'
    >>> table = build_aliases({"checkout": "buy", "signin": "login"})
    >>> table["checkout"], table["signin"]
    ('purchase', 'login')
    >>> table = build_aliases({"view": "purchase", "purchase": "view"})  # a swap stays a swap
    >>> table["view"], table["purchase"]
    ('purchase', 'view')
    """
    before = DEFAULT_ALIASES if base is None else base
    out = dict(before)
    added: dict[str, tuple[str, str]] = {}  # key -> (name as given, resolved type)
    for name, canon in (extra or {}).items():
        name, canon = str(name), str(canon)
        if not name.strip() or not canon.strip():
            raise ValueError(f"empty event type in alias {name!r} -> {canon!r}")
        key = _key(name)
        # One step, from the table before it (no chains to follow, no cycles to fear).
        resolved = before.get(_key(canon), canon.strip())
        if key in added and added[key][1] != resolved:
            raise ValueError(f"alias {name!r} -> {canon!r} contradicts alias {added[key][0]!r} -> {added[key][1]!r} "
                             "(names match in any letter case)")
        added[key] = (name, resolved)
    out.update({k: t for k, (_, t) in added.items()})
    return out


def alias_warnings(extra: Mapping[str, str] | None, base: Mapping[str, str] | None = None,
                   known_types: Iterable[str] | None = None) -> list[str]:
    """What an operator should hear about ``extra`` aliases put on ``base`` (default
    :data:`DEFAULT_ALIASES`): entries that change what a name the table already knows
    means (``view=purchase`` makes every ``view`` a purchase), and, given the model's
    ``known_types``, entries that lead to a type the model does not know.

    >>> for w in alias_warnings({"view": "purchase", "checkout": "buy", "signin": "login"}, known_types=CANONICAL):
    ...     print(w)
    alias view → purchase replaces view → view
    alias signin → login: not among the model's event types
    """
    before = DEFAULT_ALIASES if base is None else base
    table = build_aliases(extra, before)
    known = None if known_types is None else set(known_types)
    out = []
    for name in extra or {}:
        key = _key(str(name))
        new = table[key]
        if key in before and before[key] != new:
            out.append(f"alias {printable(str(name))} → {printable(new)} replaces {printable(key)} → "
                       f"{printable(before[key])}")
        if known is not None and new not in known:
            out.append(f"alias {printable(str(name))} → {printable(new)}: not among the model's event types")
    return out


def parse_alias_pairs(pairs: Iterable[str]) -> dict[str, str]:
    """``["addtocart=cart", ...]`` (CLI ``--alias``) → ``{"addtocart": "cart", ...}``.

    One name given twice (in any letter case) with different types is refused.

    >>> parse_alias_pairs(["checkout=purchase"])
    {'checkout': 'purchase'}
    """
    out: dict[str, str] = {}
    seen: dict[str, str] = {}  # key -> the name as first given
    for p in pairs:
        name, sep, canon = p.partition("=")
        if not sep or not name.strip() or not canon.strip():
            raise ValueError(f"alias {p!r}: expected NAME=TYPE, e.g. addtocart=cart")
        name, canon = name.strip(), canon.strip()
        first = seen.setdefault(_key(name), name)
        if first in out and _key(out[first]) != _key(canon):
            raise ValueError(f"alias {p!r}: {first!r} is already aliased to {out[first]!r}")
        out[first] = canon
    return out


def canonical(name: str, aliases: Mapping[str, str] = DEFAULT_ALIASES) -> str:
    """The canonical type of ``name`` (``name`` itself when it has no alias).

    >>> canonical("addtocart"), canonical("PV"), canonical("login")
    ('cart', 'view', 'login')
    """
    return aliases.get(_key(name), name)


def canonical_names(names: Iterable[str], aliases: Mapping[str, str] = DEFAULT_ALIASES) -> tuple[str, ...]:
    """:func:`canonical` of each name (a dictionary of event types, not every event)."""
    return tuple(canonical(n, aliases) for n in names)
