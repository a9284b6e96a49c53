"""`iter_records` (request dicts with raw ids, streamed from a file) and `seqguard replay`
against a live service: `seqguard serve` on a free loopback port, embedded Redis in tmp."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import TAOBAO_100, invoke
from e2e.e2e_support import LiveServer

from app.core.events import hash_strings
from app.replay import ReplayConfig, Replayer, replay, retry_after
from model_export.data import DataError, iter_records, read_events

# ---- iter_records ------------------------------------------------------------------------


def test_iter_records_taobao_raw_ids_ms_and_the_ids_of_events() -> None:
    stream = iter_records(TAOBAO_100, "taobao", chunk_rows=1000)
    chunks = list(stream)
    recs = [r for c in chunks for r in c]
    ev, report = read_events(TAOBAO_100, "taobao", dedupe=False, sort=False)

    assert all(len(c) <= 1000 for c in chunks) and len(chunks) == -(-len(recs) // 1000)
    assert len(recs) == len(ev) == stream.report.rows_kept == report.rows_kept
    assert stream.report.malformed == report.malformed
    assert recs[0] == {"event_id": "1-1511544070000-0", "user_id": "1", "event_type": "pv",
                       "timestamp": 1511544070000, "item_id": "2268318", "category_id": "2520377"}
    # Raw strings: the loader's hashes are the hashes of exactly these strings.
    assert all(type(r["item_id"]) is str and type(r["timestamp"]) is int for r in recs)
    assert np.array_equal(hash_strings([r["item_id"] for r in recs]), ev.item_id)
    assert np.array_equal(hash_strings([r["category_id"] for r in recs]), ev.category_id)
    assert [r["timestamp"] for r in recs] == ev.timestamp_ms.tolist()
    assert [r["user_id"] for r in recs] == ev.user_id_strings().tolist()
    # Deterministic ids, counted over the whole file whatever the chunking.
    assert [r["event_id"] for r in recs] == ev.event_ids().tolist()
    assert [r["event_id"] for c in iter_records(TAOBAO_100, chunk_rows=7777) for r in c] == ev.event_ids().tolist()


def test_iter_records_generic_jsonl_keeps_ids_skips_and_counts_bad_rows(tmp_path: Path) -> None:
    rows = [
        {"event_id": "a1", "user_id": "u1", "event_type": "view", "timestamp": "2024-05-01T12:00:00Z",
         "item_id": "sku-9", "price": 12.5, "country": "FR"},
        {"user_id": "u1", "event_type": "cart", "timestamp": 1714564860000, "item_id": "sku-9"},
        "not json",
        {"event_id": "", "user_id": "u2", "event_type": "buy", "timestamp": 1714564920000, "price": 0},
        {"event_id": "a4", "user_id": "u2", "event_type": "view"},  # no timestamp: malformed
    ]
    path = tmp_path / "events.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)

    stream = iter_records(path, max_malformed_fraction=0.5)
    recs = [r for c in stream for r in c]
    assert recs == [
        {"event_id": "a1", "user_id": "u1", "event_type": "view", "timestamp": 1714564800000,
         "item_id": "sku-9", "country": "FR", "price": 12.5},
        {"event_id": "u1-1714564860000-1", "user_id": "u1", "event_type": "cart", "timestamp": 1714564860000,
         "item_id": "sku-9"},
        {"event_id": "u2-1714564920000-2", "user_id": "u2", "event_type": "buy", "timestamp": 1714564920000,
         "price": 0.0},
    ]
    assert (stream.report.rows_read, stream.report.rows_kept, stream.report.malformed) == (5, 3, 2)
    ev, _ = read_events(path, dedupe=False, sort=False, max_malformed_fraction=0.5)
    assert [r["event_id"] for r in recs] == ev.event_ids().tolist()

    with pytest.raises(DataError, match="malformed"):  # the default 1% tolerance, as read_events
        list(iter_records(path))


def test_iter_records_generic_csv(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    path.write_text("user_id,event_type,timestamp,event_id,session_id,price,label\n"
                    "u1,login,2024-05-01T12:00:00+02:00,x-1,s1,,0\n"
                    "u1,view,1714557660000,,s1,3.5,1\n")
    recs = [r for c in iter_records(path) for r in c]
    assert recs == [
        {"event_id": "x-1", "user_id": "u1", "event_type": "login", "timestamp": 1714557600000, "session_id": "s1"},
        {"event_id": "u1-1714557660000-1", "user_id": "u1", "event_type": "view", "timestamp": 1714557660000,
         "session_id": "s1", "price": 3.5},
    ]  # the label is not a request field: left out


# ---- the replayer on its own ---------------------------------------------------------------


def test_retry_after_header() -> None:
    assert retry_after("2", cap=10) == 2.0
    assert retry_after(None, cap=10) == 1.0
    assert retry_after("120", cap=10) == 10.0
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", cap=10) == 0.0  # a date in the past
    assert retry_after("soon", cap=10) == 1.0


def test_replay_retries_503_after_retry_after_then_counts_the_answer() -> None:
    seen: dict[str, int] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        ev = json.loads(request.content)
        seen[ev["event_id"]] = seen.get(ev["event_id"], 0) + 1
        if seen[ev["event_id"]] == 1 and len(seen) % 2:  # every other event: one 503 first
            return httpx.Response(503, headers={"Retry-After": "0"})
        return httpx.Response(200, json={"event_id": ev["event_id"], "decision": "allow", "duplicate": False})

    cfg = ReplayConfig(url="http://seqguard.test", events=TAOBAO_100, limit=10, concurrency=2)
    s = Replayer(cfg, transport=httpx.MockTransport(handler), progress=False).run_sync().summary()
    assert (s["events_sent"], s["2xx"], s["retries_503"], s["errors"]) == (10, 10, 5, 0)
    assert s["decisions"] == {"allow": 10, "review": 0, "block": 0}
    assert len(seen) == 10


def test_replay_gives_up_after_the_retries() -> None:
    transport = httpx.MockTransport(lambda r: httpx.Response(503, headers={"Retry-After": "0"}))
    cfg = ReplayConfig(url="http://seqguard.test", events=TAOBAO_100, limit=3, retries=2, concurrency=1)
    s = Replayer(cfg, transport=transport, progress=False).run_sync().summary()
    assert (s["5xx"], s["retries_503"], s["errors"], s["events_ok"]) == (3, 6, 3, 0)


def test_replay_config_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="bulk"):
        ReplayConfig(url="http://x", events=TAOBAO_100, bulk=1001)
    with pytest.raises(ValueError, match="loop"):
        ReplayConfig(url="http://x", events=TAOBAO_100, loop=True)
    with pytest.raises(ValueError, match="tag"):
        ReplayConfig(url="http://x", events=TAOBAO_100, tag="a b")


# ---- against a live service -------------------------------------------------------------


@pytest.fixture(scope="module")
def live_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`seqguard serve` (default bundle, embedded Redis in tmp) on a free loopback port."""
    with LiveServer(None, tmp_path_factory.mktemp("serve")) as server:
        yield server.url


