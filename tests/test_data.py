"""Streaming event-log loaders, on slices of the real samples and on files written here."""

from __future__ import annotations

import csv
import gzip
import io
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.core.events import HASHED_FIELDS, Events, hash_strings, parse_timestamp_ms
from app.core.vocabulary import canonical
from model_export.data import (
    FORMATS,
    DataError,
    detect_format,
    iter_event_chunks,
    read_events,
    split_by_user,
)

HERE = Path(__file__).resolve().parent
TAOBAO_TAIL = HERE / "data" / "loader_taobao_tail300.csv.gz"  # last 300 lines of the 84k head
REES46_SLICE = HERE / "data" / "loader_rees46_slice.csv.gz"  # header, lines 3780-3979, last 100
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared(rel: str) -> Path:
    path = SHARED / rel
    if not path.is_file():
        pytest.skip(f"shared sample {path} not present")
    return path


def csv_rows(path: Path) -> list[list[str]]:
    """The file's rows, read by the standard library: the oracle the loaders are held to."""
    with gzip.open(path, "rt", newline="") as f:
        return list(csv.reader(f))


def assert_same_events(got: Events, want: Events) -> None:
    """Row by row, comparing strings rather than dictionary codes."""
    assert len(got) == len(want)
    np.testing.assert_array_equal(got.user_id_strings(), want.user_id_strings())
    np.testing.assert_array_equal(got.timestamp_ms, want.timestamp_ms)
    np.testing.assert_array_equal(got.event_type_names(), want.event_type_names())
    for name in (*HASHED_FIELDS, "price", "label", "event_id"):
        g, w = getattr(got, name), getattr(want, name)
        assert (g is None) == (w is None), name
        if g is not None:
            np.testing.assert_array_equal(g, w, err_msg=name)


# ---- real samples --------------------------------------------------------------------------


def test_taobao_slice_matches_the_standard_library_reading(
        caplog: pytest.LogCaptureFixture) -> None:
    rows = csv_rows(TAOBAO_TAIL)
    assert rows[-1] == ["100370", "1968385", "1875258", "pv"]  # the real cut-off line
    good = rows[:-1]
    events, report = read_events(TAOBAO_TAIL, sort=False)
    assert detect_format(TAOBAO_TAIL) == report.format == "taobao"
    assert (report.rows_read, report.rows_kept, report.malformed) == (300, 299, 1)
    assert report.malformed_examples[0].startswith("line 300: expected 5 fields, got 4")
    assert report.utc_offset_minutes == 480
    warned = [r for r in caplog.records if r.name == "seqguard.data" and r.levelname == "WARNING"]
    assert len(warned) == 1 and "skipped 1 malformed of 300 rows" in warned[0].getMessage()
    assert list(events.user_id_strings()) == [r[0] for r in good]
    assert list(events.event_type_names()) == [canonical(r[3]) for r in good]  # pv → view, ...
    np.testing.assert_array_equal(events.timestamp_ms, [int(r[4]) * 1000 for r in good])
    np.testing.assert_array_equal(events.item_id, hash_strings(r[1] for r in good))
    np.testing.assert_array_equal(events.category_id, hash_strings(r[2] for r in good))
    assert events.session_id is None and events.price is None and events.event_id is None
    assert events.label is None


def test_taobao_cut_off_timestamp_with_five_fields_is_malformed(tmp_path: Path) -> None:
    path = tmp_path / "ub.csv"
    path.write_text("1,2268318,2520377,pv,1511544070\n1,2333346,2520771,pv,1511561733\n"
                    "1,2576651,149192,pv,15115\n")
    events, report = read_events(path, max_malformed_fraction=0.5)
    assert report.format == "taobao" and len(events) == 2 and report.malformed == 1
    assert report.malformed_examples == [
        "line 3: field 'timestamp': '15115' is outside 2000–2100 (a cut-off line?)"]


def test_rees46_slice_matches_the_standard_library_reading() -> None:
    rows = csv_rows(REES46_SLICE)
    header, body = rows[0], rows[1:]
    assert header[0] == "event_time" and len(body[-1]) == 8  # the real cut-off line
    good = [dict(zip(header, r, strict=True)) for r in body[:-1]]
    events, report = read_events(REES46_SLICE, sort=False, dedupe=False)
    assert report.format == "rees46"
    assert (report.rows_read, report.malformed, report.duplicates_dropped) == (300, 1, 0)
    assert report.malformed_examples[0].startswith("line 301: expected 9 fields, got 8")
    want = Events.from_records([
        {"user_id": r["user_id"], "event_type": r["event_type"],
         "timestamp": r["event_time"].replace(" UTC", "Z"), "item_id": r["product_id"],
         "category_id": r["category_id"], "session_id": r["user_session"],
         "price": float(r["price"])} for r in good])
    assert_same_events(events, want)

    deduped, report = read_events(REES46_SLICE, sort=False)
    assert report.duplicates_dropped == 3 and len(deduped) == len(good) - 3  # lines 3832-3834
    assert report.rows_kept == len(deduped)


