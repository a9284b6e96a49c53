"""Online vs batch parity on real users: POST /events one by one, /batch-score as JSON,
/batch-score as an NDJSON stream, and `seqguard score` on a JSONL file, all on the
shipped default bundle, give every event the same probability (within 1e-4)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from app.cli import cli
from app.core.bundle import DEFAULT_BUNDLE
from app.routes import backfill as backfill_route

from .e2e_support import T0, TOL, TestClient, expected_decision, taobao_events, window_len

# 98 events (more than window + lookback: the store trims), 164 events with equal
# timestamps inside the user, and 21 events.
USERS = ["100", "100030", "10001"]


def interleaved(by_user: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """All users' events in one stream, round robin (each user's order kept)."""
    out: list[dict[str, Any]] = []
    for i in range(max(len(v) for v in by_user.values())):
        out += [v[i] for v in by_user.values() if i < len(v)]
    return out


def test_online_equals_batch_json_ndjson_and_cli(client: TestClient, redis_url: str, tmp_path: Path,
                                                 bundle_meta: dict[str, Any]) -> None:
    by_user = taobao_events(USERS)
    assert any(len(set(e["timestamp"] for e in v)) < len(v) for v in by_user.values())  # ties are covered
    assert max(len(v) for v in by_user.values()) > bundle_meta["history"]
    events = interleaved(by_user)
    thresholds = bundle_meta["thresholds"]

    # Online, one event a request.
    online: dict[str, float] = {}
    for e in events:
        r = client.post("/events", json=e)
        assert r.status_code == 200, r.text
        res = r.json()
        assert res["duplicate"] is False
        online[e["event_id"]] = res["anomaly_probability"]
    for user, evs in by_user.items():
        assert window_len(redis_url, user) == min(len(evs), bundle_meta["history"])

    # /batch-score, JSON: results in input order; live windows untouched.
    before = {u: window_len(redis_url, u) for u in USERS}
    r = client.post("/batch-score", json={"events": events})
    assert r.status_code == 200, r.text
    batch_json = r.json()["results"]
    assert [x["event_id"] for x in batch_json] == [e["event_id"] for e in events]
    assert [x["user_id"] for x in batch_json] == [e["user_id"] for e in events]
    assert {u: window_len(redis_url, u) for u in USERS} == before

    # /batch-score, NDJSON streamed in small pieces (lines cut across chunks).
    body = b"".join(orjson.dumps(e) + b"\n" for e in events)

    def pieces() -> Iterator[bytes]:
        for i in range(0, len(body), 997):
            yield body[i : i + 997]

    r = client.post("/batch-score", content=pieces(), headers={"content-type": "application/x-ndjson"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/x-ndjson")
    batch_ndjson = [orjson.loads(line) for line in r.text.splitlines()]
    assert [x["event_id"] for x in batch_ndjson] == [e["event_id"] for e in events]

    # `seqguard score` on a JSONL file of the same events.
    src, out = tmp_path / "events.jsonl", tmp_path / "results.jsonl"
    src.write_bytes(body)
    res = CliRunner().invoke(cli, ["score", str(DEFAULT_BUNDLE), "--events", str(src), "--out", str(out)])
    assert res.exit_code == 0, res.output
    cli_rows = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [x["event_id"] for x in cli_rows] == [e["event_id"] for e in events]

    for name, rows in (("batch json", batch_json), ("batch ndjson", batch_ndjson), ("cli", cli_rows)):
        worst = max(abs(x["anomaly_probability"] - online[x["event_id"]]) for x in rows)
        assert worst < TOL, f"{name}: max |online - {name}| = {worst:.2e}"
        for x in rows:
            assert set(x) == {"event_id", "user_id", "anomaly_probability", "decision"}
            assert x["decision"] == expected_decision(x["anomaly_probability"], thresholds)


def test_batch_score_update_windows_feeds_the_online_path(client: TestClient, redis_url: str) -> None:
    """A backfill with update_windows=true leaves the live windows as if the events had
    arrived online: the next online event scores as batch-scoring the whole history."""
    user = "1000"
    evs = taobao_events([user])[user]
    history, nxt = evs[:-1], evs[-1]
    r = client.post("/batch-score?update_windows=true", json={"events": history})
    assert r.status_code == 200, r.text
    assert window_len(redis_url, user) > 0
    online = client.post("/events", json=nxt).json()
    assert online["duplicate"] is False
    full = client.post("/batch-score", json={"events": evs}).json()["results"]
    assert abs(online["anomaly_probability"] - full[-1]["anomaly_probability"]) < TOL
    # The backfilled events are known to the idempotency record: a replay adds nothing.
    size = window_len(redis_url, user)
    assert client.post("/events", json=history[-1]).json()["duplicate"] is True
    assert window_len(redis_url, user) == size


def test_ndjson_stream_longer_than_one_chunk(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream is scored chunk by chunk, each user's last events carried over: the same
    probabilities as one JSON body. (The chunk size is cut down so that a few hundred
    events cross several chunk boundaries.)"""
    monkeypatch.setattr(backfill_route, "CHUNK_EVENTS", 25)
    events = interleaved(taobao_events(USERS))
    whole = {x["event_id"]: x["anomaly_probability"]
             for x in client.post("/batch-score", json={"events": events}).json()["results"]}
    lines = [orjson.dumps(e) for e in events]
    lines.insert(60, b'{"event_id": "bad", "user_id": "u"}')  # a bad line after the first chunk
    r = client.post("/batch-score", content=b"\n".join(lines) + b"\n", headers={"content-type": "application/x-ndjson"})
    assert r.status_code == 200
    rows = [orjson.loads(line) for line in r.text.splitlines()]
    errors = [x["error"] for x in rows if "error" in x]
    assert len(errors) == 2 and {e["line"] for e in errors} == {60}
    assert {e["path"] for e in errors} == {"$[60].event_type", "$[60].timestamp"}
    results = [x for x in rows if "error" not in x]
    assert [x["event_id"] for x in results] == [e["event_id"] for e in events]
    assert max(abs(x["anomaly_probability"] - whole[x["event_id"]]) for x in results) < TOL


