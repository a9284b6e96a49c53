"""Reason codes (issue 11, item 4): the graph's per-feature surprise, and `?explain=true`
naming the feature a scenario changed, in stable codes.

The shipped bundle (a real ONNX Runtime session), real Taobao users' events, the service
through HTTP on the session's real Redis.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from conftest import TAOBAO_100
from e2e.e2e_support import TestClient, taobao_events

from app.core.bundle import DEFAULT_BUNDLE, load_bundle
from app.core.features import FEATURES, group_starts, last_windows
from app.core.reasons import REASON_CODES
from app.core.scorer import OnnxModel
from model_export.data import read_events
from model_export.scenarios import inject


def test_the_graph_splits_each_events_surprise_by_feature_and_parity_covers_it() -> None:
    bundle = load_bundle(DEFAULT_BUNDLE)
    targets = bundle.meta["feature_surprise_targets"]
    assert set(targets) <= set(REASON_CODES)  # every predicted feature has a stable code
    assert "feature_surprise" in bundle.meta["parity"]["fp32"]["per_output"]
    assert bundle.meta["outputs"]["feature_surprise"]["shape"] == ["batch", "time", "targets"]
    events, _ = read_events(TAOBAO_100, "taobao")
    ev = events.sorted()
    rows = np.arange(0, len(ev), 97)
    x = last_windows(bundle.spec.transform(ev), rows, group_starts(ev.user)[rows], bundle.window)
    model = OnnxModel(bundle, threads=1)
    p, s, fs = model.run_explained(x)
    assert fs.shape == (*s.shape, len(targets))
    np.testing.assert_allclose(fs.sum(-1), s, atol=1e-4)
    p2, s2 = model.run(x)  # without explain: the same scores, the third output not asked for
    np.testing.assert_array_equal(p, p2)
    np.testing.assert_array_equal(s, s2)


def test_an_account_takeover_is_explained_by_the_device_and_country_it_changed() -> None:
    """Injected account takeovers (model_export/scenarios.py) change the device and the
    country: at the events where the device changes, the top reason names one of them
    (the takeover's later events stay on the new device, and other traits explain them)."""
    bundle = load_bundle(DEFAULT_BUNDLE)
    targets = bundle.meta["feature_surprise_targets"]
    events, _ = read_events(TAOBAO_100, "taobao")
    ev = inject(events, ["account_takeover"]).sorted()
    feats = bundle.spec.transform(ev)
    changed = feats[:, FEATURES.index("device_change")] == 3  # 3: another device than the event before
    rows = np.flatnonzero((ev.label == 1) & changed)
    assert rows.size >= 3
    x = last_windows(feats, rows, group_starts(ev.user)[rows], bundle.window)
    _, _, fs = OnnxModel(bundle, threads=1).run_explained(x)
    top = np.array(targets)[fs[:, -1].argmax(-1)]
    assert np.isin(top, ["device_change", "country_change"]).all(), top


def test_explain_gives_reason_codes_naming_the_changed_traits(client: TestClient) -> None:
    """A real shopper's history, then an event from a new device in a new country: the
    answer's reason codes lead with those traits, on that event; without explain, none."""
    history = taobao_events(["100"])["100"][:30]
    for e in history:
        assert client.post("/events", json={**e, "device_id": "phone-1", "country": "CN"}).status_code == 200
    last = history[-1]
    takeover = {**last, "event_id": "takeover", "timestamp": last["timestamp"] + 5_000, "device_id": "pc-77",
                "country": "BR", "event_type": "buy"}
    answer = client.post("/events?explain=true", json=takeover).json()
    codes = answer["reason_codes"]
    assert codes and [c["contribution"] for c in codes] == sorted((c["contribution"] for c in codes), reverse=True)
    assert {codes[0]["code"], codes[1]["code"]} <= {"UNUSUAL_DEVICE_CHANGE", "UNUSUAL_COUNTRY_CHANGE",
                                                    "UNUSUAL_EVENT_TYPE", "UNUSUAL_GAP"}
    assert codes[0]["code"] in ("UNUSUAL_DEVICE_CHANGE", "UNUSUAL_COUNTRY_CHANGE")
    assert codes[0]["event_id"] == "takeover" and codes[0]["feature"] in ("device_change", "country_change")
    assert all(c["code"] == REASON_CODES[c["feature"]][0] for c in codes)
    plain = client.post("/events", json={**takeover, "event_id": "takeover-2"}).json()
    assert "reason_codes" not in plain and "reasons" not in plain


def test_a_bundle_without_the_output_serves_and_explains_without_codes(make_client, tmp_path) -> None:
    """Bundles exported before reason codes have no feature_surprise output: they serve,
    and ?explain gives the events (reasons) without codes."""
    import shutil

    import onnx

    old = tmp_path / "old"
    shutil.copytree(DEFAULT_BUNDLE, old, ignore=shutil.ignore_patterns("report"))
    m = onnx.load(str(old / "model.onnx"))
    keep = [o for o in m.graph.output if o.name != "feature_surprise"]
    del m.graph.output[:]
    m.graph.output.extend(keep)
    onnx.save(m, str(old / "model.onnx"))
    assert [o.name for o in ort.InferenceSession(str(old / "model.onnx")).get_outputs()] == [
        "anomaly_probability", "surprise"]
    client = make_client(bundle=str(old))
    e = taobao_events(["100"])["100"][0]
    answer = client.post("/events?explain=true", json=e).json()
    assert answer["reasons"] and "reason_codes" not in answer
