"""Model variants (issue 11, item 3): `seqguard export --int8` writes model.int8.onnx with
its parity and decision agreement against fp32 in bundle.json; SEQGUARD_PRECISION (and
`seqguard score --precision`) picks the file served, and GET /model says what runs.

Real bundles (the session's trained one, the shipped one), real ONNX Runtime sessions,
real logs; the service through HTTP.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import pytest
from conftest import TAOBAO_100, invoke
from fastapi.testclient import TestClient

from app.core.batch_engine import score_events
from app.core.bundle import DEFAULT_BUNDLE, MODEL_FILES, load_bundle
from app.core.scorer import OnnxModel
from model_export.data import read_events
from model_export.parity import VARIANT_TOLERANCE


def test_export_records_each_variants_parity_and_decision_agreement(trained: tuple[Path, Path]) -> None:
    _, bundle_dir = trained
    meta = orjson.loads((bundle_dir / "bundle.json").read_bytes())
    for variant in ("fp16", "int8"):
        assert (bundle_dir / MODEL_FILES[variant]).is_file()
        d = meta["parity"][variant]["decisions"]
        assert d["events"] > 1000 and 0.0 <= d["agreement"] <= 1.0
        assert set(d["flagged"]) == set(d["blocked"]) == {"fp32", variant}
        assert d["tolerance"] == VARIANT_TOLERANCE
        assert d["within_tolerance"] == (d["agreement"] >= VARIANT_TOLERANCE["min_agreement"]
                                         and abs(d["flagged"][variant] - d["flagged"]["fp32"])
                                         <= VARIANT_TOLERANCE["max_flagged_change"]
                                         and abs(d["blocked"][variant] - d["blocked"]["fp32"])
                                         <= VARIANT_TOLERANCE["max_blocked_change"])
    # int8 is smaller than fp32 on disk (weights stored as int8)
    assert (bundle_dir / "model.int8.onnx").stat().st_size < 0.6 * (bundle_dir / "model.onnx").stat().st_size


def test_the_shipped_int8_model_decides_held_out_real_events_as_fp32_does() -> None:
    """The shipped bundle's int8 file on real Taobao users' events (every one, in time
    order): the decisions agree within the tolerance the export states, and the
    probabilities stay close."""
    bundle = load_bundle(DEFAULT_BUNDLE)
    events, _ = read_events(TAOBAO_100, "taobao")
    probs = {p: score_events(OnnxModel(bundle, precision=p, threads=1), events).probability for p in ("fp32", "int8")}
    decided = {p: bundle.thresholds.decide(x) for p, x in probs.items()}
    assert (decided["fp32"] == decided["int8"]).mean() >= VARIANT_TOLERANCE["min_agreement"]
    flagged = {p: (d != "allow").mean() for p, d in decided.items()}
    assert abs(flagged["int8"] - flagged["fp32"]) <= VARIANT_TOLERANCE["max_flagged_change"]
    assert np.abs(probs["int8"] - probs["fp32"]).max() < 0.1
    assert bundle.meta["parity"]["int8"]["decisions"]["within_tolerance"] is True


def test_a_precision_the_bundle_lacks_runs_fp32_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    plain = tmp_path / "bundle"
    plain.mkdir()
    for name in ("bundle.json", "model.onnx"):
        shutil.copy(DEFAULT_BUNDLE / name, plain)
    with caplog.at_level(logging.WARNING, logger="seqguard.scorer"):
        model = OnnxModel(load_bundle(plain), precision="int8")
    assert (model.precision_used, model.model_file) == ("fp32", "model.onnx")
    assert any("no int8 model" in r.getMessage() for r in caplog.records)
    int8 = OnnxModel(load_bundle(DEFAULT_BUNDLE), precision="int8")
    assert (int8.precision_used, int8.model_file) == ("int8", "model.int8.onnx")


def test_the_service_serves_the_precision_asked_for(make_client: Callable[..., TestClient], tmp_path: Path) -> None:
    client = make_client(precision="int8")
    m = client.get("/model").json()
    assert (m["precision"], m["model_file"], m["fp16"]) == ("int8", "model.int8.onnx", False)
    assert client.post("/events", json={"event_id": "e1", "user_id": "u", "event_type": "pv",
                                        "timestamp": 1_511_596_870_000}).status_code == 200
    m = make_client(fp16=True).get("/model").json()  # the deprecated flag still asks for fp16
    assert (m["precision"], m["model_file"], m["fp16"]) == ("fp16", "model.fp16.onnx", True)
    assert make_client().get("/model").json()["precision"] == "fp32"


def test_an_unknown_precision_is_refused_naming_the_variable() -> None:
    from pydantic import ValidationError

    from app.settings import Settings

    with pytest.raises(ValidationError, match="precision"):
        Settings(precision="int4")


def test_score_runs_the_precision_asked_for(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    said = invoke("score", DEFAULT_BUNDLE, "--events", TAOBAO_100, "--format", "taobao", "--out", out,
                  "--precision", "int8")
    assert "(int8)" in said
    rows = [orjson.loads(x) for x in out.read_bytes().splitlines()]
    assert rows and {r["decision"] for r in rows} <= {"allow", "review", "block"}
