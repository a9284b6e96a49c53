"""Columnar events: the one in-memory shape that loaders, scenarios, the featurizer,
the batch engine and the online service share.

Strings that only matter for equality or hashing (item, category, session, device,
country) are stored as stable 64-bit hashes (0 = missing), so a 100M-row log fits in
memory and the online path, which hashes the same strings, gets the same features.
Strings that are reported back (user ids, event ids) and the small event-type
vocabulary are stored as dictionary codes.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import date
from typing import Any

import numpy as np
import orjson

from app.core.vocabulary import DEFAULT_ALIASES, canonical_names

#: Optional string fields of the contract, stored as 64-bit hashes (0 = missing).
HASHED_FIELDS = ("item_id", "category_id", "session_id", "device_id", "country")

FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)


def hash_strings(values: Iterable[str | None]) -> np.ndarray:
    """Stable 64-bit hashes of strings (FNV-1a over UTF-8, splitmix64-finalised),
    vectorised over the batch; ``None`` and ``""`` hash to 0 (missing).

    Examples
    --------
    >>> h = hash_strings(["a", None, "a"])
    >>> bool(h[0] == h[2]) and int(h[1]) == 0
    True
    """
    raw = [b"" if v is None else v.encode("utf-8") for v in values]
    if not raw:
        return np.zeros(0, dtype=np.uint64)
    mat = np.array(raw, dtype=bytes)  # (M,) |S<L>, NUL-padded
    width = mat.dtype.itemsize
    lens = np.fromiter((len(b) for b in raw), dtype=np.int64, count=len(raw))
    h = np.full(len(raw), FNV_OFFSET, dtype=np.uint64)
    if width:
        cols = mat.view(np.uint8).reshape(len(raw), width).astype(np.uint64)
        for j in range(width):
            active = lens > j
            h = np.where(active, (h ^ cols[:, j]) * FNV_PRIME, h)
    h = finalise_hash(h ^ lens.astype(np.uint64))
    h[h == 0] = 1
    h[lens == 0] = 0
    return h


def finalise_hash(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads FNV's weak low bits (uint64 wraps by design)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


#: Plausible event times, epoch ms: 2000-01-01T00:00:00Z (included) to 2100-01-01T00:00:00Z
#: (excluded). Every path refuses times outside it, so that epoch seconds sent for
#: milliseconds (January 1970) or digits cut off a line never reach a window.
PLAUSIBLE_MS = (946_684_800_000, 4_102_444_800_000)
#: RFC 3339 date-time (section 5.6), ASCII digits only: ``T``, ``t`` or a space between date
#: and time, 1-9 fraction digits, ``Z``, ``z`` or ``±hh:mm``. Python ``re`` and RE2 (Arrow)
#: read it alike; the loaders match whole text columns with it.
RFC3339_PATTERN = (
    r"^([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([01][0-9]|2[0-3]):([0-5][0-9]):([0-5][0-9])"
    r"(?:\.([0-9]{1,9}))?(?:[Zz]|([+-])([01][0-9]|2[0-3]):([0-5][0-9]))$"
)
_RFC3339 = re.compile(RFC3339_PATTERN)
# Date, or date-time without an offset: what a request must not leave to guesswork.
_NAIVE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}(?:[Tt ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]+)?)?)?$")
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()


class TimestampError(ValueError):
    """A timestamp outside the grammar or the plausible window; ``kind`` is the problem's
    error type: ``timestamp_type``, ``timestamp_parsing``, ``timestamp_naive`` or
    ``timestamp_range``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def parse_timestamp_ms(value: Any, *, check_range: bool = False) -> int:
    """Epoch milliseconds (UTC) of an event's ``timestamp``: the one grammar of every path
    (``POST /events``, ``/batch-score``, the loaders behind ``seqguard score``/``train``).

    Accepted: epoch milliseconds as an integer, an integral float or a string of ASCII
    digits; an RFC 3339 date-time with an offset (:data:`RFC3339_PATTERN`; sub-millisecond
    digits are cut, as Arrow does). With ``check_range``, the time must lie in
    :data:`PLAUSIBLE_MS`; the error then says when the value looks like epoch seconds,
    microseconds or nanoseconds. Every reader of input passes ``check_range=True``; the
    window store and ``Events.from_records`` read validated or synthetic times.

    Raises
    ------
    TimestampError
        With ``kind`` and a message meant for the sender.

    Examples
    --------
    >>> parse_timestamp_ms("2017-11-25T08:01:10z"), parse_timestamp_ms("1511596870000")
    (1511596870000, 1511596870000)
    >>> parse_timestamp_ms(1511596870, check_range=True)
    Traceback (most recent call last):
    ...
    app.core.events.TimestampError: timestamp 1511596870 is before 2000-01-01: it looks like epoch seconds; \
send milliseconds (1511596870000)
    """
    if type(value) is int:
        ms = value
    elif isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TimestampError("timestamp_type", "timestamp must be an RFC 3339 string or epoch milliseconds")
    elif isinstance(value, int):
        ms = int(value)
    elif isinstance(value, float):
        if not value.is_integer():  # also NaN and ±inf
            raise TimestampError("timestamp_type", "timestamp in epoch milliseconds must be a whole number")
        ms = int(value)
    elif value.isascii() and value.isdigit():
        if len(value) > 19:
            raise TimestampError("timestamp_range", f"timestamp {value[:24]} is out of range")
        ms = int(value)
    else:
        ms = _rfc3339_ms(value)
    if check_range and (why := implausible_time(ms)):
        raise TimestampError("timestamp_range", why)
    return ms


