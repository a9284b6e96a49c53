"""Decisions: the review and block thresholds as one typed object, and where it is used."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest

import app.metrics
import app.replay
from app.core.bundle import DEFAULT_BUNDLE, load_bundle
from app.core.decisions import DECISIONS, Thresholds


def test_review_above_block_is_refused():
    with pytest.raises(ValueError, match=r"review threshold 0\.9 exceeds block 0\.5"):
        Thresholds(review=0.9, block=0.5)
    with pytest.raises(ValueError, match="NaN"):
        Thresholds(review=math.nan, block=0.5)
    assert Thresholds(review=0.5, block=0.5).decide(0.5) == "block", "equal thresholds: review is never answered"


def test_a_probability_at_a_threshold_reaches_it():
    t = Thresholds(review=0.25, block=0.75)  # exact in float32
    below = np.nextafter(np.float32([0.25, 0.75]), np.float32(0))
    p = np.concatenate([np.float32([0.0, 0.25, 0.75, 1.0]), below])
    assert t.decide(p).tolist() == ["allow", "review", "block", "block", "allow", "review"]
    assert [t.decide(float(x)) for x in p] == t.decide(p).tolist(), "one probability, as a str"
    assert isinstance(t.decide(0.3), str)
    assert t.decide(np.zeros(0, np.float32)).shape == (0,)


def test_float32_probabilities_are_decided_in_float32():
    """0.7 is no float32: the probability float32(0.7) the model outputs is at the threshold
    0.7 that JSON gives, as NumPy compares a float32 array with a Python float. A numpy
    float64 threshold would compare in float64 and answer ``allow``."""
    t = Thresholds(review=np.float64(0.7), block=1.0)
    assert type(t.review) is float and type(t.block) is float
    assert t.decide(np.float32([0.7])).tolist() == ["review"]


def test_json_round_trip_and_overrides():
    meta = {"review": 0.2, "block": 0.9, "unit": "event", "chosen": {"on": "validation"}}
    t = Thresholds.from_mapping(meta)
    assert t == Thresholds(0.2, 0.9) and t.as_dict() == {"review": 0.2, "block": 0.9}
    assert Thresholds.from_mapping(orjson.loads(orjson.dumps(t.as_dict()))) == t
    with pytest.raises(ValueError, match="'review' and 'block'"):
        Thresholds.from_mapping({"review": 0.2})
    assert t.override() is t
    assert t.override(review=0.0) == Thresholds(0.0, 0.9)
    assert t.override(review=0.0, block=1.0) == Thresholds(0.0, 1.0)
    with pytest.raises(ValueError, match="exceeds block"):
        t.override(review=0.95)  # a deployment's review above the bundle's block
    with pytest.raises(AttributeError):
        t.review = 0.5  # type: ignore[misc]


def test_the_bundle_gives_its_thresholds_typed():
    meta = orjson.loads((DEFAULT_BUNDLE / "bundle.json").read_bytes())["thresholds"]
    t = load_bundle().thresholds
    assert isinstance(t, Thresholds)
    assert t.as_dict() == {"review": meta["review"], "block": meta["block"]}


def test_the_decisions_are_declared_once():
    assert DECISIONS == ("allow", "review", "block")
    assert app.metrics.DECISIONS is DECISIONS and app.replay.DECISIONS is DECISIONS
