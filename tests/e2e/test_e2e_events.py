"""POST /events as a storefront sees it: shapes, order, windows, decisions, explanations,
idempotency (replays, duplicates in one body, concurrent replays) and late events."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from .e2e_support import T0, TOL, TestClient, event, expected_decision, taobao_events, window_len

RESULT_KEYS = {"event_id", "user_id", "anomaly_probability", "decision", "thresholds", "window_size",
               "model_version", "duplicate"}


def check_result(res: dict[str, Any], meta: dict[str, Any], *, event_id: str, user_id: str) -> None:
    """The contract's response shape, and a decision that follows the thresholds."""
    assert set(res) == RESULT_KEYS, res
    assert (res["event_id"], res["user_id"]) == (event_id, user_id)
    p = res["anomaly_probability"]
    assert isinstance(p, float) and 0.0 <= p <= 1.0 and math.isfinite(p)
    assert res["thresholds"] == meta["thresholds"]
    assert res["decision"] == expected_decision(p, res["thresholds"])
    assert res["model_version"] == meta["version"]
    assert isinstance(res["window_size"], int) and 1 <= res["window_size"] <= meta["window"]
    assert isinstance(res["duplicate"], bool)


def batch_probs(client: TestClient, events: list[dict[str, Any]]) -> dict[str, float]:
    r = client.post("/batch-score", json={"events": events})
    assert r.status_code == 200, r.text
    return {x["event_id"]: x["anomaly_probability"] for x in r.json()["results"]}


# --------------------------------------------------------------------------- scoring


def test_single_event_answer(client: TestClient, bundle_meta: dict[str, Any], redis_url: str) -> None:
    r = client.post("/events", json=event("e1", "u1", T0, "view", item_id="i1", category_id="c1", price=9.5,
                                          device_id="d1", country="DE", session_id="s1"))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    res = r.json()
    check_result(res, bundle_meta, event_id="e1", user_id="u1")
    assert res["window_size"] == 1 and res["duplicate"] is False
    assert window_len(redis_url, "u1") == 1


def test_rfc3339_and_epoch_ms_timestamps_are_the_same_event_time(client: TestClient) -> None:
    a = client.post("/events", json=event("a1", "ua", T0)).json()
    b = client.post("/events", json=event("b1", "ub", "2023-11-14T22:13:20Z")).json()  # == T0
    c = client.post("/events", json=event("b2", "ub", "2023-11-14T23:13:20.000+01:00")).json()  # == T0 again
    assert abs(a["anomaly_probability"] - b["anomaly_probability"]) < TOL
    assert c["window_size"] == 2


def test_bulk_results_in_input_order_and_windows_grow(client: TestClient, bundle_meta: dict[str, Any],
                                                      redis_url: str) -> None:
    w = bundle_meta["window"]
    # Two users interleaved; u1 gets more events than the model's window.
    evs = []
    for i in range(w + 6):
        evs.append(event(f"u1-{i}", "u1", T0 + 60_000 * i, ["pv", "cart", "pv", "fav"][i % 4], item_id=f"i{i % 7}"))
        if i < 5:
            evs.append(event(f"u2-{i}", "u2", T0 + 1000 * i, "pv"))
    r = client.post("/events", json={"events": evs})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"results"}
    results = body["results"]
    assert [x["event_id"] for x in results] == [e["event_id"] for e in evs]
    for e, res in zip(evs, results, strict=True):
        check_result(res, bundle_meta, event_id=e["event_id"], user_id=e["user_id"])
        assert res["duplicate"] is False
    sizes = {u: [x["window_size"] for x in results if x["user_id"] == u] for u in ("u1", "u2")}
    assert sizes["u1"] == [min(i + 1, w) for i in range(w + 6)]  # grows, then capped at the window
    assert sizes["u2"] == [1, 2, 3, 4, 5]
    # The store holds what the featurizer needs (window + lookback), not the whole history.
    assert window_len(redis_url, "u1") == min(w + 6, bundle_meta["history"])
    # One by one afterwards: the window keeps its cap.
    nxt = client.post("/events", json=event("u1-next", "u1", T0 + 60_000 * (w + 6))).json()
    assert nxt["window_size"] == w
    # Bulk equals batch: each event scored on the events of its user before it.
    probs = batch_probs(client, [*evs, event("u1-next", "u1", T0 + 60_000 * (w + 6))])
    for res in [*results, nxt]:
        assert abs(res["anomaly_probability"] - probs[res["event_id"]]) < TOL


