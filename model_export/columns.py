"""Column parsers shared by the loaders: a pyarrow column in, numpy arrays out.

Each parser reads a whole column at once, typed or text (a CSV's strings, a Parquet
file's native types, a JSONL line's values as text), and knows no source format:
:mod:`model_export.data` says which column is which and turns the masks of bad rows
into counted, line-numbered malformed rows. Text times follow ``app.core.events``' timestamp
grammar and hashes equal ``app.core.events.hash_strings``: one definition of each, shared with
the service.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from app.core.events import (  # the one definition of the hash and of the timestamp grammar
    FNV_OFFSET,
    FNV_PRIME,
    RFC3339_PATTERN,
    TimestampError,
    finalise_hash,
    may_repeat_keys,
    parse_timestamp_ms,
    repeated_keys,
)


def parse_time(arr: pa.Array, seconds: bool, utc_suffix: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(epoch ms, unparseable mask) of a timestamp column of any type; missing rows are 0.
    Text follows ``app.core.events.parse_timestamp_ms``'s grammar (its window is checked later)."""
    t, n = arr.type, len(arr)
    null = arr.is_null().to_numpy(zero_copy_only=False)
    if pa.types.is_timestamp(t):
        v = arr.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
        scale = {"s": 1000, "ms": 1, "us": -1000, "ns": -1_000_000}[t.unit]
        return (v * scale if scale > 0 else v // -scale), np.zeros(n, bool)
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        f = arr.cast(pa.float64()).fill_null(0).to_numpy(zero_copy_only=False)
        ok = np.isfinite(f) & (f == np.round(f)) & (np.abs(f) < 9e15)
        v = np.where(ok, f, 0).astype(np.int64)
        return (v * 1000 if seconds else v), ~ok & ~null
    s = strings(arr)
    # ASCII digits, few enough for int64
    digits = pc.match_substring_regex(s, "^[0-9]{1,12}$" if seconds else "^[0-9]{1,18}$|^[0-8][0-9]{18}$")
    digits = digits.fill_null(False)
    ms = np.zeros(n, dtype=np.int64)
    d = digits.to_numpy(zero_copy_only=False)
    ms[d] = pc.cast(s.filter(digits), pa.int64()).to_numpy()
    rest = ~d & ~is_missing(s)
    if seconds:  # Unix seconds are digits only
        return ms * 1000, rest
    bad = np.zeros(n, dtype=bool)
    if rest.any():
        ms[rest], bad[rest] = parse_text_times(s.filter(pa.array(rest)), utc_suffix)
    return ms, bad


def parse_text_times(s: pa.Array, utc_suffix: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(epoch ms, bad mask) of RFC 3339 strings, read as ``parse_timestamp_ms`` reads them:
    the strings matching ``RFC3339_PATTERN`` (RE2) are cast by Arrow, whose reading of
    them equals that function's (tests/test_input_grammar.py), any other is bad. With
    ``utc_suffix``, a trailing " UTC" (REES46) stands for "Z"."""
    if utc_suffix:
        s = pc.replace_substring_regex(s, " UTC$", "Z")
    ok = pc.match_substring_regex(s, RFC3339_PATTERN).fill_null(False)
    good = ok.to_numpy(zero_copy_only=False)
    out, bad = np.zeros(len(s), np.int64), ~good
    if not good.any():
        return out, bad
    text = pc.utf8_upper(s.filter(ok))  # 't' and 'z' as Arrow reads them; nothing else has case
    try:
        ns = pc.cast(text, pa.timestamp("ns", "UTC")).cast(pa.int64()).to_numpy(zero_copy_only=False)
        out[good] = ns // 1_000_000
        return out, bad
    except pa.ArrowInvalid:  # a day that does not exist, or beyond Arrow's years: one by one
        pass
    idx = np.flatnonzero(good)
    for i, v in zip(idx, text.to_pylist(), strict=True):
        try:
            out[i] = parse_timestamp_ms(v)
        except TimestampError:
            bad[i] = True
    return out, bad


def parse_price(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(float64 prices, NaN = missing; mask of values that are not finite numbers ≥ 0).

    In a numeric (Parquet) column NaN is how "missing" is written; in text, "nan" is bad.
    """
    if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type):
        v = arr.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
        return v, np.isinf(v) | (v < 0)
    s = strings(arr)
    have = ~is_missing(s)
    text = s.filter(pa.array(have))
    v = np.full(len(s), np.nan)
    try:
        v[have] = pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:  # some value is not a number: find which, one by one
        v[have] = [_float(x) for x in text.to_pylist()]
    return v, have & ~(np.isfinite(v) & (v >= 0))


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return np.nan


def parse_label(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(int8 labels, missing read as 0; mask of values other than 0/1/true/false).

    Examples
    --------
    >>> label, bad = parse_label(pa.array(["1", " TRUE", "0", "", None, "2"]))
    >>> label.tolist(), bad.tolist()
    ([1, 1, 0, 0, 0, 0], [False, False, False, False, False, True])
    """
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        s = pc.utf8_lower(pc.utf8_trim_whitespace(arr)).fill_null("")
        one = pc.is_in(s, pa.array(["1", "1.0", "true"])).to_numpy(zero_copy_only=False)
        zero = pc.is_in(s, pa.array(["0", "0.0", "false", ""])).to_numpy(zero_copy_only=False)
        return one.astype(np.int8), ~(one | zero)
    v = arr.cast(pa.float64()).fill_null(0).to_numpy(zero_copy_only=False)
    return (v == 1).astype(np.int8), ~((v == 0) | (v == 1))


def hash_column(arr: pa.Array) -> np.ndarray:
    """``hash_strings`` of a column, each distinct value hashed once."""
    enc = pc.dictionary_encode(strings(arr))
    lut = np.append(hash_utf8(enc.dictionary), np.uint64(0))  # nulls: 0, missing
    return lut[enc.indices.fill_null(len(enc.dictionary)).to_numpy(zero_copy_only=False)]


def hash_utf8(arr: pa.StringArray) -> np.ndarray:
    """Exactly ``app.core.events.hash_strings``, computed on the Arrow buffers (no Python strings):
    ten times faster, which keeps loading above 1M rows/s. Nulls hash as ""."""
    n = len(arr)
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    offsets = np.frombuffer(arr.buffers()[1], np.int32, n + 1, arr.offset * 4).astype(np.int64)
    data = np.frombuffer(arr.buffers()[2] or b"", np.uint8)
    starts, lens = offsets[:-1], np.diff(offsets)
    h = np.full(n, FNV_OFFSET, dtype=np.uint64)
    for j in range(int(lens.max(initial=0))):  # FNV-1a, byte j of every string that long
        act = np.flatnonzero(lens > j)
        h[act] = (h[act] ^ data[starts[act] + j]) * FNV_PRIME
    h = finalise_hash(h ^ lens.astype(np.uint64))
    h[h == 0] = 1
    h[lens == 0] = 0
    return h


def strings(arr: pa.Array) -> pa.Array:
    """``arr`` as a string column (integers as their decimal text, as a CSV holds them)."""
    return arr if pa.types.is_string(arr.type) else arr.cast(pa.string())


def is_missing(arr: pa.Array) -> np.ndarray:
    """Null, or "" in a text column."""
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
        return pc.equal(strings(arr), "").fill_null(True).to_numpy(zero_copy_only=False)
    return arr.is_null().to_numpy(zero_copy_only=False)


def as_py(arr: pa.Array, i: int) -> Any:
    """Row ``i`` of ``arr`` as a Python value, as an error message quotes it."""
    return arr[i].as_py()


def combined(col: pa.ChunkedArray) -> pa.Array:
    """A chunked column as one array (no copy when it has one chunk)."""
    return col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)


def rechunk(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """Tables of exactly ``rows`` rows (the last one fewer) from batches of any size."""
    buf: list[pa.RecordBatch] = []
    have = 0
    for b in batches:
        buf.append(b)
        have += b.num_rows
        while have >= rows:
            t = pa.Table.from_batches(buf)
            yield t.slice(0, rows)
            rest = t.slice(rows)
            buf, have = rest.to_batches(), rest.num_rows
    if have:
        yield pa.Table.from_batches(buf)


def json_object(raw: bytes) -> dict[str, Any] | tuple[str | None, str]:
    """The object on a JSONL line, or (field at fault, why there is none). An object that
    gives a key twice is refused, as the service refuses it (orjson would keep the last)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        return None, f"invalid JSON ({e})"
    if not isinstance(obj, dict):
        return None, f"not a JSON object: {raw[:60]!r}"
    if may_repeat_keys(raw, obj) and (where := repeated_keys(raw)):
        key = where[0][-1]
        return str(key), f"key {key!r} is given more than once in one object"
    return obj


def json_text(v: Any) -> str | None:
    """JSON values as the text a CSV would hold; integral floats as integers.

    Examples
    --------
    >>> [json_text(v) for v in ("a", 3, 3.0, 2.5, True, None)]
    ['a', '3', '3', '2.5', 'true', None]
    """
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v).lower() if isinstance(v, bool) else str(v)


def json_table(rows: dict[str, list[str | None]], required: Collection[str]) -> pa.Table:
    """String columns of JSONL rows (field → values, None where a line lacks it); a column
    no line has is left out unless ``required``, as a CSV file would lack it."""
    return pa.table({k: pa.array(v, pa.string()) for k, v in rows.items()
                     if k in required or any(x is not None for x in v)})
