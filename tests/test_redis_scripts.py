"""The EVALSHA pipeline against a real Redis (the session's embedded redis-server): replies
in order, scripts re-loaded after NOSCRIPT, an error reply failing only its own caller,
and "cannot serve now" replies raised as ConnectionError."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from app.redis_scripts import Script, ScriptCall, ScriptPipeline

INCR = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
FAIL = Script("return redis.error_reply(ARGV[1])")


def incr(key: str, by: int = 1) -> ScriptCall:
    return ScriptCall(INCR, (key,), (by,))


def test_replies_in_order_and_scripts_reloaded_after_noscript(redis_url: str) -> None:
    async def main() -> None:
        async with aioredis.Redis.from_url(redis_url) as r:
            p = ScriptPipeline(r, name="test store")
            assert await r.script_exists(INCR.sha) == [False]
            assert await p.run([incr("a"), incr("b", 5), incr("a")]) == [1, 5, 2]
            await r.script_flush()
            # concurrent callers, one pipeline: each gets its own replies, in order
            got = await asyncio.gather(p.run([incr("a"), incr("a")]), p.run([incr("b")]), p.run([incr("a", 10)]))
            assert got == [[3, 4], [6], [14]]
            assert await r.script_exists(INCR.sha) == [True]

    asyncio.run(main())


def test_an_error_reply_fails_only_its_caller(redis_url: str) -> None:
    async def main() -> None:
        async with aioredis.Redis.from_url(redis_url) as r:
            p = ScriptPipeline(r, name="test store")
            bad = p.run([incr("a"), ScriptCall(FAIL, (), ("ERR boom",))])
            got = await asyncio.gather(bad, p.run([incr("a")]), return_exceptions=True)
            assert isinstance(got[0], ResponseError) and "boom" in str(got[0])
            assert got[1] == [2]  # the failing caller's other call ran too: each call is its own

    asyncio.run(main())


@pytest.mark.parametrize("reply", [
    "READONLY You can't write against a read only replica.",
    "BUSY Redis is busy running a script.",
    "NOREPLICAS Not enough good replicas to write.",
    "OOM command not allowed when used memory > 'maxmemory'.",
    # Redis Cluster's: redis-py makes each a class of its own and drops the code (issue 8)
    "CLUSTERDOWN The cluster is down",
    "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
    "TRYAGAIN Multiple keys request during rehashing of slot",
])
def test_cannot_serve_now_is_a_connection_error(redis_url: str, reply: str) -> None:
    async def main() -> None:
        async with aioredis.Redis.from_url(redis_url) as r:
            p = ScriptPipeline(r, name="test store")
            with pytest.raises(RedisConnectionError, match=r"^test store unavailable: "):  # redis-py may drop the code
                await p.run([ScriptCall(FAIL, (), (reply,))])

    asyncio.run(main())