def test_replay_cli_single_events_against_the_service(live_url: str, tmp_path: Path) -> None:
    out = tmp_path / "summary.json"
    text = invoke("replay", "--url", live_url, "--events", TAOBAO_100, "--limit", "200", "--concurrency", "8",
                  "--json", out)
    s = json.loads(out.read_text())
    assert (s["events_sent"], s["requests"], s["2xx"], s["errors"], s["retries_503"]) == (200, 200, 200, 0, 0)
    assert sum(s["decisions"].values()) == 200 and s["duplicates"] == 0
    assert s["latency_ms"]["p50"] <= s["latency_ms"]["p99"] <= s["latency_ms"]["max"]
    assert "events sent" in text and "decision block" in text


def test_replay_bulk_and_again_as_duplicates(live_url: str) -> None:
    cfg = ReplayConfig(url=live_url, events=TAOBAO_100, bulk=50, limit=300, concurrency=3, tag="bulk-")
    first = replay(cfg)
    assert (first["events_sent"], first["requests"], first["2xx"], first["errors"]) == (300, 6, 6, 0)
    assert sum(first["decisions"].values()) == 300 and first["duplicates"] == 0
    again = replay(cfg)  # the same event ids: answered from the record, nothing written twice
    assert (again["2xx"], again["duplicates"]) == (6, 300)
    assert again["decisions"] == first["decisions"]


def test_replay_raw_engine_against_the_service(live_url: str) -> None:
    cfg = ReplayConfig(url=live_url, events=TAOBAO_100, limit=120, concurrency=4, tag="raw-", engine="raw")
    s = replay(cfg)
    assert (s["events_sent"], s["2xx"], s["errors"], s["duplicates"]) == (120, 120, 0, 0)
    assert sum(s["decisions"].values()) == 120
