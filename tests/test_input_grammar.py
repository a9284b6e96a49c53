"""One input grammar on every path (issue 8, items 1-3): the request parsers of
``POST /events`` and ``/batch-score`` (JSON and NDJSON lines) and the file loaders behind
``seqguard score``/``train``/``evaluate`` accept and refuse the same timestamps, refuse a
key given twice in one object, and skip a leading UTF-8 byte order mark."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pytest
from fastapi.exceptions import RequestValidationError

from app.core.events import PLAUSIBLE_MS, TimestampError, parse_timestamp_ms, repeated_keys
from app.schemas import parse_batch_request, parse_event_line, parse_events
from model_export.columns import parse_text_times
from model_export.data import DataError, iter_records, read_events

BOM = b"\xef\xbb\xbf"
T = 1_511_596_870_000  # 2017-11-25T08:01:10Z
SECONDS_HINT = "looks like epoch seconds; send milliseconds"


def ev(eid: str = "e1", user: str = "u1", ts: Any = T, **fields: Any) -> dict[str, Any]:
    return {"event_id": eid, "user_id": user, "event_type": "pv", "timestamp": ts, **fields}


def online(value: Any) -> int | str:
    """The epoch ms POST /events stores for ``timestamp: value``, or the error's message."""
    try:
        return parse_events(orjson.dumps(ev(ts=value)))[0][0].timestamp
    except RequestValidationError as e:
        (err,) = e.errors()
        assert err["loc"] == ("body", "timestamp")
        return str(err["msg"])


def offline(tmp_path: Path, value: Any, fmt: str) -> int | str:
    """What the loaders of ``seqguard score`` and ``replay`` read from a one-event file with
    ``value``: the epoch ms, or why the line is malformed."""
    if fmt == "jsonl":
        path = tmp_path / "e.jsonl"
        path.write_bytes(orjson.dumps(ev(ts=value)) + b"\n")
    else:
        path = tmp_path / "e.csv"
        path.write_text(f"event_id,user_id,event_type,timestamp\ne1,u1,pv,{value}\n")
    stream = iter_records(path, fmt, max_malformed_fraction=1.0)
    try:
        (chunk,) = list(stream)
    except DataError:
        return stream.report.malformed_examples[0]
    events, _ = read_events(path, fmt)
    assert [r["timestamp"] for r in chunk] == events.timestamp_ms.tolist()
    return int(chunk[0]["timestamp"])


ACCEPTED = [
    ("2017-11-25T08:01:10z", T),  # the issue's input: RFC 3339 allows lower case
    ("2017-11-25t08:01:10Z", T),
    ("2017-11-25T08:01:10Z", T),
    ("2017-11-25 08:01:10Z", T),
    ("2017-11-25T09:01:10+01:00", T),
    ("2017-11-25T02:31:10.25-05:30", T + 250),
    ("2017-11-25T08:01:10.123999999Z", T + 123),  # sub-millisecond digits are cut, never rounded
    (str(T), T),
    (T, T),
    (PLAUSIBLE_MS[0], PLAUSIBLE_MS[0]),
    (PLAUSIBLE_MS[1] - 1, PLAUSIBLE_MS[1] - 1),
    ("1999-12-31T23:00:00-01:00", PLAUSIBLE_MS[0]),
]
REFUSED = [
    (1511596870, SECONDS_HINT),  # the issue's input: epoch seconds for milliseconds
    ("1511596870", SECONDS_HINT),
    (T * 1000, "looks like epoch microseconds"),
    (T * 1_000_000, "looks like epoch nanoseconds"),
    (PLAUSIBLE_MS[0] - 1, "before 2000-01-01"),
    (PLAUSIBLE_MS[1], "after 2100-01-01"),
    ("1999-12-31T23:59:59Z", "before 2000-01-01"),
    ("2017-11-25T08:01:10", "offset"),  # naive: RFC 3339 says what it means
    ("2017-11-25", "offset"),
    ("2017-02-30T08:01:10Z", "RFC 3339"),
    ("2017-11-25T24:00:00Z", "RFC 3339"),
    ("2017-11-25T08:01:60Z", "RFC 3339"),
    ("2017-11-25T08:01:10Z\n", "RFC 3339"),  # a trailing newline: re's $ took it online, RE2 offline did not
    ("20171125T080110Z", "RFC 3339"),  # ISO 8601 basic format is not RFC 3339
    ("2017-11-25T08:01:10+0100", "RFC 3339"),
    ("2017-11-25T08:01:10 UTC", "RFC 3339"),
    (" 1511596870000", "RFC 3339"),
    ("１５１１５９６８７００００", "RFC 3339"),  # digits, but not ASCII ones
    ("yesterday", "RFC 3339"),
]


