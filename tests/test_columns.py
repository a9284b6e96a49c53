"""The column parsers the loaders share, on columns built here (the loaders on files:
tests/test_data.py; text times against ``parse_timestamp_ms``: tests/test_input_grammar.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from app.core.events import hash_strings
from model_export.columns import (
    hash_column,
    hash_utf8,
    is_missing,
    json_object,
    json_table,
    parse_price,
    parse_time,
    rechunk,
)

MS = 1_700_000_000_123


def test_hash_utf8_is_hash_strings_on_any_text_and_any_offset() -> None:
    rng = np.random.default_rng(0)
    alphabet = list("ab0-_é字😀 ")
    texts = ["".join(rng.choice(alphabet, rng.integers(0, 30))) for _ in range(300)]
    texts[:3] = [None, "", "x"]
    arr = pa.array(texts, pa.string())
    np.testing.assert_array_equal(hash_utf8(arr), hash_strings(texts))
    np.testing.assert_array_equal(hash_utf8(arr.slice(7)), hash_strings(texts[7:]))  # a non-zero offset
    np.testing.assert_array_equal(hash_column(pa.array(texts[:50] * 2)), hash_strings(texts[:50] * 2))
    assert hash_utf8(pa.array([], pa.string())).shape == (0,)


def test_parse_time_of_every_column_type() -> None:
    for unit, v, want in (("s", MS // 1000, MS - 123), ("ms", MS, MS), ("us", MS * 1000 + 999, MS),
                          ("ns", MS * 10**6, MS)):
        ms, bad = parse_time(pa.array([v], pa.timestamp(unit, "UTC")), seconds=False)
        assert ms.tolist() == [want] and not bad.any()
    ms, bad = parse_time(pa.array([1_700_000_000, None, 1.5]), seconds=True)  # seconds, whole ones only
    assert ms.tolist() == [1_700_000_000_000, 0, 0] and bad.tolist() == [False, False, True]
    ms, bad = parse_time(pa.array([str(MS), "2023-11-14T22:13:20.123Z", "", "soon", "2023-11-14"]), seconds=False)
    assert ms.tolist() == [MS, MS, 0, 0, 0] and bad.tolist() == [False, False, False, True, True]
    ms, bad = parse_time(pa.array(["2023-11-14 22:13:20 UTC"]), seconds=False, utc_suffix=True)
    assert ms.tolist() == [MS - 123] and not bad.any()


def test_parse_price_missing_and_bad() -> None:
    v, bad = parse_price(pa.array(["1.5", "", None, "-1", "nan", "x", "2"]))
    assert v[0] == 1.5 and np.isnan(v[1:3]).all() and v[6] == 2.0
    assert bad.tolist() == [False, False, False, True, True, True, False]
    v, bad = parse_price(pa.array([1.0, float("nan"), None, float("inf")]))
    assert bad.tolist() == [False, False, False, True] and np.isnan(v[1:3]).all()


def test_is_missing_and_rechunk() -> None:
    assert is_missing(pa.array(["a", "", None])).tolist() == [False, True, True]
    assert is_missing(pa.array([0, None])).tolist() == [False, True]
    batches = [pa.record_batch({"x": list(range(a, b))}) for a, b in ((0, 3), (3, 4), (4, 11))]
    tables = list(rechunk(batches, 4))
    assert [t.num_rows for t in tables] == [4, 4, 3]
    assert pa.concat_tables(tables)["x"].to_pylist() == list(range(11))


@pytest.mark.parametrize("line, why", [
    (b'{"user_id": "a", "user_id": "b"}', "key 'user_id' is given more than once"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"user_id": ', "invalid JSON"),
])
def test_json_object_refuses_what_is_no_single_object(line: bytes, why: str) -> None:
    got = json_object(line)
    assert isinstance(got, tuple) and why in got[1]


def test_json_table_keeps_required_columns_even_when_empty() -> None:
    table = json_table({"user_id": [None, None], "price": [None, None], "item_id": ["i", None]}, ("user_id",))
    assert table.column_names == ["user_id", "item_id"]
    assert json_object(b'{"user_id": "a"}') == {"user_id": "a"}