def format_rfc3339_ms(ms: int) -> str:
    """Epoch milliseconds as an RFC 3339 date-time in UTC, to the millisecond: the text
    :func:`parse_timestamp_ms` reads back to ``ms``.

    >>> format_rfc3339_ms(1511596870000), format_rfc3339_ms(946684800123)
    ('2017-11-25T08:01:10.000Z', '2000-01-01T00:00:00.123Z')
    """
    seconds, millis = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def implausible_time(ms: int) -> str | None:
    """Why ``ms`` is not a plausible event time (outside :data:`PLAUSIBLE_MS`), with a hint
    when it would be one in another unit; ``None`` when it is plausible."""
    lo, hi = PLAUSIBLE_MS
    if lo <= ms < hi:
        return None
    where = "before 2000-01-01" if ms < lo else "after 2100-01-01"
    for unit, scaled in (("seconds", ms * 1000), ("microseconds", ms // 1000), ("nanoseconds", ms // 1_000_000)):
        if lo <= scaled < hi:
            return f"timestamp {ms} is {where}: it looks like epoch {unit}; send milliseconds ({scaled})"
    return f"timestamp {ms} is {where}: send epoch milliseconds or RFC 3339 between 2000 and 2100"


def _rfc3339_ms(text: str) -> int:
    m = _RFC3339.fullmatch(text)
    if m is None:
        if _NAIVE.fullmatch(text):
            raise TimestampError("timestamp_naive", "timestamp has no UTC offset: add 'Z' or '+hh:mm' (RFC 3339)")
        raise TimestampError(
            "timestamp_parsing", "timestamp is not RFC 3339 (e.g. 2024-05-01T12:30:00Z) or epoch milliseconds"
        )
    y, mo, d, h, mi, s, frac, sign, oh, om = m.groups()
    try:
        day = date(int(y), int(mo), int(d)).toordinal() - _EPOCH_ORDINAL
    except ValueError:
        raise TimestampError("timestamp_parsing", f"timestamp {text!r} is not a valid RFC 3339 date-time") from None
    offset = 0 if sign is None else (int(oh) * 60 + int(om)) * (1 if sign == "+" else -1)
    seconds = day * 86400 + int(h) * 3600 + (int(mi) - offset) * 60 + int(s)
    return seconds * 1000 + (int(frac[:3].ljust(3, "0")) if frac else 0)


class _Object(dict[str, Any]):
    """A parsed JSON object that remembers the keys it was given more than once."""

    repeated: tuple[str, ...] = ()

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, Any]]) -> _Object:
        obj = cls(pairs)
        if len(obj) != len(pairs):
            counts = Counter(k for k, _ in pairs)
            obj.repeated = tuple(k for k, n in counts.items() if n > 1)
        return obj


