"""What routes depend on: the app's typed state, and API-key scopes."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import Depends, Request

from app.errors import Forbidden, Unauthorized
from app.live import ModelWatch, Served
from app.metrics import Metrics
from app.settings import Scope, Settings
from app.windows import WindowStore


@dataclass
class AppState:
    """Everything the lifespan opens, exposed to routes as ``StateDep``. ``live`` is the
    model served now: a request reads it once and keeps it to its end (``app.live``)."""

    settings: Settings
    live: Served
    metrics: Metrics
    redis: aioredis.Redis
    store: WindowStore
    #: The shadow model, if one is served (``app.shadow``); read once, like ``live``.
    shadow: Served | None = None
    #: Swapped-out models finishing their queued windows (``app.live.swap``).
    retired: set[asyncio.Task[None]] = field(default_factory=set)
    #: The shadow's comparisons under way (``app.shadow.score_soon``).
    shadow_tasks: set[asyncio.Task[None]] = field(default_factory=set)
    #: This worker's follower of the live model's record (``app.live.ModelWatch``).
    watch: ModelWatch | None = None
    #: Backfills run here, one at a time, beside the online batcher's own thread.
    batch_executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="backfill"))

    def user_ref(self, user_id: str) -> str:
        """What the audit log of the privacy routes (app/routes/users.py) says instead of a
        user id: a keyed hash (``user_hash_key``), stable within a deployment."""
        key = self.settings.user_hash_key.encode()
        return hmac.new(key, user_id.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


async def get_state(request: Request) -> AppState:
    # async: a sync dependency would be sent to the thread pool on every request
    state: AppState = request.app.state.seqguard
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def authorize(request: Request, scope: Scope | None) -> None:
    """The request carries an API key with ``scope`` (any known key for ``None``) when keys
    are configured; raises 401 (no or an unknown key) or 403 (a key without the scope).
    Called inline by the hot routes, as a dependency elsewhere."""
    keys = request.app.state.seqguard.settings.api_keys
    if not keys:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing bearer API key")
    scopes = keys.get(hashlib.sha256(token.strip().encode()).hexdigest())
    if scopes is None:
        raise Unauthorized("unknown API key", error="invalid_token")
    if scope is not None and scope not in scopes and "admin" not in scopes:
        raise Forbidden(f"this API key lacks the '{scope}' scope")


@dataclass(frozen=True)
class ScopeCheck:
    """Dependency: :func:`authorize` for ``scope``. An object rather than a closure so that
    the OpenAPI document can tell which scope a route needs (``app.openapi``)."""

    scope: Scope

    async def __call__(self, request: Request) -> None:
        authorize(request, self.scope)


def require(scope: Scope) -> ScopeCheck:
    """Dependency: ``Depends(require("batch"))``."""
    return ScopeCheck(scope)


async def docs_access(request: Request) -> None:
    """Dependency of ``/docs``, ``/redoc`` and ``/openapi.json``: open, except in prod, where
    they need a known API key of any scope (401 without one)."""
    if request.app.state.seqguard.settings.environment == "prod":
        authorize(request, None)