@pytest.mark.parametrize(("value", "ms"), ACCEPTED)
def test_timestamps_accepted_alike_online_and_offline(tmp_path: Path, value: Any, ms: int) -> None:
    assert parse_timestamp_ms(value, check_range=True) == ms
    assert online(value) == ms
    assert offline(tmp_path, value, "jsonl") == ms
    assert offline(tmp_path, value, "csv") == ms


@pytest.mark.parametrize(("value", "said"), REFUSED)
def test_timestamps_refused_alike_online_and_offline(tmp_path: Path, value: Any, said: str) -> None:
    with pytest.raises(TimestampError, match=said):
        parse_timestamp_ms(value, check_range=True)
    msg = online(value)
    assert isinstance(msg, str) and said in msg
    # (a newline inside a value is no CSV cell: that file would hold another line)
    for fmt in ("jsonl",) if isinstance(value, str) and "\n" in value else ("jsonl", "csv"):
        why = offline(tmp_path, value, fmt)
        assert isinstance(why, str) and "field 'timestamp'" in why and said in why


def test_epoch_seconds_hint_names_the_milliseconds_to_send() -> None:
    assert online(1511596870) == ("timestamp 1511596870 is before 2000-01-01: it looks like epoch seconds; "
                                  "send milliseconds (1511596870000)")


def test_arrow_reads_rfc3339_columns_as_the_one_function_does() -> None:
    """The loaders cast whole columns with Arrow: the same milliseconds, string for string."""
    rng = random.Random(8)
    texts = []
    for _ in range(2000):
        t = datetime(2000, 1, 1, tzinfo=UTC) + timedelta(seconds=rng.randrange(100 * 365 * 86400))
        off = rng.choice([0, 60, -90, 330, -600, 840])
        local = t + timedelta(minutes=off)
        s = local.strftime("%Y-%m-%d") + rng.choice("Tt ") + local.strftime("%H:%M:%S")
        if rng.random() < 0.5:
            s += "." + "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 9)))
        if off == 0 and rng.random() < 0.5:
            s += rng.choice("Zz")
        else:
            s += f"{'+' if off >= 0 else '-'}{abs(off) // 60:02d}:{abs(off) % 60:02d}"
        texts.append(s)
    ms, bad = parse_text_times(pa.array(texts))
    assert not bad.any()
    assert ms.tolist() == [parse_timestamp_ms(s) for s in texts]
    # one bad day sends the column through the one function, row by row: same answer
    ms2, bad2 = parse_text_times(pa.array([*texts[:50], "2019-02-29T00:00:00Z"]))
    assert ms2[:50].tolist() == ms[:50].tolist() and bad2.tolist() == [False] * 50 + [True]


# ---- repeated keys ---------------------------------------------------------------------------

ISSUE_BODY = b'{"event_id":"d1","user_id":"a","user_id":"b","event_type":"pv","timestamp":1511596870000}'


def refused_at(parse: Any, body: bytes) -> list[tuple[Any, ...]]:
    with pytest.raises(RequestValidationError) as info:
        parse(body)
    errs = info.value.errors()
    assert all(e["type"] == "duplicate_key" and repr(e["loc"][-1]) in e["msg"] for e in errs)
    return [e["loc"] for e in errs]


def test_repeated_key_refused_on_every_request_parser() -> None:
    assert refused_at(parse_events, ISSUE_BODY) == [("body", "user_id")]
    line = ISSUE_BODY
    assert refused_at(lambda b: parse_event_line(b, 7), line) == [("body", 7, "user_id")]
    one = orjson.dumps(ev("d0"))
    batch = b'{"events": [' + one + b"," + ISSUE_BODY + b"]}"
    assert refused_at(parse_events, batch) == [("body", "events", 1, "user_id")]
    assert refused_at(parse_batch_request, batch) == [("body", "events", 1, "user_id")]
    twice = b'{"events": [' + one + b'], "update_windows": true, "update_windows": false}'
    assert refused_at(parse_batch_request, twice) == [("body", "update_windows")]
    # every repeated key of every object, and beside the other errors of the body
    body = b'{"events": [' + ISSUE_BODY[:-1] + b',"price":1,"price":2}, ' + one + b"," + ISSUE_BODY + b"]}"
    assert refused_at(parse_events, body) == [("body", "events", 0, "price"), ("body", "events", 0, "user_id"),
                                              ("body", "events", 2, "user_id")]
    with pytest.raises(RequestValidationError) as info:
        parse_events(ISSUE_BODY[:-1] + b',"colour":"red"}')
    assert {e["type"] for e in info.value.errors()} == {"duplicate_key", "extra_forbidden"}


