"""Metrics with known answers, and the report files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from model_export.evaluate import (
    REPORT_FILES,
    Scored,
    compare,
    markdown_table,
    metrics,
    write_report,
)

NAMES = ("none", "scraping_bot", "click_farming", "order_brushing")


def test_perfect_separation() -> None:
    label = np.r_[np.zeros(900, np.int8), np.ones(100, np.int8)]
    score = np.r_[np.linspace(0, 0.5, 900), np.linspace(0.6, 1, 100)]
    m = metrics(label, None, NAMES, Scored("d", score, {"review": 0.55, "block": 0.9}))
    assert m["roc_auc"] == 1.0 and m["pr_auc"] == 1.0 and m["recall_at_1pct_fpr"] == 1.0
    assert m["n_events"] == 1000 and m["n_anomalous"] == 100
    review = m["at_threshold"]["review"]
    assert review == {"threshold": 0.55, "n_flagged": 100, "precision": 1.0, "recall": 1.0,
                      "f1": 1.0, "fpr": 0.0}
    assert m["at_threshold"]["block"]["recall"] == pytest.approx(0.25, abs=0.01)
    assert m["per_scenario"] == {} and m["roc_auc_mean_over_scenarios"] is None


def test_random_scores_are_near_chance() -> None:
    rng = np.random.default_rng(0)
    label = (rng.random(40_000) < 0.1).astype(np.int8)
    m = metrics(label, None, NAMES, Scored("r", rng.random(40_000), {"review": 0.99}))
    assert m["roc_auc"] == pytest.approx(0.5, abs=0.02)
    assert m["pr_auc"] == pytest.approx(label.mean(), abs=0.02)
    assert m["recall_at_1pct_fpr"] == pytest.approx(0.01, abs=0.006)
    assert m["at_threshold"]["review"]["fpr"] == pytest.approx(0.01, abs=0.003)


def test_operating_point_by_hand() -> None:
    label = np.array([0, 0, 0, 0, 1, 1])
    score = np.array([0.1, 0.2, 0.3, 0.8, 0.7, 0.9])
    at = metrics(label, None, NAMES, Scored("d", score, {"review": 0.5}))["at_threshold"]["review"]
    # flagged: 0.8 (normal), 0.7 and 0.9 (anomalous)
    assert at["n_flagged"] == 3 and at["precision"] == pytest.approx(2 / 3)
    assert at["recall"] == 1.0 and at["fpr"] == 0.25 and at["f1"] == pytest.approx(0.8)


def test_per_scenario_breakdown() -> None:
    rng = np.random.default_rng(1)
    normal = rng.random(5000)
    scraping = rng.random(200) + 2.0  # always above every normal event
    brushing = rng.random(300)  # indistinguishable from normal
    score = np.r_[normal, scraping, brushing]
    label = np.r_[np.zeros(5000), np.ones(500)].astype(np.int8)
    scenario = np.r_[np.zeros(5000), np.ones(200), np.full(300, 3)].astype(np.int8)
    m = metrics(label, scenario, NAMES, Scored("d", score, {"review": 1.5, "block": 2.5}))
    per = m["per_scenario"]
    assert list(per) == ["scraping_bot", "click_farming", "order_brushing"]
    assert per["scraping_bot"]["n_events"] == 200 and per["order_brushing"]["n_events"] == 300
    assert per["scraping_bot"]["roc_auc"] == 1.0
    assert per["scraping_bot"]["recall_at_1pct_fpr"] == 1.0
    assert per["scraping_bot"]["recall_at_review"] == 1.0
    assert per["scraping_bot"]["recall_at_block"] == pytest.approx(0.5, abs=0.1)
    assert per["order_brushing"]["roc_auc"] == pytest.approx(0.5, abs=0.05)
    assert per["order_brushing"]["recall_at_review"] == 0.0
    assert per["click_farming"] == {"n_events": 0, "roc_auc": None, "recall_at_1pct_fpr": None,
                                    "recall_at_review": None, "recall_at_block": None}
    mean = (per["scraping_bot"]["roc_auc"] + per["order_brushing"]["roc_auc"]) / 2
    assert m["roc_auc_mean_over_scenarios"] == pytest.approx(mean)


def test_split_without_positives_or_negatives() -> None:
    score = np.linspace(0, 1, 500)
    zeros = np.zeros(500, np.int8)
    m = metrics(zeros, zeros, NAMES, Scored("d", score, {"review": 0.9}))
    assert m["roc_auc"] is None and m["pr_auc"] is None and m["recall_at_1pct_fpr"] is None
    assert m["threshold_at_1pct_fpr"] is not None
    at = m["at_threshold"]["review"]
    assert at["recall"] is None and at["f1"] is None and at["precision"] == 0.0
    assert at["fpr"] == pytest.approx(0.1, abs=0.01)
    assert m["roc_auc_mean_over_scenarios"] is None
    assert all(v["roc_auc"] is None for v in m["per_scenario"].values())

    m = metrics(np.ones(50, np.int8), None, NAMES, Scored("d", score[:50], {"block": 2.0}))
    assert m["roc_auc"] is None and m["threshold_at_1pct_fpr"] is None
    at = m["at_threshold"]["block"]
    assert at["fpr"] is None and at["precision"] is None and at["recall"] == 0.0 and at["f1"] == 0.0


def test_metrics_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="scores for"):
        metrics(np.zeros(3), None, NAMES, Scored("d", np.zeros(4)))
    with pytest.raises(ValueError, match="finite"):
        metrics(np.zeros(2), None, NAMES, Scored("d", np.array([0.0, np.nan])))
    with pytest.raises(ValueError, match="distinct"):
        compare(np.zeros(2), None, NAMES, [Scored("d", np.zeros(2)), Scored("d", np.ones(2))])


def test_markdown_table() -> None:
    table = markdown_table([{"a": 1, "b": 0.123456, "c": "x|y"}, {"a": None, "b": float("nan")}],
                           ["a", "b", "c"])
    assert table.splitlines() == ["| a | b | c |", "|---|---|---|", "| 1 | 0.1235 | x\\|y |",
                                  "| – | – | – |"]


def _split(seed: int = 0, n: int = 4000) -> tuple[np.ndarray, np.ndarray, list[Scored]]:
    rng = np.random.default_rng(seed)
    label = (rng.random(n) < 0.05).astype(np.int8)
    scenario = np.where(label == 1, rng.integers(1, len(NAMES), n), 0).astype(np.int8)
    good = rng.normal(size=n) + 3 * label
    return label, scenario, [
        Scored("transformer", good, {"review": 2.3, "block": 3.1}),
        Scored("iforest", rng.random(n) + 0.3 * label, {"review": 0.99, "block": 0.999}),
        Scored("rate_rule", rng.integers(1, 5, n).astype(float), {"review": 4.0, "block": 5.0}),
    ]


CARD = {
    "name": "seqguard-transformer", "arch": "transformer", "params": 812_345, "window": 64,
    "fingerprint": "sha256:abc123", "thresholds": {"review": 2.3, "block": 3.1},
    "threshold_method": "1% and 0.1% FPR on validation normal events",
    "intended_use": "Flag automated or fraudulent sessions for review.",
    "limitations": ["Attacks are injected, not observed.", "Single storefront."],
}


def test_write_report(tmp_path: Path) -> None:
    label, scenario, detectors = _split()
    comparison = compare(label, scenario, NAMES, detectors)
    paths = write_report(tmp_path / "report", comparison, label=label, scenario=scenario,
                         scenario_names=NAMES, detectors=detectors, model_card=CARD)
    assert [p.name for p in paths] == list(REPORT_FILES)
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    for png in ("roc.png", "pr.png", "score_hist.png"):
        data = (tmp_path / "report" / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) < 200_000

    saved = orjson.loads((tmp_path / "report" / "metrics.json").read_bytes())
    assert set(saved["detectors"]) == {"transformer", "iforest", "rate_rule"}
    assert saved["n_anomalous"] == int(label.sum())
    want = comparison["detectors"]["transformer"]["roc_auc"]
    assert saved["detectors"]["transformer"]["roc_auc"] == pytest.approx(want)

    card = (tmp_path / "report" / "model_card.md").read_text()
    assert card.startswith("# Model card: seqguard-transformer")
    for text in ("**Architecture**: transformer", "sha256:abc123", "  - review: 2.3",
                 "## Intended use", "- Single storefront.", "| detector | ROC-AUC |",
                 "| transformer |", "| iforest |", "| rate_rule |", "precision@review",
                 "](roc.png)", "](pr.png)", "](score_hist.png)", "](scenarios.md)"):
        assert text in card, text

    scen = (tmp_path / "report" / "scenarios.md").read_text()
    assert "| scenario | events | transformer ROC-AUC | transformer recall@1%FPR |" in scen
    for name in NAMES[1:]:
        assert f"| {name} |" in scen
    assert "| none |" not in scen


def test_write_report_on_a_split_without_positives(tmp_path: Path) -> None:
    label, scenario, detectors = _split()
    label, scenario = np.zeros_like(label), np.zeros_like(scenario)
    comparison = compare(label, scenario, NAMES, detectors)
    write_report(tmp_path, comparison, label=label, scenario=scenario, scenario_names=NAMES,
                 detectors=detectors, model_card={"name": "m"})
    saved = orjson.loads((tmp_path / "metrics.json").read_bytes())
    assert saved["detectors"]["transformer"]["roc_auc"] is None
    assert "| transformer | – |" in (tmp_path / "model_card.md").read_text()
