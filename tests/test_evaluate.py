"""Metrics with known answers: per event, per user, on real traffic."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import orjson
import pytest
from conftest import TAOBAO_100

from app.core.decisions import Thresholds
from app.core.events import Events
from app.core.features import FeatureSpec
from model_export.evaluate import (
    DetectorScores,
    compare,
    evaluate_bundle,
    history_bin,
    history_position,
    metrics,
    real_test_events,
    real_traffic,
    real_traffic_summary,
    user_level,
    user_max,
)

NAMES = ("none", "scraping_bot", "click_farming", "order_brushing")


def test_perfect_separation() -> None:
    label = np.r_[np.zeros(900, np.int8), np.ones(100, np.int8)]
    score = np.r_[np.linspace(0, 0.5, 900), np.linspace(0.6, 1, 100)]
    m = metrics(label, None, NAMES, DetectorScores("d", score, {"review": 0.55, "block": 0.9}))
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
    m = metrics(label, None, NAMES, DetectorScores("r", rng.random(40_000), {"review": 0.99}))
    assert m["roc_auc"] == pytest.approx(0.5, abs=0.02)
    assert m["pr_auc"] == pytest.approx(label.mean(), abs=0.02)
    assert m["recall_at_1pct_fpr"] == pytest.approx(0.01, abs=0.006)
    assert m["at_threshold"]["review"]["fpr"] == pytest.approx(0.01, abs=0.003)


def test_operating_point_by_hand() -> None:
    label = np.array([0, 0, 0, 0, 1, 1])
    score = np.array([0.1, 0.2, 0.3, 0.8, 0.7, 0.9])
    at = metrics(label, None, NAMES, DetectorScores("d", score, {"review": 0.5}))["at_threshold"]["review"]
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
    m = metrics(label, scenario, NAMES, DetectorScores("d", score, {"review": 1.5, "block": 2.5}))
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
    m = metrics(zeros, zeros, NAMES, DetectorScores("d", score, {"review": 0.9}))
    assert m["roc_auc"] is None and m["pr_auc"] is None and m["recall_at_1pct_fpr"] is None
    assert m["threshold_at_1pct_fpr"] is not None
    at = m["at_threshold"]["review"]
    assert at["recall"] is None and at["f1"] is None and at["precision"] == 0.0
    assert at["fpr"] == pytest.approx(0.1, abs=0.01)
    assert m["roc_auc_mean_over_scenarios"] is None
    assert all(v["roc_auc"] is None for v in m["per_scenario"].values())

    m = metrics(np.ones(50, np.int8), None, NAMES, DetectorScores("d", score[:50], {"block": 2.0}))
    assert m["roc_auc"] is None and m["threshold_at_1pct_fpr"] is None
    at = m["at_threshold"]["block"]
    assert at["fpr"] is None and at["precision"] is None and at["recall"] == 0.0 and at["f1"] == 0.0


def test_metrics_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="scores for"):
        metrics(np.zeros(3), None, NAMES, DetectorScores("d", np.zeros(4)))
    with pytest.raises(ValueError, match="finite"):
        metrics(np.zeros(2), None, NAMES, DetectorScores("d", np.array([0.0, np.nan])))
    with pytest.raises(ValueError, match="distinct"):
        compare(np.zeros(2), None, NAMES, [DetectorScores("d", np.zeros(2)), DetectorScores("d", np.ones(2))])


# -- real traffic --------------------------------------------------------------------------

T0 = 1_704_114_000_000
#: (user, type as logged, anomaly probability, label) in time order per user; decisions at
#: review 0.5 / block 0.9. Aliases: pv → view, addtocart → cart; "login" is unknown.
REAL = [
    ("a", "view", 0.10, 0), ("a", "pv", 0.60, 0), ("a", "addtocart", 0.95, 0), ("a", "view", 0.20, 0),
    ("a", "login", 0.70, 0),
    ("b", "purchase", 0.92, 0), ("b", "view", 0.99, 1), ("b", "view", 0.10, 0),  # labelled row: not counted
    ("c", "login", 0.05, 0), *[("c", "view", 0.10, 0)] * 16, ("c", "view", 0.55, 0),
]
SPEC = FeatureSpec(("view", "cart", "purchase"), (), ())
THRESHOLDS = Thresholds(review=0.5, block=0.9)


def real_scored(shuffle: int | None = 0) -> tuple[Events, np.ndarray]:
    records = [{"user_id": u, "event_type": t, "timestamp": T0 + 1000 * i, "label": y}
               for i, (u, t, _, y) in enumerate(REAL)]
    prob = np.array([p for _, _, p, _ in REAL], np.float32)
    ev = Events.from_records(records)
    if shuffle is None:
        return ev, prob
    perm = np.random.default_rng(shuffle).permutation(len(ev))  # any row order
    return ev.take(perm), prob[perm]


def test_history_position_and_bins() -> None:
    user = np.array([2, 0, 2, 2, 0, 1])
    ts = np.array([30, 5, 10, 10, 1, 7])  # user 2: equal times keep row order
    assert history_position(user, ts).tolist() == [3, 2, 1, 2, 1, 1]
    assert history_bin(np.arange(1, 20)).tolist() == (
        ["1"] + ["2-4"] * 3 + ["5-16"] * 12 + ["17+"] * 3)


def test_real_traffic_by_hand() -> None:
    ev, prob = real_scored()
    rt = real_traffic(ev, prob, THRESHOLDS, SPEC)
    # 25 counted events (b's labelled one is scored but not counted): flagged .6 .95 .7 .92 .55,
    # blocked .95 .92.
    assert rt["n_excluded_labelled"] == 1
    assert rt["overall"] == {"events": 25, "flagged": 5, "flagged_share": 0.2, "blocked": 2,
                             "blocked_share": 0.08}
    assert rt["users"] == {"users": 3, "flagged": 3, "flagged_share": 1.0, "blocked": 2,
                           "blocked_share": pytest.approx(2 / 3)}
    per_type = rt["per_type"]
    assert list(per_type) == ["view", "cart", "remove_from_cart", "favorite", "purchase", "login"]
    view = per_type["view"]  # a: view pv view, b: view, c: 17 views; flagged .6 and .55
    assert (view["events"], view["flagged"], view["blocked"]) == (21, 2, 0)
    assert view["flagged_share"] == pytest.approx(2 / 21) and view["known_to_model"]
    assert per_type["cart"] == {"known_to_model": True, "events": 1, "flagged": 1,
                                     "flagged_share": 1.0, "blocked": 1, "blocked_share": 1.0}
    assert per_type["favorite"]["events"] == 0 and per_type["favorite"]["flagged_share"] is None
    assert per_type["login"]["known_to_model"] is False
    assert (per_type["login"]["events"], per_type["login"]["flagged_share"]) == (2, 0.5)

    lengths = {k: (r["events"], r["flagged"], r["blocked"]) for k, r in rt["per_history_length"].items()}
    # 1: a.1 b.92 c.05 | 2-4: a.6 .95 .2, b(.99 labelled).1, c×3 | 5-16: a.7, c×12 | 17+: c.1 .55
    assert lengths == {"1": (3, 1, 1), "2-4": (7, 2, 1), "5-16": (13, 1, 0), "17+": (2, 1, 0)}

    unknown = rt["unknown_types"]
    assert unknown["events"] == 2 and unknown["share"] == 0.08
    assert unknown["per_type"] == {"login": {"share": 0.08, "events": 2, "flagged": 1, "flagged_share": 0.5,
                                             "blocked": 0, "blocked_share": 0.0}}
    # Row order does not matter.
    again = real_traffic(*real_scored(shuffle=None), THRESHOLDS, SPEC)
    assert orjson.dumps(again) == orjson.dumps(rt)

    summary = real_traffic_summary(rt)
    assert summary == {"events": 25, "flagged_share": 0.2, "blocked_share": 0.08, "users": 3,
                       "users_flagged_share": 1.0, "users_blocked_share": pytest.approx(2 / 3),
                       "worst_type": "cart", "worst_type_events": 1, "worst_type_flagged_share": 1.0,
                       "worst_type_blocked_share": 1.0, "unknown_type_share": 0.08}
    with pytest.raises(ValueError, match="probabilities"):
        real_traffic(ev, prob[:-1], THRESHOLDS, SPEC)
    empty = real_traffic(ev.take(np.zeros(len(ev), bool)), prob[:0], THRESHOLDS, SPEC)
    assert empty["overall"]["flagged_share"] is None and empty["users"]["users"] == 0
    assert real_traffic_summary(empty)["worst_type"] is None


def test_real_test_events_prefers_prep_real_then_falls_back() -> None:
    rows = [  # user, label, scenario
        ("u1", 0, 0), ("u1", 1, 4), ("u1", 0, 0), ("u1", 0, 5),
        ("sg-inj-scraping_bot-0", 0, 1), ("sg-inj-scraping_bot-0", 1, 1),
        ("u2", 0, 0),
    ]
    ev = Events.from_records([{"user_id": u, "event_type": "view", "timestamp": T0 + i, "label": y}
                              for i, (u, y, _) in enumerate(rows)])
    ev = ev.with_columns(scenario=np.array([c for *_, c in rows], np.int8), scenarios=(
        "none", "scraping_bot", "click_farming", "order_brushing", "account_takeover", "cart_stuffing"))
    got, source = real_test_events(SimpleNamespace(splits={"test": ev}))
    assert got.timestamp_ms.tolist() == [T0, T0 + 2, T0 + 6] and "scenario 0" in source
    got, _ = real_test_events(SimpleNamespace(splits={"test": ev}, real={"train": ev}))
    assert len(got) == 3
    real = ev.take(np.array([0, 6]))
    got, source = real_test_events(SimpleNamespace(splits={"test": ev}, real={"test": real}))
    assert got is real and "before any injection" in source


# -- per user ------------------------------------------------------------------------------


def scenario_users() -> Events:
    rows = [  # user, label, scenario (codes into NAMES)
        ("n1", 0, 0), ("n2", 0, 0), ("n2", 0, 0), ("n3", 0, 0), ("n3", 0, 0), ("n3", 0, 0),
        ("p1", 0, 1), ("p1", 1, 1), ("p1", 1, 1), ("p1", 1, 1),  # a new account's first event is label 0
        ("p2", 1, 2), ("p2", 1, 2),
        ("p3", 0, 0), ("p3", 1, 1), ("p3", 0, 0),  # a real user with an injected burst
    ]
    ev = Events.from_records([{"user_id": u, "event_type": "view", "timestamp": T0 + i, "label": y}
                              for i, (u, y, _) in enumerate(rows)])
    return ev.with_columns(scenario=np.array([c for *_, c in rows], np.int8), scenarios=NAMES)


def test_user_max() -> None:
    ev = scenario_users()
    score = np.arange(len(ev), dtype=float)
    assert user_max(ev.user, score, ev.n_users).tolist() == [0, 2, 5, 9, 11, 14]


def test_user_level_auc_by_hand() -> None:
    ev = scenario_users()  # users n1 n2 n3 p1 p2 p3 (codes 0..5)
    scores = {"det": np.array([0.1, 0.2, 0.5, 0.9, 0.4, 0.3]),
              "user_events": np.bincount(ev.user).astype(float)}  # 1 2 3 4 2 3
    ul = user_level(ev, scores, detector="det", rules={"user_events": "events of the user"})
    assert ul["n_users"] == 6 and ul["n_negative_users"] == 3
    per = ul["per_scenario"]
    assert list(per) == ["scraping_bot", "click_farming", "order_brushing", "any"]
    # scraping_bot: p1 (0.9) beats n1 n2 n3, p3 (0.3) beats n1 n2 → 5/6. Events: p1 4 beats
    # all; p3 3 beats two and ties n3 → 5.5/6.
    assert per["scraping_bot"]["users"] == 2
    assert per["scraping_bot"]["roc_auc"] == {"det": pytest.approx(5 / 6), "user_events": pytest.approx(11 / 12)}
    # click_farming: p2 (0.4) beats two of three; its 2 events beat one and tie one.
    assert per["click_farming"]["roc_auc"] == {"det": pytest.approx(2 / 3), "user_events": pytest.approx(0.5)}
    assert per["order_brushing"] == {"users": 0, "roc_auc": {"det": None, "user_events": None}}
    # any: (3 + 2 + 2) / 9 for the detector, (3 + 1.5 + 2.5) / 9 for the rule: a tie.
    assert per["any"]["users"] == 3
    assert per["any"]["roc_auc"]["det"] == pytest.approx(7 / 9)
    assert per["any"]["roc_auc"]["user_events"] == pytest.approx(7 / 9)
    assert ul["rules_not_beaten"] == {"scraping_bot": ["user_events"], "any": ["user_events"]}

    better = scores | {"det": np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.7])}
    assert user_level(ev, better, detector="det", rules={"user_events": "-"})["rules_not_beaten"] == {}


# -- a trained bundle end to end -------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_bundle_reports_real_traffic_and_user_level(trained: tuple[Path, Path], tmp_path: Path) -> None:
    from app.core.batch_engine import score_events
    from app.core.bundle import load_bundle
    from app.core.scorer import OnnxModel
    from model_export.dataset import TrainConfig, prepare
    from model_export.scenarios import SCENARIOS

    _, bundle_dir = trained
    bundle = load_bundle(bundle_dir)
    cfg = TrainConfig.from_dict(bundle.meta["training"]["train_config"])
    prep = prepare(TAOBAO_100, "taobao", list(SCENARIOS), cfg)
    real, _ = real_test_events(prep)
    summary = evaluate_bundle(bundle_dir, prep, tmp_path)

    prob = score_events(OnnxModel(bundle), real).probability
    rt = summary["real_traffic"]
    assert rt["events"] == len(real) > 0
    assert rt["flagged_share"] == pytest.approx(np.mean(prob >= bundle.thresholds.review))
    assert rt["blocked_share"] == pytest.approx(np.mean(prob >= bundle.thresholds.block))
    assert rt["worst_type"] in ("view", "cart", "remove_from_cart", "favorite", "purchase")

    saved = orjson.loads((tmp_path / "metrics.json").read_bytes())
    full = saved["real_traffic"]
    for table in ("per_type", "per_history_length"):
        assert sum(r["events"] for r in full[table].values()) == len(real), table
    assert full["users"]["users"] == np.unique(real.user).size
    ul = saved["user_level"]
    assert list(ul["per_scenario"]) == [*SCENARIOS, "any"]
    assert set(ul["rules"]) == {"user_events", "max_events_5min", "distinct_categories"}
    assert set(ul["per_scenario"]["any"]["roc_auc"]) == set(saved["detectors"]) | set(ul["rules"])
    card = (tmp_path / "model_card.md").read_text()
    assert "{'" not in card and "[{" not in card
    for text in ("## Training configuration", "| arch | transformer |", "### Per history length",
                 "| scenario | positive users |", "| sha256 |"):
        assert text in card, text