def test_retailrocket_layout(tmp_path: Path) -> None:
    # RetailRocket's events.csv layout; the values are made up (no sample is shipped).
    path = tmp_path / "events.csv.gz"
    with gzip.open(path, "wt") as f:
        f.write("timestamp,visitorid,event,itemid,transactionid\n"
                "1433221332117,257597,view,355908,\n"
                "1433224214164,992329,addtocart,248676,\n"
                "1433224214999,992329,transaction,248676,4000\n")
    events, report = read_events(path, sort=False)
    assert report.format == detect_format(path) == "retailrocket"
    assert list(events.event_type_names()) == ["view", "cart", "purchase"]  # canonical names
    assert list(events.user_id_strings()) == ["257597", "992329", "992329"]
    assert list(events.timestamp_ms) == [1433221332117, 1433224214164, 1433224214999]
    np.testing.assert_array_equal(events.item_id, hash_strings(["355908", "248676", "248676"]))
    assert events.category_id is None and events.event_id is None


def test_full_taobao_head_sample() -> None:
    events, report = read_events(shared("taobao_userbehavior/UserBehavior_head_84k.csv.gz"))
    assert (len(events), events.n_users, report.malformed) == (84_475, 815, 1)
    assert report.rows_read == 84_476 and report.duplicates_dropped == 0
    names, counts = np.unique(events.event_type_names(), return_counts=True)
    assert dict(zip(names.tolist(), counts.tolist(), strict=True)) == {
        "view": 75_872, "cart": 4_497, "favorite": 2_356, "purchase": 1_750}  # pv, cart, fav, buy
    assert "1 malformed" in report.summary()


def test_full_rees46_sample() -> None:
    events, report = read_events(shared("rees46_2019oct_sample/2019-Oct_head_17k.csv.gz"))
    assert report.rows_read - report.malformed == 17_434
    assert (report.malformed, report.duplicates_dropped) == (1, 5)
    assert len(events) == 17_429 and events.n_users == 4_504
    assert events.timestamp_ms.min() == int(datetime(2019, 10, 1, tzinfo=UTC).timestamp() * 1000)
    assert np.isfinite(events.price).all()


def test_full_flink_slice() -> None:
    path = shared("taobao_userbehavior/UserBehavior_flink_course_slice_110k.csv.gz")
    events, report = read_events(path, sort=False)
    assert (len(events), report.malformed, events.n_users) == (110_300, 0, 66_454)
    assert (np.diff(events.timestamp_ms) >= 0).all()  # the slice is time-ordered


# ---- generic files -------------------------------------------------------------------------

T0 = 1_709_280_000_000  # 2024-03-01T08:00:00Z
RECORDS = [
    {"event_id": "e1", "user_id": "u1", "event_type": "view", "timestamp": "2024-03-01T10:00:00Z",
     "item_id": "i1", "category_id": "c1", "session_id": "s1", "device_id": "d1",
     "country": "DE", "price": 9.99, "label": 0},
    {"event_id": "e2", "user_id": "u2", "event_type": "login", "timestamp": 1709287200123,
     "device_id": "d2", "country": "FR", "label": 1},
    {"event_id": "e3", "user_id": "u1", "event_type": "purchase",
     "timestamp": "2024-03-01T11:00:00.250+02:00", "item_id": "ünïcødé-商品", "price": 0.0,
     "label": 0},
    {"event_id": "e4", "user_id": "u3", "event_type": "view", "timestamp": "2024-03-01 09:30:00Z",
     "item_id": "x" * 100, "category_id": "c2", "session_id": "s9", "label": 1},
    {"event_id": "e5", "user_id": "u1", "event_type": "addtocart", "timestamp": 1709280000000,
     "item_id": "i1", "price": 12.5, "label": 0},
]
COLUMNS = ["event_id", "user_id", "event_type", "timestamp", "item_id", "category_id",
           "session_id", "device_id", "country", "price", "label"]


