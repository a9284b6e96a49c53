"""Lua scripts run with EVALSHA, many callers' calls batched into one pipeline.

Knows nothing of what the scripts do (the window store, :mod:`app.windows`, owns them
and their keys). A :class:`ScriptPipeline` sends every :class:`ScriptCall` issued in one
turn of the event loop in one pipeline, loads scripts Redis does not know (NOSCRIPT:
a restarted or flushed Redis) and runs their calls again, and raises Redis's "cannot
serve now" replies (OOM, READONLY, ...) as ``ConnectionError``, which the service answers
with 503.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any, NamedTuple, NoReturn

import redis.asyncio as aioredis
from redis import exceptions as rexc

# Replies that mean "Redis cannot take writes right now": the caller answers 503.
_UNAVAILABLE = ("OOM", "READONLY", "BUSY", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "LOADING", "NOREPLICAS")


class Script:
    """A Lua script and its SHA1, the name EVALSHA calls it by."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()


class ScriptCall(NamedTuple):
    """One EVALSHA: the script, its KEYS and its ARGV."""

    script: Script
    keys: tuple[str, ...]
    args: tuple[str | bytes | int, ...]


class ScriptPipeline:
    """Runs script calls on ``redis``, the calls of concurrent callers in one pipeline.

    Parameters
    ----------
    redis : an asyncio client.
    name : what the scripts serve, for the unavailable error ("<name> unavailable: ...")
        and the flush tasks' name.
    """

    def __init__(self, redis: aioredis.Redis, *, name: str) -> None:
        self.redis = redis
        self.name = name
        self._queued: list[tuple[list[ScriptCall], asyncio.Future[list[Any]]]] = []
        self._flush_due = False
        self._flushes: set[asyncio.Task[None]] = set()

    async def run(self, calls: list[ScriptCall]) -> list[Any]:
        """Run script calls; replies in order. Calls of concurrent callers issued in the
        same turn of the event loop go to Redis together, in one pipeline: redis-py spends
        about 0.1 ms of CPU per command sent alone and a third of that per command in a
        pipeline. No caller waits for another: the pipeline leaves on the next turn."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queued.append((calls, future))
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._start_flush)
        return await future

    def _start_flush(self) -> None:
        self._flush_due = False
        queued, self._queued = self._queued, []
        task = asyncio.create_task(self._flush(queued), name=f"{self.name.replace(' ', '-')}-pipeline")
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self, queued: list[tuple[list[ScriptCall], asyncio.Future[list[Any]]]]) -> None:
        try:
            replies = await self._pipeline([c for calls, _ in queued for c in calls])
        except BaseException as e:  # the connection: every caller gets it (a retry is safe)
            for _, future in queued:
                if not future.done():
                    future.set_exception(e)
            if not isinstance(e, Exception):
                raise
            return
        i = 0
        for calls, future in queued:
            mine, i = replies[i : i + len(calls)], i + len(calls)
            if future.done():  # the caller is gone (cancelled); its calls ran all the same
                continue
            failed = next((r for r in mine if isinstance(r, Exception)), None)
            if failed is None:
                future.set_result(mine)
            else:
                try:
                    self._reraise(failed)
                except Exception as e:
                    future.set_exception(e)

    async def _pipeline(self, calls: list[ScriptCall]) -> list[Any]:
        """EVALSHA the calls in one pipeline; replies in order, error replies as exceptions.
        Calls that met NOSCRIPT (a restarted or flushed Redis) run again once the scripts
        are loaded. Each call is atomic and independent of the others; a NOSCRIPT fails
        every call of its script in the pipeline, so re-running them keeps their order."""
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            async with self.redis.pipeline(transaction=False) as pipe:
                for i in todo:
                    c = calls[i]
                    pipe.evalsha(c.script.sha, len(c.keys), *c.keys, *c.args)
                out = await pipe.execute(raise_on_error=False)
            missing: list[int] = []
            for i, r in zip(todo, out, strict=True):
                if isinstance(r, rexc.NoScriptError) and attempt == 0:
                    missing.append(i)
                else:
                    replies[i] = r
            if not missing:
                break
            for script in {calls[i].script.sha: calls[i].script for i in missing}.values():
                await self.redis.script_load(script.source)
            todo = missing
        return replies

    def _reraise(self, exc: Exception) -> NoReturn:
        """Raise Redis's "cannot serve now" replies as ConnectionError (503 upstream); other
        errors (a bug, or already a ConnectionError/TimeoutError) as they are."""
        if isinstance(exc, rexc.ResponseError) and _unavailable(exc):
            raise rexc.ConnectionError(f"{self.name} unavailable: {exc}") from exc
        raise exc


def _unavailable(exc: rexc.ResponseError) -> bool:
    # redis-py maps some codes to classes and drops the code from the message (Redis 7
    # refuses a script with OOM before it runs); inside a script (Redis 6) the reply
    # arrives wrapped: "Error running script ...: -OOM command not allowed ..."
    if isinstance(exc, rexc.OutOfMemoryError | rexc.ReadOnlyError | rexc.BusyLoadingError
                  | rexc.ClusterDownError | rexc.TryAgainError):  # MasterDownError is a ClusterDownError
        return True
    msg = str(exc)
    return msg.split(" ", 1)[0].upper() in _UNAVAILABLE or any(f"-{code} " in msg for code in _UNAVAILABLE)
