"""Training end to end on real logs: unknown and novel event types, thresholds, the
self-supervised path, and the run directory export reads (the data: tests/test_dataset.py)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import orjson
import pytest
from conftest import DATA, TAOBAO_100, invoke
from typer.testing import CliRunner

from app.cli import cli
from app.core.batch_engine import score_events
from app.core.bundle import load_bundle
from app.core.events import Events
from app.core.scorer import OnnxModel
from model_export.data import read_events
from model_export.dataset import TrainConfig, load_prepared, prepare
from model_export.train import novel_types, with_unknown_types

HDFS_400 = DATA / "hdfs_normal_400.gz"  # the first 400 normal sessions of DeepLog's HDFS data


def test_unknown_types_only_on_normal_events():
    rng = np.random.default_rng(0)
    feats = np.full((100_000, 3), 5)
    label = (rng.random(100_000) < 0.2).astype(np.int8)
    out = with_unknown_types(feats, label, 0.01, rng)
    hit = out[:, 0] == 1
    assert 0.007 < hit.mean() < 0.009  # 1% of the 80% normal events
    assert not hit[label == 1].any()
    assert (feats[:, 0] == 5).all(), "the input is not modified"


@pytest.fixture(scope="module")
def hdfs_jsonl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hdfs") / "hdfs.jsonl"
    with gzip.open(HDFS_400, "rt") as f, path.open("wb") as out:
        for i, line in enumerate(x for x in f if x.strip()):
            for j, k in enumerate(line.split()):
                out.write(orjson.dumps({"user_id": f"s{i}", "event_type": f"k{k}",
                                        "timestamp": 1_500_000_000_000 + 1000 * j}) + b"\n")
    return path


def test_self_supervised_run_exports_with_user_thresholds(hdfs_jsonl: Path, tmp_path: Path):
    """--inject none trains on next-event prediction only; its tail calibration exports
    (parity within the tolerance the calibration map allows) and its user-unit thresholds
    meet their targets on the validation sessions."""
    run_dir, bundle = tmp_path / "run", tmp_path / "bundle"
    out = invoke("train", "--events", hdfs_jsonl, "--format", "jsonl", "--inject", "none", "--window", "16",
                 "--epochs", "2", "--seed", "3", "--fpr-unit", "user", "--out", run_dir)
    assert "validation users flagged" in out
    invoke("export", run_dir, "--out", bundle, "--no-report")
    meta = load_bundle(bundle).meta
    assert meta["calibration"]["kind"] == "tail"
    assert meta["supervised"] is False
    parity = meta["parity"]["fp32"]
    assert max(parity["max_diff_over_allowed"].values()) <= 1.0
    assert parity["per_output"]["surprise"] <= 1e-4
    chosen = meta["thresholds"]["chosen"]
    assert meta["thresholds"]["unit"] == chosen["unit"] == "user"
    for name in ("review", "block"):
        assert chosen[name]["validation_user_fpr"] <= chosen[name]["target_fpr"]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["train_config"]["fpr_unit"] == "user"


def test_event_unit_thresholds_hold_every_type_on_validation(tmp_path: Path):
    run_dir = tmp_path / "run"
    invoke("train", "--events", TAOBAO_100, "--format", "taobao", "--inject", "all", "--window", "16",
           "--epochs", "1", "--seed", "3", "--out", run_dir)
    chosen = json.loads((run_dir / "run.json").read_text())["thresholds"]["chosen"]
    assert chosen["unit"] == "event" and chosen["per_type_factor"] == 2.0
    for name in ("review", "block"):
        row = chosen[name]
        assert row["validation_fpr"] <= row["target_fpr"]
        too_few = set(row.get("types_too_few_to_constrain", ()))
        # the bounds count the validation users' real events (look-alikes only the overall rate)
        assert chosen["per_type_on"].endswith("(real users)")
        for t, r in row["per_type_constrained_on"].items():
            if t not in too_few:
                assert r["fpr"] <= 2 * row["target_fpr"], (name, t)


def test_novel_types_only_when_no_unknown_types_are_taught():
    prep = prepare(TAOBAO_100, "taobao", [], TrainConfig(window=16, seed=3))
    assert novel_types(prep, TrainConfig(unknown_type_rate=0.01)) == ()
    # padding (0) and unknown (1) are never training events; every fitted type is
    assert novel_types(prep, TrainConfig(unknown_type_rate=0.0)) == (0, 1)


def test_an_unseen_log_key_is_blocked_in_logs_mode(hdfs_jsonl: Path, tmp_path: Path):
    """With no unknown types taught (--unknown-type-rate 0, the mode for logs), a log key no
    training session has is impossible as a next event (DeepLog: an unseen key is an
    anomaly): through ONNX Runtime it scores far above every normal event and is blocked,
    where a rare key the model learnt is not."""
    run_dir, bundle = tmp_path / "run", tmp_path / "bundle"
    invoke("train", "--events", hdfs_jsonl, "--format", "jsonl", "--inject", "none", "--window", "16",
           "--epochs", "2", "--seed", "3", "--fpr-unit", "user", "--unknown-type-rate", "0", "--out", run_dir)
    run = json.loads((run_dir / "run.json").read_text())
    assert 1 in run["model"]["novel_types"]
    invoke("export", run_dir, "--out", bundle, "--no-report")
    model = OnnxModel(load_bundle(bundle), threads=1)

    normal = read_events(hdfs_jsonl, "jsonl", dedupe=False, sort=True)[0]
    normal_surprise = score_events(model, normal).surprise
    keys = ["k5", "k22", "k5", "k5", "k11", "k9", "k99", "k11", "k9"]  # k99: no HDFS session has it
    session = Events.from_records([{"user_id": "new", "event_type": k, "timestamp": 1_500_000_000_000 + 1000 * j}
                                   for j, k in enumerate(keys)])
    scored = score_events(model, session)
    assert scored.surprise[6] > normal_surprise.max() + 10
    assert scored.probability[6] >= model.bundle.thresholds.block
    assert scored.surprise[:6].max() < np.quantile(normal_surprise, 0.999)


def test_export_needs_only_the_run_directory_and_never_overwrites(tmp_path: Path):
    """Issue 9: export re-read the training file by the path typed at training (so it
    failed from another directory) and silently replaced a bundle (its report and fp16
    model were lost). The run directory now holds its splits; export refuses a non-empty
    OUT without --force, and with it replaces OUT whole."""
    data = tmp_path / "data" / "events.csv.gz"
    data.parent.mkdir()
    data.write_bytes(TAOBAO_100.read_bytes())
    run_dir, bundle = tmp_path / "run", tmp_path / "bundle"
    invoke("train", "--events", data, "--format", "taobao", "--inject", "all", "--window", "16",
           "--epochs", "1", "--seed", "3", "--out", run_dir)
    invoke("export", run_dir, "--out", bundle, "--no-report")
    again = load_prepared(run_dir, json.loads((run_dir / "run.json").read_text()))
    assert again is not None
    prep = prepare(data, "taobao", ["scraping_bot", "click_farming", "order_brushing", "account_takeover",
                                    "cart_stuffing"], TrainConfig(window=16, seed=3))
    for name in ("train", "val", "test"):
        a, b = again.splits[name], prep.splits[name]
        assert np.array_equal(a.timestamp_ms, b.timestamp_ms) and np.array_equal(a.label, b.label)
        assert a.user_ids.tolist() == b.user_ids.tolist() and a.event_types == b.event_types
        assert np.array_equal(again.features[name], prep.features[name])
    assert np.array_equal(again.real["test"].timestamp_ms, prep.real["test"].timestamp_ms)
    assert again.real["test"].event_ids().tolist() == prep.real["test"].event_ids().tolist()

    data.unlink()  # the training file is gone: export still works, with the same parity windows
    (bundle / "report").mkdir()
    res = CliRunner().invoke(cli, ["export", str(run_dir), "--out", str(bundle), "--no-report"])
    assert res.exit_code == 2 and "not empty" in res.output and "--force" in res.output
    assert (bundle / "report").is_dir(), "a refused export leaves OUT as it was"
    first = load_bundle(bundle).meta
    invoke("export", run_dir, "--out", bundle, "--no-report", "--force")
    meta = load_bundle(bundle).meta
    assert meta["model_version"] == first["model_version"] and meta["parity"] == first["parity"]
    assert not (bundle / "report").exists(), "--force replaces OUT whole"
    assert not list(tmp_path.glob(".bundle.export-*")), "no staging directory left behind"


def test_export_of_a_bundle_or_a_missing_directory_says_so(tmp_path: Path):
    """Issue 9: export given a bundle printed `[Errno 2] … run.json`."""
    for source, says in ((Path("app/bundles/default"), "is a bundle"), (tmp_path / "nope", "is missing"),
                         (tmp_path, "not a run directory")):
        res = CliRunner().invoke(cli, ["export", str(source), "--out", str(tmp_path / "out")])
        out = " ".join(res.output.split())
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert says in out and "seqguard train --out" in out