def may_repeat_keys(raw: bytes, tree: Any = None) -> bool:
    """Whether the JSON text ``raw`` (parsed: ``tree``, or ``None`` to parse it here) may
    give a key twice in one object; ``False`` is a proof that it does not, and costs a
    fraction of :func:`repeated_keys` (tests/benchmarks/bench_parse.py).

    The proof: with no backslash in ``raw``, no string holds a quote, so its quotes are
    exactly those of its keys and string values. Writing the parsed tree out again keeps
    every one of them unless a repeated key was dropped, which takes that key's two.
    """
    if b"\\" in raw:
        return True
    try:
        again = orjson.dumps(orjson.loads(raw) if tree is None else tree)
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        return True
    return again.count(b'"') != raw.count(b'"')


def repeated_keys(raw: bytes | str) -> list[tuple[str | int, ...]]:
    """Where the JSON text ``raw`` gives a key twice in one object: the path of each such
    key (``("events", 2, "user_id")``), in path order; ``[]`` when no object repeats a key
    or the text is no JSON (its parser says so). JSON leaves repeated keys to the parser
    and the fast ones keep the last, so every reader of input refuses them with this
    exact check (the standard library's parser, about 1.5 µs per event).

    >>> repeated_keys(b'{"user_id": "a", "user_id": "b"}'), repeated_keys(b'[{"a": 1}, {"a": 1, "a": 2}]')
    ([('user_id',)], [(1, 'a')])
    """
    try:
        tree = json.loads(raw, object_pairs_hook=_Object.from_pairs)
    except (ValueError, RecursionError):
        return []
    found: list[tuple[str | int, ...]] = []
    todo: list[tuple[tuple[str | int, ...], Any]] = [((), tree)]
    while todo:
        loc, node = todo.pop()
        if isinstance(node, _Object):
            found += [(*loc, key) for key in node.repeated]
            todo += [((*loc, k), v) for k, v in node.items()]
        elif isinstance(node, list):
            todo += [((*loc, i), v) for i, v in enumerate(node)]
    return sorted(found, key=lambda loc: [(0, x, "") if isinstance(x, int) else (1, 0, x) for x in loc])


