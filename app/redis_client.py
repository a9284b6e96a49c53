"""The service's Redis client: a ``redis.asyncio`` blocking connection pool with hiredis
parsing replies and packing commands."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.connection import HiredisRespSerializer
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
    by ``timeout_s``; a failed command is retried once after 10 ms, not redis-py's
    default backoff of seconds: an outage must turn into a prompt 503 + ``Retry-After``,
    and the client retries (event ids make that safe)."""
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=pool_size, timeout=timeout_s, socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s, retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1),
    )
    if HIREDIS_AVAILABLE:
        base = pool.connection_class
        pool.connection_class = type(f"Hiredis{base.__name__}", (_HiredisPacking, base), {})
    return aioredis.Redis(connection_pool=pool)
