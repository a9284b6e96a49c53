"""Shadow scoring (issue 11, item 2): a candidate bundle scores the live windows after each
answer, never changes one, and the metrics compare the two; POST /admin/model loads,
stops and promotes it.

Real bundles (copies of the shipped one under another version, with other thresholds so
that decisions differ), a real ONNX Runtime session, the session's real Redis, the service
through HTTP (TestClient runs the lifespan).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from bundle_copies import bundle_copy
from fastapi.testclient import TestClient

from app.core.bundle import DEFAULT_BUNDLE, load_bundle
from app.windows import live_model_key, shadow_model_key

LIVE_MODEL_KEY = live_model_key(str(DEFAULT_BUNDLE))  # the records of the deployment the tests start
SHADOW_MODEL_KEY = shadow_model_key(str(DEFAULT_BUNDLE), None)

SHIPPED = load_bundle(DEFAULT_BUNDLE).version
PROBLEM = "application/problem+json"
T0 = 1_511_596_870_000


def event(eid: str, user: str = "u1", t: int = T0, event_type: str = "pv") -> dict[str, Any]:
    return {"event_id": eid, "user_id": user, "event_type": event_type, "timestamp": t}


def strict(meta: dict[str, Any]) -> None:
    """Thresholds so low that the shadow blocks every event the live model allows."""
    meta["thresholds"] = {**meta["thresholds"], "review": 1e-9, "block": 2e-9}


def metric(client: TestClient, name: str, labels: str = "") -> float:
    prefix = f"{name}{{{labels}}}" if labels else name
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(prefix + " "):
            return float(line.split()[-1])
    return 0.0


def wait_for(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """The shadow scores after the answer: wait until its metrics show it (bounded)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("the shadow did not report in time")
        time.sleep(0.05)


def post_log(client: TestClient, n: int, user: str = "u1", start: int = 0) -> list[dict[str, Any]]:
    return [client.post("/events", json=event(f"e{i}", user, T0 + 1000 * i)).json() for i in range(start, start + n)]


