"""Batch engine throughput (`seqguard score`): the Taobao sample replicated with new
user ids to ~1M events, scored end to end on the default bundle, with where the time goes
and the answers written as JSONL and as Parquet (and, for the A/B, as JSONL by the
dict-per-answer writer the columnar one replaced: same bytes, checked; writers alternate,
best of ``--write-repeats``); then the engine's worst case, short histories: the head of the time-ordered stream slice
(1-4 events for most users), scored with the service's one ONNX Runtime thread; then late
events: the first ``--late-rows`` Taobao events in time order against the same events
with a share ``--late`` of them delivered 5 places later (each out-of-order event costs
an online window: app/core/batch_engine.py), in the same run.

    .venv/bin/python tests/benchmarks/bench_score.py [--rows 1000000] [--short-rows 50000] [--bundle DIR]
        [--late 0.01] [--late-rows 40000] [--write-repeats 2] [--precision fp32|fp16|int8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson
from _common import FLINK, TAOBAO, machine, replicated_taobao

from app.core.batch_engine import EventScores, arrived_out_of_order, score_events, write_results
from app.core.bundle import Bundle, load_bundle
from app.core.decisions import Thresholds
from app.core.events import Events
from app.core.scorer import OnnxModel
from model_export.data import iter_records, read_events


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--chunk-len", type=int, default=512)
    ap.add_argument("--short-rows", type=int, default=50_000, help="events of the stream slice (0: skip)")
    ap.add_argument("--late", type=float, default=0.01, help="share of events delivered late (0: skip)")
    ap.add_argument("--late-rows", type=int, default=40_000, help="events of the late-events comparison")
    ap.add_argument("--write-repeats", type=int, default=2, help="runs of each writer (alternating; best kept)")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "int8"), help="the model file scored with")
    args = ap.parse_args()
    bundle = load_bundle(args.bundle)
    model = OnnxModel(bundle, precision=args.precision)
    print(f"machine: {machine()}; bundle {bundle.version} ({bundle.arch}, {model.precision_used}) on {model.provider}")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "events.csv"
        n = replicated_taobao(src, args.rows)
        t0 = time.perf_counter()
        ev, _ = read_events(src, "taobao", dedupe=False, sort=False)
        t1 = time.perf_counter()
        feats_t = time.perf_counter()
        bundle.spec.transform(ev.sorted())
        feats_secs = time.perf_counter() - feats_t
        t2 = time.perf_counter()
        scores = score_events(model, ev, chunk_len=args.chunk_len)
        t3 = time.perf_counter()
        writers = {"JSONL": (write_results, "out.jsonl"), "Parquet": (write_results, "out.parquet"),
                   "JSONL, dict per answer (before)": (write_jsonl_before, "before.jsonl")}
        best = dict.fromkeys(writers, np.inf)
        for _ in range(args.write_repeats):  # alternating, so that drift hits every writer
            for name, (write, file) in writers.items():
                t = time.perf_counter()
                write(Path(tmp) / file, ev, scores, bundle.thresholds)
                best[name] = min(best[name], time.perf_counter() - t)
        same = (Path(tmp) / "out.jsonl").read_bytes() == (Path(tmp) / "before.jsonl").read_bytes()
    load, score = t1 - t0, t3 - t2
    print(f"{n:,} events, {np.unique(ev.user).size:,} users")
    print(f"  load CSV                              {load:6.2f} s")
    print(f"  score                                 {score:6.2f} s  (of which featurize ≈ {feats_secs:.2f} s "
          "incl. sort)")
    for name, secs in best.items():
        same_bytes = f"  ({'the same bytes' if same else 'DIFFERENT BYTES'} as JSONL)" if "before" in name else ""
        print(f"  write {name:31s} {secs:6.2f} s{same_bytes}")
    print(f"  end to end (load + score + write; scoring alone {n / score:,.0f} events/s)")
    for name, secs in best.items():
        total = load + score + secs
        print(f"    {name:31s} {total:6.2f} s  = {n / total:,.0f} events/s")
    if args.short_rows:
        short_histories(bundle, args.short_rows)
    if args.late:
        late_events(model, args.late_rows, args.late)


def write_jsonl_before(out: Path, events: Events, scores: EventScores, thresholds: Thresholds,
                       block_rows: int = 65536) -> int:
    """The JSONL writer before the columnar one (app/core/batch_engine.py at commit f65c6f0),
    kept here for the A/B only: a dict per answer, ``orjson.dumps`` each."""
    decisions = thresholds.decide(scores.probability).tolist()
    probs = scores.probability.astype(np.float64).tolist()
    answers = [{"event_id": e, "user_id": u, "anomaly_probability": p, "decision": d} for e, u, p, d in zip(
        events.event_ids().tolist(), events.user_id_strings().tolist(), probs, decisions, strict=True)]
    if scores.duplicate is not None:
        for i in np.flatnonzero(scores.duplicate).tolist():
            answers[i]["duplicate"] = True
    with out.open("wb") as fh:
        buf: list[bytes] = []
        for line in map(orjson.dumps, answers):
            buf.append(line)
            if len(buf) >= block_rows:
                fh.write(b"\n".join(buf) + b"\n")
                buf.clear()
        if buf:
            fh.write(b"\n".join(buf) + b"\n")
    return len(answers)


def short_histories(bundle: Bundle, rows: int) -> None:
    model = OnnxModel(bundle, threads=1)  # as `/batch-score` runs it beside the online path
    ev = Events.from_records(next(iter_records(FLINK, "taobao", chunk_rows=rows)))
    per_user = np.bincount(np.unique(ev.user, return_inverse=True)[1])
    score_events(model, ev)  # warm-up: every padded shape
    secs = []
    for _ in range(3):
        t = time.perf_counter()
        score_events(model, ev)
        secs.append(time.perf_counter() - t)
    print(f"short histories: {len(ev):,} events of the stream slice, {per_user.size:,} users, "
          f"{(per_user <= 4).mean():.0%} with 1-4 events; 1 ONNX Runtime thread")
    print(f"  score           {min(secs):6.2f} s  = {len(ev) / min(secs):,.0f} events/s (best of 3; "
          f"worst {len(ev) / max(secs):,.0f})")


def late_events(model: OnnxModel, rows: int, share: float, repeats: int = 3) -> None:
    ev, _ = read_events(TAOBAO, "taobao")
    ev = ev.take(np.arange(min(rows, len(ev))))
    rng = np.random.default_rng(0)
    order = list(range(len(ev)))
    for i in rng.choice(len(order) - 1, size=int(len(order) * share), replace=False).tolist():
        order.insert(min(len(order) - 1, i + 5), order.pop(i))
    late = ev.take(np.asarray(order))
    again = float(arrived_out_of_order(late).mean())
    score_events(model, ev)  # warm-up
    best = {"in time order": np.inf, f"{share:.0%} delivered late": np.inf}
    for _ in range(repeats):  # A and B alternate, so that drift hits both
        for name, log in zip(best, (ev, late), strict=True):
            t = time.perf_counter()
            score_events(model, log)
            best[name] = min(best[name], time.perf_counter() - t)
    print(f"late events: {len(ev):,} Taobao events; {again:.1%} of them out of order once "
          f"{share:.0%} are delivered 5 places late (best of {repeats}, alternating)")
    for name, secs in best.items():
        print(f"  {name:22s} {secs:6.2f} s  = {len(ev) / secs:,.0f} events/s")
    a, b = best.values()
    print(f"  ratio                  {b / a:.2f}x the time")


if __name__ == "__main__":
    main()
