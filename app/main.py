"""`create_app(settings)`: the service. The lifespan loads the bundle and its ONNX Runtime
session (warmed up on every shape it will use), opens the Redis pool (or starts an
embedded Redis), starts the micro-batcher, and closes all of them on the way out."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.routing import APIRoute
from redis.asyncio import Redis

from app import errors, openapi, serving
from app.core import logs
from app.deps import AppState
from app.embedded_redis import EmbeddedRedis
from app.live import (
    ModelWatch,
    bundle_path,
    follow_record,
    ignore_sighup_until_serving,
    load_served,
    on_sighup,
    set_shadow,
    start_shadow,
)
from app.metrics import Metrics, mark_process_dead
from app.middleware import DirectRoutes, LingeringClose, RequestMetrics
from app.redis_client import connect, durability_warning, read_durability
from app.routes import admin, backfill, events, meta, users
from app.settings import Settings, tag_key
from app.windows import WindowStore

log = logging.getLogger("seqguard")


async def log_durability(redis: Redis) -> None:
    """Say in the log what a crash of the window store can lose of acknowledged events."""
    config = await read_durability(redis)
    if config is None:
        log.info("Redis persistence unknown (CONFIG refused, or Redis not answering yet)")
    elif (warning := durability_warning(config)) is not None:
        log.warning("%s", warning)
    else:
        log.info("Redis persistence: appendonly %s, appendfsync %s",
                 config.get("appendonly"), config.get("appendfsync"))


def create_app(settings: Settings) -> FastAPI:
    """The seqguard service for ``settings``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # POST /events and /batch-score both score through this bundle's spec, so both take
        # the deployment's aliases. A bad bundle or threshold override stops the start here.
        metrics = Metrics()
        base = bundle_path(settings)
        served = load_served(base, settings, metrics)  # the checks a reload passes (BundleRefused)
        embedded = None
        url = settings.redis_url
        if url is None:
            embedded = EmbeddedRedis(settings.redis_data_dir, maxmemory=settings.redis_maxmemory)
            embedded.start()
            url = embedded.url
            log.info("embedded Redis (append-only) at %s, data in %s", url, settings.redis_data_dir)
        redis = connect(url, pool_size=settings.redis_pool_size, timeout_s=settings.redis_timeout_s)
        await log_durability(redis)
        store = WindowStore(redis, history=served.bundle.spec.history, window_ttl_s=settings.window_ttl_s,
                            idempotency_ttl_s=settings.idempotency_ttl_s,
                            on_answer_error=lambda e: metrics.track_store_error(),
                            tag_key=tag_key(settings.user_tag_key, "SEQGUARD_USER_TAG_KEY"))
        for warning in settings.warnings():
            log.warning("%s", warning)
        served, applied = await follow_record(redis, served, base, settings, metrics, store.history)
        shadow, shadow_applied = await start_shadow(redis, base, settings, metrics, store.history)
        await served.batcher.start()
        metrics.set_model_info(served.version, served.model.provider, served.bundle.arch)
        state = app.state.seqguard = AppState(settings=settings, live=served, metrics=metrics, redis=redis,
                                              store=store)
        await set_shadow(state, shadow)
        state.watch = ModelWatch(state, settings.model_poll_s)
        state.watch.applied = applied
        state.watch.shadow_applied = shadow_applied
        state.watch.start()
        on_sighup(state.watch)
        t = served.thresholds
        log.info("serving %s (%s, window %d) on %s; thresholds review %.4g block %.4g",
                 served.version, served.bundle.arch, served.bundle.window, served.model.provider, t.review, t.block)
        serving.share_the_gil(settings)  # live requests first, beside a backfill's thread
        try:
            yield
        finally:
            await state.watch.stop()
            await state.live.batcher.stop()
            await set_shadow(state, None)  # its comparisons under way end with it (counted as dropped)
            for task in list(state.retired):
                await task
            state.batch_executor.shutdown(wait=True)
            await store.flush_answers()
            await redis.aclose()
            await redis.connection_pool.aclose()
            if embedded is not None:
                embedded.stop()
            mark_process_dead(os.getpid())  # multiprocess metrics: drop this worker's live gauges

    app = FastAPI(
        title="seqguard",
        summary="Real-time anomaly scoring of user event sequences.",
        version="0.1.0",
        lifespan=lifespan,
        # Served by app.openapi: a complete document, and pages with local assets.
        openapi_url=None, docs_url=None, redoc_url=None,
    )
    problems = errors.Problems(retry_after_s=settings.retry_after_s)
    errors.install(app, problems)
    for router in (events.router, backfill.router, meta.router, users.router, admin.router):
        app.include_router(router)
    openapi.install(app, settings)
    # POST /events, included above without a prefix or router dependencies.
    hot = [r for r in events.router.routes if isinstance(r, APIRoute) and r.endpoint is events.post_events]
    app.add_middleware(DirectRoutes, routes=hot, problems=problems)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(RequestMetrics)
    # Outermost: answers given before the body was read reach clients that send it all first.
    app.add_middleware(LingeringClose, max_bytes=settings.linger_max_bytes, timeout_s=settings.linger_timeout_s)
    return app


def app_from_env() -> FastAPI:
    """uvicorn factory for `seqguard serve` workers: settings from the environment."""
    ignore_sighup_until_serving()
    settings = Settings()
    logs.setup(settings.log_level, settings.log_format)
    return create_app(settings)