def test_decisions_follow_thresholds_overridden_in_settings(make_client: Any) -> None:
    client = make_client(review_threshold=0.0, block_threshold=1.0)
    res = client.post("/events", json={"events": [event(f"e{i}", "u1", T0 + i, "pv") for i in range(5)]}).json()
    for x in res["results"]:
        assert x["thresholds"] == {"review": 0.0, "block": 1.0}
        assert x["decision"] == ("block" if x["anomaly_probability"] >= 1.0 else "review")
    assert client.get("/model").json()["thresholds"] == {"review": 0.0, "block": 1.0}


def test_block_and_allow_both_happen_on_real_behaviour(client: TestClient) -> None:
    """A plain shopper's history is mostly allowed; a burst of identical purchases
    seconds apart (order brushing) ends up blocked."""
    user = "100"
    normal = taobao_events([user])[user][:40]
    res = client.post("/events", json={"events": normal}).json()["results"]
    decisions = [x["decision"] for x in res]
    assert decisions.count("allow") >= len(decisions) // 2
    t = normal[-1]["timestamp"]
    burst = [event(f"burst-{i}", user, t + 1000 * (i + 1), "buy", item_id="42", category_id="7") for i in range(30)]
    last = client.post("/events", json={"events": burst}).json()["results"][-5:]
    assert {x["decision"] for x in last} == {"block"}, last


def test_explain_gives_reasons_with_per_event_surprise(client: TestClient) -> None:
    evs = [event(f"e{i}", "u1", T0 + 30_000 * i, "pv", item_id=f"i{i}") for i in range(3)]
    evs += [event("e3", "u1", T0 + 90_000, "buy", item_id="i9", price=999.0),
            event("e4", "u1", T0 + 91_000, "buy", item_id="i9", price=999.0)]
    for e in evs[:3]:
        assert client.post("/events", json=e).status_code == 200
    # Without explain: no reasons.
    assert "reasons" not in client.post("/events", json=evs[3]).json()
    # With explain, a window of 5 events: all of them are listed, most surprising first
    # (issue 9: they came in time order, which hides what drove the score).
    r = client.post("/events?explain=true", json=evs[4])
    assert r.status_code == 200
    reasons = r.json()["reasons"]
    assert sorted(x["event_id"] for x in reasons) == ["e0", "e1", "e2", "e3", "e4"]
    surprises = [x["surprise"] for x in reasons]
    assert surprises == sorted(surprises, reverse=True) and surprises[0] > surprises[-1]
    by_id = {e["event_id"]: e for e in evs}
    for x in reasons:
        src = by_id[x["event_id"]]
        assert set(x) == {"event_id", "event_type", "timestamp", "surprise"}
        assert (x["timestamp"], x["event_type"]) == (src["timestamp"], src["event_type"])
        assert isinstance(x["surprise"], float) and math.isfinite(x["surprise"]) and x["surprise"] >= 0
    # A longer window: the five most surprising events of the window, most surprising first.
    more = [event(f"m{i}", "u1", T0 + 100_000 + 1000 * i, "pv", item_id="i1") for i in range(10)]
    client.post("/events", json={"events": more})
    res2 = client.post("/events?explain=true", json=event("x", "u1", T0 + 200_000, "cart", item_id="i1")).json()
    ids = [x["event_id"] for x in res2["reasons"]]
    window_ids = ["e0", "e1", "e2", "e3", "e4", *[e["event_id"] for e in more], "x"]
    assert len(ids) == 5 and set(ids) <= set(window_ids)
    top = [x["surprise"] for x in res2["reasons"]]
    assert top == sorted(top, reverse=True)
    # In a bulk request, every result carries its own reasons.
    bulk = client.post("/events?explain=true",
                       json={"events": [event("y1", "u2", T0, "pv"), event("y2", "u2", T0 + 5, "pv")]}).json()
    assert [sorted(x["event_id"] for x in r["reasons"]) for r in bulk["results"]] == [["y1"], ["y1", "y2"]]


