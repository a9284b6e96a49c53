"""One input grammar and one set of rules on every path, over HTTP (issue 8, items 1, 2, 3
and 6): ``POST /events`` (one event and bulk), ``/batch-score`` as JSON and as NDJSON,
and ``seqguard score`` refuse a repeated key, read the same timestamps, skip a leading
byte order mark, and answer a redelivered event as the live window store does."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from app.cli import cli
from app.core.bundle import DEFAULT_BUNDLE
from app.routes import backfill as backfill_route

from .e2e_support import TOL, TestClient, db_size, taobao_events, window_len

PROBLEM = "application/problem+json"
NDJSON = {"content-type": "application/x-ndjson"}
JSON = {"content-type": "application/json"}
BOM = b"\xef\xbb\xbf"
T = 1_511_596_870_000  # 2017-11-25T08:01:10Z
ISSUE_BODY = b'{"event_id":"d1","user_id":"a","user_id":"b","event_type":"pv","timestamp":1511596870000}'


def ev(eid: str, ts: Any = T, user: str = "u1", event_type: str = "pv") -> dict[str, Any]:
    return {"event_id": eid, "user_id": user, "event_type": event_type, "timestamp": ts}


def bulk(*lines: bytes) -> bytes:
    return b'{"events": [' + b",".join(lines) + b"]}"


def ndjson(*lines: bytes) -> bytes:
    return b"\n".join(lines) + b"\n"


def send(client: TestClient, path: str, body: bytes) -> Any:
    """POST ``body`` to one of the four request forms."""
    route, headers = {"events": ("/events", JSON), "events-bulk": ("/events", JSON),
                      "batch-json": ("/batch-score", JSON), "batch-ndjson": ("/batch-score", NDJSON)}[path]
    return client.post(route, content=body, headers=headers)


def body_of(form: str, *lines: bytes) -> bytes:
    if form == "events":
        assert len(lines) == 1
        return lines[0]
    return ndjson(*lines) if form == "batch-ndjson" else bulk(*lines)


FORMS = ["events", "events-bulk", "batch-json", "batch-ndjson"]


def problem(r: Any) -> list[dict[str, Any]]:
    assert r.status_code == 422, r.text
    assert r.headers["content-type"] == PROBLEM
    errors: list[dict[str, Any]] = r.json()["errors"]
    return errors


# ---- 1. repeated keys -------------------------------------------------------------------------

@pytest.mark.parametrize("form", FORMS)
def test_repeated_key_is_refused_naming_it(client: TestClient, redis_url: str, form: str) -> None:
    """The issue's body ("user_id" twice) gets a 422 naming the key, and nothing is stored."""
    errors = problem(send(client, form, body_of(form, ISSUE_BODY)))
    where = {"events": "$.user_id", "events-bulk": "$.events[0].user_id", "batch-json": "$.events[0].user_id",
             "batch-ndjson": "$[0].user_id"}[form]
    assert [(e["path"], e["type"]) for e in errors] == [(where, "duplicate_key")]
    assert "'user_id'" in errors[0]["message"]
    assert db_size(redis_url) == 0 and window_len(redis_url, "a") == window_len(redis_url, "b") == 0


def test_repeated_key_after_the_first_ndjson_chunk_is_reported_in_the_stream(
        client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backfill_route, "CHUNK_EVENTS", 2)
    lines = [orjson.dumps(ev(f"e{i}", T + i)) for i in range(4)] + [ISSUE_BODY]
    r = send(client, "batch-ndjson", ndjson(*lines))
    assert r.status_code == 200
    rows = [orjson.loads(x) for x in r.text.splitlines()]
    assert [x["event_id"] for x in rows if "error" not in x] == ["e0", "e1", "e2", "e3"]
    assert [x["error"]["path"] for x in rows if "error" in x] == ["$[4].user_id"]


