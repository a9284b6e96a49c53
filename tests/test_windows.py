"""The window store against a real Redis (the session's embedded redis-server): ordering,
trimming, TTLs, idempotency, atomicity under concurrency, script reloads and outages."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Awaitable, Callable
from importlib.resources import files
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from app.embedded_redis import EmbeddedRedis
from app.windows import (
    MAX_EVENTS_PER_CALL,
    SCRIPTS,
    StoredWindow,
    WindowStore,
    pack_answer,
    unpack_answer,
    user_key_tag,
    user_keys,
)

T = TypeVar("T")
TTL_W, TTL_I = 600, 1800


def run(url: str, body: Callable[[aioredis.Redis], Awaitable[T]], **client_kw: Any) -> T:
    """Run ``body(client)`` in a fresh event loop with a client that is closed afterwards."""

    async def main() -> T:
        async with aioredis.Redis.from_url(url, **client_kw) as r:
            return await body(r)

    return asyncio.run(main())


def store(r: aioredis.Redis, history: int = 4, keep: int | None = None, **kw: Any) -> WindowStore:
    return WindowStore(r, history=history, keep=keep, window_ttl_s=kw.pop("window_ttl_s", TTL_W),
                       idempotency_ttl_s=kw.pop("idempotency_ttl_s", TTL_I), **kw)


def ev(eid: str | int, ts: int, user: str = "u1", **fields: Any) -> dict[str, Any]:
    return {"event_id": str(eid), "user_id": user, "event_type": "view", "timestamp": ts, **fields}


def ids(w: StoredWindow | list[dict[str, Any]]) -> list[str]:
    return [e["event_id"] for e in (w.events if isinstance(w, StoredWindow) else w)]


def answer(p: float, eid: str = "e1", user: str = "u1", **extra: Any) -> bytes:
    """A contract answer of ``eid`` with probability ``p`` (JSON), as POST /events saves it."""
    return orjson.dumps({"event_id": eid, "user_id": user, "anomaly_probability": p, "decision": "allow",
                         "thresholds": {"review": 0.5, "block": 0.9}, "window_size": 1, "model_version": "m1",
                         "duplicate": False, **extra})


def same(got: bytes | None, expected: bytes) -> bool:
    """``got`` is the answer ``expected`` (as JSON documents)."""
    return got is not None and orjson.loads(got) == orjson.loads(expected)


async def kept(s: WindowStore, user: str) -> list[dict[str, Any]]:
    """The events the store keeps for ``user``, oldest first, as an access request reads them."""
    events: list[dict[str, Any]] = (await s.stored(user))["events"]
    return events


async def raw_state(r: aioredis.Redis, user: str) -> tuple[Any, ...]:
    k = user_keys(user)
    return (await r.zrange(k.window, 0, -1, withscores=True), await r.hgetall(k.ids), await r.get(k.seq))


# ------------------------------------------------------------------------- basics


def test_append_and_read_round_trip(redis_url: str) -> None:
    full = ev("e1", 1_700_000_000_000, item_id="i9", category_id="c3", session_id="s1", device_id="d1",
              country="DE", price=19.99)

    async def body(r: aioredis.Redis) -> None:
        s = store(r)
        w = await s.append(full)
        assert w == StoredWindow("u1", "e1", False, None, [full])
        # RFC 3339 timestamps are stored as epoch ms; None fields are omitted
        w2 = await s.append(ev("e2", "2023-11-14T22:13:21Z", price=None))  # type: ignore[arg-type]
        assert w2.events[-1] == ev("e2", 1_700_000_001_000)
        assert await kept(s, "u1") == [full, ev("e2", 1_700_000_001_000)]
        assert await s.stored("nobody") == {"events": [], "event_ids": []}
        assert await s.append_many([]) == []

    run(redis_url, body)


def test_a_client_that_decodes_responses_works_too(redis_url: str) -> None:
    async def body(r: aioredis.Redis) -> None:
        s = store(r)
        assert ids(await s.append(ev("e1", 1, price=2.5))) == ["e1"]
        await s.save_answers([("u1", "e1", answer(1.0))])
        assert same((await s.append(ev("e1", 1))).answer, answer(1.0))
        assert await kept(s, "u1") == [ev("e1", 1, price=2.5)]

    run(redis_url, body, decode_responses=True)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="keep"):
        WindowStore(None, history=8, keep=4, window_ttl_s=60, idempotency_ttl_s=60)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="history"):
        WindowStore(None, history=0, window_ttl_s=60, idempotency_ttl_s=60)  # type: ignore[arg-type]


def test_event_without_ids_is_refused(redis_url: str) -> None:
    async def body(r: aioredis.Redis) -> None:
        with pytest.raises(ValueError, match="user_id"):
            await store(r).append({"event_id": "e", "event_type": "view", "timestamp": 1})
        assert await r.dbsize() == 0

    run(redis_url, body)


def test_late_events_are_scored_on_the_window_at_their_timestamp(redis_url: str) -> None:
    async def body(r: aioredis.Redis) -> None:
        s = store(r, history=3, keep=10)
        for i, ts in enumerate([100, 200, 300, 400]):
            await s.append(ev(f"e{i}", ts))
        late = await s.append(ev("late", 250))
        assert ids(late) == ["e0", "e1", "late"]  # at or before 250 only: e2, e3 are later
        earliest = await s.append(ev("first", 50))
        assert ids(earliest) == ["first"]
        assert ids(await kept(s, "u1")) == ["first", "e0", "e1", "late", "e2", "e3"]
        after = await s.append(ev("e5", 500))
        assert ids(after) == ["late", "e2", "e3", "e5"][-3:]

    run(redis_url, body)


def test_equal_timestamps_keep_arrival_order(redis_url: str) -> None:
    async def body(r: aioredis.Redis) -> None:
        s = store(r, history=20)
        # ids chosen so that byte order of the JSON would disagree with arrival order
        order = ["z", "a", "m", "b", "y"]
        got = [await s.append(ev(e, 1000)) for e in order]
        for k, w in enumerate(got):
            assert ids(w) == order[: k + 1]
        late = await s.append(ev("c", 1000))  # same timestamp, arrives last: goes last
        assert ids(late) == [*order, "c"]
        mid = await s.append(ev("x", 999))
        assert ids(mid) == ["x"]
        assert ids(await kept(s, "u1")) == ["x", *order, "c"]

    run(redis_url, body)


def test_history_and_trim_to_keep(redis_url: str) -> None:
    async def body(r: aioredis.Redis) -> None:
        s = store(r, history=3, keep=5)
        got = [await s.append(ev(i, i)) for i in range(10)]
        assert [len(w.events) for w in got] == [1, 2, 3, 3, 3, 3, 3, 3, 3, 3]
        assert ids(got[-1]) == ["7", "8", "9"]
        assert await r.zcard(user_keys("u1").window) == 5
        assert ids(await kept(s, "u1")) == ["5", "6", "7", "8", "9"]
        # an event older than everything kept is scored on itself and trimmed at once
        w = await s.append(ev("old", 0))
        assert ids(w) == ["old"]
        assert ids(await kept(s, "u1")) == ["5", "6", "7", "8", "9"]

    run(redis_url, body)


def test_ttls_are_set_and_refreshed(redis_url: str) -> None:
    async def body(r: aioredis.Redis) -> None:
        s = store(r, window_ttl_s=100, idempotency_ttl_s=300)
        k = user_keys("u1")
        await s.append(ev(1, 1))
        for key, ttl in ((k.window, 100), (k.seq, 300), (k.ids, 300), (k.id_times, 300)):
            assert ttl * 1000 - 2000 < await r.pttl(key) <= ttl * 1000, key
        for key in k:
            await r.pexpire(key, 5000)
        await s.append(ev(2, 2))
        assert await r.pttl(k.window) > 98_000 and await r.pttl(k.ids) > 298_000
        assert await r.pttl(k.seq) > 298_000 and await r.pttl(k.id_times) > 298_000
        # a replay refreshes nothing
        for key in k:
            await r.pexpire(key, 5000)
        assert (await s.append(ev(2, 2))).duplicate
        assert all([await r.pttl(key) <= 5000 for key in k])

    run(redis_url, body)


# -------------------------------------------------------------------- idempotency


def test_replay_returns_first_answer_and_changes_nothing(redis_url: str) -> None:
    async def body(r: aioredis.Redis) -> None:
        s = store(r)
        first = await s.append(ev("e1", 10))
        assert not first.duplicate and first.answer is None
        await s.append(ev("e2", 20))
        await s.save_answers([("u1", "e1", answer(0.1))])
        before = await raw_state(r, "u1")
        again = await s.append(ev("e1", 99999, event_type="buy"))  # same id, other content
        assert again == StoredWindow("u1", "e1", True, again.answer, []) and same(again.answer, answer(0.1))
        assert await raw_state(r, "u1") == before
        # the first answer is never overwritten; unknown events are skipped
        await s.save_answers([("u1", "e1", answer(0.9)), ("u1", "nope", answer(0.9, "nope")),
                              ("u2", "e1", answer(0.9, user="u2"))])
        assert same((await s.append(ev("e1", 10))).answer, answer(0.1))
        assert await r.exists(user_keys("u2").ids) == 0
        # idempotency is per user: another user's e1 is another event
        assert not (await s.append(ev("e1", 10, user="u2"))).duplicate

    run(redis_url, body)


def test_replay_before_the_answer_is_saved_gets_the_window_at_the_event(redis_url: str) -> None:
    async def body(r: aioredis.Redis) -> None:
        s = store(r, history=3, keep=10)
        for i, ts in enumerate([10, 20, 20, 30, 20]):
            await s.append(ev(f"e{i}", ts))
        before = await raw_state(r, "u1")
        w = await s.append(ev("e2", 20))
        assert w.duplicate and w.answer is None
        assert ids(w) == ["e0", "e1", "e2"]  # e4 (same ts, arrived later) and e3 (later ts) excluded
        assert ids(await s.append(ev("e4", 20))) == ["e1", "e2", "e4"]
        assert ids(await s.append(ev("e0", 10))) == ["e0"]
        assert await raw_state(r, "u1") == before
        # the same id twice in one batch: the second is a replay of the first
        a, b = await s.append_many([ev("n1", 25), ev("n1", 25)])
        assert not a.duplicate and b.duplicate and ids(a) == ids(b) == ["e2", "e4", "n1"]

    run(redis_url, body)


def test_idempotency_records_are_bounded_by_count_and_age(redis_url: str) -> None:
    async def body(r: aioredis.Redis) -> None:
        k = user_keys("u1")
        s = store(r, history=2, keep=50, max_ids_per_user=5)
        for i in range(8):
            await s.append(ev(i, i))
        assert await r.hlen(k.ids) == 5 and await r.zcard(k.id_times) == 5
        assert sorted(await r.hkeys(k.ids)) == [b"3", b"4", b"5", b"6", b"7"]
        assert (await s.append(ev(7, 7))).duplicate
        assert not (await s.append(ev(0, 0))).duplicate  # forgotten: applied again (documented)

        await r.flushall()
        s = store(r, history=2, idempotency_ttl_s=2)
        await s.append(ev("old", 1))
        await asyncio.sleep(1.2)
        await s.append(ev("mid", 2))
        await asyncio.sleep(1.0)
        await s.append(ev("new", 3))  # "old" is now past the 2 s horizon, "mid" is not
        assert sorted(await r.hkeys(k.ids)) == [b"mid", b"new"]
        assert await r.zcard(k.id_times) == 2

    run(redis_url, body)


# ------------------------------------------------------------------- concurrency


def _pool_client(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(url, max_connections=32))


def test_200_concurrent_replays_of_one_event_store_it_once(redis_url: str) -> None:
    async def main() -> None:
        async with _pool_client(redis_url) as r:
            s = store(r)
            await s.append(ev("before", 1))
            got = await asyncio.gather(*(s.append(ev("same", 5)) for _ in range(200)))
            assert sum(not w.duplicate for w in got) == 1
            assert all(ids(w) == ["before", "same"] for w in got)  # replays rebuild the same window
            assert await r.zcard(user_keys("u1").window) == 2
            assert await r.get(user_keys("u1").seq) == b"2"

    asyncio.run(main())


def test_500_concurrent_distinct_events_of_one_user(redis_url: str) -> None:
    rng = random.Random(5)
    events = [ev(f"e{i}", rng.randrange(50)) for i in range(500)]  # many equal timestamps

    async def main() -> None:
        async with _pool_client(redis_url) as r:
            s = store(r, history=600, keep=1000)
            got = await asyncio.gather(*(s.append(e) for e in events))
            members = await r.zrange(user_keys("u1").window, 0, -1, withscores=True)
            assert all(not w.duplicate for w in got)

        order = [(int(score), int(m[:12]), orjson.loads(m[13:])["event_id"]) for m, score in members]
        assert len(order) == 500 and order == sorted(order)  # by (timestamp, arrival)
        by_id = {eid: seq for _, seq, eid in order}
        assert sorted(by_id) == sorted(e["event_id"] for e in events)
        ranked = [eid for _, _, eid in order]
        for e, w in zip(events, got, strict=True):
            # exactly the events at or before it (in final order) that had arrived before it
            pos = ranked.index(e["event_id"])
            expect = [x for x in ranked[: pos + 1] if by_id[x] <= by_id[e["event_id"]]]
            assert ids(w) == expect

    asyncio.run(main())


def test_append_many_matches_sequential_appends(redis_url: str) -> None:
    rng = random.Random(11)
    events = []
    for i in range(420):
        user = "heavy" if i % 3 else f"u{rng.randrange(6)}"  # "heavy" needs several script calls
        events.append(ev(f"e{i}", 1000 + i // 2 - rng.choice([0, 0, 0, 3, 40]), user=user))
    events += [dict(events[k]) for k in (3, 100, 401)]  # replays, inside the batch
    rng.shuffle(events)
    assert sum(e["user_id"] == "heavy" for e in events) > 2 * MAX_EVENTS_PER_CALL
    users = sorted({e["user_id"] for e in events})

    async def body(r: aioredis.Redis) -> None:
        s = store(r, history=8, keep=12)
        one_by_one = [await s.append(e) for e in events]
        state = [await raw_state(r, u) for u in users]
        await r.flushall()
        many = await s.append_many(events)
        assert many == one_by_one
        assert [await raw_state(r, u) for u in users] == state
        assert sum(w.duplicate for w in many) == 3

    run(redis_url, body)


# ------------------------------------------------------------------------- keys


def test_keys_carry_the_hash_tag_and_never_the_raw_user_id(redis_url: str) -> None:
    user = "alice@example.com"

    async def body(r: aioredis.Redis) -> None:
        s = store(r)
        await s.append(ev("e1", 1, user=user, item_id="i1"))
        await s.save_answers([(user, "e1", answer(0.5, user=user))])
        keys = sorted(k.decode() for k in await r.keys("*"))
        tag = user_key_tag(user)
        assert re.fullmatch(r"[0-9a-f]{20}", tag) and tag != user_key_tag("bob")
        assert keys == sorted(f"sg:{{{tag}}}:{suffix}" for suffix in ("w", "n", "ids", "idt"))
        assert sorted(user_keys(user)) == keys
        for key in keys:  # nowhere in Redis, neither in keys nor in values
            dumped = await r.dump(key)
            assert user.encode() not in key.encode() and user.encode() not in dumped
        assert (await kept(s, user))[0]["user_id"] == user

    run(redis_url, body)


def test_keyed_tags_differ_from_unkeyed_ones_and_between_keys() -> None:
    """SEQGUARD_USER_TAG_KEY: a keyed BLAKE2b, so that a guessed user id cannot be tested
    against the tags without the key; an empty key keeps the tags deployments have now."""
    user = "1001"
    unkeyed, a, b = user_key_tag(user), user_key_tag(user, b"key-a"), user_key_tag(user, b"key-b")
    assert unkeyed == user_key_tag(user, b"") == "02293d64de19188582a1"  # the tag of every key stored so far
    assert len({unkeyed, a, b}) == 3
    assert a == user_key_tag(user, b"key-a") and all(re.fullmatch(r"[0-9a-f]{20}", t) for t in (a, b))
    assert user_key_tag("1002", b"key-a") != a
    assert user_keys(user, b"key-a") == tuple(f"sg:{{{a}}}:{x}" for x in ("w", "n", "ids", "idt"))
    assert user_keys(user) == user_keys(user, b"") != user_keys(user, b"key-a")
    assert not any(user in k for key in (b"", b"key-a", b"\xff" * 64) for k in user_keys(user, key))
    with pytest.raises(ValueError):  # over BLAKE2b's 64 bytes
        user_keys(user, b"k" * 65)
    with pytest.raises(ValueError):  # refused when the store is built, not at its first event
        store(None, tag_key=b"k" * 65)  # type: ignore[arg-type]


def test_a_store_with_a_tag_key_keeps_every_key_under_the_keyed_tag(redis_url: str) -> None:
    user, key = "alice@example.com", b"s3cret-tag-key"

    async def body(r: aioredis.Redis) -> None:
        s = store(r, tag_key=key)
        await s.append(ev("e1", 1, user=user, item_id="i1"))
        await s.append(ev("e2", 2, user=user))
        await s.save_answers([(user, "e1", answer(0.5, user=user))])
        keys = sorted([k.decode() async for k in r.scan_iter(match="*")])
        assert keys == sorted(user_keys(user, key)) == sorted(s.keys(user))
        assert not set(keys) & set(user_keys(user)), "nothing under the unkeyed tag"
        assert not any(user in k for k in keys)
        assert ids(await kept(s, user)) == ["e1", "e2"]
        assert [x["event_id"] for x in (await s.stored(user))["event_ids"]] == ["e1", "e2"]
        replay = await s.append(ev("e1", 1, user=user))
        assert replay.duplicate and same(replay.answer, answer(0.5, user=user))
        assert await store(r).stored(user) == {"events": [], "event_ids": []}, "an unkeyed store sees none of it"
        assert await store(r, tag_key=b"another-key").stored(user) == {"events": [], "event_ids": []}
        assert await s.forget(user) == 4 and await r.dbsize() == 0

    run(redis_url, body)


# ------------------------------------------------------------------------- scripts


def test_the_lua_scripts_are_package_resources_and_load(redis_url: str) -> None:
    """app/lua/*.lua ship as package data, one file per script the store runs, and each
    compiles in Redis under the SHA the store calls it by."""
    lua = {p.name: p.read_text(encoding="utf-8") for p in (files("app") / "lua").iterdir() if p.name.endswith(".lua")}
    assert sorted(lua) == ["append_events.lua", "restore_user.lua", "save_answer.lua"]
    assert sorted(s.source for s in SCRIPTS) == sorted(lua.values())
    assert all(src.startswith("-- ") and "KEYS" in src and "ARGV" in src for src in lua.values())

    async def body(r: aioredis.Redis) -> None:
        for script in SCRIPTS:
            assert await r.script_load(script.source) == script.sha
        assert await r.script_exists(*(s.sha for s in SCRIPTS)) == [True] * len(SCRIPTS)

    run(redis_url, body)


# --------------------------------------------------------------- failures


def test_scripts_reload_after_script_flush(redis_url: str) -> None:
    async def body(r: aioredis.Redis) -> None:
        s = store(r)
        await s.append(ev("e1", 1))
        await r.script_flush()
        assert ids(await s.append(ev("e2", 2))) == ["e1", "e2"]
        await r.script_flush()
        got = await s.append_many([ev("e3", 3), ev("x1", 1, user="u2"), ev("e4", 4)])
        assert [ids(w) for w in got] == [["e1", "e2", "e3"], ["x1"], ["e1", "e2", "e3", "e4"]]
        await r.script_flush()
        await s.save_answers([("u1", "e4", answer(0.4, "e4"))])
        assert same((await s.append(ev("e4", 4))).answer, answer(0.4, "e4"))

    run(redis_url, body)


def test_out_of_memory_is_unavailable_and_writes_nothing(redis_url: str) -> None:
    async def body(r: aioredis.Redis) -> None:
        s = store(r)
        await s.append(ev("e1", 1))
        before = await raw_state(r, "u1")
        await r.config_set("maxmemory", 1)
        try:
            with pytest.raises(RedisConnectionError, match="OOM"):
                await s.append_many([ev("e2", 2), ev("e3", 3)])
        finally:
            await r.config_set("maxmemory", 0)
        assert await raw_state(r, "u1") == before
        assert ids(await s.append(ev("e2", 2))) == ["e1", "e2"]

    run(redis_url, body)


def test_answers_saved_after_the_reply_are_visible_until_saved(redis_url: str) -> None:
    async def body(r: aioredis.Redis) -> None:
        s = store(r)
        await s.append_many([ev("e1", 10), ev("e2", 20)])
        s.save_answers_soon([("u1", "e1", answer(0.1)), ("u1", "e2", answer(0.2, "e2"))])
        s.save_answers_soon([("u1", "e1", answer(0.9))])  # the first answer wins, queued or saved
        # Queued, not saved yet: Redis has no answer, this process has.
        assert (await s.append(ev("e1", 10))).answer is None
        assert same(s.unsaved_answer("u1", "e1"), answer(0.1))
        await s.flush_answers()
        assert s.unsaved_answer("u1", "e1") is None
        assert same((await s.append(ev("e1", 10))).answer, answer(0.1))
        assert same((await s.append(ev("e2", 20))).answer, answer(0.2, "e2"))
        # Later answers start a new background save.
        await s.append(ev("e3", 30))
        s.save_answers_soon([("u1", "e3", answer(0.3, "e3"))])
        await s.flush_answers()
        assert same((await s.append(ev("e3", 30))).answer, answer(0.3, "e3"))

    run(redis_url, body)


def test_answers_that_cannot_be_saved_are_reported_and_dropped(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    with EmbeddedRedis(tmp_path / "redis") as server:

        async def body(r: aioredis.Redis) -> None:
            s = store(r, on_answer_error=errors.append)
            await s.append(ev("e1", 1))
            server.stop()
            s.save_answers_soon([("u1", "e1", answer(0.1))])
            await s.flush_answers()
            assert s.unsaved_answer("u1", "e1") is None
            server.start()
            w = await s.append(ev("e1", 1))  # the event is stored; its answer is not
            assert w.duplicate and w.answer is None and ids(w) == ["e1"]

        run(server.url, body, retry=Retry(NoBackoff(), 1), socket_timeout=2, socket_connect_timeout=2)
    assert len(errors) == 1 and isinstance(errors[0], RedisConnectionError)


def test_stopped_redis_raises_connection_error_and_recovers_with_its_data(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "redis") as server:

        async def body(r: aioredis.Redis) -> None:
            s = store(r)
            await s.append(ev("e1", 1))
            await s.save_answers([("u1", "e1", answer(0.1))])
            server.stop()
            with pytest.raises(RedisConnectionError):
                await s.append(ev("e2", 2))
            with pytest.raises(RedisConnectionError):
                await s.append_many([ev("e2", 2)])
            with pytest.raises(RedisConnectionError):
                await s.stored("u1")
            server.start()  # same port and data dir; the AOF brings the data back, not the scripts
            assert await r.ping()
            assert same((await s.append(ev("e1", 1))).answer, answer(0.1))
            assert ids(await s.append(ev("e2", 1))) == ["e1", "e2"]  # the arrival counter survived too
            server.restart(kill=True)  # a crash right after an acknowledged write
            assert ids(await kept(s, "u1")) == ["e1", "e2"]

        run(server.url, body, retry=Retry(NoBackoff(), 1), socket_timeout=2, socket_connect_timeout=2)


def test_duration_is_in_the_millisecond_range(redis_url: str) -> None:
    """Sanity bound (not a benchmark): 200 sequential appends of a 64+16 window."""

    async def body(r: aioredis.Redis) -> float:
        s = store(r, history=80, keep=100)
        t0 = time.perf_counter()
        for i in range(200):
            await s.append(ev(i, i, item_id=f"i{i}", price=1.5))
        return (time.perf_counter() - t0) / 200

    assert run(redis_url, body) < 0.02


# ------------------------------------------------ idempotency records (issue 8)


def test_an_idempotency_record_keeps_a_packed_answer_without_ids(redis_url: str) -> None:
    user = "alice.unique@example.org"
    reasons = [{"event_id": "e1", "event_type": "view", "timestamp": 10, "surprise": 1.5}]

    async def body(r: aioredis.Redis) -> None:
        s = store(r)
        await s.append(ev("e1", 10, user=user))
        first = answer(0.123456789, "e1", user, reasons=reasons)
        s.save_answers_soon([(user, "e1", first)])
        queued = s.unsaved_answer(user, "e1")
        await s.flush_answers()
        record = await r.hget(user_keys(user).ids, "e1")
        assert record == b'10|000000000001|[0.123456789,"allow",1,"m1",0.5,0.9]'
        assert len(record) < 64 and user.encode() not in record
        # A replay gets the contract answer back: the ids from the request, no reasons
        # (whether the answer is still queued in this process or saved).
        replay = await s.append(ev("e1", 10, user=user))
        expected = {k: v for k, v in orjson.loads(first).items() if k != "reasons"}
        assert replay.duplicate and replay.answer is not None and orjson.loads(replay.answer) == expected
        assert queued is not None and orjson.loads(queued) == expected

    run(redis_url, body)


def test_a_whole_answer_saved_by_an_earlier_version_is_still_replayed(redis_url: str) -> None:
    async def body(r: aioredis.Redis) -> None:
        s = store(r)
        await s.append(ev("e1", 10))
        record = await r.hget(user_keys("u1").ids, "e1")
        await r.hset(user_keys("u1").ids, "e1", record + answer(0.25, "e1", "u1"))  # as saved before issue 8
        replay = await s.append(ev("e1", 10))
        assert replay.duplicate and same(replay.answer, answer(0.25))

    run(redis_url, body)


def test_pack_answer_refuses_what_is_not_an_answer() -> None:
    with pytest.raises(KeyError):
        pack_answer(b'{"p": 0.1}')
    assert orjson.loads(unpack_answer(pack_answer(answer(0.5, "x", "y")), "y", "x")) == orjson.loads(
        answer(0.5, "x", "y"))
