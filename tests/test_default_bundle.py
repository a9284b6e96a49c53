"""The shipped default bundle on the inputs issue 7 names: ordinary shoppers, other
stores' event names, unknown types, and real traffic it never saw (real ONNX Runtime
through the batch engine, which gives what POST /events gives for the same history)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from app.core.batch_engine import score_events
from app.core.bundle import load_bundle
from app.core.events import Events
from app.core.scorer import OnnxModel
from model_export.data import read_events

REES46 = Path(__file__).resolve().parents[2] / "shared" / "data" / "rees46_2019oct_sample" / "2019-Oct_head_17k.csv.gz"
T0 = 1_511_596_870_000  # 2017-11-25 08:01:10 UTC


@pytest.fixture(scope="module")
def model() -> OnnxModel:
    return OnnxModel(load_bundle(), threads=1)


def decisions(model: OnnxModel, types: list[str], gaps_s: list[float], items: list[str] | None = None,
              user: str = "new-shopper", with_items: bool = True) -> tuple[np.ndarray, list[str]]:
    t = T0 + np.cumsum([0, *gaps_s]).astype(np.int64) * 1000
    recs = [{"user_id": user, "event_type": e, "timestamp": int(ts), "item_id": items[i] if items else "2268318",
             "category_id": "2520377"} for i, (e, ts) in enumerate(zip(types, t, strict=True))]
    if not with_items:  # the contract makes both optional
        recs = [{k: v for k, v in r.items() if k not in ("item_id", "category_id")} for r in recs]
    p = score_events(model, Events.from_records(recs)).probability
    return p, model.bundle.thresholds.decide(p).tolist()


@pytest.mark.parametrize(("types", "gap"), [(["pv", "cart"], 60), (["pv", "buy"], 60), (["view", "purchase"], 30),
                                            (["pv", "fav"], 20), (["pv", "pv"], 60), (["pv", "pv"], 300)])
def test_a_new_shopper_is_allowed(model, types, gap):
    """Issue 7: a new user who views an item and carts it 60 s later was blocked
    (p = 0.94); view then buy scored 0.98; viewing an item twice 1–300 s apart 0.90–0.99."""
    _, d = decisions(model, types, [gap])
    assert d == ["allow", "allow"]


@pytest.mark.parametrize("gap", [1, 3, 10, 30])
def test_viewing_an_item_again_soon_is_allowed(model, gap):
    """A reload or a second look a few seconds later (was 0.90-0.99)."""
    _, d = decisions(model, ["pv", "pv"], [gap])
    assert d == ["allow", "allow"]


SESSION = ["view", "view", "view", "view", "addtocart", "view", "view", "addtocart", "transaction", "view"]
ITEMS = ["i1", "i2", "i3", "i1", "i1", "i4", "i5", "i4", "i1", "i6"]
GAPS = [20, 35, 15, 30, 40, 25, 30, 60, 90]
SPELLINGS = {
    "retailrocket": {},
    "taobao": {"view": "pv", "addtocart": "cart", "transaction": "buy"},
    "canonical": {"addtocart": "cart", "transaction": "purchase"},
    "otto": {"view": "clicks", "addtocart": "carts", "transaction": "orders"},
}


def test_one_session_in_every_stores_names_scores_alike_and_is_allowed(model):
    """Issue 7: browse → cart → buy spelled the RetailRocket way was flagged on 10 of 10
    events; spelled pv/cart/buy, 7 of 10 were allowed."""
    probs = {name: decisions(model, [m.get(t, t) for t in SESSION], GAPS, ITEMS)
             for name, m in SPELLINGS.items()}
    first = probs["retailrocket"][0]
    for name, (p, d) in probs.items():
        assert np.array_equal(p, first), name
        assert set(d) == {"allow"}, name


def test_a_storefront_that_sends_no_item_ids_is_not_flagged(model):
    """Found by review: three plain views without item or category ids scored 0.03,
    0.79, 0.90 (review, then block)."""
    _, d = decisions(model, ["view", "view", "view"], [20, 20], with_items=False)
    assert d == ["allow"] * 3
    _, d = decisions(model, [*SESSION], GAPS, with_items=False)
    assert "block" not in d


def test_unknown_types_are_never_enough_to_block(model):
    """The same session in names the model never saw: scored, and not blocked for it."""
    unknown = {"view": "page_open", "addtocart": "basket_put", "transaction": "paid_order"}
    _, d = decisions(model, [unknown[t] for t in SESSION], GAPS, ITEMS)
    assert "block" not in d
    assert model.bundle.spec.unknown_types(Events.from_records(
        [{"user_id": "u", "event_type": unknown[t], "timestamp": 0} for t in SESSION])) == {
        "page_open": 7, "basket_put": 2, "paid_order": 1}


def test_rees46_in_its_own_names_is_rarely_flagged(model):
    """Issue 7: the REES46 sample had 64.8% of its events flagged and 11.8% blocked; the
    target is at most 3% flagged."""
    if not REES46.exists():
        pytest.skip(f"{REES46} not present")
    ev, report = read_events(REES46, "rees46", dedupe=False, sort=False)
    assert report.type_aliases_applied == {} or set(report.type_aliases_applied.values()) <= {"view", "cart",
                                                                                            "purchase"}
    d = model.bundle.thresholds.decide(score_events(model, ev).probability)
    assert np.mean(d != "allow") <= 0.03
    assert np.mean(d == "block") <= 0.03


def test_the_shipped_report_meets_the_real_traffic_targets():
    """What `make model` measured on the held-out real Taobao users (never trained on)."""
    rt = load_bundle().meta["evaluation"]["real_traffic"]
    assert rt["events"] > 20_000
    assert rt["flagged_share"] <= 0.015 and rt["blocked_share"] <= 0.0015
    assert rt["users_blocked_share"] <= 0.005
    assert rt["worst_type_flagged_share"] <= 0.03
    assert rt["unknown_type_share"] == 0.0


def held_out_per_type() -> dict[str, dict]:
    """The shipped report's held-out real traffic, per canonical type seen."""
    metrics = json.loads((load_bundle().path / "report" / "metrics.json").read_text(encoding="utf-8"))
    return {t: r for t, r in metrics["real_traffic"]["per_type"].items() if r["events"]}


def test_no_canonical_type_of_held_out_real_traffic_is_over_its_budget():
    """Issue 7: every canonical type at most 3% flagged and 0.3% blocked on the held-out
    real users, purchases included (2 of 604 were blocked before real shoppers' own runs
    joined the brushing look-alikes; docs/QUALITY.md)."""
    seen = held_out_per_type()
    assert {"view", "cart", "favorite", "purchase"} <= set(seen)
    for name, r in seen.items():
        assert r["flagged_share"] <= 0.03, name
        assert r["blocked_share"] <= 0.003, name