def test_explain_gives_times_in_the_form_the_scored_event_came_in(client: TestClient) -> None:
    """Issue 9: reasons' times were always epoch ms, also for a client that sends RFC 3339.
    The store keeps only ms; each answer renders them in the form of its own event's
    timestamp, whatever form the earlier events of the window came in."""
    client.post("/events", json=event("a", "u1", T0, "pv", item_id="i1"))  # 2023-11-14T22:13:20Z
    client.post("/events", json=event("b", "u1", "2023-11-14T23:13:50.5+01:00", "pv", item_id="i2"))

    def times(res: dict[str, Any]) -> dict[str, Any]:
        return {x["event_id"]: x["timestamp"] for x in res["reasons"]}

    as_text = client.post("/events?explain=true", json=event("c", "u1", "2023-11-14T22:14:00.123456Z", "cart",
                                                             item_id="i2")).json()
    assert times(as_text) == {"a": "2023-11-14T22:13:20.000Z", "b": "2023-11-14T22:13:50.500Z",
                              "c": "2023-11-14T22:14:00.123Z"}
    as_ms = client.post("/events?explain=true", json=event("d", "u1", T0 + 60_500, "pv", item_id="i3")).json()
    assert times(as_ms) == {"a": T0, "b": T0 + 30_500, "c": T0 + 40_123, "d": T0 + 60_500}
    digits = client.post("/events?explain=true", json=event("e", "u1", str(T0 + 61_000), "pv", item_id="i3")).json()
    assert set(times(digits).values()) <= {T0, T0 + 30_500, T0 + 40_123, T0 + 60_500, T0 + 61_000}
    # In one bulk body, each result in the form of its own event's timestamp.
    bulk = client.post("/events?explain=true", json={"events": [
        event("f", "u2", "2023-11-14T22:13:20Z", "pv"), event("g", "u2", T0 + 1000, "pv"),
        event("h", "u2", "2023-11-14T22:13:22Z", "cart")]}).json()["results"]
    assert [times(r) for r in bulk] == [
        {"f": "2023-11-14T22:13:20.000Z"},
        {"f": T0, "g": T0 + 1000},
        {"f": "2023-11-14T22:13:20.000Z", "g": "2023-11-14T22:13:21.000Z", "h": "2023-11-14T22:13:22.000Z"}]
    # The store keeps the time as a number whatever form it came in.
    window = client.get("/users/u1/window").json()["events"]
    assert [e["timestamp"] for e in window] == [T0, T0 + 30_500, T0 + 40_123, T0 + 60_500, T0 + 61_000]


# ----------------------------------------------------------------------- idempotency


def test_replay_returns_first_answer_and_changes_no_window(client: TestClient, redis_url: str) -> None:
    first = client.post("/events", json=event("e1", "u1", T0, "pv", item_id="i1")).json()
    second = client.post("/events", json=event("e2", "u1", T0 + 1000, "cart", item_id="i1")).json()
    assert window_len(redis_url, "u1") == 2
    # The same id again, even with different content: the first answer, marked duplicate.
    for replay in (event("e1", "u1", T0), event("e1", "u1", T0 + 5000, "buy", price=1.0)):
        again = client.post("/events", json=replay).json()
        assert again == first | {"duplicate": True}
    again2 = client.post("/events", json={"events": [event("e2", "u1", T0 + 1000, "cart", item_id="i1")]})
    assert again2.json()["results"] == [second | {"duplicate": True}]
    assert window_len(redis_url, "u1") == 2
    third = client.post("/events", json=event("e3", "u1", T0 + 2000, "pv")).json()
    assert third["window_size"] == 3 and third["duplicate"] is False
    # The same event_id of another user is another event.
    other = client.post("/events", json=event("e1", "u2", T0, "pv")).json()
    assert other["duplicate"] is False and other["window_size"] == 1


def test_duplicates_inside_one_bulk_request(client: TestClient, redis_url: str) -> None:
    evs = [event("a", "u1", T0, "pv"), event("b", "u1", T0 + 10, "cart"), event("a", "u1", T0, "pv"),
           event("c", "u2", T0, "pv"), event("b", "u1", T0 + 10, "cart"), event("d", "u1", T0 + 20, "pv")]
    res = client.post("/events", json={"events": evs}).json()["results"]
    assert [x["event_id"] for x in res] == ["a", "b", "a", "c", "b", "d"]
    assert [x["duplicate"] for x in res] == [False, False, True, False, True, False]
    for i, j in ((0, 2), (1, 4)):
        assert res[j] == res[i] | {"duplicate": True}
    assert [x["window_size"] for x in res] == [1, 2, 1, 1, 2, 3]
    assert window_len(redis_url, "u1") == 3 and window_len(redis_url, "u2") == 1
    # A later replay gets the first answer too.
    assert client.post("/events", json=evs[0]).json() == res[0] | {"duplicate": True}



