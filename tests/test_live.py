"""app/live.py and POST /admin/model: serving another bundle without a restart (issue 11).

Real bundles (copies of the shipped one, with their own version, or broken on purpose),
a real ONNX Runtime session and the session's real Redis; the service through its HTTP
interface (TestClient runs the lifespan). Reloads under concurrent load, SIGHUP and
several workers are in tests/e2e/test_e2e_reload.py.
"""

from __future__ import annotations

import shutil
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
from app.live import check_bundle
from app.windows import live_model_key

LIVE_KEY = live_model_key(str(DEFAULT_BUNDLE))  # the record of the deployment the tests start

SHIPPED = load_bundle(DEFAULT_BUNDLE).version
PROBLEM = "application/problem+json"


def event(eid: str, user: str = "u1", t: int = 1_511_596_870_000) -> dict[str, Any]:
    return {"event_id": eid, "user_id": user, "event_type": "pv", "timestamp": t}


def change(client: TestClient, bundle: Any) -> Any:
    return client.post("/admin/model", json={"bundle": str(bundle)})


def reloads(client: TestClient, result: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f'seqguard_model_reloads_total{{result="{result}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_a_new_bundle_serves_the_next_request(make_client: Callable[..., TestClient], tmp_path: Path,
                                               redis_url: str) -> None:
    client = make_client()
    assert client.post("/events", json=event("e1")).json()["model_version"] == SHIPPED
    new = bundle_copy(tmp_path, "v-next")
    r = change(client, new)
    assert r.status_code == 200, r.text
    assert r.json() == {"role": "live", "version": "v-next", "previous": SHIPPED, "bundle": str(new),
                        "workers_follow_within_s": 2.0}
    answer = client.post("/events", json=event("e2")).json()
    assert answer["model_version"] == "v-next" and answer["window_size"] == 2  # the same stored window
    model = client.get("/model").json()
    assert (model["version"], model["bundle"]) == ("v-next", str(new))
    assert client.get("/readyz").json()["model"] == "v-next"
    batch = client.post("/batch-score", json={"events": [event("b1", "u9")]})
    assert batch.status_code == 200 and batch.headers["seqguard-model-version"] == "v-next"
    stream = client.post("/batch-score", content=orjson.dumps(event("b2", "u9")),
                         headers={"content-type": "application/x-ndjson"})
    assert stream.status_code == 200 and stream.headers["seqguard-model-version"] == "v-next"
    with redis.Redis.from_url(redis_url) as r2:  # what the other workers and replicas follow
        record = orjson.loads(r2.get(LIVE_KEY))
    assert (record["bundle"], record["version"], record["base"]) == (str(new), "v-next", str(DEFAULT_BUNDLE))
    assert reloads(client, "ok") == 1
    assert 'seqguard_model_info{arch="transformer",provider="CPUExecutionProvider",version="v-next"} 1.0' \
        in client.get("/metrics").text
    # A replay is answered from its first answer, with the model that gave it.
    replay = client.post("/events", json=event("e1")).json()
    assert replay["duplicate"] is True and replay["model_version"] == SHIPPED


@pytest.mark.parametrize(("why", "breaks", "says"), [
    ("no such directory", lambda b: shutil.rmtree(b), "no such directory"),
    ("a file, not a directory", lambda b: (shutil.rmtree(b), b.write_text("x")), "not a directory"),
    ("no bundle.json", lambda b: (b / "bundle.json").unlink(), "no bundle.json"),
    ("a bundle.json that is not JSON", lambda b: (b / "bundle.json").write_text("{nope"), "bundle.json: not JSON"),
    # A fresh-user review: window 100000 beside feature_spec.window 64 passed every check and
    # the warm-up of every padded length up to it took 22 GB before the kernel killed the service.
    ("a window the feature spec does not share", lambda b: _edit(b, lambda m: m.update(window=100_000)),
     "must equal feature_spec.window"),
    ("a window past the limit", lambda b: _edit(b, lambda m: (m.update(window=5000), m["feature_spec"].update(
        window=5000))), "lie in 1..1024"),
    ("no parity record", lambda b: _edit(b, lambda m: m.pop("parity")), "no parity record"),
    ("parity past its tolerance",
     lambda b: _edit(b, lambda m: m["parity"]["fp32"].update(max_diff_over_allowed={"anomaly_probability": 3.0})),
     "parity past its tolerance"),
    ("a featurizer that needs more events than the store keeps",
     lambda b: _edit(b, lambda m: (m.update(window=1000), m["feature_spec"].update(window=1000))),
     "the window store returns"),
    ("a model file ONNX Runtime cannot load", lambda b: (b / "model.onnx").write_bytes(b"not onnx"),
     "ONNX Runtime cannot load it"),
    ("another schema", lambda b: _edit(b, lambda m: m.update(schema_version=99)), "schema"),
])
def test_a_bad_bundle_is_refused_and_the_live_model_serves_on(
        make_client: Callable[..., TestClient], tmp_path: Path, why: str, breaks: Callable[[Path], Any],
        says: str) -> None:
    client = make_client()
    bad = bundle_copy(tmp_path, "v-bad")
    breaks(bad)
    r = change(client, bad)
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM, (why, r.text)
    body = r.json()
    assert body["detail"].startswith(f"{bad} cannot be served: ")
    assert body["type"].endswith("/bundle-refused") and any(says in p for p in body["problems"]), (why, body)
    assert client.get("/model").json()["version"] == SHIPPED
    assert client.post("/events", json=event("e1")).json()["model_version"] == SHIPPED
    assert reloads(client, "refused") == 1 and reloads(client, "ok") == 0