@dataclass(frozen=True, slots=True)
class Events:
    """N events as columns. Optional columns are ``None`` when the source lacks them."""

    user: np.ndarray  # (N,) int32, code into user_ids
    user_ids: np.ndarray  # (U,) object, distinct user id strings
    timestamp_ms: np.ndarray  # (N,) int64, epoch milliseconds UTC
    event_type: np.ndarray  # (N,) int32, code into event_types
    event_types: tuple[str, ...]  # distinct event type strings
    item_id: np.ndarray | None = None  # (N,) uint64 hash, 0 = missing
    category_id: np.ndarray | None = None
    session_id: np.ndarray | None = None
    device_id: np.ndarray | None = None
    country: np.ndarray | None = None
    price: np.ndarray | None = None  # (N,) float32, NaN = missing
    event_id: np.ndarray | None = None  # (N,) object str
    label: np.ndarray | None = None  # (N,) int8, 1 = anomalous
    scenario: np.ndarray | None = None  # (N,) int8, code into scenarios (0 = none)
    scenarios: tuple[str, ...] = ("none",)

    def __len__(self) -> int:
        return int(self.timestamp_ms.shape[0])

    @property
    def n_users(self) -> int:
        return int(self.user_ids.shape[0])

    def take(self, idx: np.ndarray) -> Events:
        """Rows ``idx`` (an index or boolean mask), dictionaries kept as they are."""
        return replace(self, **{n: getattr(self, n)[idx] for n in _row_columns(self)})

    def with_columns(self, **columns: Any) -> Events:
        return replace(self, **columns)

    def with_canonical_types(self, aliases: Mapping[str, str] = DEFAULT_ALIASES) -> Events:
        """These events with every event type renamed through ``aliases`` (a table as
        :func:`app.core.vocabulary.build_aliases` builds it), on the dictionary alone: raw names
        that map to one type share its code, so ``event_types`` stays distinct.

        >>> ev = Events.from_records([{"user_id": "u", "event_type": t, "timestamp": 0}
        ...                           for t in ("pv", "view", "login", "buy")])
        >>> canon = ev.with_canonical_types()
        >>> canon.event_type_names().tolist(), sorted(canon.event_types)
        (['view', 'view', 'login', 'purchase'], ['login', 'purchase', 'view'])
        """
        names = canonical_names(self.event_types, aliases)
        if names == self.event_types:
            return self
        merged = tuple(dict.fromkeys(names))
        if len(merged) == len(names):
            return replace(self, event_types=merged)
        index = {n: i for i, n in enumerate(merged)}
        lut = np.array([index[n] for n in names], dtype=np.int32)
        return replace(self, event_type=lut[self.event_type], event_types=merged)

    def event_type_names(self) -> np.ndarray:
        """(N,) object array of event type strings."""
        return np.asarray(self.event_types, dtype=object)[self.event_type]

    def user_id_strings(self) -> np.ndarray:
        """(N,) object array of user id strings."""
        return self.user_ids[self.user]

    def order(self) -> np.ndarray:
        """Stable permutation that groups rows by user, in time order within a user."""
        return np.lexsort((self.timestamp_ms, self.user))

    def sorted(self) -> Events:
        return self.take(self.order())

    def event_ids(self) -> np.ndarray:
        """Event ids, with a deterministic id (``<user>-<ms>-<row>``) for rows that have none;
        only those rows are formatted (it was every row, half of a writer's time)."""
        if self.event_id is None:
            missing = np.arange(len(self))
            out = np.empty(len(self), dtype=object)
        else:
            missing = np.flatnonzero([not e for e in self.event_id])
            out = self.event_id.astype(object, copy=True)
        if missing.size:
            uid = self.user_ids[self.user[missing]].tolist()
            ts = self.timestamp_ms[missing].tolist()  # Python ints: formatting numpy scalars is slow
            out[missing] = [f"{u}-{t}-{i}" for u, t, i in zip(uid, ts, missing.tolist(), strict=True)]
        return out

    @classmethod
    def concat(cls, parts: Sequence[Events]) -> Events:
        """Concatenate, merging the user, event-type and scenario dictionaries."""
        parts = [p for p in parts if len(p)] or list(parts[:1])
        if len(parts) == 1:
            return parts[0]
        user_ids, user_cols = _merge_dict([p.user_ids for p in parts], [p.user for p in parts])
        etypes, etype_cols = _merge_dict(
            [np.asarray(p.event_types, dtype=object) for p in parts], [p.event_type for p in parts]
        )
        scen, scen_cols = _merge_dict(
            [np.asarray(p.scenarios, dtype=object) for p in parts],
            [p.scenario if p.scenario is not None else np.zeros(len(p), np.int8) for p in parts],
        )
        n = [len(p) for p in parts]
        out: dict[str, Any] = {
            "user": np.concatenate(user_cols).astype(np.int32),
            "user_ids": user_ids,
            "timestamp_ms": np.concatenate([p.timestamp_ms for p in parts]),
            "event_type": np.concatenate(etype_cols).astype(np.int32),
            "event_types": tuple(etypes),
        }
        for name, fill in (*((h, np.uint64(0)) for h in HASHED_FIELDS), ("price", np.nan)):
            cols = [getattr(p, name) for p in parts]
            if any(c is not None for c in cols):
                dtype = np.float32 if name == "price" else np.uint64
                out[name] = np.concatenate(
                    [c if c is not None else np.full(k, fill, dtype) for c, k in zip(cols, n, strict=True)]
                )
        if any(p.event_id is not None for p in parts):
            out["event_id"] = np.concatenate(
                [p.event_id if p.event_id is not None else np.full(k, None, object)
                 for p, k in zip(parts, n, strict=True)]
            )
        if any(p.label is not None for p in parts):
            out["label"] = np.concatenate(
                [p.label if p.label is not None else np.zeros(k, np.int8) for p, k in zip(parts, n, strict=True)]
            )
        if any(p.scenario is not None for p in parts):
            out["scenario"] = np.concatenate(scen_cols).astype(np.int8)
            out["scenarios"] = tuple(scen)
        return cls(**out)

    @classmethod
    def from_records(cls, records: Sequence[Mapping[str, Any]]) -> Events:
        """Events from dicts with the contract's field names (plus optional ``label``).

        Timestamps follow :func:`parse_timestamp_ms`'s grammar, without its plausible
        window (records here are validated requests or synthetic events). Meant for
        request-sized inputs; files go through the streaming loaders.
        """
        users, user = _codes([str(r["user_id"]) for r in records])
        etypes, etype = _codes([str(r["event_type"]) for r in records])
        cols: dict[str, Any] = {
            "user": user.astype(np.int32),
            "user_ids": users.astype(object),
            "timestamp_ms": np.array([parse_timestamp_ms(r["timestamp"]) for r in records],
                                     np.int64),
            "event_type": etype.astype(np.int32),
            "event_types": tuple(str(e) for e in etypes),
        }
        hashed = {}
        for name in HASHED_FIELDS:
            vals = [r.get(name) for r in records]
            if any(v not in (None, "") for v in vals):
                hashed[name] = [None if v is None else str(v) for v in vals]
        cols.update(zip(hashed, _hash_remembered(list(hashed.values())), strict=True))
        prices = [r.get("price") for r in records]
        if any(p is not None for p in prices):
            cols["price"] = np.array([np.nan if p is None else float(p) for p in prices], np.float32)
        ids = [r.get("event_id") for r in records]
        if any(i is not None for i in ids):
            cols["event_id"] = np.array([None if i is None else str(i) for i in ids], dtype=object)
        labels = [r.get("label") for r in records]
        if any(v is not None for v in labels):
            cols["label"] = np.array([int(v or 0) for v in labels], np.int8)
        return cls(**cols)