@pytest.mark.parametrize("body", [
    b'{"event_id":"d1","user_id":"a","user\\u005fid":"b","event_type":"pv","timestamp":1511596870000}',  # escaped
    b'{"event_id":"d1","user_id":"a","event_type":"pv","timestamp":1511596870000,"item_id":null,"item_id":"x"}',
    b'{"event_id":"d1","user_id":"a","event_type":"pv","timestamp":1511596870000,"item_id":"x","item_id":null}',
])
def test_repeated_key_in_any_spelling_is_found(body: bytes) -> None:
    assert len(refused_at(parse_events, body)) == 1
    batch = b'{"events": [' + orjson.dumps(ev("d0")) + b"," + body + b"]}"
    assert len(refused_at(parse_batch_request, batch)) == 1


def test_values_that_spell_a_key_are_no_repeat() -> None:
    body = orjson.dumps(ev(item_id="user_id", category_id="\"user_id\"", session_id="events"))
    assert parse_events(body)[0][0].item_id == "user_id"
    assert len(parse_batch_request(b'{"events": [' + body + b"," + body + b"]}").events) == 2
    assert repeated_keys(b'{"a": {"b": 1, "b": 2}, "c": [{"d": 1, "d": 1}]}') == [("a", "b"), ("c", 0, "d")]
    assert repeated_keys(b"not json") == []


def test_repeated_key_is_a_malformed_line_in_files(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    lines = [orjson.dumps(ev(f"e{i}", ts=T + i)) for i in range(300)]
    lines[5] = ISSUE_BODY.replace(b"d1", b"e5")
    lines[9] = lines[9][:-1] + b',"label":0,"label":1}'
    path.write_bytes(b"\n".join(lines) + b"\n")
    events, report = read_events(path, sort=False)
    assert len(events) == 298 and report.malformed == 2
    assert report.malformed_examples == [
        "line 6: field 'user_id': key 'user_id' is given more than once in one object",
        "line 10: field 'label': key 'label' is given more than once in one object",
    ]
    assert "e5" not in set(events.event_id)


# ---- byte order marks ------------------------------------------------------------------------

def test_bom_is_skipped_by_every_request_parser() -> None:
    one = orjson.dumps(ev())
    assert parse_events(BOM + one)[0][0].event_id == "e1"
    assert parse_events((BOM + one).decode())[0][0].event_id == "e1"
    assert len(parse_events(BOM + b'{"events": [' + one + b"]}")[0]) == 1
    assert len(parse_batch_request(BOM + b'{"events": [' + one + b"]}").events) == 1
    assert parse_event_line(BOM + one, 0).event_id == "e1"
    with pytest.raises(RequestValidationError):  # only at the start of the body
        parse_event_line(BOM + one, 1)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "taobao"])
def test_bom_is_skipped_by_every_text_loader(tmp_path: Path, fmt: str) -> None:
    rows = [ev(f"e{i}", ts=T + 60_000 * i) for i in range(3)]
    if fmt == "jsonl":
        text = b"".join(orjson.dumps(r) + b"\n" for r in rows)
    elif fmt == "csv":
        text = b"event_id,user_id,event_type,timestamp\n" + b"".join(
            f"{r['event_id']},{r['user_id']},pv,{r['timestamp']}\n".encode() for r in rows)
    else:
        text = b"".join(f"1,2,3,pv,{r['timestamp'] // 1000}\n".encode() for r in rows)
    path = tmp_path / f"e.{fmt}"
    path.write_bytes(BOM + text)
    events, report = read_events(path, fmt, sort=False)
    assert (len(events), report.malformed) == (3, 0)
    assert events.user_id_strings().tolist() == ["u1"] * 3 if fmt != "taobao" else ["1"] * 3
    assert events.timestamp_ms.tolist() == [r["timestamp"] for r in rows]
