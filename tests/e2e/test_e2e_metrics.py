"""GET /metrics after real traffic: every contract metric, with the values the traffic
implies; and the micro-batcher gathering concurrent requests into shared batches."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import orjson
import pytest

from app.metrics import UNKNOWN_TYPE_LABELS
from app.routes import backfill as backfill_route

from .e2e_support import T0, TOL, TestClient, event, metric, metric_names, parse_metrics

CONTRACT_METRICS = {
    "seqguard_requests_total", "seqguard_request_duration_seconds_bucket", "seqguard_request_duration_seconds_count",
    "seqguard_events_scored_total", "seqguard_decisions_total", "seqguard_anomaly_probability_bucket",
    "seqguard_inference_batch_size_bucket", "seqguard_inference_duration_seconds_bucket",
    "seqguard_scoring_queue_depth", "seqguard_window_store_duration_seconds_bucket",
    "seqguard_window_store_errors_total", "seqguard_duplicate_events_total", "seqguard_model_info",
}


def test_metrics_after_traffic(client: TestClient, bundle_meta: dict[str, Any]) -> None:
    decisions: Counter[str] = Counter()
    for i in range(3):
        decisions[client.post("/events", json=event(f"s{i}", "u1", T0 + 1000 * i)).json()["decision"]] += 1
    bulk = client.post("/events", json={"events": [event(f"b{i}", "u2", T0 + 10 * i, "cart") for i in range(5)]})
    decisions.update(x["decision"] for x in bulk.json()["results"])
    assert client.post("/events", json=event("s0", "u1", T0)).json()["duplicate"] is True  # a replay
    assert client.post("/events", json={"event_id": "x"}).status_code == 422
    batch = client.post("/batch-score", json={"events": [event(f"h{i}", "u3", T0 + i, "pv") for i in range(7)]})
    decisions.update(x["decision"] for x in batch.json()["results"])
    assert client.get("/no-such-route").status_code == 404

    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    s = parse_metrics(r.text)
    assert metric_names(s) >= CONTRACT_METRICS

    # Requests by route template and status; latency by route.
    assert metric(s, "seqguard_requests_total", route="/events", status="200") == 5
    assert metric(s, "seqguard_requests_total", route="/events", status="422") == 1
    assert metric(s, "seqguard_requests_total", route="/batch-score", status="200") == 1
    assert metric(s, "seqguard_requests_total", route="unmatched", status="404") == 1  # never the raw path
    assert not [lab for n, lab, _ in s if n == "seqguard_requests_total" and lab["route"] == "/no-such-route"]
    assert metric(s, "seqguard_request_duration_seconds_count", route="/events") == 6
    assert 0 < metric(s, "seqguard_request_duration_seconds_sum", route="/events") < 30
    # Scoring: online (3 singles + 5 in bulk; the replay is answered from its record), batch 7.
    assert metric(s, "seqguard_events_scored_total", path="online") == 8
    assert metric(s, "seqguard_events_scored_total", path="batch") == 7
    for d in ("allow", "review", "block"):
        assert metric(s, "seqguard_decisions_total", decision=d) == decisions[d], d
    assert metric(s, "seqguard_anomaly_probability_count") == 15
    assert 0 <= metric(s, "seqguard_anomaly_probability_sum") <= 15
    assert metric(s, "seqguard_duplicate_events_total") == 1
    # Inference: the online windows went through the micro-batcher (warm-up is not counted).
    assert metric(s, "seqguard_inference_batch_size_sum") == 8
    n_calls = metric(s, "seqguard_inference_batch_size_count")
    assert 1 <= n_calls <= 4 and metric(s, "seqguard_inference_duration_seconds_count") == n_calls
    assert metric(s, "seqguard_inference_duration_seconds_sum") > 0
    assert metric(s, "seqguard_scoring_queue_depth") == 0
    # Window store: one atomic append per accepted /events request, no errors.
    assert metric(s, "seqguard_window_store_duration_seconds_count", op="append") == 5
    assert metric(s, "seqguard_window_store_errors_total") == 0
    # The model being served, on the provider actually in use.
    info = [(lab, v) for n, lab, v in s if n == "seqguard_model_info"]
    assert info == [({"version": bundle_meta["version"], "provider": "CPUExecutionProvider",
                      "arch": bundle_meta["arch"]}, 1.0)]


def test_micro_batcher_under_200_concurrent_posts(client: TestClient) -> None:
    """200 users with a short history each post their next event at the same moment:
    every answer is right (batch-score agrees) and inference ran in batches > 1."""
    n, hist = 200, 3
    seed = [event(f"u{u}-{i}", f"u{u}", T0 + 60_000 * i + u, ["pv", "cart", "fav"][(u + i) % 3],
                  item_id=f"i{(u * 7 + i) % 13}") for u in range(n) for i in range(hist)]
    assert client.post("/events", json={"events": seed}).status_code == 200
    nxt = [event(f"u{u}-{hist}", f"u{u}", T0 + 60_000 * hist + u, ["buy", "pv"][u % 2], item_id=f"i{u % 13}")
           for u in range(n)]
    before = parse_metrics(client.get("/metrics").text)

    barrier = threading.Barrier(50, timeout=30)

    def post(e: dict[str, Any]) -> dict[str, Any]:
        if int(e["user_id"][1:]) < 50:
            barrier.wait()  # the first 50 leave together; the rest follow as threads free up
        r = client.post("/events", json=e)
        assert r.status_code == 200, r.text
        return dict(r.json())

    with ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(post, nxt))
    after = parse_metrics(client.get("/metrics").text)

    expected = {x["event_id"]: x["anomaly_probability"] for x in
                client.post("/batch-score", json={"events": seed + nxt}).json()["results"]}
    for e, a in zip(nxt, answers, strict=True):
        assert (a["event_id"], a["user_id"], a["window_size"], a["duplicate"]) == (
            e["event_id"], e["user_id"], hist + 1, False)
        assert abs(a["anomaly_probability"] - expected[e["event_id"]]) < TOL

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    calls = delta("seqguard_inference_batch_size_count")
    singles = delta("seqguard_inference_batch_size_bucket", le="1.0")
    assert delta("seqguard_inference_batch_size_sum") == n  # every window scored once
    assert calls < n and calls - singles >= 1, (calls, singles)  # some calls carried several windows
    assert delta("seqguard_events_scored_total", path="online") == n
    assert metric(after, "seqguard_scoring_queue_depth") == 0


def test_a_bulk_as_large_as_the_scoring_queue_is_served_when_idle(make_client: Any) -> None:
    """The queue bound counts each waiting window once, however the batcher cuts a
    large request into batches."""
    client = make_client(queue_size=1000, max_batch=64)
    evs = [event(f"e{i}", f"u{i}", T0 + i) for i in range(1000)]  # 1000 windows of one padded length
    r = client.post("/events", json={"events": evs})
    assert r.status_code == 200, r.text
    assert [x["event_id"] for x in r.json()["results"]] == [e["event_id"] for e in evs]
    s = parse_metrics(client.get("/metrics").text)
    assert metric(s, "seqguard_inference_batch_size_sum") == 1000
    assert metric(s, "seqguard_scoring_queue_depth") == 0


def test_unknown_event_types_counted_bounded_and_warned_once(
        client: TestClient, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Events scored with a type the model does not know are counted under their name, on
    every path; a window's history is not counted again, nor a replay, nor the context a
    stream carries between chunks. The label set is bounded, and each name is warned
    about once, without the user."""
    user = "secret-user-7"
    for i, t in enumerate(["login", "login", "pv"]):  # the third window holds two logins: not counted
        assert client.post("/events", json=event(f"s{i}", user, T0 + 1000 * i, t)).status_code == 200
    bulk = [event(f"b{i}", "u2", T0 + i, "login") for i in range(2)]
    assert client.post("/events", json={"events": bulk}).status_code == 200
    assert client.post("/events", json=event("s0", user, T0, "login")).json()["duplicate"] is True
    batch = [event(f"h{i}", "u3", T0 + i, t) for i, t in enumerate(["login", "pv", "login"])]
    assert client.post("/batch-score", json={"events": batch}).status_code == 200
    monkeypatch.setattr(backfill_route, "CHUNK_EVENTS", 2)  # the stream's chunks carry context over
    stream = [event(f"n{i}", "u4", T0 + i, t) for i, t in enumerate(["login", "pv", "pv", "login", "pv"])]
    r = client.post("/batch-score", content=b"".join(orjson.dumps(e) + b"\n" for e in stream),
                    headers={"content-type": "application/x-ndjson"})
    assert r.status_code == 200 and len(r.text.splitlines()) == 5
    names = [f"new{i:02d}" for i in range(1, UNKNOWN_TYPE_LABELS + 1)]  # with login: 21 distinct names
    fresh = [event(f"x{i}", f"u-{name}", T0, name) for i, name in enumerate(names)]
    assert client.post("/events", json={"events": fresh}).status_code == 200

    s = parse_metrics(client.get("/metrics").text)
    assert metric(s, "seqguard_unknown_event_types_total", event_type="login") == 2 + 2 + 2 + 2
    assert metric(s, "seqguard_events_scored_total", path="batch") == 3 + 5  # the stream's context once
    for name in names[:-1]:
        assert metric(s, "seqguard_unknown_event_types_total", event_type=name) == 1, name
    assert metric(s, "seqguard_unknown_event_types_total", event_type="other") == 1  # the 21st name
    labels = {lab["event_type"] for n, lab, _ in s if n == "seqguard_unknown_event_types_total"}
    assert labels == {"login", *names[:-1], "other"}
    assert "pv" not in labels  # an aliased name is known

    warned = [r.getMessage() for r in caplog.records if r.name == "seqguard.vocabulary"]
    assert sorted(warned) == sorted(set(warned)) and len(warned) == 1 + len(names)  # once per name
    assert sum("'login' is unknown" in w for w in warned) == 1
    assert all("out-of-vocabulary id" in w and "SEQGUARD_EVENT_ALIASES" in w for w in warned)
    assert not [r for r in caplog.records if user in r.getMessage()]  # never a user id


def test_docs_pages_are_counted_under_their_routes(client: TestClient) -> None:
    """Issue 9: /docs, /openapi.json and /redoc were counted as route="unmatched"."""
    before = parse_metrics(client.get("/metrics").text)
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert client.get(path).status_code == 200
    after = parse_metrics(client.get("/metrics").text)
    for path in ("/docs", "/openapi.json", "/redoc"):
        grew = (metric(after, "seqguard_requests_total", route=path, status="200")
                - metric(before, "seqguard_requests_total", route=path, status="200"))
        assert grew == 1, path
    assert (metric(after, "seqguard_requests_total", route="unmatched", status="200")
            == metric(before, "seqguard_requests_total", route="unmatched", status="200"))