def _edit(bundle: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    meta = orjson.loads((bundle / "bundle.json").read_bytes())
    edit(meta)
    (bundle / "bundle.json").write_bytes(orjson.dumps(meta))


def test_every_failed_check_is_listed(make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    """A fresh-user review: a bundle with three faults was answered with the first only."""
    client = make_client()
    bad = bundle_copy(tmp_path, "v-bad", lambda m: (m.pop("parity"), m["thresholds"].update(review=0.9, block=0.5)))
    (bad / "model.onnx").write_bytes(b"not onnx")
    problems = change(client, bad).json()["problems"]
    assert len(problems) == 3, problems
    assert [p.split(" ")[0] for p in problems] == ["no", "thresholds:", "ONNX"], problems


def test_a_relative_path_is_recorded_absolute(make_client: Callable[..., TestClient], tmp_path: Path,
                                              redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Other workers and replicas read the record from their own directories."""
    client = make_client()
    bundle_copy(tmp_path, "v-rel")
    monkeypatch.chdir(tmp_path)
    assert change(client, "v-rel").status_code == 200
    with redis.Redis.from_url(redis_url) as r:
        assert orjson.loads(r.get(LIVE_KEY))["bundle"] == str(tmp_path / "v-rel")
    link = tmp_path / "current"
    link.symlink_to(tmp_path / "v-rel")
    assert change(client, link).status_code == 200
    model = client.get("/model").json()
    assert (model["bundle"], model["bundle_dir"]) == (str(link), str(tmp_path / "v-rel"))


def test_thresholds_overrides_that_cross_the_new_bundle_are_refused(make_client: Callable[..., TestClient],
                                                                    tmp_path: Path) -> None:
    client = make_client(review_threshold=0.6)  # below the shipped block threshold, above this one's
    low = bundle_copy(tmp_path, "v-low", lambda m: m["thresholds"].update(review=0.1, block=0.5))
    r = change(client, low)
    assert r.status_code == 422 and "thresholds: review threshold 0.6 exceeds block 0.5" in r.json()["problems"], r.text
    assert client.get("/model").json()["version"] == SHIPPED


@pytest.mark.parametrize(("body", "path"), [
    ({"bundle": 7}, "$.bundle"),
    ({"bundle": ""}, "$.bundle"),
    ({}, "$.bundle"),
    ({"bundle": "x", "mode": "live"}, "$.mode"),
    ({"bundle": "x", "role": "canary"}, "$.role"),
    (b'{"bundle": "a", "bundle": "b"}', "$.bundle"),
])
def test_bad_bodies_name_the_field(client: TestClient, body: Any, path: str) -> None:
    r = client.post("/admin/model", content=body if isinstance(body, bytes) else orjson.dumps(body),
                    headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.headers["content-type"] == PROBLEM, r.text
    assert path in [e["path"] for e in r.json()["errors"]]


def test_other_workers_follow_the_record(make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    """Two workers on one Redis: the one that takes the reload swaps at once, the other
    within its poll interval."""
    a, b = make_client(model_poll_s=0.05), make_client(model_poll_s=0.05)
    assert change(a, bundle_copy(tmp_path, "v-both")).status_code == 200
    deadline = time.monotonic() + 30
    while b.get("/model").json()["version"] != "v-both":
        assert time.monotonic() < deadline, "the second worker never followed"
        time.sleep(0.05)
    assert b.post("/events", json=event("f1")).json()["model_version"] == "v-both"
    assert reloads(b, "ok") == 1


def test_a_record_a_worker_cannot_serve_is_refused_once(make_client: Callable[..., TestClient], tmp_path: Path,
                                                        redis_url: str) -> None:
    client = make_client(model_poll_s=0.05)
    record = {"bundle": str(tmp_path / "gone"), "version": "v-gone", "base": str(DEFAULT_BUNDLE)}
    with redis.Redis.from_url(redis_url) as r:
        r.set(LIVE_KEY, orjson.dumps(record))
    time.sleep(0.5)  # about ten polls
    assert client.get("/model").json()["version"] == SHIPPED
    assert reloads(client, "refused") == 1  # logged and counted once, not at every poll


def test_a_starting_worker_joins_its_siblings_model(make_client: Callable[..., TestClient], tmp_path: Path,
                                                    redis_url: str) -> None:
    """A worker restarted after a reload serves what its siblings serve (the record was
    written under its own SEQGUARD_BUNDLE); a deployment with another SEQGUARD_BUNDLE starts
    on it and makes it the record."""
    reloaded = bundle_copy(tmp_path, "v-reloaded")
    with redis.Redis.from_url(redis_url) as r:
        r.set(LIVE_KEY, orjson.dumps({"bundle": str(reloaded), "version": "v-reloaded",
                                      "base": str(DEFAULT_BUNDLE)}))
    assert make_client().get("/model").json()["version"] == "v-reloaded"
    deployed = bundle_copy(tmp_path, "v-deployed")
    assert make_client(bundle=deployed).get("/model").json()["version"] == "v-deployed"
    with redis.Redis.from_url(redis_url) as r:
        assert orjson.loads(r.get(live_model_key(str(deployed))))["base"] == str(deployed)
        assert orjson.loads(r.get(LIVE_KEY))["version"] == "v-reloaded"  # the first deployment's, untouched


def test_check_bundle_passes_the_shipped_bundle() -> None:
    bundle = load_bundle(DEFAULT_BUNDLE)
    assert check_bundle(bundle, store_history=bundle.spec.history) == []
    assert check_bundle(bundle, store_history=bundle.spec.history - 1)  # a store that keeps too few


# An attack review's findings ------------------------------------------------------------


def other_shape_onnx(path: Path) -> None:
    """A valid ONNX model of the contract's input that answers (B, T, F) floats, not (B, T)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    feats = helper.make_tensor_value_info("features", TensorProto.INT64, ["batch", "time", 13])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "time", 13])
            for n in ("anomaly_probability", "surprise")]
    nodes = [helper.make_node("Cast", ["features"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Sigmoid", ["f"], ["anomaly_probability"]),
             helper.make_node("Identity", ["f"], ["surprise"])]
    graph = helper.make_graph(nodes, "other", [feats], outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what ONNX Runtime reads (the onnx package writes newer)
    onnx.save(model, str(path))


def test_a_model_of_another_output_shape_is_refused_before_it_serves(make_client: Callable[..., TestClient],
                                                                     tmp_path: Path) -> None:
    """It passed warm-up, was swapped in, and every /events request then hung: the
    batcher's worker died on its outputs and nothing answered its waiters."""
    client = make_client()
    bad = bundle_copy(tmp_path, "v-shape")
    other_shape_onnx(bad / "model.onnx")
    r = change(client, bad)
    assert r.status_code == 422 and any("warm-up failed" in p and "expected float" in p
                                        for p in r.json()["problems"]), r.text
    assert client.post("/events", json=event("e1")).json()["model_version"] == SHIPPED


def test_a_record_that_breaks_the_loader_does_not_stop_the_follower(make_client: Callable[..., TestClient],
                                                                    tmp_path: Path, redis_url: str) -> None:
    """A parity record of strings raised ValueError in the check, which killed every
    worker's follower for good (and was a 500 on the admin route)."""
    client = make_client(model_poll_s=0.05)
    odd = bundle_copy(tmp_path, "v-odd", lambda m: m["parity"]["fp32"].update(max_diff_over_allowed={"x": "abc"}))
    r = change(client, odd)
    assert r.status_code == 422 and "parity past its tolerance" in r.text, r.text
    with redis.Redis.from_url(redis_url) as r2:
        r2.set(LIVE_KEY, orjson.dumps({"bundle": str(odd), "version": "v-odd", "base": str(DEFAULT_BUNDLE)}))
        time.sleep(0.3)
        good = bundle_copy(tmp_path, "v-good")
        r2.set(LIVE_KEY, orjson.dumps({"bundle": str(good), "version": "v-good", "base": str(DEFAULT_BUNDLE)}))
    deadline = time.monotonic() + 30
    while client.get("/model").json()["version"] != "v-good":
        assert time.monotonic() < deadline, "the follower died on the bad record"
        time.sleep(0.05)


def test_the_same_version_with_other_thresholds_reaches_every_worker(make_client: Callable[..., TestClient],
                                                                    tmp_path: Path) -> None:
    """Followers compared versions only: a bundle posted again under its version with
    other thresholds stayed in the worker that took the POST."""
    a, b = make_client(model_poll_s=0.05), make_client(model_poll_s=0.05)
    assert change(a, bundle_copy(tmp_path / "1", "v-same")).status_code == 200
    stricter = bundle_copy(tmp_path / "2", "v-same", lambda m: m["thresholds"].update(review=0.2, block=0.3))
    assert change(a, stricter).status_code == 200
    deadline = time.monotonic() + 30
    while b.get("/model").json()["thresholds"] != {"review": 0.2, "block": 0.3}:
        assert time.monotonic() < deadline, "the second worker kept the old thresholds"
        time.sleep(0.05)


def test_a_directory_changed_since_the_record_is_not_served(make_client: Callable[..., TestClient],
                                                           tmp_path: Path) -> None:
    """A restarted worker (or a follower) served whatever the record's directory held
    now, a model never made live, while its siblings served the one posted."""
    a = make_client(model_poll_s=0.05)
    current = bundle_copy(tmp_path, "current")
    _edit(current, lambda m: m.update(model_version="v-posted"))
    assert change(a, current).status_code == 200
    _edit(current, lambda m: m.update(model_version="v-never-posted"))
    b = make_client(model_poll_s=0.05)  # starts, reads the record, finds another version there
    time.sleep(0.3)
    assert b.get("/model").json()["version"] == SHIPPED
    assert a.get("/model").json()["version"] == "v-posted"


def test_backfills_keep_the_stores_window_after_a_reload_to_a_smaller_history(
        make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    """An attack review: after a reload to a bundle of a smaller window (history 48 beside
    the store's 80), a backfill emulated the store with the new bundle's history, and a
    late event's answer differed from the live one. The store's window is what counts."""
    def smaller(meta: dict[str, Any]) -> None:
        meta["window"] = meta["feature_spec"]["window"] = 32

    client = make_client()
    r = change(client, bundle_copy(tmp_path, "v-small", smaller))
    assert r.status_code == 200, r.text
    log = [event(f"e{i}", "u1", 1_511_596_870_000 + 1000 * i) for i in range(70)]
    log.append(event("late", "u1", 1_511_596_870_000 + 15_500))  # late into the oldest part of the window
    live = [client.post("/events", json=e).json() for e in log]
    batch = client.post("/batch-score", json={"events": log}).json()["results"]
    stream = client.post("/batch-score", content=b"\n".join(orjson.dumps(e) for e in log),
                         headers={"content-type": "application/x-ndjson"})
    for name, rows in (("json", batch), ("ndjson", [orjson.loads(x) for x in stream.text.splitlines()])):
        worst = max(abs(x["anomaly_probability"] - y["anomaly_probability"]) for x, y in zip(rows, live, strict=True))
        assert worst < 2e-6, (name, worst)


def test_deployments_on_one_redis_keep_their_own_records(make_client: Callable[..., TestClient], tmp_path: Path,
                                                         redis_url: str) -> None:
    """An attack review: two deployments on one Redis (a rolling deploy) shared one live
    record; a worker of the old one that restarted wrote its bundle as the record, and every
    worker of both followed it (a promotion undone, the new deployment on the old bundle)."""
    old = make_client(model_poll_s=0.05)
    assert change(old, bundle_copy(tmp_path, "v-old-reloaded")).status_code == 200
    new = make_client(model_poll_s=0.05, bundle=str(bundle_copy(tmp_path, "v-new")))
    restarted_old = make_client(model_poll_s=0.05)  # a worker of the old deployment, restarted
    time.sleep(0.5)  # several polls
    assert old.get("/model").json()["version"] == "v-old-reloaded"
    assert restarted_old.get("/model").json()["version"] == "v-old-reloaded"  # rejoins its siblings
    assert new.get("/model").json()["version"] == "v-new"