def test_an_ndjson_answer_keeps_input_order_across_chunks_bad_lines_included(
        client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the first chunk, each bad line's error lines stand where the line stood, between
    the answers of the valid lines around it (they came before the whole chunk's answers),
    and a chunk of bad lines only is answered too (it ended the stream, unanswered after)."""
    monkeypatch.setattr(backfill_route, "CHUNK_EVENTS", 4)
    bad = {5: b'{"event_id": "x5", "user_id": "u1"}', 6: b"not json", 9: ISSUE_BODY,
           12: b'{"event_id": "x12"}', 13: b"[]", 14: b"{", 15: b'{"event_id": "x15", "timestamp": "soon"}'}
    lines = [bad.get(i, orjson.dumps(ev(f"e{i}", T + i))) for i in range(20)]  # chunk 3 (lines 12-15): all bad
    r = send(client, "batch-ndjson", ndjson(*lines))
    assert r.status_code == 200, r.text
    # Each answer line's input line: a result's by its event id, an error's by its "line".
    rows = [orjson.loads(x) for x in r.text.splitlines()]
    order = [x["error"]["line"] if "error" in x else int(x["event_id"][1:]) for x in rows]
    assert order == sorted(order)
    assert sorted(set(order)) == list(range(20))  # every line answered, each bad one with 1+ error lines
    assert order.count(5) == 2  # event_type and timestamp missing: both named, together


def test_a_line_that_is_not_json_is_one_bad_line_of_the_stream(client: TestClient) -> None:
    """Reviews found a 400 "not valid JSON: ... at line 1 column 19" for the third line of a
    stream (the position inside the line, read as if in the body) that also dropped the
    other bad lines of the chunk. It is a 422 listing every bad line, each at its $[n]."""
    lines = [orjson.dumps(ev("g0", T)), orjson.dumps(ev("g1", T + 1)), b'{"event_id":"b1", bad',
             orjson.dumps({k: v for k, v in ev("g3", T + 3).items() if k != "timestamp"})]
    r = send(client, "batch-ndjson", ndjson(*lines))
    assert r.status_code == 422, r.text
    errors = r.json()["errors"]
    assert [e["path"] for e in errors] == ["$[2]", "$[3].timestamp"]
    assert errors[0]["type"] == "json_invalid_line" and "not valid JSON" in errors[0]["message"]


# ---- 2. one timestamp grammar -----------------------------------------------------------------

@pytest.mark.parametrize("form", FORMS)
def test_lower_case_rfc3339_is_accepted_and_epoch_seconds_refused(client: TestClient, redis_url: str,
                                                                   form: str) -> None:
    ok = send(client, form, body_of(form, orjson.dumps(ev("z1", "2017-11-25T08:01:10z"))))
    assert ok.status_code == 200, ok.text
    errors = problem(send(client, form, body_of(form, orjson.dumps(ev("s1", 1511596870, user="u2")))))
    assert len(errors) == 1 and errors[0]["type"] == "timestamp_range"
    assert "looks like epoch seconds; send milliseconds (1511596870000)" in errors[0]["message"]
    assert window_len(redis_url, "u2") == 0  # never stored as January 1970


def test_the_same_time_on_every_path(client: TestClient, tmp_path: Path) -> None:
    """'2017-11-25T08:01:10z' and 1511596870000 are the same time everywhere: the same score
    online, in both batch forms and in `seqguard score` as the same event in epoch ms."""
    as_text = [ev("a", "2017-11-25T08:01:10z"), ev("b", "2017-11-25t08:02:10.000Z", event_type="cart")]
    as_ms = [ev("a", T), ev("b", T + 60_000, event_type="cart")]
    want = [x["anomaly_probability"] for x in client.post("/batch-score", json={"events": as_ms}).json()["results"]]
    lines = [orjson.dumps(e) for e in as_text]
    got = {
        "json": [x["anomaly_probability"] for x in send(client, "batch-json", bulk(*lines)).json()["results"]],
        "ndjson": [orjson.loads(x)["anomaly_probability"] for x in
                   send(client, "batch-ndjson", ndjson(*lines)).text.splitlines()],
        "cli": [x["anomaly_probability"] for x in score_file(tmp_path, ndjson(*lines))],
        "online": [send(client, "events", x).json()["anomaly_probability"] for x in lines],
    }
    for name, probs in got.items():
        assert max(abs(a - b) for a, b in zip(probs, want, strict=True)) < TOL, name


# ---- 3. byte order marks ----------------------------------------------------------------------

@pytest.mark.parametrize("form", FORMS)
def test_a_leading_bom_is_skipped(client: TestClient, form: str) -> None:
    lines = [orjson.dumps(ev("b1"))] if form == "events" else [orjson.dumps(ev(f"b{i}", T + i)) for i in range(3)]
    r = send(client, form, BOM + body_of(form, *lines))
    assert r.status_code == 200, r.text
    if form == "events":
        assert r.json()["event_id"] == "b1"
    elif form == "batch-ndjson":
        assert [orjson.loads(x)["event_id"] for x in r.text.splitlines()] == ["b0", "b1", "b2"]
    else:
        assert [x["event_id"] for x in r.json()["results"]] == ["b0", "b1", "b2"]


# ---- 6. one set of rules for backfill and live ------------------------------------------------

def score_file(tmp_path: Path, data: bytes) -> list[dict[str, Any]]:
    src, out = tmp_path / "events.jsonl", tmp_path / "results.jsonl"
    src.write_bytes(data)
    res = CliRunner().invoke(cli, ["score", str(DEFAULT_BUNDLE), "--events", str(src), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return [orjson.loads(x) for x in out.read_bytes().splitlines()]


def backfills(client: TestClient, tmp_path: Path, events: list[dict[str, Any]],
              monkeypatch: pytest.MonkeyPatch) -> dict[str, list[dict[str, Any]]]:
    """The answers of /batch-score (JSON; NDJSON in one chunk, in chunks of 1 and of 7) and
    of `seqguard score` to ``events``."""
    lines = [orjson.dumps(e) for e in events]
    out = {"json": send(client, "batch-json", bulk(*lines)).json()["results"]}
    for size in (backfill_route.CHUNK_EVENTS, 1, 7):
        monkeypatch.setattr(backfill_route, "CHUNK_EVENTS", size)
        r = send(client, "batch-ndjson", ndjson(*lines))
        assert r.status_code == 200, r.text
        out[f"ndjson/{size}"] = [orjson.loads(x) for x in r.text.splitlines()]
    monkeypatch.undo()
    out["cli"] = score_file(tmp_path, ndjson(*lines))
    return out


def test_a_redelivered_event_is_answered_alike_live_and_in_backfills(
        client: TestClient, redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The issue's log: ord-1, ord-1, ord-2 of one user a minute apart. Live, the repeat gets
    the first answer with duplicate=true and ord-2 is scored on [ord-1, ord-2]; every
    backfill form gives the same answers and flags the repeat."""
    ord1 = {**ev("ord-1", T, event_type="buy"), "item_id": "i1"}
    ord2 = {**ev("ord-2", T + 60_000, event_type="buy"), "item_id": "i2"}
    log = [ord1, ord1, ord2]
    live = [client.post("/events", json=e).json() for e in log]
    assert [x["duplicate"] for x in live] == [False, True, False]
    assert live[1]["anomaly_probability"] == live[0]["anomaly_probability"]
    assert window_len(redis_url, "u1") == 2
    for name, rows in backfills(client, tmp_path, log, monkeypatch).items():
        assert [x["event_id"] for x in rows] == ["ord-1", "ord-1", "ord-2"], name
        assert [x.get("duplicate", False) for x in rows] == [False, True, False], name
        for x, want in zip(rows, live, strict=True):
            assert abs(x["anomaly_probability"] - want["anomaly_probability"]) < TOL, name
            assert x["decision"] == want["decision"], name


def test_redeliveries_in_a_real_log_answer_alike_live_and_in_backfills(
        client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bundle_meta: dict[str, Any]) -> None:
    """Real users' events with some delivered twice (right after, or later in the log; the
    second time possibly with another timestamp): every path answers as the live service."""
    by_user = taobao_events(["100", "10001"])
    events = [e for pair in itertools.zip_longest(*by_user.values()) for e in pair if e]  # round robin
    assert len(by_user["100"]) > bundle_meta["history"]  # the store trims; a stream carries the last events
    log: list[dict[str, Any]] = []
    for i, e in enumerate(events):
        log.append(e)
        if i % 9 == 4:
            log.append(e)  # redelivered at once
        if i % 13 == 6:
            log.append({**events[i - 5], "timestamp": e["timestamp"]})  # redelivered late, stamped anew
    live = [client.post("/events", json=e).json() for e in log]
    dup = [x["duplicate"] for x in live]
    assert sum(dup) == len(log) - len(events)
    for name, rows in backfills(client, tmp_path, log, monkeypatch).items():
        assert [x.get("duplicate", False) for x in rows] == dup, name
        worst = max(abs(x["anomaly_probability"] - y["anomaly_probability"]) for x, y in zip(rows, live, strict=True))
        # Tighter than TOL: a repeat carried into the next chunk's context would push the
        # oldest event out of it (seen at 1e-5 in chunks of 1); float noise here is ~1e-7.
        assert worst < 2e-6, f"{name}: {worst:.2e}"



def test_late_events_are_answered_alike_live_and_in_every_backfill_form(
        client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bundle_meta: dict[str, Any]) -> None:
    """Events that arrive after later-stamped events of their user (the issue's kind: the
    same answer whatever the body form, size or chunking). Each backfill form answers as
    the live store did: a late event on what had arrived before it, the events before it
    without it, and one older than every event the store still keeps on itself alone."""
    by_user = taobao_events(["100", "10001"])
    history = bundle_meta["history"]
    u100, u10001 = by_user["100"], by_user["10001"]
    assert len(u100) > history + 10
    log = [e for pair in itertools.zip_longest(u100, u10001) for e in pair if e]  # round robin
    for moved, by in ((u100[20], 9), (u10001[5], 30), (u100[40], 3)):  # late by a few events
        i = log.index(moved)
        log.insert(i + by, log.pop(i))
    log.remove(u100[2])
    log.append(u100[2])  # older than every event the store keeps of its user
    same_second = {**u10001[-1], "event_id": "10001-again", "event_type": "cart"}
    log.insert(log.index(u10001[-1]), same_second)  # arrives first, same timestamp
    assert any(a["timestamp"] > b["timestamp"] for a, b in itertools.pairwise(log[:30])), "the log must be late"
    live = [client.post("/events", json=e).json() for e in log]
    assert live[-1]["window_size"] == 1  # the very late event: the store kept nothing older
    for name, rows in backfills(client, tmp_path, log, monkeypatch).items():
        assert [x["event_id"] for x in rows] == [e["event_id"] for e in log], name
        worst = max(abs(x["anomaly_probability"] - y["anomaly_probability"]) for x, y in zip(rows, live, strict=True))
        assert worst < 2e-6, f"{name}: {worst:.2e}"
        assert [x["decision"] for x in rows] == [y["decision"] for y in live], name


def test_batch_update_windows_stores_a_repeat_once(client: TestClient, redis_url: str) -> None:
    log = [ev("r1", T), ev("r1", T), ev("r2", T + 60_000)]
    r = client.post("/batch-score?update_windows=true", json={"events": log})
    assert [x.get("duplicate", False) for x in r.json()["results"]] == [False, True, False]
    assert window_len(redis_url, "u1") == 2


def test_a_repeat_of_an_event_long_gone_from_the_carried_context(
        client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bundle_meta: dict[str, Any]) -> None:
    """A stream scored in chunks recognises a repeat of an event of any earlier chunk, not
    only of the events carried over: here the first event of a user, redelivered after
    more than `history` later ones (as the live store does, within its idempotency bounds)."""
    evs = taobao_events(["100"])["100"]
    assert len(evs) > bundle_meta["history"] + 2
    log = [*evs, evs[0], {**evs[1], "timestamp": evs[-1]["timestamp"]}]
    live = [client.post("/events", json=e).json() for e in log]
    assert [x["duplicate"] for x in live] == [False] * len(evs) + [True, True]
    for name, rows in backfills(client, tmp_path, log, monkeypatch).items():
        assert [x.get("duplicate", False) for x in rows] == [False] * len(evs) + [True, True], name
        worst = max(abs(x["anomaly_probability"] - y["anomaly_probability"]) for x, y in zip(rows, live, strict=True))
        assert worst < 2e-6, f"{name}: {worst:.2e}"