def _codes(values: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)`` for Python strings: the sorted distinct
    values and each value's index among them (a dict, not an object-array sort)."""
    distinct = sorted(set(values))
    index = {v: i for i, v in enumerate(distinct)}
    return np.array(distinct, dtype=object), np.fromiter(map(index.__getitem__, values), np.int64, len(values))


#: Hashes of recently seen strings (item and category ids, ...): the online path hashes a
#: user's recent events again with every new event. Bounded; emptied when full.
_HASHED: dict[str, int] = {}
_HASHED_MAX = 1 << 18


def _hash_remembered(columns: list[list[str | None]]) -> list[np.ndarray]:
    """``hash_strings`` of each column, hashing only the strings not seen recently, all
    columns' new strings in one call. Safe beside another thread emptying the memo: each
    string is looked up once, and new ones are taken from this call's own hashes."""
    known = _HASHED
    found = [[0 if v is None else known.get(v) for v in col] for col in columns]
    missing = {v for col, hs in zip(columns, found, strict=True) for v, h in zip(col, hs, strict=True) if h is None}
    new: dict[str | None, int] = {}
    if missing:
        new = dict(zip(missing, hash_strings(list(missing)).tolist(), strict=True))
        if len(known) + len(new) > _HASHED_MAX:
            known.clear()
        known.update(new)  # type: ignore[arg-type]
    return [np.array([new[v] if h is None else h for v, h in zip(col, hs, strict=True)], dtype=np.uint64)
            for col, hs in zip(columns, found, strict=True)]


def _row_columns(ev: Events) -> list[str]:
    dict_only = {"user_ids", "event_types", "scenarios"}
    return [f.name for f in fields(ev) if f.name not in dict_only and getattr(ev, f.name) is not None]


def _merge_dict(values: list[np.ndarray], codes: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Union of several dictionaries, and each part's codes remapped into it."""
    merged: dict[Any, int] = {}
    remapped = []
    for vals, c in zip(values, codes, strict=True):
        lut = np.array([merged.setdefault(v, len(merged)) for v in vals], dtype=np.int64)
        remapped.append(lut[c] if len(lut) else c.astype(np.int64))
    return np.array(list(merged), dtype=object), remapped
