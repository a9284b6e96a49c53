"""The service's Redis client: a ``redis.asyncio`` blocking connection pool with hiredis
parsing replies and packing commands."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.utils import HIREDIS_AVAILABLE


class _HiredisPacking:
    """Packs commands with hiredis's C packer, as redis-py's sync client does; its asyncio
    client packs them in Python (redis/redis-py#4176), a third of its CPU per command."""

    _packer = HiredisRespSerializer()

    def pack_command(self, *args: Any) -> list[bytes]:
        return self._packer.pack(*args)


def connect(url: str, *, pool_size: int, timeout_s: float) -> aioredis.Redis:
    """A client on a blocking pool of ``pool_size`` connections to ``url`` (redis://,
    rediss:// or unix://). Waiting for a connection, connecting and each reply are bounded
    by ``timeout_s``; a command whose connection failed is retried once after 10 ms, not
    redis-py's default backoff of seconds: an outage must turn into a prompt 503 +
    ``Retry-After``, and the client retries (event ids make that safe). A command that
    timed out is not retried: Redis may still run it when it resumes, and the retry then
    found the event stored and answered a first delivery ``"duplicate": true`` (an attack
    review, SIGSTOP of Redis for 1.5 s; ``seqguard rekey`` counted moved users as
    conflicts and left their old keys). A reset after the command reached Redis can still
    do that, far more rarely; the event is stored once either way."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=pool_size, timeout=timeout_s, socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1, supported_errors=(RedisConnectionError,)),
    )
    if HIREDIS_AVAILABLE:
        base = pool.connection_class
        pool.connection_class = type(f"Hiredis{base.__name__}", (_HiredisPacking, base), {})
    return aioredis.Redis(connection_pool=pool)


def durability_warning(config: dict[str, str]) -> str | None:
    """What a crash of the Redis behind ``config`` (its ``CONFIG GET appendonly`` and
    ``appendfsync``) can lose of acknowledged events, or None when nothing but a crash of
    its host can.

    >>> durability_warning({"appendonly": "yes", "appendfsync": "no"}) is None
    True
    >>> durability_warning({"appendonly": "no", "appendfsync": "everysec"})[:40]
    'Redis keeps no append-only file (appendo'
    """
    if config.get("appendonly") != "yes":
        return ("Redis keeps no append-only file (appendonly no): a restart of Redis loses "
                "acknowledged events, from its last snapshot on")
    if config.get("appendfsync") == "everysec":
        return ("Redis fsyncs its append-only file every second (appendfsync everysec): while "
                "that fsync is slow, Redis holds writes back for up to 2 s, so a crash of Redis "
                "can lose acknowledged events; `appendfsync no` with an fsync once a second "
                "beside it does not (see docker/redis.conf)")
    return None


async def read_durability(redis: aioredis.Redis) -> dict[str, str] | None:
    """``appendonly`` and ``appendfsync`` of the server, or None where CONFIG is refused
    (managed services rename it) or the server is not answering yet."""
    try:
        config: dict[str, str] = {}
        for name in ("appendonly", "appendfsync"):
            reply = await redis.config_get(name)
            config.update((_text(k), _text(v)) for k, v in reply.items())
        return config
    except (aioredis.ResponseError, aioredis.ConnectionError, aioredis.TimeoutError):
        return None


async def read_memory(redis: aioredis.Redis) -> tuple[int, int] | None:
    """(``used_memory``, ``maxmemory``) of the server in bytes (``maxmemory`` 0: no
    limit), or None when it does not answer or refuses INFO."""
    try:
        info = await redis.info("memory")
    except (aioredis.ResponseError, aioredis.ConnectionError, aioredis.TimeoutError, OSError):
        return None
    try:
        return int(info["used_memory"]), int(info.get("maxmemory", 0))
    except (KeyError, TypeError, ValueError):
        return None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
