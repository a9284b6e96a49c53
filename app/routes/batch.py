"""POST /batch-score: backfills on the batch engine of `seqguard score`.

JSON bodies are answered as JSON; NDJSON (``application/x-ndjson``) streams of any length
are scored in chunks and answered as an NDJSON stream, one line per input line, in input
order. Each event is scored on the events of the same request at or before it (equal
timestamps: input order), exactly as if they had arrived online one by one; live windows
are read by nothing here and written only with ``update_windows``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from redis.exceptions import RedisError
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from app.backfill import Scores, score_events
from app.decisions import decide
from app.deps import AppState, StateDep, require
from app.errors import ServiceUnavailable, json_path
from app.events import Events
from app.routes import json_response
from app.routes.events import read_body
from app.schemas import BatchScoreResults, parse_batch_request, parse_event_line, to_records

router = APIRouter(tags=["scoring"])
NDJSON = "application/x-ndjson"
#: Events per chunk of an NDJSON stream.
CHUNK_EVENTS = 20_000


@router.post(
    "/batch-score",
    response_model=BatchScoreResults,
    dependencies=[Depends(require("batch"))],
    responses={200: {"content": {NDJSON: {}}}, 413: {}, 422: {}, 503: {}},
)
async def batch_score(request: Request, state: StateDep, update_windows: bool = False) -> Any:
    """Score a backfill: JSON {"events": [...]} or an NDJSON stream of events."""
    if request.headers.get("content-type", "").split(";")[0].strip() == NDJSON:
        return await _ndjson(request, state, update_windows)
    body = await read_body(request, state.settings.batch_max_body_bytes)
    req = parse_batch_request(body, max_events=state.settings.batch_max_events)
    records = to_records(req.events)
    if req.update_windows or update_windows:
        await _append(state, records)
    scores = await _score(state, records)
    return json_response({"results": _results(records, scores, state.thresholds)})


async def _score(state: AppState, records: list[dict[str, Any]], answered_from: int = 0) -> Scores:
    """Scores of ``records``; the scoring metrics count those from ``answered_from`` on
    (before it: context carried over from an earlier chunk of a stream, counted there)."""
    events = Events.from_records(records)
    loop = asyncio.get_running_loop()
    scores: Scores = await loop.run_in_executor(state.batch_executor, score_events, state.model, events)
    answered_p = scores.probability[answered_from:]
    state.metrics.track_scored("batch", answered_p, decide(answered_p, state.thresholds))
    if unknown := state.bundle.spec.unknown_types(events, rows=np.arange(answered_from, len(events))):
        state.metrics.track_unknown_types(unknown)
    return scores


async def _append(state: AppState, records: list[dict[str, Any]]) -> None:
    try:
        for i in range(0, len(records), 1000):
            await state.store.append_many(records[i : i + 1000])
    except (RedisError, OSError):
        state.metrics.track_store_error()
        raise ServiceUnavailable("the window store is unavailable; retry") from None


def _results(records: list[dict[str, Any]], scores: Scores, thresholds: dict[str, float]) -> list[dict[str, Any]]:
    decisions = decide(scores.probability, thresholds)
    probs = scores.probability.astype(float).tolist()
    return [
        {"event_id": r["event_id"], "user_id": r["user_id"], "anomaly_probability": p, "decision": d}
        for r, p, d in zip(records, probs, decisions, strict=True)
    ]


async def _ndjson(request: Request, state: StateDep, update_windows: bool) -> StreamingResponse:
    lines = _lines(request)
    first, errors, done = await _chunk(lines, 0)
    if errors:  # nothing streamed yet: a proper 422 naming every bad line of the first chunk
        raise RequestValidationError(errors)
    history = state.bundle.spec.history

    async def stream() -> AsyncIterator[bytes]:
        tails: dict[str, list[dict[str, Any]]] = {}
        chunk, offset, finished = first, 0, done
        while chunk:
            context = [e for r in chunk for e in tails.get(r["user_id"], ())] if tails else []
            context = list({id(e): e for e in context}.values())  # once per user, not per event
            if update_windows:
                await _append(state, chunk)
            scores = await _score(state, context + chunk, answered_from=len(context))
            tail = Scores(scores.probability[len(context):], scores.surprise[len(context):])
            yield b"".join(orjson.dumps(r) + b"\n" for r in _results(chunk, tail, state.thresholds))
            _carry(tails, context + chunk, history)
            offset += len(chunk)
            if finished:
                break
            chunk, bad, finished = await _chunk(lines, offset)
            for err in bad:  # after the first chunk: reported in the stream, line by line
                problem = {"line": err["loc"][1], "path": json_path(err["loc"]), "message": err["msg"]}
                yield orjson.dumps({"error": problem}) + b"\n"

    return _ReadingStreamingResponse(stream(), media_type=NDJSON)


class _ReadingStreamingResponse(StreamingResponse):
    """A streaming answer whose generator keeps reading the request body.

    Under servers speaking ASGI < 2.4 (uvicorn says 2.3), Starlette's StreamingResponse
    calls ``receive()`` in a task of its own to notice disconnects, and so swallows the
    body messages this route is still reading: a stream longer than one chunk would hang.
    Here a disconnect surfaces as an error on send instead.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.stream_response(send)
        except OSError:
            raise ClientDisconnect() from None


async def _lines(request: Request) -> AsyncIterator[bytes]:
    buf = b""
    async for part in request.stream():
        buf += part
        *full, buf = buf.split(b"\n")
        for line in full:
            if line.strip():
                yield line
    if buf.strip():
        yield buf


async def _chunk(lines: AsyncIterator[bytes], offset: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], bool]:
    """Up to CHUNK_EVENTS valid events, the errors of the invalid lines, and whether the stream ended."""
    events: list[Any] = []
    errors: list[dict[str, Any]] = []
    n = offset
    async for line in lines:
        try:
            events.append(parse_event_line(line, n))
        except RequestValidationError as e:
            errors.extend(e.errors())
        n += 1
        if len(events) >= CHUNK_EVENTS:
            return to_records(events), errors, False
    return to_records(events), errors, True


def _carry(tails: dict[str, list[dict[str, Any]]], records: list[dict[str, Any]], history: int) -> None:
    """Keep each user's last ``history`` events (timestamp order, ties by arrival)."""
    by_user: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_user.setdefault(r["user_id"], []).append(r)
    for user, rs in by_user.items():
        rs.sort(key=lambda r: r["timestamp"])  # stable: arrival order among equal timestamps
        tails[user] = rs[-history:]
