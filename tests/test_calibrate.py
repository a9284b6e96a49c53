"""Calibration maps and threshold choice: per-type false-positive budgets, the user unit,
and maps that cannot amplify float error."""

from __future__ import annotations

import numpy as np
import pytest

from model_export.calibrate import (
    MIN_KNOT_SPACING,
    choose_thresholds,
    fit_calibration,
    lipschitz,
)
from model_export.model import Calibration

TARGETS = {"review": 0.01, "block": 0.001}
TYPES = ("view", "cart", "favorite", "purchase")


def _skewed(n: int = 200_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Normal scores where purchases (5%) score higher than views: an overall threshold
    alone flags purchases far beyond the target."""
    rng = np.random.default_rng(seed)
    types = rng.choice(np.array(TYPES, dtype=object), n, p=(0.85, 0.06, 0.04, 0.05))
    score = rng.random(n) ** 3
    score[types == "purchase"] = rng.random(int((types == "purchase").sum())) ** 0.3
    return score, types


def test_every_type_is_held_to_twice_the_target():
    score, types = _skewed()
    t = choose_thresholds(score, TARGETS, event_types=types, constrained_types=TYPES)
    for name, fpr in TARGETS.items():
        assert np.mean(score >= t[name]) <= fpr
        for k in TYPES:
            assert np.mean(score[types == k] >= t[name]) <= 2 * fpr, (name, k)
        row = t["chosen"][name]
        assert row["set_by"] == "type:purchase"
        assert row["per_type"]["purchase"]["fpr"] <= 2 * fpr
        assert row["per_type"]["purchase"]["events"] == int((types == "purchase").sum())


def test_without_the_constraint_purchases_exceed_it():
    """The data above does need the constraint: the test before can fail."""
    score, types = _skewed()
    t = choose_thresholds(score, TARGETS, event_types=types)
    assert np.mean(score[types == "purchase"] >= t["review"]) > 2 * TARGETS["review"]
    assert t["chosen"]["review"]["set_by"] == "overall"


def test_per_type_bounds_count_the_real_events_only():
    """Look-alike purchases the model scores low must not let real purchases pass their
    bound: with ``constrain_on`` (the real events), real purchases hold twice the target
    although, all purchases counted, they would not."""
    score, types = _skewed()
    rng = np.random.default_rng(5)
    easy = np.full(3000, "purchase", dtype=object)  # look-alikes: normal, and scored low
    score, types = np.r_[score, rng.random(3000) * 0.01], np.r_[types, easy]
    real = np.r_[np.ones(score.size - 3000, bool), np.zeros(3000, bool)]
    diluted = choose_thresholds(score, TARGETS, event_types=types, constrained_types=TYPES)
    held = choose_thresholds(score, TARGETS, event_types=types, constrained_types=TYPES, constrain_on=real)
    real_purchases = score[real & (types == "purchase")]
    assert np.mean(real_purchases >= diluted["review"]) > 2 * TARGETS["review"]
    for name, fpr in TARGETS.items():
        assert np.mean(real_purchases >= held[name]) <= 2 * fpr
        assert held["chosen"][name]["per_type_constrained_on"]["purchase"]["events"] == real_purchases.size


def test_types_too_rare_to_resolve_are_reported_not_constrained():
    score, types = _skewed(n=20_000)
    types[:30] = "remove_from_cart"  # 30 events cannot resolve 2 x 0.1%
    score[:30] = 0.999999
    t = choose_thresholds(score, TARGETS, event_types=types, constrained_types=(*TYPES, "remove_from_cart"))
    assert "remove_from_cart" in t["chosen"]["block"]["types_too_few_to_constrain"]
    assert t["chosen"]["review"]["set_by"] != "type:remove_from_cart"


def test_user_unit_meets_its_target_share_of_users():
    rng = np.random.default_rng(1)
    users = np.repeat(np.arange(5000), rng.integers(1, 40, 5000))
    score = rng.random(users.size)
    t = choose_thresholds(score, TARGETS, users=users, unit="user")
    user_max = np.zeros(5000)
    np.maximum.at(user_max, users, score)
    for name, fpr in TARGETS.items():
        reached = np.mean(user_max >= t[name])
        assert reached <= fpr
        assert reached >= fpr / 2  # the budget is used, not just met
        assert t["chosen"][name]["validation_user_fpr"] == pytest.approx(reached)
    assert t["unit"] == "user" and t["chosen"]["n_normal_users"] == 5000
    # per event, the same thresholds flag far fewer: the unit matters
    assert np.mean(score >= t["review"]) < TARGETS["review"] / 2
    with pytest.raises(ValueError, match="user"):
        choose_thresholds(score, TARGETS, unit="user")
    with pytest.raises(ValueError, match="fpr unit"):
        choose_thresholds(score, TARGETS, unit="session")


def test_a_target_too_small_for_the_data_is_flagged():
    t = choose_thresholds(np.linspace(0, 1, 200), TARGETS)
    assert t["chosen"]["review"]["resolvable"] is True
    assert t["chosen"]["block"]["resolvable"] is False
    assert t["chosen"]["block"]["validation_fpr"] == 0.0


def test_tail_map_on_tied_surprise_has_bounded_slope():
    """Normal surprise that is mostly exactly 0 (a deterministic log, like HDFS) gives
    quantiles that coincide or nearly do; knots closer than MIN_KNOT_SPACING are merged,
    so the map's slope, and what it can make of float error, stays bounded."""
    rng = np.random.default_rng(2)
    surprise = np.where(rng.random(20_000) < 0.95, 0.0, rng.exponential(1e-3, 20_000))
    cal = Calibration()
    d = fit_calibration(cal, "tail", logit=np.zeros_like(surprise), surprise=surprise, label=None)
    assert np.min(np.diff(d["knots_x"])) >= MIN_KNOT_SPACING - 1e-12
    slope = lipschitz(d)
    assert slope <= 1.0 / MIN_KNOT_SPACING
    assert np.all(np.diff(d["knots_y"]) >= 0)


def test_lipschitz_of_each_kind():
    assert lipschitz({"kind": "platt", "a": -8.0, "b": 1.0}) == 2.0
    assert lipschitz({"kind": "tail", "knots_x": [0.0, 1.0, 1.5], "knots_y": [0.0, 0.5, 1.0]}) == 1.0
    # fisher: the sigmoid's slope times the steeper of the two maps
    fisher = {"kind": "fisher", "a": 2.0, "b": -1.0, "logit_x": [0.0, 1.0], "logit_y": [0.0, 3.0],
              "recent_x": [0.0, 2.0, 2.5], "recent_y": [0.0, 1.0, 3.0]}
    assert lipschitz(fisher) == 2.0 / 4.0 * 4.0


def test_fisher_map_rises_with_either_score_and_bounds_its_slope():
    """The fused probability: −log survival of the logit and of the recent surprise under
    normal events, summed, then Platt; knots at least MIN_KNOT_SPACING apart."""
    rng = np.random.default_rng(3)
    label = (rng.random(20_000) < 0.05).astype(np.int8)
    logit = rng.normal(size=label.size) + 4 * label
    recent = np.abs(rng.normal(size=label.size)) + 1.5 * label
    cal = Calibration()
    d = fit_calibration(cal, "fisher", logit=logit, surprise=recent, recent=recent, label=label)
    assert d["kind"] == "fisher" and d["a"] > 0
    for xs in (d["logit_x"], d["recent_x"]):
        assert np.diff(xs).min() >= MIN_KNOT_SPACING - 1e-9
    # 1% of normal logits lie above their 99th percentile: −log(0.01) ≈ 4.6 there
    q99 = float(np.quantile(logit[label == 0], 0.99))
    assert float(np.interp(q99, d["logit_x"], d["logit_y"])) == pytest.approx(np.log(100), abs=0.1)
    with pytest.raises(ValueError, match="recent"):
        fit_calibration(Calibration(), "fisher", logit=logit, surprise=recent, label=label)
