"""train → export → score → evaluate through the command line, on real data."""

from __future__ import annotations

import gzip
import json

import numpy as np
import orjson
import pytest
from conftest import TAOBAO_100, WINDOW, invoke

from app.core.bundle import load_bundle
from model_export.report import REPORT_FILES


def test_bundle_has_everything_the_contract_lists(trained):
    _, bundle_dir = trained
    b = load_bundle(bundle_dir)
    meta = b.meta
    for key in ("schema_version", "model_version", "architecture", "window", "feature_spec", "calibration",
                "thresholds", "training_data", "evaluation", "parity"):
        assert meta[key] is not None, key
    assert b.window == WINDOW and b.arch == "transformer"
    assert 0.0 < b.thresholds.review <= b.thresholds.block <= 1.0
    assert meta["thresholds"]["chosen"]["on"].startswith("validation")
    assert meta["parity"]["fp32"]["max_abs_diff"] <= 1e-4
    # labels (injected scenarios): the supervised score fused with the recent surprise
    assert meta["calibration"]["kind"] == "fisher" and meta["parity"]["fp32"]["max_diff_over_allowed"]
    assert "fp16" in meta["parity"] and (bundle_dir / "model.fp16.onnx").is_file()
    assert meta["training_data"]["sha256"] and "path" not in meta["training_data"]
    for name in REPORT_FILES:
        assert (bundle_dir / "report" / name).stat().st_size > 0, name
    detectors = meta["evaluation"]["detectors"]
    assert {"iforest", "ecod", "rate_rule"} <= set(detectors)


def test_onnx_has_dynamic_batch_and_time_axes(trained):
    import onnx

    _, bundle_dir = trained
    m = onnx.load(str(bundle_dir / "model.onnx"))
    dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims[:2] == ["batch", "time"]
    assert {o.name for o in m.graph.output} == {"anomaly_probability", "surprise", "feature_surprise"}
    for o in m.graph.output:  # every output has the dynamic batch and time axes; feature_surprise a third
        axes = [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
        assert axes[:2] == ["batch", "time"] and len(axes) == (3 if o.name == "feature_surprise" else 2), axes
    assert m.opset_import[0].version >= 17


def test_score_writes_one_line_per_input_event_in_input_order(trained, tmp_path):
    _, bundle_dir = trained
    out = tmp_path / "results.jsonl"
    invoke("score", bundle_dir, "--events", TAOBAO_100, "--format", "taobao", "--out", out)
    rows = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    with gzip.open(TAOBAO_100, "rt") as f:
        src = [line.split(",") for line in f.read().splitlines()]
    assert len(rows) == len(src)
    assert [r["user_id"] for r in rows] == [s[0] for s in src]
    assert len({r["event_id"] for r in rows}) == len(rows), "generated ids are unique"
    p = np.array([r["anomaly_probability"] for r in rows])
    assert ((p >= 0) & (p <= 1)).all()
    thresholds = load_bundle(bundle_dir).thresholds
    assert [r["decision"] for r in rows] == thresholds.decide(p).tolist()
    again = tmp_path / "again.jsonl"
    invoke("score", bundle_dir, "--events", TAOBAO_100, "--format", "taobao", "--out", again)
    assert again.read_bytes() == out.read_bytes(), "scoring is deterministic"


def test_evaluate_writes_a_report_against_the_baselines(trained, tmp_path):
    _, bundle_dir = trained
    out = tmp_path / "report"
    invoke("evaluate", bundle_dir, "--events", TAOBAO_100, "--format", "taobao", "--inject", "all", "--out", out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["detectors"]) >= {"seqguard-transformer", "iforest", "ecod", "rate_rule"}
    assert metrics["n_anomalous"] > 0
    assert "| seqguard-transformer" in (out / "model_card.md").read_text() or "seqguard-transformer" in (
        out / "model_card.md").read_text()


@pytest.mark.slow
def test_self_supervised_run_on_generic_jsonl_without_labels(tmp_path):
    """Any vocabulary, no labels, nothing injected: the probability is the calibrated tail
    probability of surprise under normal data, and thresholds still come from validation."""
    vocab = {"pv": "browse", "cart": "basket", "fav": "wish", "buy": "order"}
    src = tmp_path / "events.jsonl"
    with gzip.open(TAOBAO_100, "rt") as f, src.open("w") as out:
        for i, line in enumerate(f.read().splitlines()):
            u, item, cat, t, ts = line.split(",")
            out.write(json.dumps({"event_id": f"e{i}", "user_id": f"shop-{u}", "event_type": vocab[t],
                                  "timestamp": int(ts) * 1000, "item_id": item, "category_id": cat}) + "\n")
    run_dir, bundle_dir = tmp_path / "run", tmp_path / "bundle"
    invoke("train", "--events", src, "--inject", "none", "--window", WINDOW, "--epochs", "2", "--out", run_dir)
    invoke("export", run_dir, "--out", bundle_dir)
    b = load_bundle(bundle_dir)
    assert b.meta["supervised"] is False
    assert b.meta["calibration"]["kind"] == "tail"
    assert set(b.spec.event_types) == set(vocab.values())
    t = b.thresholds
    assert 0.9 <= t.review < t.block <= 1.0, t  # at 1% and 0.1% FPR of a tail probability
    res = tmp_path / "res.jsonl"
    invoke("score", bundle_dir, "--events", src, "--out", res)
    rows = [orjson.loads(x) for x in res.read_bytes().splitlines()]
    p = np.array([r["anomaly_probability"] for r in rows])
    assert rows[0]["event_id"] == "e0"
    assert 0.3 < float(np.median(p)) < 0.7, "normal traffic sits mid-distribution"
    assert 0.0 < float(np.mean([r["decision"] != "allow" for r in rows])) < 0.05
