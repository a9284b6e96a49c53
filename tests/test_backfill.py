"""The batch engine (ONNX Runtime): every event gets the output of its own last W events."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TAOBAO_100

from app.backfill import LENGTH_QUANTUM, SHORT_LENGTH, score_events
from app.bundle import load_bundle
from app.features import group_starts, last_windows
from app.scorer import OnnxModel
from model_export.data import read_events
from model_export.scenarios import inject


@pytest.fixture(scope="module")
def model(trained) -> OnnxModel:
    return OnnxModel(load_bundle(trained[1]))


@pytest.fixture(scope="module")
def events():
    ev, _ = read_events(TAOBAO_100, "taobao")
    return inject(ev, ["scraping_bot", "account_takeover"])  # device/country columns too


def test_long_sequence_pass_equals_per_window_scoring(model, events):
    spec = model.bundle.spec
    scores = score_events(model, events, chunk_len=spec.window + 40)
    ev = events.sorted()  # already sorted: rows line up with `scores`
    feats = spec.transform(ev)
    rows = np.arange(len(ev))
    windows = last_windows(feats, rows, group_starts(ev.user), spec.window)  # (N, W, F)
    prob, surprise = model.run(windows)
    assert np.abs(prob[:, -1] - scores.probability).max() <= 1e-5
    assert np.abs(surprise[:, -1] - scores.surprise).max() <= 1e-4


def test_short_histories_run_short_and_score_as_full_windows(model, events):
    """Users with 1-9 events: chunks of up to SHORT_LENGTH run at that length, longer at
    multiples of LENGTH_QUANTUM; each event gets what a full window gives it."""
    spec = model.bundle.spec
    ev = events.sorted()
    starts = group_starts(ev.user)
    keep = (np.arange(len(ev)) - starts) < (ev.user % (SHORT_LENGTH + 1)) + 1
    short = ev.take(np.flatnonzero(keep))
    lengths = np.bincount(short.user)[np.unique(short.user)]
    assert lengths.min() == 1 and lengths.max() == SHORT_LENGTH + 1 and SHORT_LENGTH < LENGTH_QUANTUM
    scores = score_events(model, short)
    windows = last_windows(spec.transform(short), np.arange(len(short)), group_starts(short.user), spec.window)
    prob, _ = model.run(windows)
    assert np.abs(prob[:, -1] - scores.probability).max() <= 1e-5


def test_chunking_does_not_change_scores(model, events):
    w = model.bundle.spec.window
    a = score_events(model, events, chunk_len=w + 1, batch_tokens=512)
    b = score_events(model, events, chunk_len=4 * w, batch_tokens=1 << 16)
    assert np.abs(a.probability - b.probability).max() <= 1e-5


def test_scores_follow_input_order(model, events):
    """Users interleaved differently, each user's own events in the same order: same
    scores, written back in input order. (Events of one user at the same timestamp are
    taken in input order, i.e. arrival order, so that order is kept here.)"""
    n = len(events)
    slots = np.random.default_rng(0).permutation(n)  # random interleaving of the rows
    by_user = np.lexsort((slots, events.user))  # each user's slots, in increasing order
    perm = np.empty(n, np.int64)
    perm[slots[by_user]] = np.lexsort((np.arange(n), events.user))  # k-th slot of u ← k-th row of u
    assert not np.array_equal(perm, np.arange(n))
    direct = score_events(model, events).probability
    shuffled = score_events(model, events.take(perm)).probability
    assert np.abs(shuffled - direct[perm]).max() <= 1e-6


def test_online_window_fetch_gives_the_batch_answer(model, events):
    """The service fetches a user's last W+R events: featurizing only those gives the
    same probability for the newest event as the full-history batch pass."""
    spec = model.bundle.spec
    ev = events.sorted()
    full = score_events(model, ev).probability
    ends = np.flatnonzero(np.append(ev.user[1:] != ev.user[:-1], True))  # each user's last event
    for end in ends[:20]:
        lo = max(group_starts(ev.user)[end], end - spec.history + 1)
        recent = ev.take(np.arange(lo, end + 1))
        f = spec.transform(recent)
        x = last_windows(f, np.array([len(recent) - 1]), np.array([0]), spec.window)
        p, _ = model.run(x)
        assert abs(float(p[0, -1]) - float(full[end])) <= 1e-5


def test_empty_input(model, events):
    assert score_events(model, events.take(np.arange(0))).probability.shape == (0,)