def write_csv(path: Path, records: list[dict], columns: list[str] = COLUMNS) -> Path:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", newline="") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(records)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    data = b"".join(orjson.dumps(r) + b"\n" for r in records)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    """Native types: a tz-aware microsecond timestamp, float prices, int8 labels."""
    cols = {c: [r.get(c) for r in records] for c in COLUMNS}
    ts = pa.array([parse_timestamp_ms(t) * 1000 for t in cols.pop("timestamp")], pa.int64())
    table = pa.table({**{c: pa.array(cols[c], pa.string()) for c in COLUMNS[:3]},
                      "timestamp": ts.cast(pa.timestamp("us", "UTC")),
                      **{c: pa.array(cols[c], pa.string()) for c in COLUMNS[4:9]},
                      "price": pa.array(cols["price"], pa.float64()),
                      "label": pa.array(cols["label"], pa.int8())})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    path.write_bytes(gzip.compress(buf.getvalue()) if path.suffix == ".gz" else buf.getvalue())
    return path


@pytest.mark.parametrize("name, fmt", [
    ("events.csv", "csv"), ("events.csv.gz", "csv"), ("events.jsonl", "jsonl"),
    ("events.jsonl.gz", "jsonl"), ("events.parquet", "parquet"), ("events.parquet.gz", "parquet"),
])
def test_generic_round_trip(tmp_path: Path, name: str, fmt: str) -> None:
    writer = {"csv": write_csv, "jsonl": write_jsonl, "parquet": write_parquet}[fmt]
    path = writer(tmp_path / name, RECORDS)
    assert detect_format(path) == fmt
    events, report = read_events(path, sort=False)
    assert (report.format, report.rows_read, report.malformed) == (fmt, 5, 0)
    assert_same_events(events, Events.from_records(RECORDS).with_canonical_types())  # addtocart → cart
    assert events.timestamp_ms[2] == int(datetime(2024, 3, 1, 9, 0, 0, 250000,
                                                  tzinfo=UTC).timestamp() * 1000)
    assert events.price.dtype == np.float32 and np.isnan(events.price[1])
    assert list(events.label) == [0, 1, 0, 1, 0]
    assert list(events.event_id) == ["e1", "e2", "e3", "e4", "e5"]


def test_generic_file_with_only_required_columns_and_extras(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "min.csv", [{**r, "referrer": "x"} for r in RECORDS],
                     ["user_id", "referrer", "event_type", "timestamp", "utm"])
    events, report = read_events(path)
    assert len(events) == 5 and report.ignored_columns == ["referrer", "utm"]
    assert "ignored columns: referrer, utm" in report.summary()
    for name in (*HASHED_FIELDS, "price", "label", "event_id"):
        assert getattr(events, name) is None


def test_generic_jsonl_with_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    lines = [orjson.dumps(r) for r in RECORDS]
    lines[1:1] = [b'{"user_id": "u9", "event_type": "view", "timest', b"", b"[1, 2]"]
    path.write_bytes(b"\n".join(lines) + b"\n")
    events, report = read_events(path, max_malformed_fraction=0.5, sort=False)
    assert len(events) == 5 and (report.rows_read, report.malformed) == (7, 2)
    assert report.malformed_examples[0].startswith("line 2: invalid JSON")
    assert report.malformed_examples[1].startswith("line 4: not a JSON object")


def test_malformed_rows_are_skipped_with_their_lines(tmp_path: Path) -> None:
    rows = [dict(RECORDS[0], event_id=f"e{i}", timestamp=T0 + 1_000 * i) for i in range(20)]
    rows[3]["price"] = -1
    rows[7]["timestamp"] = "2019-13-01"
    rows[9]["user_id"] = ""
    path = write_csv(tmp_path / "e.csv", rows)
    with path.open("a") as f:
        f.write("\n\ne20,u1,view\n")  # blank lines are not rows; a short row is malformed
    events, report = read_events(path, max_malformed_fraction=0.5, sort=False)
    assert len(events) == 17 and (report.rows_read, report.malformed) == (21, 4)
    assert report.malformed_examples == [
        "line 5: field 'price': price '-1' is not a finite number ≥ 0",
        "line 9: field 'timestamp': cannot parse '2019-13-01' as RFC 3339 with an offset, or epoch milliseconds",
        "line 11: field 'user_id': missing value",
        "line 24: expected 11 fields, got 3: 'e20,u1,view'",
    ]
    with pytest.raises(DataError) as err:
        read_events(path)
    assert (err.value.line, err.value.field) == (5, "price")
    assert str(err.value).startswith(
        f"{path}, line 5, field 'price': price '-1' is not a finite number ≥ 0 (4 of 21 rows")


def test_unparseable_timestamp_beyond_tolerance_names_line_and_field(tmp_path: Path) -> None:
    rows = [dict(RECORDS[0], event_id=f"e{i}") for i in range(10)]
    rows[4]["timestamp"] = rows[6]["timestamp"] = "yesterday"
    path = write_csv(tmp_path / "events.csv", rows)
    with pytest.raises(DataError) as err:
        read_events(path, max_malformed_fraction=0.1)
    assert str(err.value).startswith(f"{path}, line 6, field 'timestamp': cannot parse "
                                     "'yesterday' as RFC 3339 with an offset, or epoch milliseconds (2 of 10")
    assert err.value.path == str(path)
    events, report = read_events(path, max_malformed_fraction=0.25)
    assert len(events) == 8 and report.malformed == 2


def test_missing_required_column(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "e.csv", RECORDS, ["user_id", "event_type", "timestamp"])
    with pytest.raises(DataError, match=r"f\.csv: missing required column 'event_type'$") as err:
        read_events(write_csv(tmp_path / "f.csv", RECORDS, ["user_id", "timestamp"]), "csv")
    assert err.value.field == "event_type"
    assert len(read_events(path)[0]) == 5
    jsonl = write_jsonl(tmp_path / "e.jsonl", [{"user_id": "u", "event_type": "v"}])
    with pytest.raises(DataError, match="missing required column 'timestamp'"):
        read_events(jsonl)
    with pytest.raises(DataError, match="missing required column 'event_time'"):
        read_events(write_csv(tmp_path / "r.csv", [], ["event_type", "user_id"]), "rees46")


def test_empty_and_missing_files(tmp_path: Path) -> None:
    for path in (write_csv(tmp_path / "h.csv", []), write_jsonl(tmp_path / "e.jsonl", []),
                 write_parquet(tmp_path / "e.parquet", [])):
        with pytest.raises(DataError, match=r": no events$"):
            read_events(path)
    (tmp_path / "zero.csv").write_bytes(b"")
    with pytest.raises(DataError, match="no events"):
        read_events(tmp_path / "zero.csv", "csv")
    with pytest.raises(DataError, match=r"nope\.csv: no such file"):
        read_events(tmp_path / "nope.csv")
    (tmp_path / "odd.txt").write_text("a;b;c\n1;2;3\n")
    with pytest.raises(DataError, match="cannot tell the format"):
        detect_format(tmp_path / "odd.txt")
    with pytest.raises(ValueError, match="format must be one of"):
        read_events(tmp_path / "odd.txt", "xlsx")
    assert FORMATS[0] == "auto"


def test_dedupe_drops_exact_duplicates_only(tmp_path: Path) -> None:
    base = dict(RECORDS[0])
    rows = [base, dict(base, price=10.0), base, dict(base, event_id="e9"), base,
            dict(RECORDS[1])]
    path = write_csv(tmp_path / "d.csv", rows)
    events, report = read_events(path, sort=False)
    assert report.duplicates_dropped == 2 and len(events) == 4
    assert list(events.event_id) == ["e1", "e1", "e9", "e2"]
    assert np.allclose(events.price[:2], [9.99, 10.0])
    events, report = read_events(path, dedupe=False)
    assert report.duplicates_dropped == 0 and len(events) == 6


def test_sort_groups_users_in_time_order_and_keeps_ties_stable(tmp_path: Path) -> None:
    rows = [dict(RECORDS[0], event_id=f"e{i}", user_id=f"u{i % 3}", timestamp=T0 + t)
            for i, t in enumerate([50, 10, 30, 10, 20, 10, 50, 40, 10])]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    in_order, _ = read_events(path, sort=False)
    assert list(in_order.event_id) == [r["event_id"] for r in rows]
    events, _ = read_events(path)
    uid = events.user_id_strings()
    for u in ("u0", "u1", "u2"):
        at = np.flatnonzero(uid == u)
        assert (np.diff(at) == 1).all()  # contiguous
        assert (np.diff(events.timestamp_ms[at]) >= 0).all()
    # equal timestamps keep file order: u0 has e3 (10) and e0, e6 (50)
    assert list(events.event_id[uid == "u0"]) == ["e3", "e0", "e6"]
    assert list(events.event_id[uid == "u1"]) == ["e1", "e4", "e7"]


def test_split_by_user() -> None:
    events, _ = read_events(TAOBAO_TAIL)
    records = [{"user_id": f"user{u}", "event_type": "pv", "timestamp": 1000 * (50 - t)}
               for u in range(40) for t in range(u % 5 + 1)]
    many = Events.from_records(records)
    for ev in (events, many):
        parts = split_by_user(ev, (0.5, 0.25, 0.25), seed=3)
        users = [set(p.user_id_strings()) for p in parts]
        assert not (users[0] & users[1] or users[0] & users[2] or users[1] & users[2])
        assert set().union(*users) == set(ev.user_id_strings())
        assert sum(len(p) for p in parts) == len(ev)
        for p in parts:
            assert_same_events(p, p.sorted())
        again = split_by_user(ev, (0.5, 0.25, 0.25), seed=3)
        assert [set(p.user_id_strings()) for p in again] == users
    sizes = [len(set(p.user_id_strings())) for p in split_by_user(many, seed=0)]
    assert sizes == [28, 6, 6]
    shuffled = many.take(np.random.default_rng(1).permutation(len(many)))  # row order is moot
    assert [set(p.user_id_strings()) for p in split_by_user(shuffled, seed=0)] == [
        set(p.user_id_strings()) for p in split_by_user(many, seed=0)]
    assert [set(p.user_id_strings()) for p in split_by_user(many, seed=1)] != [
        set(p.user_id_strings()) for p in split_by_user(many, seed=0)]
    with pytest.raises(ValueError):
        split_by_user(many, (0.5, 0.5))  # type: ignore[arg-type]


@pytest.mark.parametrize("path", [TAOBAO_TAIL, REES46_SLICE], ids=["taobao", "rees46"])
def test_small_chunks_give_the_same_result(path: Path) -> None:
    progress: list[int] = []
    small, report = read_events(path, chunk_rows=7, on_chunk=progress.append)
    whole, _ = read_events(path)
    assert_same_events(small, whole)
    assert len(progress) > 30 and sum(progress) == report.rows_read
    chunks = list(iter_event_chunks(path, chunk_rows=7))
    assert all(len(c) <= 7 for c in chunks)
    assert_same_events(Events.concat(chunks), read_events(path, sort=False, dedupe=False)[0])


def test_small_chunks_generic(tmp_path: Path) -> None:
    rows = [dict(r, event_id=f"{r['event_id']}-{k}") for k in range(7) for r in RECORDS]
    for writer, name in ((write_jsonl, "g.jsonl.gz"), (write_parquet, "g.parquet"),
                         (write_csv, "g.csv")):
        path = writer(tmp_path / name, rows)
        assert_same_events(read_events(path, chunk_rows=3)[0], read_events(path)[0])
        assert len(list(iter_event_chunks(path, chunk_rows=3))) == 12


def test_parquet_native_types_and_hashes_of_any_string(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    alphabet = list("ab0-_é字😀 ")
    items = ["".join(rng.choice(alphabet, rng.integers(0, 40))) for _ in range(500)]
    items[:3] = [None, "", "x"]
    n = len(items)
    table = pa.table({
        "user_id": pa.array(rng.integers(1, 9, n)),  # integers, read as their decimal text
        "event_type": pa.array(["view", "buy"] * (n // 2)).dictionary_encode(),
        "timestamp": pa.array(1_700_000_000_000 + np.arange(n), pa.int64()),  # epoch ms
        "item_id": pa.array(items, pa.large_string()),
        "device_id": pa.array([None] * n, pa.string()),
        "price": pa.array([None, float("nan"), 1.5] + [2.0] * (n - 3)),
        "label": pa.array([True, False] * (n // 2)),
    })
    pq.write_table(table, tmp_path / "native.parquet", row_group_size=64)
    events, report = read_events(tmp_path / "native.parquet", sort=False, chunk_rows=100)
    assert (len(events), report.malformed, report.format) == (n, 0, "parquet")
    assert list(events.user_id_strings()) == [str(u) for u in table["user_id"].to_pylist()]
    np.testing.assert_array_equal(events.item_id, hash_strings(items))
    assert (events.device_id == 0).all()
    assert np.isnan(events.price[:2]).all() and events.price[2] == np.float32(1.5)
    assert list(events.label[:4]) == [1, 0, 1, 0]
    assert list(events.timestamp_ms[:2]) == [1_700_000_000_000, 1_700_000_000_001]
