"""The window store: each user's most recent events in Redis. This module owns every
Redis key, TTL and Lua script of the project.

Keys of one user share a Redis Cluster hash tag derived from the user id (never the raw
id, which appears nowhere in Redis):

- ``sg:{<tag>}:w``   sorted set, the window: score = timestamp (epoch ms), member =
  ``f"{seq:012d}|" + JSON(event without user_id)``. ``seq`` is the user's arrival
  counter, so equal timestamps sort in arrival order (Redis orders equal scores by
  member bytes) — the batch engine's rule (equal timestamps → input order).
- ``sg:{<tag>}:n``   string, the arrival counter (``INCR``).
- ``sg:{<tag>}:ids`` hash, event_id → ``"<timestamp>|<seq>|<first answer>"`` (answer
  empty until :meth:`WindowStore.save_answers` records it, after the reply). The answer
  is packed (:func:`pack_answer`): probability, decision, window size, model version and
  thresholds, about 60 bytes, never the user id; a replay gets it back as the contract's
  answer (:func:`unpack_answer`), the ids added from the request.
- ``sg:{<tag>}:idt`` sorted set, event_id → arrival time (server ms): bounds the
  idempotency records by age (``idempotency_ttl_s``) and by count.

One Lua script (``app/lua/append_events.lua``) appends a user's events atomically (checks
idempotency, assigns seq, inserts in timestamp order, reads the window at the event, trims,
refreshes TTLs), in one round trip; another (``app/lua/save_answer.lua``) records a first
answer. :mod:`app.redis_scripts` runs them (EVALSHA, the calls of concurrent requests in one
pipeline; re-loaded after NOSCRIPT). Idempotency is per user: a replay carries the same
``user_id`` and ``event_id``.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, NamedTuple

import orjson
import redis.asyncio as aioredis
from redis import exceptions as rexc

from app.core.events import parse_timestamp_ms
from app.redis_scripts import Script, ScriptCall, ScriptPipeline

#: Idempotency records kept per user at most (besides the age bound): a replay of an
#: event older than the last this-many events of its user is applied again.
MAX_IDS_PER_USER = 10_000
#: Events of one user per script call: bounds the time Redis spends in one script
#: and the size of one reply (each event returns its window).
MAX_EVENTS_PER_CALL = 128
#: First answers saved per pipeline by :meth:`WindowStore.save_answers_soon`.
SAVE_ANSWERS_PER_CALL = 512

#: What an idempotency record keeps of a first answer, in this order (:func:`pack_answer`).
ANSWER_FIELDS = ("anomaly_probability", "decision", "window_size", "model_version")

_SEQ_WIDTH = 12  # 10**12 events per user before the width grows
_PREFIX = _SEQ_WIDTH + 1  # "<seq>|"


def pack_answer(answer: bytes | Mapping[str, Any]) -> bytes:
    """The part of a first answer that its idempotency record keeps: a JSON array of
    :data:`ANSWER_FIELDS` and the two thresholds. Never the user id (nothing raw about a
    user goes to Redis) nor the event id (the record's field) nor ``reasons``.

    Raises KeyError or TypeError when ``answer`` is not a contract answer.

    Examples
    --------
    >>> pack_answer({"event_id": "e1", "user_id": "alice", "anomaly_probability": 0.031, "decision": "allow",
    ...              "thresholds": {"review": 0.5, "block": 0.9}, "window_size": 17, "model_version": "m1",
    ...              "duplicate": False})
    b'[0.031,"allow",17,"m1",0.5,0.9]'
    """
    a = orjson.loads(answer) if isinstance(answer, bytes | bytearray | memoryview | str) else answer
    t = a["thresholds"]
    return orjson.dumps([*(a[k] for k in ANSWER_FIELDS), t["review"], t["block"]])


def unpack_answer(packed: bytes | str, user_id: str, event_id: str) -> bytes:
    """The contract answer (JSON, ``duplicate`` false) of an event from its packed record
    (:func:`pack_answer`); a record written whole by an earlier version is read too.

    Examples
    --------
    >>> unpack_answer(b'[0.031,"allow",17,"m1",0.5,0.9]', "alice", "e1")[:60]
    b'{"event_id":"e1","user_id":"alice","anomaly_probability":0.0'
    """
    doc = orjson.loads(packed)
    if isinstance(doc, dict):  # a whole answer, as versions before the packed record saved it
        return orjson.dumps(doc | {"event_id": event_id, "user_id": user_id, "duplicate": False})
    p, decision, size, version, review, block = doc
    return orjson.dumps({"event_id": event_id, "user_id": user_id, "anomaly_probability": p, "decision": decision,
                         "thresholds": {"review": review, "block": block}, "window_size": size,
                         "model_version": version, "duplicate": False})


def user_key_tag(user_id: str) -> str:
    """The user's Redis Cluster hash tag: 20 hex chars of BLAKE2b of the user id.

    Examples
    --------
    >>> len(user_key_tag("u1")), user_key_tag("u1") == user_key_tag("u1")
    (20, True)
    """
    return hashlib.blake2b(user_id.encode("utf-8"), digest_size=10, person=b"seqguard-win").hexdigest()


#: The service's one key that is no user's: the live model's record (``app.live``), one
#: per deployment, no TTL.
LIVE_MODEL_KEY = "sg:model:live"


class UserKeys(NamedTuple):
    window: str  # sorted set of events
    seq: str  # arrival counter
    ids: str  # hash event_id → "<ts>|<seq>|<answer>"
    id_times: str  # sorted set event_id → arrival ms


def user_keys(user_id: str) -> UserKeys:
    """Every Redis key of one user (one hash tag: one cluster slot)."""
    base = f"sg:{{{user_key_tag(user_id)}}}:"
    return UserKeys(base + "w", base + "n", base + "ids", base + "idt")


@dataclass(frozen=True)
class StoredWindow:
    """The outcome of appending one event.

    ``events`` is the window at the event, oldest first, its last item the event itself
    (dicts with the contract's field names; ``None`` fields are omitted). For a replay
    whose first answer is saved, ``duplicate`` is true, ``answer`` holds that answer (JSON,
    rebuilt from its packed record: no ``reasons``) and ``events`` is empty; for a replay
    whose answer is not saved yet (a concurrent replay, or a retry after a lost reply),
    ``answer`` is None and ``events`` is the window at the
    original event, as far as the store still holds it.
    """

    user_id: str
    event_id: str
    duplicate: bool
    answer: bytes | None
    events: list[dict[str, Any]]


def _script(name: str) -> Script:
    """A Lua script of ``app/lua/`` (package data: an installed wheel carries it)."""
    return Script((files(__package__) / "lua" / name).read_text(encoding="utf-8"))


_APPEND = _script("append_events.lua")
_SAVE_ANSWER = _script("save_answer.lua")
#: Every Lua script the store runs.
SCRIPTS = (_APPEND, _SAVE_ANSWER)


class WindowStore:
    """Per-user event windows in Redis.

    Parameters
    ----------
    redis : an asyncio client (its pool bounds the concurrency).
    history : events returned per window: ``FeatureSpec.history`` (window + lookback).
    keep : events kept per user (≥ history; default history).
    window_ttl_s : the window's lifetime after its user's last event.
    idempotency_ttl_s : how long a replayed event_id is recognised.
    max_ids_per_user : idempotency records kept per user at most.
    on_answer_error : called with the error when answers queued by
        :meth:`save_answers_soon` could not be saved.
    """

    def __init__(self, redis: aioredis.Redis, *, history: int, keep: int | None = None, window_ttl_s: int,
                 idempotency_ttl_s: int, max_ids_per_user: int = MAX_IDS_PER_USER,
                 on_answer_error: Callable[[BaseException], None] | None = None) -> None:
        keep = history if keep is None else keep
        if history < 1:
            raise ValueError("history must be ≥ 1")
        if keep < history:
            raise ValueError(f"keep ({keep}) must be ≥ history ({history})")
        if window_ttl_s < 1 or idempotency_ttl_s < 1 or max_ids_per_user < 1:
            raise ValueError("TTLs and max_ids_per_user must be ≥ 1")
        self.redis = redis
        self.history = history
        self.keep = keep
        self.window_ttl_s = window_ttl_s
        self.idempotency_ttl_s = idempotency_ttl_s
        self.max_ids_per_user = max_ids_per_user
        self._head = (history, keep, window_ttl_s * 1000, idempotency_ttl_s * 1000, max_ids_per_user)
        self.on_answer_error = on_answer_error
        self._unsaved: dict[tuple[str, str], bytes] = {}
        self._saver: asyncio.Task[None] | None = None
        self._scripts = ScriptPipeline(redis, name="window store")

    # ------------------------------------------------------------------ writes

    async def append(self, event: Mapping[str, Any]) -> StoredWindow:
        """Append one event atomically and return the window ending at it."""
        return (await self.append_many([event]))[0]

    async def append_many(self, events: Sequence[Mapping[str, Any]]) -> list[StoredWindow]:
        """Append events; results in input order. Events of one user apply in list order,
        in one script call per user (one round trip for all users); users with more than
        ``MAX_EVENTS_PER_CALL`` events take one more round trip per extra chunk. A
        connection error may leave earlier calls applied: a retry is safe (idempotency)."""
        if not events:
            return []
        encoded = [_encode(e) for e in events]
        by_user: dict[str, list[int]] = {}
        for i, (uid, _, _, _) in enumerate(encoded):
            by_user.setdefault(uid, []).append(i)
        results: list[StoredWindow | None] = [None] * len(events)
        wave = 0
        while True:
            # Wave k holds the k-th chunk of every user: each user appears once per
            # pipeline, so a call retried after NOSCRIPT cannot overtake a later one.
            chunks = [(uid, idx[wave * MAX_EVENTS_PER_CALL:(wave + 1) * MAX_EVENTS_PER_CALL])
                      for uid, idx in by_user.items() if len(idx) > wave * MAX_EVENTS_PER_CALL]
            if not chunks:
                break
            calls = []
            for uid, idx in chunks:
                args: list[str | bytes | int] = [*self._head]
                for i in idx:
                    _, eid, ts, payload = encoded[i]
                    args += (eid, ts, payload)
                calls.append(ScriptCall(_APPEND, tuple(user_keys(uid)), tuple(args)))
            replies = await self._scripts.run(calls)
            for (uid, idx), reply in zip(chunks, replies, strict=True):
                for i, r in zip(idx, reply, strict=True):
                    results[i] = _stored(uid, encoded[i][1], r)
            wave += 1
        return [r for r in results if r is not None]

    async def save_answers(self, items: Sequence[tuple[str, str, bytes]]) -> None:
        """Record ``(user_id, event_id, answer)`` as each event's first answer (the
        contract's answer as JSON, kept packed: :func:`pack_answer`); an answer already
        saved is kept, and an event the store no longer knows is skipped."""
        await self._save_packed([(uid, eid, pack_answer(answer)) for uid, eid, answer in items if answer])

    async def _save_packed(self, items: Sequence[tuple[str, str, bytes]]) -> None:
        calls = [ScriptCall(_SAVE_ANSWER, (user_keys(uid).ids,), (eid, packed)) for uid, eid, packed in items]
        if calls:
            await self._scripts.run(calls)

    def save_answers_soon(self, items: Sequence[tuple[str, str, bytes]]) -> None:
        """Queue first answers for :meth:`save_answers` in the background, one pipeline
        for all answers queued meanwhile, so that a reply does not wait for a second round
        trip. The events themselves are stored already (acknowledged means stored); the
        answer only serves replays. A replay that comes before its answer is saved gets it
        from :meth:`unsaved_answer` in the same process, and is otherwise scored again on
        the stored window at its event. Answers that cannot be saved (Redis down) are
        dropped and reported to ``on_answer_error``."""
        for uid, eid, answer in items:
            if (uid, eid) not in self._unsaved:
                self._unsaved[uid, eid] = pack_answer(answer)
        if self._unsaved and (self._saver is None or self._saver.done()):
            self._saver = asyncio.create_task(self._save_unsaved(), name="save-answers")

    def unsaved_answer(self, user_id: str, event_id: str) -> bytes | None:
        """The first answer of an event (as a replay from Redis gets it: no ``reasons``),
        while it waits in this process to be saved."""
        packed = self._unsaved.get((user_id, event_id))
        return None if packed is None else unpack_answer(packed, user_id, event_id)

    async def flush_answers(self) -> None:
        """Wait until every queued answer is saved (or dropped): before closing Redis."""
        while self._saver is not None and not self._saver.done():
            await asyncio.shield(self._saver)

    async def _save_unsaved(self) -> None:
        while self._unsaved:
            # Answers stay visible to unsaved_answer() until their pipeline has run.
            batch = list(itertools.islice(self._unsaved.items(), SAVE_ANSWERS_PER_CALL))
            try:
                await self._save_packed([(uid, eid, packed) for (uid, eid), packed in batch])
            except (rexc.RedisError, OSError) as e:
                if self.on_answer_error is not None:
                    self.on_answer_error(e)
            for key, _ in batch:
                self._unsaved.pop(key, None)

    # ------------------------------------------------------------------- reads

    async def stored(self, user_id: str) -> dict[str, Any]:
        """Everything the store holds about one user, for an access request: every kept event
        of the window (oldest first, up to ``keep``) and the event ids its idempotency records
        remember, with the arrival time (epoch ms) of each. One round trip.

        Raises: ``redis`` errors (the caller answers 503).
        """
        keys = user_keys(user_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrange(keys.window, 0, -1)
            pipe.zrange(keys.id_times, 0, -1, withscores=True)
            members, id_times = await pipe.execute()
        return {"events": _decode_window(members, user_id),
                "event_ids": [{"event_id": (e.decode() if isinstance(e, bytes) else e), "arrived_ms": int(t)}
                              for e, t in id_times]}

    async def forget(self, user_id: str) -> int:
        """Erase one user: every key of theirs (window, arrival counter, idempotency records)
        in one command, and their answers not yet saved in this process. Returns the number of
        Redis keys removed (0: nothing was stored). Erasing twice is harmless.

        Raises: ``redis`` errors (the caller answers 503; nothing was removed, or all of it:
        ``DEL`` of keys in one slot is atomic).
        """
        for key in [k for k in self._unsaved if k[0] == user_id]:
            self._unsaved.pop(key, None)
        return int(await self.redis.delete(*user_keys(user_id)))


def _encode(event: Mapping[str, Any]) -> tuple[str, str, str, bytes]:
    """(user_id, event_id, timestamp ms as text, member payload) of a contract event."""
    uid, eid = event.get("user_id"), event.get("event_id")
    if not isinstance(uid, str) or not uid or not isinstance(eid, str) or not eid:
        raise ValueError("an event needs a non-empty string user_id and event_id")
    ts = parse_timestamp_ms(event["timestamp"])
    body = {k: v for k, v in event.items() if k != "user_id" and v is not None}
    body["timestamp"] = ts
    return uid, eid, str(ts), orjson.dumps(body)


def _decode_window(members: list[Any], user_id: str) -> list[dict[str, Any]]:
    """Contract dicts from window members, oldest first: one JSON parse per window."""
    if not members:
        return []
    if isinstance(members[0], str):  # a client with decode_responses=True
        members = [m.encode("utf-8") for m in members]
    events: list[dict[str, Any]] = orjson.loads(b"[" + b",".join([m[_PREFIX:] for m in members]) + b"]")
    for e in events:
        e["user_id"] = user_id
    return events


def _stored(user_id: str, event_id: str, reply: list[Any]) -> StoredWindow:
    status = int(reply[0])
    if status == 1:
        return StoredWindow(user_id, event_id, True, unpack_answer(reply[1], user_id, event_id), [])
    return StoredWindow(user_id, event_id, status == 2, None, _decode_window(reply[1:], user_id))