SPELLINGS = {  # one browse → cart → buy session, in the names of three sources and a deployment's own
    "retailrocket": ["view", "addtocart", "transaction"],
    "taobao": ["pv", "cart", "buy"],
    "canonical": ["view", "cart", "purchase"],
    "deployment": ["View", "cart", "checkout"],
}


def spelled(user: str, types: list[str]) -> list[dict[str, Any]]:
    return [{"event_id": f"{user}-{k}", "user_id": user, "event_type": t, "timestamp": T0 + 45_000 * k,
             "item_id": "i1", "category_id": "c7", "price": 19.9} for k, t in enumerate(types)]


def test_one_session_in_every_spelling_scores_alike(make_client: Any) -> None:
    """POST /events and /batch-score map every source's names (and, with
    SEQGUARD_EVENT_ALIASES, a deployment's own) to the model's types: the same session
    spelled four ways gets the same probabilities from both."""
    client = make_client(event_aliases={"checkout": "purchase"})
    online: dict[str, list[float]] = {}
    for name, types in SPELLINGS.items():
        online[name] = [client.post("/events", json=e).json()["anomaly_probability"] for e in spelled(name, types)]
    batch_events = [e for name, types in SPELLINGS.items() for e in spelled(f"b-{name}", types)]
    rows = client.post("/batch-score", json={"events": batch_events}).json()["results"]
    batch = {name: [r["anomaly_probability"] for r in rows if r["user_id"] == f"b-{name}"] for name in SPELLINGS}
    want = online["canonical"]
    for name in SPELLINGS:
        assert online[name] == pytest.approx(want, abs=1e-6), name
        assert batch[name] == pytest.approx(want, abs=TOL), name
    # Without the deployment's alias, `checkout` is a type the model does not know.
    plain = make_client()
    other = [plain.post("/events", json=e).json()["anomaly_probability"]
             for e in spelled("plain", SPELLINGS["deployment"])]
    assert other[:2] == pytest.approx(want[:2], abs=1e-6) and other[2] != pytest.approx(want[2], abs=1e-6)
