"""The report files: Markdown tables, plots, the model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from test_evaluate import NAMES, SPEC, THRESHOLDS, real_scored, scenario_users

from model_export.evaluate import DetectorScores, compare, real_traffic, user_level
from model_export.report import REPORT_FILES, ROC_MIN_FPR, curve_figure, markdown_table, write_report


def test_markdown_table() -> None:
    table = markdown_table([{"a": 1, "b": 0.123456, "c": "x|y"}, {"a": None, "b": float("nan")}],
                           ["a", "b", "c"])
    assert table.splitlines() == ["| a | b | c |", "|---|---|---|", "| 1 | 0.1235 | x\\|y |",
                                  "| – | – | – |"]


def _split(seed: int = 0, n: int = 4000) -> tuple[np.ndarray, np.ndarray, list[DetectorScores]]:
    rng = np.random.default_rng(seed)
    label = (rng.random(n) < 0.05).astype(np.int8)
    scenario = np.where(label == 1, rng.integers(1, len(NAMES), n), 0).astype(np.int8)
    good = rng.normal(size=n) + 3 * label
    return label, scenario, [
        DetectorScores("transformer", good, {"review": 2.3, "block": 3.1}),
        DetectorScores("iforest", rng.random(n) + 0.3 * label, {"review": 0.99, "block": 0.999}),
        DetectorScores("rate_rule", rng.integers(1, 5, n).astype(float), {"review": 4.0, "block": 5.0}),
    ]


CARD = {
    "name": "seqguard-transformer",
    "model": {"version": "transformer-abc", "architecture": "transformer", "parameters": 812_345,
              "window (events)": 64, "calibration": "platt"},
    "training_data": {
        "name": "events.csv.gz", "format": "taobao", "sha256": "abc123", "inject": ["scraping_bot"],
        "splits": {"train": {"events": 700, "users": 7, "anomalous_events": 70},
                   "test": {"events": 300, "users": 3, "anomalous_events": 30}},
        "load_report": {"rows_read": 1001, "rows_kept": 1000, "malformed": 1, "ignored_columns": []},
    },
    "train_config": {"arch": "transformer", "lr": 0.002, "split": [0.7, 0.15, 0.15],
                     "fpr_targets": {"review": 0.01, "block": 0.001}, "reinject": True},
    "thresholds": {
        "review": 2.3, "block": 3.1, "unit": "user",
        "chosen": {"on": "validation split", "n_normal_events": 5000,
                   "review": {"target_fpr": 0.01, "validation_fpr": 0.0098},
                   "block": {"target_fpr": 0.001, "validation_fpr": 0.0011}},
        "per_type": {"purchase": {"review": 2.9, "block": 3.5}, "view": {"review": 2.1, "block": 3.0}},
    },
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
    for text in ("| architecture | transformer |", "| sha256 | abc123 |", "| review | 2.3 |",
                 "## Intended use", "- Single storefront.", "| detector | ROC-AUC |",
                 "| transformer |", "| iforest |", "| rate_rule |", "precision@review",
                 "](roc.png)", "](pr.png)", "](score_hist.png)", "](scenarios.md)"):
        assert text in card, text
    assert "Not measured" in card  # no real traffic in this comparison

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


# -- plots ---------------------------------------------------------------------------------


def _drawn(fig: Any) -> Any:
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


@pytest.mark.parametrize("roc", [True, False])
def test_curves_keep_every_legend_entry_off_the_curves(roc: bool) -> None:
    label, _, detectors = _split()
    fig = curve_figure(label.astype(bool), detectors, roc=roc)
    renderer = _drawn(fig)
    (ax,) = fig.axes
    (legend,) = fig.legends
    texts = [t.get_text() for t in legend.get_texts()]
    for d in detectors:
        assert sum(t.startswith(f"{d.name} (") for t in texts) == 1, (d.name, texts)
    assert not legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
    if roc:
        assert ax.get_xscale() == "log"
        assert ax.get_xlim() == pytest.approx((ROC_MIN_FPR, 1.0))
        xs = np.concatenate([line.get_xdata() for line in ax.get_lines() if len(line.get_xdata())])
        assert xs.min() >= ROC_MIN_FPR  # an FPR of 0 is drawn at the axis minimum, not dropped
        assert {"at the review threshold", "at the block threshold"} <= set(texts)
        # The transformer's review point: (FPR, recall) at its threshold.
        y = label.astype(bool)
        flag = detectors[0].score >= 2.3
        points = [(float(line.get_xdata()[0]), float(line.get_ydata()[0])) for line in ax.get_lines()
                  if line.get_marker() == "o" and len(line.get_xdata()) == 1]
        assert (pytest.approx(max(flag[~y].mean(), ROC_MIN_FPR)), pytest.approx(flag[y].mean())) in points
    else:
        assert ax.get_xscale() == "linear"


def test_curves_on_a_split_without_positives_have_no_legend() -> None:
    _, _, detectors = _split()
    fig = curve_figure(np.zeros(len(detectors[0].score), bool), detectors, roc=True)
    assert fig.legends == [] and fig.axes[0].get_xscale() == "log"


# -- the model card ------------------------------------------------------------------------


def test_model_card_renders_tables_not_dicts(tmp_path: Path) -> None:
    label, scenario, detectors = _split()
    comparison = compare(label, scenario, NAMES, detectors)
    ev, prob = real_scored()
    comparison["real_traffic"] = {"source": "Held-out real users", **real_traffic(ev, prob, THRESHOLDS, SPEC)}
    users = scenario_users()
    comparison["user_level"] = user_level(
        users, {"transformer": np.array([0.1, 0.2, 0.5, 0.9, 0.4, 0.3]),
                "user_events": np.bincount(users.user).astype(float)},
        detector="transformer", rules={"user_events": "events of the user"})
    write_report(tmp_path, comparison, label=label, scenario=scenario, scenario_names=NAMES,
                 detectors=detectors, model_card=CARD)
    card = (tmp_path / "model_card.md").read_text()

    for bad in ("{'", '{"', "[{", "['", "[0."):
        assert bad not in card, bad
    sections = ["## Model", "## Training data", "## Training configuration", "## Thresholds",
                "## Real traffic", "## Injected scenarios", "## Intended use", "## Limitations"]
    at = [card.index(f"{s}\n") for s in sections]
    assert at == sorted(at), at
    for text in (
        "| version | transformer-abc |",
        # training data: a row per split, the source with its checksum and load summary
        "| split | events | users | anomalous events |", "| train | 700 | 7 | 70 |", "| test | 300 | 3 | 30 |",
        "| sha256 | abc123 |", "| inject | scraping_bot |", "| rows_read | 1001 |", "| ignored_columns | – |",
        # training configuration: two columns, nested values inline
        "| setting | value |", "| lr | 0.002 |", "| split | 0.7, 0.15, 0.15 |",
        "| fpr_targets | review: 0.01, block: 0.001 |", "| reinject | yes |",
        # thresholds: value, target and validation rate per decision; the rest generically
        "| decision | threshold (≥) | target fpr | validation fpr |", "| review | 2.3 | 0.01 | 0.0098 |",
        "| block | 3.1 | 0.001 | 0.0011 |", "| n_normal_events | 5000 |", "- **Unit**: user",
        "### Per type", "| type | review | block |", "| purchase | 2.9 | 3.5 |",
        # real traffic
        "Held-out real users: 25 events of 3 users", "review 1%, block 0.1% of normal validation users",
        "| events | 25 | 5 | 20% | 2 | 8% |", "| users (any event flagged / blocked) | 3 | 3 | 100% | 2 | 66.7% |",
        "| type | known to model | events | flagged share | blocked share |",
        "| view | yes | 21 | 9.52% | 0% |", "| favorite | no | 0 | – | – |", "| login | no | 2 | 50% | 0% |",
        "| position | events | flagged share | blocked share |", "| 2-4 | 7 | 28.6% | 14.3% |",
        "| 17+ | 2 | 50% | 0% |",
        "| type as logged | share of all events | events | flagged share | blocked share |",
        "| login | 8% | 2 | 50% | 0% |",
        # injected scenarios: headline, per scenario, per user
        "| detector | ROC-AUC |", "| scenario | events | transformer ROC-AUC |",
        "| scenario | positive users | transformer | user_events |",
        "| scraping_bot | 2 | 0.8333 | 0.9167 |", "| any scenario | 3 | 0.7778 | 0.7778 |",
        "**A per-user rule beats or ties the detector on:** scraping_bot (user_events 0.917 ≥ transformer 0.833); "
        "any (user_events 0.778 ≥ transformer 0.778).",
    ):
        assert text in card, text
    saved = orjson.loads((tmp_path / "metrics.json").read_bytes())
    assert {"n_events", "n_anomalous", "detectors", "real_traffic", "user_level"} <= set(saved)
    assert saved["real_traffic"]["per_history_length"]["17+"]["events"] == 2
    assert "## User-level ROC-AUC per scenario" in (tmp_path / "scenarios.md").read_text()