def test_a_shadow_from_the_settings_compares_without_changing_an_answer(
        make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    plain = post_log(make_client(), 12, user="plain")  # the answers with no shadow
    shadow = bundle_copy(tmp_path, "v-shadow", strict)
    client = make_client(shadow_bundle=str(shadow))
    answers = post_log(client, 12, user="shadowed")  # the same events of another user
    assert [(a["model_version"], a["decision"], a["anomaly_probability"]) for a in answers] == \
        [(SHIPPED, p["decision"], p["anomaly_probability"]) for p in plain]
    assert {a["decision"] for a in answers} == {"allow"}
    wait_for(lambda: metric(client, "seqguard_shadow_decisions_total",
                                  'live="allow",shadow="block",version="v-shadow"') == 12)
    assert metric(client, "seqguard_shadow_disagreements_total", 'version="v-shadow"') == 12
    assert metric(client, "seqguard_shadow_anomaly_probability_count") == 12
    # The live metrics count the live model alone.
    assert metric(client, "seqguard_events_scored_total", 'path="online"') == 12
    assert metric(client, "seqguard_decisions_total", 'decision="allow"') == 12
    assert metric(client, "seqguard_decisions_total", 'decision="block"') == 0
    model = client.get("/model").json()
    assert model["version"] == SHIPPED
    assert model["shadow"]["version"] == "v-shadow" and model["shadow"]["thresholds"] == {"review": 1e-9,
                                                                                        "block": 2e-9}
    assert 'seqguard_shadow_model_info{arch="transformer",provider="CPUExecutionProvider",version="v-shadow"} 1.0' \
        in client.get("/metrics").text
    # Replays are answered from their first answer and not shadowed again.
    replay = client.post("/events", json=event("e0", "shadowed", T0)).json()
    assert replay["duplicate"] is True and replay["decision"] == "allow"
    time.sleep(0.3)
    assert metric(client, "seqguard_shadow_disagreements_total", 'version="v-shadow"') == 12


def test_agreeing_models_count_no_disagreement(make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    client = make_client(shadow_bundle=str(bundle_copy(tmp_path, "v-same")))
    post_log(client, 5)
    wait_for(lambda: metric(client, "seqguard_shadow_decisions_total", 'live="allow",shadow="allow",version="v-same"')
             == 5)
    assert metric(client, "seqguard_shadow_disagreements_total", 'version="v-same"') == 0


def test_the_admin_route_loads_stops_and_promotes_a_shadow(
        make_client: Callable[..., TestClient], tmp_path: Path, redis_url: str) -> None:
    client = make_client()
    candidate = bundle_copy(tmp_path, "v-candidate", strict)
    r = client.post("/admin/model", json={"bundle": str(candidate), "role": "shadow"})
    assert r.status_code == 200, r.text
    assert r.json() == {"role": "shadow", "version": "v-candidate", "previous": None, "bundle": str(candidate),
                        "workers_follow_within_s": 2.0}
    with redis.Redis.from_url(redis_url) as rr:  # what the other workers and replicas follow
        record = orjson.loads(rr.get(SHADOW_MODEL_KEY))
        assert (record["bundle"], record["version"], record["base"]) == (str(candidate), "v-candidate",
                                                                         str(DEFAULT_BUNDLE))
    assert {a["model_version"] for a in post_log(client, 4)} == {SHIPPED}
    wait_for(lambda: metric(client, "seqguard_shadow_decisions_total",
                            'live="allow",shadow="block",version="v-candidate"') == 4)

    r = client.post("/admin/model", json={"promote": True})
    assert r.status_code == 200, r.text
    assert r.json()["role"] == "live" and r.json()["version"] == "v-candidate" and r.json()["previous"] == SHIPPED
    answer = client.post("/events", json=event("p1", "u1", T0 + 60_000)).json()
    assert answer["model_version"] == "v-candidate" and answer["decision"] == "block"
    assert answer["thresholds"] == {"review": 1e-9, "block": 2e-9}
    model = client.get("/model").json()
    assert model["version"] == "v-candidate" and model["shadow"] is None
    with redis.Redis.from_url(redis_url) as rr:
        assert orjson.loads(rr.get(LIVE_MODEL_KEY))["version"] == "v-candidate"
        assert orjson.loads(rr.get(SHADOW_MODEL_KEY))["bundle"] is None  # a record that says none
    assert "seqguard_shadow_model_info{" not in client.get("/metrics").text

    again = client.post("/admin/model", json={"promote": True})  # nothing to promote now
    assert again.status_code == 409 and again.headers["content-type"] == PROBLEM
    assert again.json()["type"].endswith("/no-shadow")

    client.post("/admin/model", json={"bundle": str(bundle_copy(tmp_path, "v-other")), "role": "shadow"})
    stop = client.post("/admin/model", json={"bundle": None, "role": "shadow"})
    assert stop.status_code == 200 and stop.json()["version"] is None and stop.json()["previous"] == "v-other"
    assert client.get("/model").json()["shadow"] is None
    with redis.Redis.from_url(redis_url) as rr:
        assert orjson.loads(rr.get(SHADOW_MODEL_KEY))["bundle"] is None  # a record that says none


@pytest.mark.parametrize(("body", "fields"), [
    ({"promote": True, "bundle": "/x"}, ["bundle"]),
    ({"promote": True, "role": "shadow"}, ["role"]),
    ({"promote": True, "bundle": "/x", "role": "live"}, ["bundle", "role"]),
    ({}, ["bundle"]),
    ({"role": "live"}, ["bundle"]),
    ({"bundle": "/x", "role": "canary"}, ["role"]),
    ({"promote": "yes"}, ["promote"]),
    ({"role": "shadow"}, ["bundle"]),  # stopping the shadow takes an explicit null
    ({"bundle": None, "role": "live"}, ["bundle"]),
    ({"promote": False}, ["bundle"]),
])
def test_a_bad_change_is_a_422_naming_each_field(client: TestClient, body: dict[str, Any],
                                                  fields: list[str]) -> None:
    r = client.post("/admin/model", json=body)
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM
    assert sorted({e["path"] for e in r.json()["errors"]}) == [f"$.{f}" for f in fields]


def test_a_refused_shadow_leaves_the_models_as_they_were(make_client: Callable[..., TestClient],
                                                          tmp_path: Path) -> None:
    client = make_client()
    good = bundle_copy(tmp_path, "v-good")
    client.post("/admin/model", json={"bundle": str(good), "role": "shadow"})
    broken = bundle_copy(tmp_path, "v-broken", lambda m: m.pop("parity"))
    r = client.post("/admin/model", json={"bundle": str(broken), "role": "shadow"})
    assert r.status_code == 422 and r.json()["type"].endswith("/bundle-refused")
    assert any("parity" in p for p in r.json()["problems"])
    model = client.get("/model").json()
    assert model["version"] == SHIPPED and model["shadow"]["version"] == "v-good"


def test_a_shadow_that_fails_never_fails_a_request(make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    """The shadow's batcher stopped under it (as a swap past its drain time leaves it): the
    live answers go on, and the windows it did not score are counted as dropped."""
    client = make_client(shadow_bundle=str(bundle_copy(tmp_path, "v-shadow")))
    state = client.app.state.seqguard
    client.portal.call(state.shadow.batcher.stop)
    answers = post_log(client, 3)
    assert all(a["model_version"] == SHIPPED for a in answers)
    wait_for(lambda: metric(client, "seqguard_shadow_dropped_total", 'reason="stopped"') == 3)


def test_other_workers_follow_the_shadow_and_its_promotion(make_client: Callable[..., TestClient],
                                                           tmp_path: Path) -> None:
    """Two workers on one Redis: the one that takes the change applies it at once, the
    other within its poll interval, for a shadow, its promotion and its removal."""
    a, b = make_client(model_poll_s=0.05), make_client(model_poll_s=0.05)
    candidate = bundle_copy(tmp_path, "v-candidate", strict)

    def shadow_of(c: TestClient) -> str | None:
        s = c.get("/model").json()["shadow"]
        return None if s is None else s["version"]

    assert a.post("/admin/model", json={"bundle": str(candidate), "role": "shadow"}).status_code == 200
    wait_for(lambda: shadow_of(b) == "v-candidate")
    post_log(b, 3, user="on-b")
    wait_for(lambda: metric(b, "seqguard_shadow_decisions_total", 'live="allow",shadow="block",version="v-candidate"')
             == 3)
    assert a.post("/admin/model", json={"promote": True}).status_code == 200
    wait_for(lambda: b.get("/model").json()["version"] == "v-candidate" and shadow_of(b) is None)
    a.post("/admin/model", json={"bundle": str(bundle_copy(tmp_path, "v-next")), "role": "shadow"})
    wait_for(lambda: shadow_of(b) == "v-next")
    a.post("/admin/model", json={"bundle": None, "role": "shadow"})
    wait_for(lambda: shadow_of(b) is None)


def test_a_worker_that_starts_follows_the_shadow_of_its_deployment(make_client: Callable[..., TestClient],
                                                                   tmp_path: Path) -> None:
    a = make_client()
    a.post("/admin/model", json={"bundle": str(bundle_copy(tmp_path, "v-candidate")), "role": "shadow"})
    late = make_client()  # a worker restarted, or a replica scaled up, later
    assert late.get("/model").json()["shadow"]["version"] == "v-candidate"
    other = make_client(bundle=str(bundle_copy(tmp_path, "v-new-deployment")))
    assert other.get("/model").json()["shadow"] is None  # another SEQGUARD_BUNDLE: another deployment


def test_promotion_serves_exactly_the_bundle_that_was_watched(make_client: Callable[..., TestClient],
                                                               tmp_path: Path) -> None:
    """A fresh-user review: a shadow's bundle.json edited in place (thresholds, same version)
    was promoted with the edit, unwatched. It is refused: the models stay as they were."""
    client = make_client()
    candidate = bundle_copy(tmp_path, "v-candidate")
    client.post("/admin/model", json={"bundle": str(candidate), "role": "shadow"})
    meta = orjson.loads((candidate / "bundle.json").read_bytes())
    meta["thresholds"] = {**meta["thresholds"], "review": 0.02}
    (candidate / "bundle.json").write_bytes(orjson.dumps(meta))
    r = client.post("/admin/model", json={"promote": True})
    assert r.status_code == 422 and r.json()["type"].endswith("/bundle-refused")
    assert any("changed since the shadow loaded it" in p for p in r.json()["problems"])
    model = client.get("/model").json()
    assert model["version"] == SHIPPED and model["shadow"]["version"] == "v-candidate"


def test_a_repeat_in_one_body_is_not_shadowed_again(make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    client = make_client(shadow_bundle=str(bundle_copy(tmp_path, "v-shadow")))
    body = [event(f"e{i}", "u1", T0 + 1000 * i) for i in range(5)]
    client.post("/events", json={"events": [*body, body[2]]})
    wait_for(lambda: metric(client, "seqguard_shadow_decisions_total", 'live="allow",shadow="allow",version="v-shadow"')
             == 5)
    time.sleep(0.3)
    assert metric(client, "seqguard_shadow_decisions_total", 'live="allow",shadow="allow",version="v-shadow"') == 5
    assert metric(client, "seqguard_shadow_dropped_total", 'reason="queue_full"') == 0  # the series exists at 0
    assert 'seqguard_shadow_dropped_total{reason="failed"} 0.0' in client.get("/metrics").text


def test_a_stop_or_a_promotion_holds_when_a_worker_restarts(make_client: Callable[..., TestClient],
                                                             tmp_path: Path) -> None:
    """An attack review: a worker that restarted loaded SEQGUARD_SHADOW_BUNDLE again and wrote
    it as the record, so every worker ran a stopped (or promoted) shadow again."""
    candidate = str(bundle_copy(tmp_path, "v-candidate"))
    a = make_client(shadow_bundle=candidate)
    assert a.get("/model").json()["shadow"]["version"] == "v-candidate"
    a.post("/admin/model", json={"bundle": None, "role": "shadow"})
    assert make_client(shadow_bundle=candidate).get("/model").json()["shadow"] is None  # restarted: still stopped
    a.post("/admin/model", json={"bundle": candidate, "role": "shadow"})
    assert a.post("/admin/model", json={"promote": True}).status_code == 200
    restarted = make_client(shadow_bundle=candidate).get("/model").json()
    assert (restarted["version"], restarted["shadow"]) == ("v-candidate", None)


def test_a_new_deployment_does_not_take_the_old_ones_shadow(make_client: Callable[..., TestClient],
                                                            tmp_path: Path) -> None:
    """An attack review: a deployment with another SEQGUARD_BUNDLE (or another
    SEQGUARD_SHADOW_BUNDLE) followed the shadow record of the one before within a poll."""
    old = make_client(model_poll_s=0.05)
    old.post("/admin/model", json={"bundle": str(bundle_copy(tmp_path, "v-old-shadow")), "role": "shadow"})
    new = make_client(model_poll_s=0.05, bundle=str(bundle_copy(tmp_path, "v-new")))
    other_setting = make_client(model_poll_s=0.05, shadow_bundle=str(bundle_copy(tmp_path, "v-mine")))
    time.sleep(0.5)  # several polls
    assert new.get("/model").json()["shadow"] is None
    assert other_setting.get("/model").json()["shadow"]["version"] == "v-mine"


def test_a_sample_of_the_windows_is_shadowed(make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    client = make_client(shadow_bundle=str(bundle_copy(tmp_path, "v-shadow")), shadow_sample=0.25)
    post_log(client, 200)
    time.sleep(1.0)
    n = metric(client, "seqguard_shadow_decisions_total", 'live="allow",shadow="allow",version="v-shadow"')
    assert 15 <= n <= 90, n  # 50 expected; the bounds are about 6 standard deviations
    assert metric(client, "seqguard_events_scored_total", 'path="online"') == 200
