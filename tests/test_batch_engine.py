"""The batch engine (ONNX Runtime): every event gets the output of its own last W events."""

from __future__ import annotations

import io

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TAOBAO_100

from app.core.answers import BLOCK_ROWS, FIELDS, Answers
from app.core.batch_engine import (
    EventScores,
    FirstAnswers,
    answers,
    arrived_out_of_order,
    result_lines,
    results,
    score_events,
    write_results,
)
from app.core.bundle import load_bundle
from app.core.decisions import Thresholds
from app.core.events import Events
from app.core.features import BATCH_STEP, SHORT_LENGTH, group_starts, last_windows
from app.core.scorer import OnnxModel
from model_export.data import read_events
from model_export.parity import FP32_TOLERANCE
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
    multiples of BATCH_STEP; each event gets what a full window gives it."""
    spec = model.bundle.spec
    ev = events.sorted()
    starts = group_starts(ev.user)
    keep = (np.arange(len(ev)) - starts) < (ev.user % (SHORT_LENGTH + 1)) + 1
    short = ev.take(np.flatnonzero(keep))
    lengths = np.bincount(short.user)[np.unique(short.user)]
    assert lengths.min() == 1 and lengths.max() == SHORT_LENGTH + 1 and SHORT_LENGTH < BATCH_STEP
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


def _log(*rows: tuple[str, str, int, str]) -> Events:
    return Events.from_records([{"event_id": e, "user_id": u, "event_type": t, "timestamp": ts}
                                for e, u, ts, t in rows])


def test_a_repeated_event_joins_no_window_and_gets_the_first_answer(model):
    """The live store's rule: a repeat of (user_id, event_id) is answered with the first
    occurrence's scores, flagged, and is part of no window (the issue's ord-1, ord-1, ord-2)."""
    t = 1_511_596_870_000
    ord1, ord2 = ("ord-1", "u", t, "pv"), ("ord-2", "u", t + 60_000, "buy")
    twice = score_events(model, _log(ord1, ord1, ord2))
    once = score_events(model, _log(ord1, ord2))
    assert twice.is_duplicate().tolist() == [False, True, False]
    assert twice.probability.tolist() == [once.probability[0], once.probability[0], once.probability[1]]
    assert once.duplicate is None
    # redelivered later with another timestamp (a minute on): still the first answer, no window
    late = score_events(model, _log(ord1, ("ord-1", "u", t + 30_000, "pv"), ord2))
    assert late.probability.tolist() == twice.probability.tolist()
    # the same event_id of another user is another event; rows without ids never repeat
    other = score_events(model, _log(ord1, ("ord-1", "v", t, "pv")))
    assert other.duplicate is None
    no_ids = Events.from_records([{"user_id": "u", "event_type": "pv", "timestamp": t}] * 2)
    assert score_events(model, no_ids).duplicate is None


def test_repeats_among_many_users_and_chunks(model, events):
    """Repeats spread over a real log: every non-repeat scores as without the repeats, at
    any chunk length, and `seqguard score`'s lines flag the repeats."""
    rng = np.random.default_rng(8)
    ev = events.with_columns(event_id=np.array([f"e{i}" for i in range(len(events))], dtype=object))
    again = rng.choice(len(ev), 200, replace=False)
    doubled = Events.concat([ev, ev.take(again)])
    w = model.bundle.spec.window
    base = score_events(model, ev)
    for chunk_len in (w + 1, 512):
        s = score_events(model, doubled, chunk_len=chunk_len)
        assert s.is_duplicate().tolist() == [False] * len(ev) + [True] * len(again)
        # other chunkings pad to other lengths: float rounding, through the calibration map's
        # slope, within the tolerance the export holds ONNX Runtime to (model_export/parity.py)
        assert np.abs(s.probability[: len(ev)] - base.probability).max() <= FP32_TOLERANCE
        assert np.abs(s.surprise[: len(ev)] - base.surprise).max() <= FP32_TOLERANCE
        assert (s.probability[len(ev):] == s.probability[again]).all()
    lines = [orjson.loads(x) for x in result_lines(doubled, s, model.bundle.thresholds)]
    assert [x.get("duplicate", False) for x in lines] == s.is_duplicate().tolist()
    assert s[len(ev):].is_duplicate().all() and s[: len(ev)].duplicate is not None


