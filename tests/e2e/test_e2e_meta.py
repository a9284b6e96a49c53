"""GET /model, /healthz and /readyz."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from app.core.bundle import DEFAULT_BUNDLE

from .e2e_support import T0, TestClient, event


def test_model_describes_the_served_bundle(client: TestClient, bundle_meta: dict[str, Any]) -> None:
    r = client.get("/model")
    assert r.status_code == 200
    m = r.json()
    shipped = json.loads((DEFAULT_BUNDLE / "bundle.json").read_text())
    assert m["version"] == bundle_meta["version"] == shipped["model_version"]
    assert m["architecture"] == shipped["architecture"]["arch"] == "transformer"
    assert m["window"] == shipped["window"] == bundle_meta["window"]
    assert m["thresholds"] == {"review": shipped["thresholds"]["review"], "block": shipped["thresholds"]["block"]}
    assert m["provider"] == "CPUExecutionProvider"  # what the session really runs on (no GPU here)
    assert m["fp16"] is False and m["model_file"] == "model.onnx"
    assert m["parameters"]["parameters"] == shipped["architecture"]["parameters"]
    ev = m["evaluation"]
    assert ev == shipped["evaluation"]
    assert 0.5 < ev["detectors"]["seqguard-transformer"]["roc_auc"] <= 1.0
    # The answers of /events name the same model and thresholds.
    res = client.post("/events", json=event("e1", "u1", T0)).json()
    assert res["model_version"] == m["version"] and res["thresholds"] == m["thresholds"]


def test_model_names_the_model_file_that_runs(make_client: Any, tmp_path: Path) -> None:
    """SEQGUARD_FP16 asks for model.fp16.onnx, on whichever provider loads; /model says
    which file the session runs, not what was asked for."""
    m = make_client(fp16=True).get("/model").json()
    assert (m["fp16"], m["model_file"], m["provider"]) == (True, "model.fp16.onnx", "CPUExecutionProvider")
    plain = tmp_path / "bundle"  # the shipped bundle without its fp16 model
    plain.mkdir()
    for name in ("bundle.json", "model.onnx"):
        shutil.copy(DEFAULT_BUNDLE / name, plain)
    m = make_client(bundle=plain, fp16=True).get("/model").json()
    assert (m["fp16"], m["model_file"]) == (False, "model.onnx")


def test_model_shows_the_vocabulary_and_the_deployments_aliases(make_client: Any) -> None:
    shipped = json.loads((DEFAULT_BUNDLE / "bundle.json").read_text())["feature_spec"]
    vocab = make_client().get("/model").json()["vocabulary"]
    assert vocab == {"event_types": shipped["event_types"], "aliases": shipped["aliases"], "deployment_aliases": {}}
    assert vocab["aliases"]["addtocart"] == "cart" and "checkout" not in vocab["aliases"]
    vocab = make_client(event_aliases={"Checkout": "buy"}).get("/model").json()["vocabulary"]
    assert vocab["deployment_aliases"] == {"Checkout": "buy"}
    assert vocab["aliases"]["checkout"] == "purchase"  # as the service applies it
    assert vocab["event_types"] == shipped["event_types"]


def test_health_and_readiness(client: TestClient, bundle_meta: dict[str, Any]) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "model": bundle_meta["version"], "redis": True}
    assert "retry-after" not in r.headers


def test_openapi_lists_the_contract_routes(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/events", "/batch-score", "/model", "/healthz", "/readyz"} <= set(spec["paths"])


def test_startup_warns_about_aliases_that_change_or_lose_a_type(make_client, caplog):
    """One routine (app.core.vocabulary.alias_warnings) tells the operator, at service start,
    which deployment aliases change what a known name means and which lead to a type the
    model never saw; /model shows them."""
    with caplog.at_level("WARNING", logger="seqguard"):
        c = make_client(event_aliases={"view": "purchase", "signin": "login", "checkout": "buy"})
    text = caplog.text
    assert "SEQGUARD_EVENT_ALIASES: alias view → purchase replaces view → view" in text
    assert "SEQGUARD_EVENT_ALIASES: alias signin → login: not among the model's event types" in text
    assert "checkout" not in text  # checkout → purchase is a plain, known alias
    vocab = c.get("/model").json()["vocabulary"]
    assert vocab["aliases"]["checkout"] == "purchase" and vocab["deployment_aliases"]["signin"] == "login"
