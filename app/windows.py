"""The window store: each user's most recent events in Redis. This module owns every
Redis key, TTL and Lua script of the project.

Keys of one user share a Redis Cluster hash tag derived from the user id (never the raw
id, which appears nowhere in Redis): BLAKE2b of the id, keyed with the deployment's
``user_tag_key`` when it has one (:func:`user_key_tag`), so that whoever reads Redis cannot
test a guessed id against the tags. A new key renames every key: :class:`Rekeyer` moves
them (``seqguard rekey``).

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
answer; a third (``app/lua/restore_user.lua``) restores a user's keys under a new tag
(:class:`Rekeyer`). :mod:`app.redis_scripts` runs them (EVALSHA, the calls of concurrent
requests in one pipeline; re-loaded after NOSCRIPT). Idempotency is per user: a replay carries the same
``user_id`` and ``event_id``.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from typing import Any, Literal, NamedTuple

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


def user_key_tag(user_id: str, tag_key: bytes = b"") -> str:
    """The user's Redis Cluster hash tag: 20 hex chars of BLAKE2b of the user id, keyed with
    ``tag_key`` (the deployment's ``user_tag_key``, at most 64 bytes). An empty key is
    BLAKE2b's unkeyed mode: the tags of deployments without a key.

    Examples
    --------
    >>> len(user_key_tag("u1")), user_key_tag("u1") == user_key_tag("u1")
    (20, True)
    >>> user_key_tag("u1", b"k1") == user_key_tag("u1", b"k1") != user_key_tag("u1", b"k2")
    True
    """
    return hashlib.blake2b(user_id.encode("utf-8"), key=tag_key, digest_size=10,
                           person=b"seqguard-win").hexdigest()


def live_model_key(base: str) -> str:
    """The live model's record (``app.live``) of the deployment whose ``SEQGUARD_BUNDLE``
    is ``base``: one per deployment, no TTL, so that deployments sharing a Redis (a
    rolling deploy's old and new workers) never follow or overwrite each other's (an
    attack review: one crash of an old worker sent every worker back to its bundle).

    >>> live_model_key("/srv/b")[:14], live_model_key("/srv/b") == live_model_key("/srv/c")
    ('sg:model:live:', False)
    """
    return f"sg:model:live:{_deployment(base)}"


def shadow_model_key(base: str, setting: str | None) -> str:
    """The shadow model's record (``app.live``, ``app.shadow``) of the deployment whose
    ``SEQGUARD_BUNDLE`` is ``base`` and ``SEQGUARD_SHADOW_BUNDLE`` is ``setting``."""
    return f"sg:model:shadow:{_deployment(base, setting or '')}"


def _deployment(*settings: str) -> str:
    """16 hex chars naming a deployment by its settings (paths: nothing of a user's)."""
    return hashlib.blake2b("\0".join(settings).encode("utf-8"), digest_size=8, person=b"seqguard-dep").hexdigest()


class UserKeys(NamedTuple):
    window: str  # sorted set of events
    seq: str  # arrival counter
    ids: str  # hash event_id → "<ts>|<seq>|<answer>"
    id_times: str  # sorted set event_id → arrival ms


def user_keys(user_id: str, tag_key: bytes = b"") -> UserKeys:
    """Every Redis key of one user (one hash tag: one cluster slot) under ``tag_key``
    (:func:`user_key_tag`)."""
    base = f"sg:{{{user_key_tag(user_id, tag_key)}}}:"
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
_RESTORE_USER = _script("restore_user.lua")
#: Every Lua script the store (and :class:`Rekeyer`) runs.
SCRIPTS = (_APPEND, _SAVE_ANSWER, _RESTORE_USER)


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
    tag_key : the key of the users' hash tags (``user_tag_key``, UTF-8); empty: unkeyed.
    """

    def __init__(self, redis: aioredis.Redis, *, history: int, keep: int | None = None, window_ttl_s: int,
                 idempotency_ttl_s: int, max_ids_per_user: int = MAX_IDS_PER_USER,
                 on_answer_error: Callable[[BaseException], None] | None = None, tag_key: bytes = b"") -> None:
        keep = history if keep is None else keep
        if history < 1:
            raise ValueError("history must be ≥ 1")
        if keep < history:
            raise ValueError(f"keep ({keep}) must be ≥ history ({history})")
        if window_ttl_s < 1 or idempotency_ttl_s < 1 or max_ids_per_user < 1:
            raise ValueError("TTLs and max_ids_per_user must be ≥ 1")
        user_key_tag("", tag_key)  # a key BLAKE2b refuses (over 64 bytes) fails here, not per event
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
        self._tag_key = tag_key

    def keys(self, user_id: str) -> UserKeys:
        """Every Redis key of one user, under this store's tag key."""
        return user_keys(user_id, self._tag_key)

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
                calls.append(ScriptCall(_APPEND, tuple(self.keys(uid)), tuple(args)))
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
        calls = [ScriptCall(_SAVE_ANSWER, (self.keys(uid).ids,), (eid, packed)) for uid, eid, packed in items]
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
        keys = self.keys(user_id)
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
        return int(await self.redis.delete(*self.keys(user_id)))


#: What :meth:`Rekeyer.move` did with one user: moved (or would move, in a dry run), had
#: nothing under the old tag, or skipped (keys under the new tag exist already).
Moved = Literal["moved", "absent", "conflict"]


class Rekeyer:
    """Moves users' keys from one tag key to another (``seqguard rekey``), TTLs kept.

    The old and new keys of a user lie in two cluster slots, so RENAME (one slot) cannot
    move them, and no command here spans two slots: the old keys are read with DUMP and
    PTTL in one MULTI, one script restores them under the new tag unless a key of the user
    is there already (``app/lua/restore_user.lua``: no REPLACE), then one DEL removes the
    old ones. The same commands work on one Redis and on a Redis Cluster.

    Not atomic with the service: an event the service appends under the old tag while its
    user is moved (between the read and the DEL) is lost, and one appended after it stays
    under the old tag until its TTL. Move users with the service stopped, or before it
    serves with the new key.
    """

    def __init__(self, redis: aioredis.Redis, *, from_key: bytes, to_key: bytes) -> None:
        if from_key == to_key:
            raise ValueError("the old and the new tag key are the same: nothing to move")
        for k in (from_key, to_key):
            user_key_tag("", k)  # refused now if BLAKE2b refuses it
        self.redis = redis
        self._from, self._to = from_key, to_key
        self._scripts = ScriptPipeline(redis, name="window store")

    async def move(self, user_id: str, *, dry_run: bool = False) -> Moved:
        """Move one user's keys; with ``dry_run``, say what would happen and write nothing.

        Raises: ``redis`` errors (nothing of this user moved, or only the DEL of its old
        keys is missing: a second run then finds it a conflict).
        """
        old, new = user_keys(user_id, self._from), user_keys(user_id, self._to)
        async with self.redis.pipeline(transaction=True) as pipe:  # one slot: a consistent snapshot
            for key in old:
                pipe.dump(key)
                pipe.pttl(key)
            replies = await pipe.execute()
        dumps, ttls = replies[0::2], replies[1::2]
        if all(d is None for d in dumps):
            return "absent"
        if dry_run:
            return "conflict" if await self.redis.exists(*new) else "moved"
        args: list[str | bytes | int] = []
        for dump, ttl in zip(dumps, ttls, strict=True):
            # PTTL -1: no expiry (RESTORE's 0); 0: under a millisecond left, not "for ever"
            args += (max(int(ttl), 1) if int(ttl) != -1 else 0, dump) if dump is not None else (0, b"")
        [restored] = await self._scripts.run([ScriptCall(_RESTORE_USER, tuple(new), tuple(args))])
        if int(restored) < 0:
            return "conflict"
        await self.redis.delete(*(k for k, d in zip(old, dumps, strict=True) if d is not None))
        return "moved"

    async def move_many(self, user_ids: Sequence[str], *, dry_run: bool = False, in_flight: int = 32,
                        on_progress: Callable[[int, int], None] | None = None) -> dict[Moved, int]:
        """:meth:`move` each user (``in_flight`` at a time); how many were moved, absent and
        in conflict, each user counted once however often listed. ``on_progress(done,
        total)`` after each group.

        Raises: ``redis`` errors, the users before the failing group moved.
        """
        counts: dict[Moved, int] = {"moved": 0, "absent": 0, "conflict": 0}
        unique = list(dict.fromkeys(user_ids))  # one user twice in a group would race with itself
        for start in range(0, len(unique), in_flight):
            group = unique[start:start + in_flight]
            for outcome in await asyncio.gather(*(self.move(u, dry_run=dry_run) for u in group)):
                counts[outcome] += 1
            if on_progress is not None:
                on_progress(start + len(group), len(unique))
        return counts


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