def test_first_answers_of_a_stream():
    seen = FirstAnswers()
    recs = [{"user_id": u, "event_id": e} for u, e in [("u", "a"), ("u", "b"), ("v", "a")]]
    keys = FirstAnswers.keys(recs)
    assert seen.find(keys).tolist() == [-1, -1, -1]
    seen.add(keys[:2], np.array([0.1, 0.2], np.float32), np.array([1.0, 2.0], np.float32))
    at = seen.find(FirstAnswers.keys([recs[1], recs[2], recs[0]]))
    assert at[1] == -1 and len(seen) == 2
    prob, surprise = seen.answers(at[[0, 2]])
    assert prob.tolist() == pytest.approx([0.2, 0.1]) and surprise.tolist() == [2.0, 1.0]


def _late_log(events: Events, users: int = 6, seed: int = 3) -> Events:
    """Some users' events interleaved in time order, then some events of half the users
    delivered late: moved a few places later in the input, often past later-stamped events
    of their user."""
    ev = events.sorted()
    chosen = np.unique(ev.user)[:users]
    order = sorted(np.flatnonzero(np.isin(ev.user, chosen)).tolist(), key=lambda r: (ev.timestamp_ms[r], r))
    rng = np.random.default_rng(seed)
    movable = [i for i, r in enumerate(order) if ev.user[r] in chosen[: users // 2]]
    for i in rng.choice(movable, size=len(movable) // 4, replace=False).tolist():
        order.insert(min(len(order) - 1, i + int(rng.integers(1, 12))), order.pop(i))
    return ev.take(np.asarray(order))


def test_each_event_is_answered_as_at_its_arrival(model, events):
    """The live store's rule (arrival order): an event's answer depends only on the events
    that arrived before it, so it is the same in the whole log and in the log cut just after
    it (what an NDJSON stream of any chunking sees), and late events change no earlier answer."""
    log = _late_log(events)
    redo = arrived_out_of_order(log)
    assert redo.any() and not redo.all()
    told: list[tuple[int, int]] = []
    whole = score_events(model, log, on_progress=lambda d, t: told.append((d, t)))
    total = len(log) + int(redo.sum())  # the out-of-order events are scored again
    assert told[-1] == (total, total) and all(t == total for _, t in told)
    assert [d for d, _ in told] == sorted(d for d, _ in told)
    for end in range(1, len(log) + 1, 7):
        prefix = score_events(model, log.take(np.arange(end)))
        assert abs(prefix.probability[-1] - whole.probability[end - 1]) <= 2e-6, end
    in_time = score_events(model, log, as_arrived=False)  # the log as the truth: every event on all before it in time
    assert np.abs(in_time.probability - score_events(model, log.sorted(), as_arrived=False).probability[
        np.argsort(np.lexsort((log.timestamp_ms, log.user)), kind="stable")]).max() <= 2e-6
    assert np.abs(in_time.probability - whole.probability).max() > 1e-4  # lateness matters here


def test_a_log_in_time_order_scores_alike_either_way(model, events):
    ev = events.sorted()
    a, b = score_events(model, ev), score_events(model, ev, as_arrived=False)
    np.testing.assert_array_equal(a.probability, b.probability)


# ---------------------------------------------------------------------------------------
# Writing the answers (app/core/answers.py): JSONL as the dict-per-answer writer wrote it,
# Parquet with the same answers.
# ---------------------------------------------------------------------------------------


def reference_jsonl(events: Events, scores: EventScores, thresholds: Thresholds) -> bytes:
    """The JSONL writer before the columnar one (commit f65c6f0): a dict per answer, orjson each."""
    decisions = thresholds.decide(scores.probability).tolist()
    probs = scores.probability.astype(np.float64).tolist()
    lines = []
    for e, u, p, d, dup in zip(events.event_ids().tolist(), events.user_id_strings().tolist(), probs, decisions,
                               scores.is_duplicate().tolist(), strict=True):
        answer = {"event_id": e, "user_id": u, "anomaly_probability": p, "decision": d}
        if dup:
            answer["duplicate"] = True
        lines.append(orjson.dumps(answer) + b"\n")
    return b"".join(lines)


@pytest.fixture(scope="module")
def shipped() -> OnnxModel:
    return OnnxModel(load_bundle(), threads=1)


@pytest.fixture(scope="module")
def answer_log(shipped, events) -> tuple[Events, EventScores]:
    """The real log with every kind of id and probability an answer can carry: events
    without an id (generated ones), unicode ids and user ids, ids JSON must escape (in the
    first rows only, so that later blocks take the one-call path), repeats, and
    probabilities of exactly 0, 1 and each threshold (and the float32 just below it)."""
    n = len(events)
    ids = np.array([f"e{i}" for i in range(n)], dtype=object)
    ids[5::9] = None
    ids[6::9] = [f"événement-ü-🙂-{i}" for i in range(6, n, 9)]
    ids[7:n // 4:23] = [f'q"uo\\te\tand\x01 \u2028-{i}' for i in range(7, n // 4, 23)]
    ids[4] = 'a "quoted" id'
    users = np.array([f"ユーザー-{u}" if i % 3 else f"u{u}" for i, u in enumerate(events.user_ids)], dtype=object)
    log = events.with_columns(event_id=ids, user_ids=users)
    again = np.random.default_rng(4).choice(np.flatnonzero(ids != None), 60, replace=False)  # noqa: E711
    log = Events.concat([log, log.take(again)])
    scores = score_events(shipped, log)
    t = shipped.bundle.thresholds
    pinned = np.array([0, 1, t.review, t.block, np.nextafter(np.float32(t.review), np.float32(0)),
                       np.nextafter(np.float32(t.block), np.float32(0))], np.float32)
    prob = scores.probability.copy()
    prob[np.arange(pinned.size) * 31] = pinned
    return log, EventScores(prob, scores.surprise, scores.duplicate)


@pytest.mark.parametrize("block_rows", [7, 64, BLOCK_ROWS])
def test_jsonl_is_byte_for_byte_the_dict_per_answer_writer(shipped, answer_log, block_rows, tmp_path):
    log, scores = answer_log
    t = shipped.bundle.thresholds
    assert scores.is_duplicate().sum() == 60 and log.event_id is not None and (log.event_id == None).any()  # noqa: E711
    assert set(t.decide(scores.probability)) == {"allow", "review", "block"}
    expected = reference_jsonl(log, scores, t)
    assert b"".join(answers(log, scores, t).json_lines(block_rows)) == expected
    assert write_results(tmp_path / "r.jsonl", log, scores, t, block_rows) == len(log)
    assert (tmp_path / "r.jsonl").read_bytes() == expected
    fh = io.BytesIO()
    write_results(fh, log, scores, t, block_rows)
    assert fh.getvalue() == expected
    assert [orjson.dumps(x) for x in results(log.event_ids().tolist(), log.user_id_strings().tolist(), scores, t)] \
        == expected.splitlines() == list(result_lines(log, scores, t))


def test_json_lines_are_the_records_dumped():
    """Answers built from records (``/batch-score``) may lack an id: beside an id with two
    escaped quotes, a block holds as many quotes as one of plain ids."""
    ids = ["a", 'a "quoted" id', None, "é\\", "b"]
    a = Answers.of(ids, np.array([0, 1, 0, 1, 0]), np.array(["u", 'v"'], object),
                   np.array([0, 0.5, 1, 0.25, 0.75], np.float32), np.array([False, False, True, False, True]),
                   Thresholds(0.5, 0.75))
    for block_rows in (1, 3, 5):
        assert b"".join(a.json_lines(block_rows)) == b"".join(orjson.dumps(r) + b"\n" for r in a.records())
    assert [r["decision"] for r in a.records()] == ["allow", "review", "block", "allow", "block"]


def test_parquet_holds_the_jsonl_answers(shipped, answer_log, tmp_path):
    log, scores = answer_log
    t = shipped.bundle.thresholds
    write_results(tmp_path / "r.jsonl", log, scores, t)
    assert write_results(tmp_path / "r.parquet", log, scores, t, block_rows=100) == len(log)
    table = pq.read_table(tmp_path / "r.parquet")
    assert table.schema == pa.schema([("event_id", pa.string()), ("user_id", pa.string()),
                                      ("anomaly_probability", pa.float32()),
                                      ("decision", pa.dictionary(pa.int8(), pa.string())),
                                      ("duplicate", pa.bool_())])
    assert tuple(table.column_names) == FIELDS
    assert pq.ParquetFile(tmp_path / "r.parquet").metadata.num_row_groups == -(-len(log) // 100)
    lines = [orjson.loads(x) for x in (tmp_path / "r.jsonl").read_bytes().splitlines()]
    rows = table.to_pylist()
    assert len(rows) == len(lines) == len(log)
    for row, line in zip(rows, lines, strict=True):
        assert row == {**line, "duplicate": line.get("duplicate", False)}  # float32 read back as its float64
    prob = table.column("anomaly_probability").to_numpy()
    np.testing.assert_array_equal(prob, scores.probability)  # exactly the value decided on
    assert t.decide(prob).tolist() == table.column("decision").to_pylist()


def test_writing_no_answers(shipped, events, tmp_path):
    none = events.take(np.arange(0))
    scores = score_events(shipped, none)
    t = shipped.bundle.thresholds
    assert write_results(tmp_path / "r.jsonl", none, scores, t) == 0
    assert (tmp_path / "r.jsonl").read_bytes() == b"" and list(result_lines(none, scores, t)) == []
    assert write_results(tmp_path / "r.parquet", none, scores, t) == 0
    table = pq.read_table(tmp_path / "r.parquet")
    assert table.num_rows == 0 and tuple(table.column_names) == FIELDS


def test_repeats_are_flagged_alike_in_both_forms(shipped, tmp_path):
    """ord-1, ord-1, ord-2, ord-1: the repeats carry the first answer, flagged."""
    t0 = 1_511_596_870_000
    log = _log(("ord-1", "u", t0, "pv"), ("ord-1", "u", t0, "pv"), ("ord-2", "u", t0 + 60_000, "buy"),
               ("ord-1", "u", t0 + 90_000, "pv"))
    scores = score_events(shipped, log)
    t = shipped.bundle.thresholds
    for name in ("r.jsonl", "r.PARQUET"):
        write_results(tmp_path / name, log, scores, t)
    lines = [orjson.loads(x) for x in (tmp_path / "r.jsonl").read_bytes().splitlines()]
    assert [x.get("duplicate") for x in lines] == [None, True, None, True]
    assert lines[1] == lines[3] == {**lines[0], "duplicate": True}
    rows = pq.read_table(tmp_path / "r.PARQUET").to_pylist()
    assert [r["duplicate"] for r in rows] == [False, True, False, True]
    assert [r["anomaly_probability"] for r in rows] == [x["anomaly_probability"] for x in lines]


def test_carried_context_is_never_scored_again(model, events):
    """An attack review: a late event in a later NDJSON chunk made every carried context row
    it precedes in time "out of order", and each was scored again on an online window and
    thrown away. Only the chunk's own rows are scored again."""
    ev = events.sorted()
    user = ev.take(np.flatnonzero(ev.user == np.bincount(ev.user).argmax()))  # the busiest user, in time order
    h = model.bundle.spec.history
    assert len(user) > h + 1
    chunk = user.take(np.concatenate([np.arange(len(user) - h, len(user)), [h // 2]]))  # context, then a late event
    told: list[tuple[int, int]] = []
    with_context = score_events(model, chunk, context_rows=h, on_progress=lambda d, t: told.append((d, t)))
    assert told[-1] == (len(chunk) + 1, len(chunk) + 1)  # the late event alone is scored again
    whole = score_events(model, chunk)  # the same rows, all wanted: the context too
    assert abs(with_context.probability[-1] - whole.probability[-1]) <= 2e-6
