"""POST /events: append each event to its user's window, score the window ending at it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from app import shadow
from app.core.events import format_rfc3339_ms
from app.core.reasons import reason_codes
from app.deps import AppState, authorize
from app.errors import PayloadTooLarge, RequestTimeout, ServiceUnavailable
from app.microbatcher import QueueFull, Stopped
from app.routes import json_response, media_type
from app.schemas import ScoreResult, ScoreResults, parse_events, query_flag, to_records

router = APIRouter(tags=["scoring"])
log = logging.getLogger("seqguard.events")


async def body_chunks(request: Request, *, read_timeout_s: float, total_timeout_s: float | None = None,
                      min_rate_bytes_s: float = 0.0, min_rate_grace_s: float = 0.0) -> AsyncIterator[bytes]:
    """The request body piece by piece, as it arrives.

    Raises :class:`RequestTimeout` (408) when the next piece takes longer than
    ``read_timeout_s``, the whole body longer than ``total_timeout_s`` (seconds), or the
    body falls more than ``min_rate_grace_s`` seconds behind a steady ``min_rate_bytes_s``
    (so any stretch longer than the grace must average at least that rate), and
    Starlette's ``ClientDisconnect`` when the client goes away (counted as 499).

    The rate rule is Apache mod_reqtimeout's ``MinRate`` (each byte received buys
    ``1 / rate`` s), with the time bought capped at the grace: a client cannot bank a fast
    start and trickle for hours after it. Only the time spent waiting here for the body
    counts, not the time the caller works on what it got (the server reads nothing then:
    a backfill's chunk being scored must not count against its client).
    """
    loop = asyncio.get_running_loop()
    deadline = None if total_timeout_s is None else loop.time() + total_timeout_s
    behind_left = min_rate_grace_s if min_rate_bytes_s > 0 else float("inf")  # seconds the body may still lose
    pieces = request.stream().__aiter__()
    while True:
        total_left = float("inf") if deadline is None else deadline - loop.time()
        wait = min(read_timeout_s, total_left, behind_left)
        started = loop.time()
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                chunk = await anext(pieces)
        except StopAsyncIteration:
            return
        except TimeoutError:
            if total_left <= wait:
                detail = f"the body was not received within {total_timeout_s:g} s"
            elif behind_left <= wait:
                detail = (f"the body arrived at under {min_rate_bytes_s:g} bytes/s for longer than "
                          f"{min_rate_grace_s:g} s")
            else:
                detail = f"no part of the body arrived for {read_timeout_s:g} s"
            raise RequestTimeout(detail) from None
        if min_rate_bytes_s > 0:
            behind_left = min(min_rate_grace_s, behind_left - (loop.time() - started) + len(chunk) / min_rate_bytes_s)
        if chunk:
            yield chunk


async def read_body(request: Request, limit: int) -> bytes:
    """The whole request body (bytes), refused with 413 as soon as it passes ``limit``
    bytes (before any is read when its Content-Length says so), and with 408 when it
    arrives too slowly (``body_read_timeout_s`` between pieces, ``body_timeout_s`` in all,
    ``body_min_rate_bytes_s`` after ``body_min_rate_grace_s``)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {limit}")
    s = request.app.state.seqguard.settings
    chunks, size = [], 0
    async for chunk in body_chunks(request, read_timeout_s=s.body_read_timeout_s, total_timeout_s=s.body_timeout_s,
                                   min_rate_bytes_s=s.body_min_rate_bytes_s,
                                   min_rate_grace_s=s.min_rate_grace_s):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def reasons(window: Sequence[dict[str, Any]], surprise: np.ndarray, top: int = 5, *,
            rfc3339: bool = False) -> list[dict[str, Any]]:
    """The ``top`` events of the window that drove the score, most surprising first (ties:
    the later event first), each with its surprise: nats, −log of twice the mid-p-value of
    the event under the model's prediction from the events before it, summed over the
    predicted features (0 = no less likely than a typical next event; about 2.3 per
    tenfold rarer; model_export/model.py). Times are epoch milliseconds, or with
    ``rfc3339`` (the scored event's timestamp came so) RFC 3339 date-times in UTC."""
    events = list(window)[-len(surprise):]
    order = np.lexsort((-np.arange(len(surprise)), -surprise))[:top]
    when = format_rfc3339_ms if rfc3339 else int
    return [
        {"event_id": events[i].get("event_id"), "event_type": events[i]["event_type"],
         "timestamp": when(events[i]["timestamp"]),
         "surprise": round(max(float(surprise[i]), 0.0), 4) + 0.0}  # float error must not show as -0.0
        for i in order.tolist()
    ]


@router.post(
    "/events",
    response_model=ScoreResult | ScoreResults,
    responses={401: {}, 403: {}, 413: {}, 422: {}, 503: {}},
    # The one hot route: no dependencies to solve (state, key and query are read inline).
    openapi_extra={"parameters": [{
        "name": "explain", "in": "query", "required": False, "schema": {"type": "boolean", "default": False},
        "description": "Add the events that drove each score (`reasons`).",
    }]},
)
async def post_events(request: Request) -> Response:
    """Append one event (or up to 1000) to its user's window and score it."""
    state: AppState = request.app.state.seqguard
    authorize(request, "events")
    media_type(request)
    explain = query_flag(request.query_params, "explain")
    s = state.settings
    body = await read_body(request, s.max_body_bytes)
    events, batched = parse_events(body, max_events=s.max_events_per_request)
    records = to_records(events)
    if not state.live.batcher.has_room(len(records)):
        raise ServiceUnavailable("scoring queue is full; nothing was written, retry")
    started = time.perf_counter()
    try:
        stored = await state.store.append_many(records)
    except (RedisConnectionError, RedisTimeoutError, OSError) as e:
        state.metrics.track_store_error()
        log.warning("window store unavailable: %s", type(e).__name__)
        raise ServiceUnavailable("the window store is unavailable: the events may have been stored; "
                                 "retry with the same event_id") from None
    state.metrics.track_store("append", time.perf_counter() - started)

    results: list[dict[str, Any] | None] = [None] * len(stored)
    fresh = []
    first_here: dict[tuple[str, str], int] = {}
    repeats_here: list[tuple[int, int]] = []
    for i, w in enumerate(stored):
        # A repeat of an event earlier in this very body: that event's answer, once it has
        # one (the store's window at it has changed since: later events, trimming).
        earlier = first_here.setdefault((w.user_id, w.event_id), i)
        if earlier != i:
            repeats_here.append((i, earlier))
            continue
        # A replay: its first answer, nothing changed. Not saved yet: maybe still queued here.
        answer = w.answer
        if answer is None and w.duplicate:
            answer = state.store.unsaved_answer(w.user_id, w.event_id)
        if answer is not None:
            results[i] = orjson.loads(answer) | {"duplicate": True}
        else:
            fresh.append(i)
    if fresh:
        # The model read once, after the store's await and with none before the batcher has
        # the windows: a swap meanwhile retires a batcher only once it has nothing queued.
        live = state.live
        thresholds = live.thresholds.as_dict()
        targets = live.bundle.meta.get("feature_surprise_targets") or []
        windows = [stored[i].events for i in fresh]
        try:
            scores = await live.batcher.score(windows, explain=explain)
        except QueueFull as e:
            # Lost the race for the last slots after storing, or the model was stopped (a
            # shutdown): a retry re-scores the stored window and answers with duplicate=true.
            what = "the scoring model was stopped" if isinstance(e, Stopped) else "scoring queue is full"
            raise ServiceUnavailable(f"{what}; the events are stored, retry to get scores") from None
        first = []
        for k, i in enumerate(fresh):
            w = stored[i]
            res: dict[str, Any] = {
                "event_id": w.event_id, "user_id": w.user_id,
                "anomaly_probability": scores.probability[k], "decision": scores.decision[k],
                "thresholds": thresholds, "window_size": scores.window_size[k],
                "model_version": live.version, "duplicate": w.duplicate,
            }
            if explain:
                # Times in the form the client sent this event's in (the store keeps only ms).
                rfc3339 = events[i].timestamp_rfc3339
                res["reasons"] = reasons(w.events, scores.surprise[k], rfc3339=rfc3339)
                if (per_feature := scores.feature_surprise[k]) is not None and targets:
                    codes = reason_codes(w.events, per_feature, targets)
                    if rfc3339:
                        for c in codes:
                            c["timestamp"] = format_rfc3339_ms(c["timestamp"])
                    res["reason_codes"] = codes
            results[i] = res
            first.append((w.user_id, w.event_id, orjson.dumps(res | {"duplicate": False})))
        # The first answer of each event, for replays (never overwrites an earlier one),
        # saved after the reply: the events are stored already.
        state.store.save_answers_soon(first)
        shadow.score_soon(state, windows, scores.decision)  # after this answer, never in its way
    for i, earlier in repeats_here:
        results[i] = {**results[earlier], "duplicate": True}  # type: ignore[dict-item]
    dups = sum(1 for w in stored if w.duplicate)
    if dups:
        state.metrics.track_duplicate(dups)
    return json_response({"results": results} if batched else results[0])
