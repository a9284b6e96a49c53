"""Cost of refusing repeated JSON keys on the request parse path (issue 8, item 1).

Times, in one run on one core, the parse of ``POST /events`` and ``/batch-score`` bodies
before (pydantic's validation alone, which keeps the last of a repeated key) and after
(``app.schemas.parse_events`` / ``parse_batch_request``: the BOM skip, the validation and
the repeated-key check), for a body that proves cheaply that no key repeats and for one
that needs the exact check (a ``\\u`` escape in it, as Python's ``json.dumps`` writes
non-ASCII text), and the JSONL loader's per-line check.

    .venv/bin/python tests/benchmarks/bench_parse.py
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import orjson
from _common import machine

from app.schemas import _EVENTS_BODY, BatchScoreRequest, parse_batch_request, parse_events
from model_export.columns import json_object

T0 = 1_714_566_600_000


def event(i: int, user: str = "user-42") -> dict[str, Any]:
    return {"event_id": f"e{i}", "user_id": user, "event_type": "view", "timestamp": T0 + i,
            "item_id": f"item-{i % 50}", "category_id": "c7", "price": 9.5}


def per_call(fn: Callable[[], object], budget_s: float = 1.0) -> float:
    """Best of five timings of ``fn`` (seconds a call), each repeating it ~budget_s / 5."""
    t = time.perf_counter()
    fn()
    n = max(1, int(budget_s / 5 / max(time.perf_counter() - t, 1e-7)))
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


def row(name: str, size: int, before: float, after: float, unit: str = "request") -> None:
    print(f"{name:<44} {size:>9,} B  before {before * 1e6:>9.1f} µs  after {after * 1e6:>9.1f} µs  "
          f"{(after / before - 1) * 100:>+6.1f}% per {unit}")


def main() -> None:
    print(f"machine: {machine()}")
    ctx = {"max_events": 100_000}
    one = orjson.dumps(event(0))
    one_esc = json.dumps(event(0, "usér-42")).encode()  # ensure_ascii: "us\\u00e9r-42"
    bulk = orjson.dumps({"events": [event(i) for i in range(1000)]})
    bulk_esc = json.dumps({"events": [event(i, "usér-42") for i in range(1000)]}).encode()
    big = orjson.dumps({"events": [event(i) for i in range(100_000)]})
    for name, body in (("POST /events, one event", one), ("POST /events, one event, escaped", one_esc),
                       ("POST /events, 1,000 events", bulk), ("POST /events, 1,000 events, escaped", bulk_esc)):
        before = per_call(lambda body=body: _EVENTS_BODY.validate_json(body, context=ctx))
        after = per_call(lambda body=body: parse_events(body))
        row(name, len(body), before, after)
    before = per_call(lambda: BatchScoreRequest.model_validate_json(big, context=ctx), budget_s=5)
    after = per_call(lambda: parse_batch_request(big), budget_s=5)
    row("POST /batch-score, 100,000 events", len(big), before, after)

    lines = [orjson.dumps(event(i)) for i in range(10_000)]
    before = per_call(lambda: [orjson.loads(x) for x in lines]) / len(lines)
    after = per_call(lambda: [json_object(x) for x in lines]) / len(lines)
    row("JSONL loader, a line (orjson + check)", len(lines[0]), before, after, "line")


if __name__ == "__main__":
    main()