def test_a_repeat_in_one_body_gets_its_first_answer_after_the_window_moved_on(client: TestClient) -> None:
    """A fresh-user review: 90 events of one user and a repeat of the 31st in one body.
    The store trims the window to its history before the repeat comes, and the repeat was
    scored again on what was left (another probability, another decision); it gets the
    first answer, as a later replay does, and as every backfill form answers it."""
    evs = [event(f"o{i}", "u1", T0 + 1000 * i, "cart" if i % 7 == 0 else "pv", item_id=f"i{i % 5}")
           for i in range(90)]
    late = {**evs[60], "event_id": "late", "timestamp": T0 + 500}  # late too: before most of the window
    body = [*evs, late, evs[30], late]
    res = client.post("/events", json={"events": body}).json()["results"]
    assert res[-2] == res[30] | {"duplicate": True}
    assert res[-1] == res[-3] | {"duplicate": True}
    batch = client.post("/batch-score", json={"events": body}).json()["results"]
    for x, y in zip(batch, res, strict=True):
        assert abs(x["anomaly_probability"] - y["anomaly_probability"]) < 2e-6 and x["decision"] == y["decision"]


def test_concurrent_posts_of_one_event_store_it_once(client: TestClient, redis_url: str) -> None:
    client.post("/events", json=event("before", "u1", T0 - 1000, "pv"))
    ev = event("same", "u1", T0, "cart", item_id="i1")
    n = 24
    barrier = threading.Barrier(n, timeout=30)

    def post(_: int) -> httpx.Response:
        barrier.wait()
        return client.post("/events", json=ev)

    with ThreadPoolExecutor(n) as pool:
        answers = [r.json() for r in pool.map(post, range(n))]
    assert [a["duplicate"] for a in answers].count(False) == 1
    assert {(a["anomaly_probability"], a["window_size"], a["decision"]) for a in answers} == {
        (answers[0]["anomaly_probability"], 2, answers[0]["decision"])}
    assert window_len(redis_url, "u1") == 2
    assert client.post("/events", json=event("after", "u1", T0 + 1000, "pv")).json()["window_size"] == 3


def test_concurrent_distinct_events_of_one_user_are_all_stored_in_arrival_order(client: TestClient,
                                                                                redis_url: str) -> None:
    n = 30
    barrier = threading.Barrier(n, timeout=30)

    def post(i: int) -> dict[str, Any]:
        barrier.wait()
        return client.post("/events", json=event(f"c{i}", "u1", T0, "pv")).json()  # one timestamp: arrival order

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(post, range(n)))
    assert sorted(a["window_size"] for a in answers) == list(range(1, n + 1))  # each saw all who came before
    assert window_len(redis_url, "u1") == n


# ----------------------------------------------------------------------- late events


def test_late_events_are_scored_on_the_window_at_their_timestamp(client: TestClient, redis_url: str,
                                                                 bundle_meta: dict[str, Any]) -> None:
    """Events arrive out of timestamp order; each is scored on the events that arrived so
    far at or before its timestamp — what /batch-score gives on those same events."""
    user = "1000"
    evs = taobao_events([user])[user][:36]
    arrival = list(range(len(evs)))
    for i in range(4, len(evs) - 3, 5):  # every fifth event arrives three places late
        arrival[i], arrival[i + 3] = arrival[i + 3], arrival[i]
    arrival.remove(0)
    arrival.append(0)  # and the oldest arrives last of all
    late = [k for k, i in enumerate(arrival) if any(evs[j]["timestamp"] > evs[i]["timestamp"] for j in arrival[:k])]
    assert len(late) >= 6
    arrived: list[dict[str, Any]] = []
    for i in arrival:
        e = evs[i]
        res = client.post("/events", json=e).json()
        arrived.append(e)
        expected = batch_probs(client, arrived)[e["event_id"]]
        assert abs(res["anomaly_probability"] - expected) < TOL, (e["event_id"], res, expected)
        at_or_before = sum(1 for a in arrived if a["timestamp"] <= e["timestamp"])
        assert res["window_size"] == min(bundle_meta["window"], at_or_before)
    assert window_len(redis_url, user) == len(evs)
    # Once all have arrived, the next event sees the whole history in timestamp order.
    nxt = event("next", user, evs[-1]["timestamp"] + 1000, "pv")
    res = client.post("/events", json=nxt).json()
    assert abs(res["anomaly_probability"] - batch_probs(client, [*evs, nxt])["next"]) < TOL
