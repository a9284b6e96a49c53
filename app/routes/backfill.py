"""POST /batch-score: backfills on the batch engine of `seqguard score`.

JSON bodies are answered as JSON; NDJSON (``application/x-ndjson``) streams (up to
``batch_max_body_bytes``, lines up to ``batch_max_line_bytes``) are scored in chunks and
answered as an NDJSON stream in input order: a result per valid line and, past the first
chunk, the error lines of each invalid one where it stood. A limit crossed before the
answer starts is a 413 (a slow body a 408); after, the stream's last line is
``{"error": {problem}}``. Parsing and encoding run in the backfill thread, off the loop.
Each event is scored on the events of the same request at or before it (equal
timestamps: input order), exactly as if they had arrived online one by one; live windows
are read by nothing here and written only with ``update_windows``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from redis.exceptions import RedisError
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from app.core.batch_engine import EventScores, FirstAnswers, score_events
from app.core.batch_engine import results as answers
from app.core.decisions import Thresholds
from app.core.events import Events
from app.core.scorer import OnnxModel
from app.deps import AppState, StateDep, require
from app.errors import PayloadTooLarge, ProblemError, ServiceUnavailable, json_path
from app.live import Served
from app.metrics import Metrics
from app.routes import JSON, media_type
from app.routes.events import body_chunks, read_body
from app.schemas import BatchScoreResults, QueryFlag, parse_batch_request, parse_event_line, to_records

router = APIRouter(tags=["scoring"])
NDJSON = "application/x-ndjson"
BOM = b"\xef\xbb\xbf"
#: The answer's header naming the model that scored the whole backfill (one per request,
#: whatever reload happens meanwhile; POST /events names it in each answer instead).
MODEL_VERSION_HEADER = "Seqguard-Model-Version"
#: Events per chunk of an NDJSON stream.
CHUNK_EVENTS = 20_000
log = logging.getLogger("seqguard.batch")
#: Results per orjson call when encoding a JSON answer.
_ENCODE_SLICE = 2000


@router.post(
    "/batch-score",
    response_model=BatchScoreResults,
    dependencies=[Depends(require("batch"))],
    responses={200: {"content": {NDJSON: {}}, "headers": {MODEL_VERSION_HEADER: {
        "description": "the model that scored the whole backfill", "schema": {"type": "string"}}}},
        413: {}, 422: {}, 503: {}},
)
async def batch_score(request: Request, state: StateDep, update_windows: QueryFlag = False) -> Any:
    """Score a backfill: JSON {"events": [...]} or an NDJSON stream of events."""
    if "explain" in request.query_params:  # refused, never silently ignored
        raise RequestValidationError([{
            "type": "unsupported", "loc": ("query", "explain"), "input": request.query_params["explain"],
            "msg": "explain is answered by POST /events only; /batch-score gives probabilities and decisions"}])
    if media_type(request, (JSON, NDJSON)) == NDJSON:
        return await _ndjson(request, state, update_windows)
    body = await read_body(request, state.settings.batch_max_body_bytes)
    # Parsing and encoding 100k events take about a second of CPU: in the backfill thread,
    # never on the event loop, so that concurrent /events requests are not held up.
    loop = asyncio.get_running_loop()
    parse = partial(_parse_json, body, max_events=state.settings.batch_max_events)
    records, update = await loop.run_in_executor(state.batch_executor, parse)
    live = state.live  # one model for the whole backfill, even if another is swapped in meanwhile
    if update or update_windows:
        await _append(state, records)
    scores = await _score(state, live, records)
    encode = partial(_encode_json, records, scores, live.thresholds)
    response = await loop.run_in_executor(state.batch_executor, encode)
    response.headers[MODEL_VERSION_HEADER] = live.version
    return response


def _parse_json(body: bytes, *, max_events: int) -> tuple[list[dict[str, Any]], bool]:
    req = parse_batch_request(body, max_events=max_events)
    return to_records(req.events), req.update_windows


def _encode_json(records: list[dict[str, Any]], scores: EventScores, thresholds: Thresholds) -> Response:
    # orjson holds the GIL for a whole call (about 0.1 s for 100k results): encoded in
    # slices, so that the event loop's thread gets the GIL back between them.
    results = _answers(records, scores, thresholds)
    slices = (orjson.dumps(results[i: i + _ENCODE_SLICE])[1:-1] for i in range(0, len(results), _ENCODE_SLICE))
    body = b'{"results":[' + b",".join(slices) + b"]}"
    return Response(body, media_type="application/json")


async def _score(state: AppState, live: Served, records: list[dict[str, Any]], answered_from: int = 0,
                 seen: FirstAnswers | None = None) -> EventScores:
    """EventScores of ``records`` by ``live``'s model; the scoring metrics count those from ``answered_from`` on
    (before it: context carried over from an earlier chunk of a stream, counted there).

    A repeat of an earlier (user_id, event_id) gets the first one's scores and joins no
    window (``EventScores.duplicate``): within ``records`` (the batch engine's rule), and, with
    ``seen`` (a stream's first answers, updated here), of an event of an earlier chunk.
    """
    loop = asyncio.get_running_loop()
    if seen is None:
        events, scores = await loop.run_in_executor(state.batch_executor, _events_and_scores, live.model, records,
                                                    0, state.store.keep)
    else:
        keys = FirstAnswers.keys(records)
        found = seen.find(keys)
        found[:answered_from] = -1  # the context: first occurrences, scored before
        earlier = found >= 0
        kept = np.flatnonzero(~earlier)
        rows = [records[i] for i in kept.tolist()] if earlier.any() else records
        events, inner = await loop.run_in_executor(state.batch_executor, _events_and_scores, live.model, rows,
                                                   answered_from, state.store.keep)
        scores = inner
        if earlier.any():
            prob, surprise = np.empty(len(records), np.float32), np.empty(len(records), np.float32)
            prob[kept], surprise[kept] = inner.probability, inner.surprise
            prob[earlier], surprise[earlier] = seen.answers(found[earlier])
            dup = earlier.copy()
            dup[kept] = inner.is_duplicate()
            scores = EventScores(prob, surprise, dup)
        new = ~scores.is_duplicate()
        new[:answered_from] = False
        seen.add(keys[new], scores.probability[new], scores.surprise[new])
    answered = scores[answered_from:]
    fresh = ~answered.is_duplicate()  # a repeat is answered, not scored again (as online)
    fresh_prob = answered.probability[fresh]
    state.metrics.track_scored("batch", fresh_prob, live.thresholds.decide(fresh_prob))
    if repeats := int(fresh.size - fresh.sum()):
        state.metrics.track_duplicate(repeats)
    if unknown := live.bundle.spec.unknown_types(events, rows=np.arange(answered_from, len(events))):
        state.metrics.track_unknown_types(unknown)
    return scores


def _events_and_scores(model: OnnxModel, records: list[dict[str, Any]], context_rows: int,
                       keep: int) -> tuple[Events, EventScores]:
    """``records`` as Events and their batch-engine scores, run off the event loop: building
    the columns alone takes 0.3–0.5 s per 100k events. The first ``context_rows`` are a
    stream's carried context; ``keep`` is the window store's (the live rules' trimming)."""
    events = Events.from_records(records)
    return events, score_events(model, events, context_rows=context_rows, keep=keep)


async def _append(state: AppState, records: list[dict[str, Any]]) -> None:
    try:
        for i in range(0, len(records), 1000):
            await state.store.append_many(records[i : i + 1000])
    except (RedisError, OSError):
        state.metrics.track_store_error()
        raise ServiceUnavailable("the window store is unavailable: some events may have been stored; "
                                 "retry with the same event_ids") from None


async def _ndjson(request: Request, state: StateDep, update_windows: bool) -> StreamingResponse:
    settings = state.settings
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > settings.batch_max_body_bytes:
        raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {settings.batch_max_body_bytes}")
    pieces = body_chunks(request, read_timeout_s=settings.body_read_timeout_s,
                         min_rate_bytes_s=settings.body_min_rate_bytes_s,
                         min_rate_grace_s=settings.min_rate_grace_s)
    lines = _lines(pieces, max_line=settings.batch_max_line_bytes, max_body=settings.batch_max_body_bytes)
    executor = state.batch_executor
    first = await _chunk(lines, 0, executor)
    if first.errors:  # nothing streamed yet: a proper 422 naming every bad line of the first chunk
        raise RequestValidationError(first.errors)
    live = state.live  # one model for the whole stream
    history = state.store.keep  # the store's window, which a stream's carried context emulates
    if update_windows:  # before the answer starts: a store failure is still a proper 503
        await _append(state, first.records)

    async def stream() -> AsyncIterator[bytes]:
        tails: dict[str, list[dict[str, Any]]] = {}
        seen = FirstAnswers()  # the stream's first answers: repeats across chunks
        chunk, stored = first, True
        loop = asyncio.get_running_loop()
        while True:
            records = chunk.records
            if update_windows and not stored:
                try:
                    await _append(state, records)
                except ServiceUnavailable:  # the answer has started: the problem is its last line
                    log.warning("window store unavailable during an NDJSON /batch-score stream; ended it")
                    raise
            stored = False
            if records:
                context = [e for r in records for e in tails.get(r["user_id"], ())] if tails else []
                context = list({id(e): e for e in context}.values())  # once per user, not per event
                scores = await _score(state, live, context + records, answered_from=len(context), seen=seen)
                tail = scores[len(context):]  # keeps the repeats' duplicate flags
                yield await loop.run_in_executor(executor, _encode_lines, chunk, tail, live.thresholds)
                _carry(tails, [r for r, d in zip(context + records, scores.is_duplicate(), strict=True) if not d],
                       history)
            elif chunk.errors:  # a chunk of invalid lines only: still answered, line by line
                yield _encode_errors(chunk.errors)
            if chunk.finished:
                return
            # A limit crossed now (413, 408) ends the stream with its problem as the last line.
            chunk = await _chunk(lines, chunk.next_line, executor)

    route = getattr(request.scope.get("route"), "path", "/batch-score")  # the label seqguard_requests_total uses
    return _ReadingStreamingResponse(_ended_by_problems(stream(), state.metrics, route), media_type=NDJSON,
                                     headers={MODEL_VERSION_HEADER: live.version})


async def _ended_by_problems(body: AsyncIterator[bytes], metrics: Metrics, route: str) -> AsyncIterator[bytes]:
    """``body``'s lines; if a failure ends it, the problem as the last line, since the
    answer's status (200) has gone out. Each such end is counted in
    ``seqguard_stream_errors_total`` under the problem's status: the request metrics count
    the request as the 200 it was sent as. A problem (413, 408, 503) is its own line; any
    other exception is logged once, with its traceback, under an ``error_id`` that a 500
    line names (it used to cut the stream off with no last line, and no terminating chunk).
    A client that went away (``ClientDisconnect``) is the request metrics' 499 alone.
    """
    try:
        async for piece in body:
            yield piece
        return
    except ClientDisconnect:
        raise
    except ProblemError as exc:
        problem = exc
    except Exception as exc:
        error_id = uuid.uuid4().hex
        log.error("unexpected error %s (%s) on POST %s after its NDJSON answer had started: ended it with a 500 "
                  "line", error_id, type(exc).__name__, route, exc_info=exc)
        problem = ProblemError("An unexpected error occurred; quote error_id when reporting it.", error_id=error_id)
    yield _error_line(problem)
    # Counted once the line has gone to the server: if that send failed, the client had
    # left, and the request is the request metrics' 499 alone.
    metrics.track_stream_error(route, problem.status)


def _error_line(exc: ProblemError) -> bytes:
    """The last line of a stream that a problem ended after its answer had started."""
    return orjson.dumps({"error": {"type": exc.type, "title": exc.title, "status": exc.status,
                                   "detail": exc.detail, **exc.extensions}}) + b"\n"


def _encode_errors(errors: list[dict[str, Any]]) -> bytes:
    """The ``{"error": {"line", "path", "message"}}`` lines of invalid input lines (after the
    first chunk, where the answer has started)."""
    return b"".join(orjson.dumps({"error": {"line": e["loc"][1], "path": json_path(e["loc"]), "message": e["msg"]}})
                    + b"\n" for e in errors)


def _answers(records: list[dict[str, Any]], scores: EventScores, thresholds: Thresholds) -> list[dict[str, Any]]:
    """The batch engine's answer of each record (``app.core.batch_engine.results``)."""
    return answers([r["event_id"] for r in records], [r["user_id"] for r in records], scores, thresholds)


def _encode_lines(chunk: _Chunk, scores: EventScores, thresholds: Thresholds) -> bytes:
    """A chunk's answer lines in input order: each valid line's result, and the error
    lines of each invalid one where that line was."""
    results = [orjson.dumps(r) + b"\n" for r in _answers(chunk.records, scores, thresholds)]
    if not chunk.errors:
        return b"".join(results)
    out: list[bytes] = []
    errors, k = chunk.errors, 0
    for line, result in zip(chunk.lines, results, strict=True):
        start = k
        while k < len(errors) and errors[k]["loc"][1] < line:
            k += 1
        if k > start:
            out.append(_encode_errors(errors[start:k]))
        out.append(result)
    if k < len(errors):
        out.append(_encode_errors(errors[k:]))
    return b"".join(out)


class _ReadingStreamingResponse(StreamingResponse):
    """A streaming answer whose generator keeps reading the request body.

    Under servers speaking ASGI < 2.4 (uvicorn says 2.3), Starlette's StreamingResponse
    calls ``receive()`` in a task of its own to notice disconnects, and so swallows the
    body messages this route is still reading: a stream longer than one chunk would hang.
    Here a disconnect surfaces as an error on send, or as ``ClientDisconnect`` from the
    body, and ends the answer quietly (the request metrics count it as 499).
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.stream_response(send)
        except (OSError, ClientDisconnect):
            log.debug("client closed the connection during an NDJSON /batch-score stream")


async def _lines(pieces: AsyncIterator[bytes], *, max_line: int, max_body: int) -> AsyncIterator[bytes]:
    """The non-blank lines of an NDJSON body, without their newlines.

    Linear in the body: each piece is split once, and a line that spans pieces is joined
    once, when its newline arrives. Raises :class:`PayloadTooLarge` (413) as soon as a
    line passes ``max_line`` bytes or the body ``max_body`` bytes, newline or not.
    """
    pending: list[bytes] = []  # the start of a line whose newline has not arrived yet
    pending_size = total = 0
    n = 0
    async for piece in pieces:
        if total == 0 and piece.startswith(BOM):  # a leading UTF-8 BOM, as every text input
            piece = piece[len(BOM):]
        total += len(piece)
        if total > max_body:
            raise PayloadTooLarge(f"NDJSON body exceeds the limit of {max_body} bytes")
        start = 0
        while (end := piece.find(b"\n", start)) != -1:
            if pending_size + end - start > max_line:
                raise PayloadTooLarge(f"NDJSON line {n} exceeds the limit of {max_line} bytes")
            line = b"".join((*pending, piece[start:end])) if pending else piece[start:end]
            pending.clear()
            pending_size, start = 0, end + 1
            if line.strip():
                n += 1
                yield line
        if start < len(piece):
            pending.append(piece[start:])
            pending_size += len(piece) - start
            if pending_size > max_line:
                raise PayloadTooLarge(f"NDJSON line {n} exceeds the limit of {max_line} bytes")
        # One piece (up to ~64 KiB, so up to 64Ki blank lines) at a time: pieces already
        # received come back without a pause, and other requests must get the loop between.
        await asyncio.sleep(0)
    line = b"".join(pending)
    if line.strip():
        yield line


@dataclass(frozen=True, slots=True)
class _Chunk:
    """Up to CHUNK_EVENTS lines of a stream, parsed: the valid lines' events and their line
    numbers (``lines``, ascending), the errors of the invalid ones (in line order), whether
    the stream ended with it, and the number of the line after it."""

    records: list[dict[str, Any]]
    lines: list[int]
    errors: list[dict[str, Any]]
    finished: bool
    next_line: int


async def _chunk(lines: AsyncIterator[bytes], first_line: int, executor: Executor) -> _Chunk:
    """Up to CHUNK_EVENTS lines from ``first_line`` on, parsed off the event loop."""
    raw: list[bytes] = []
    finished = True
    async for line in lines:
        raw.append(line)
        if len(raw) >= CHUNK_EVENTS:
            finished = False
            break
    records, numbers, errors = await asyncio.get_running_loop().run_in_executor(
        executor, _parse_lines, raw, first_line)
    return _Chunk(records, numbers, errors, finished, first_line + len(raw))


def _parse_lines(raw: list[bytes], first_line: int) -> tuple[list[dict[str, Any]], list[int], list[dict[str, Any]]]:
    events: list[Any] = []
    numbers: list[int] = []
    errors: list[dict[str, Any]] = []
    for n, line in enumerate(raw, first_line):
        try:
            events.append(parse_event_line(line, n))
            numbers.append(n)
        except RequestValidationError as e:
            errors.extend(e.errors())
    return to_records(events), numbers, errors


def _carry(tails: dict[str, list[dict[str, Any]]], records: list[dict[str, Any]], history: int) -> None:
    """Keep each user's last ``history`` events (timestamp order, ties by arrival)."""
    by_user: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_user.setdefault(r["user_id"], []).append(r)
    for user, rs in by_user.items():
        rs.sort(key=lambda r: r["timestamp"])  # stable: arrival order among equal timestamps
        tails[user] = rs[-history:]
