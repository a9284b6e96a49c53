"""Liveness, readiness, the loaded model, and Prometheus metrics."""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Depends, Response
from redis.exceptions import RedisError

from app.core.events import format_rfc3339_ms
from app.deps import StateDep, require
from app.redis_client import read_memory
from app.routes import json_response
from app.schemas import ModelInfo

router = APIRouter(tags=["operations"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {}})
async def readyz(state: StateDep) -> Response:
    """Readiness: the model is loaded and Redis answers."""
    try:
        redis_ok = bool(await state.redis.ping())
    except (RedisError, OSError):
        redis_ok = False
    body = {"status": "ready" if redis_ok else "unavailable", "model": state.live.version, "redis": redis_ok}
    return json_response(body, status_code=200 if redis_ok else 503,
                          headers=None if redis_ok else {"Retry-After": str(state.settings.retry_after_s)})


@router.get("/model", response_model=ModelInfo, dependencies=[Depends(require("events"))])
async def model_info(state: StateDep) -> dict[str, Any]:
    """The model this worker serves: version, architecture, window, thresholds, provider,
    vocabulary, where it was loaded from and when, and its shadow if one runs (each worker
    answers for itself)."""
    live = state.live
    meta = live.bundle.meta
    spec = live.bundle.spec
    arch = meta["architecture"]
    return {
        "version": live.version,
        "architecture": live.bundle.arch,
        "window": live.bundle.window,
        "thresholds": live.thresholds.as_dict(),
        "provider": live.model.provider,
        "precision": live.model.precision_used,
        "fp16": live.model.runs_fp16,
        "model_file": live.model.model_file,
        "bundle": live.path,
        "bundle_dir": live.resolved,
        "loaded_at": format_rfc3339_ms(round(live.loaded_at * 1000)),
        "worker_pid": os.getpid(),
        "created_at": meta.get("created_at"),
        "parameters": {k: arch[k] for k in ("d_model", "n_layers", "n_heads", "parameters") if k in arch},
        "evaluation": meta.get("evaluation") or {},
        "vocabulary": {"event_types": list(spec.event_types), "aliases": spec.aliases,
                       "deployment_aliases": state.settings.event_aliases},
        "shadow": None if (shadow := state.shadow) is None else {
            "version": shadow.version, "architecture": shadow.bundle.arch, "thresholds": shadow.thresholds.as_dict(),
            "provider": shadow.model.provider, "bundle": shadow.path,
            "loaded_at": format_rfc3339_ms(round(shadow.loaded_at * 1000))},
    }


@router.get("/metrics", include_in_schema=False)
async def metrics(state: StateDep) -> Response:
    """Prometheus text exposition."""
    # Redis's memory, read now: a scrape shows how close the store is to its limit. A Redis
    # that does not answer leaves the last values (and shows in readyz and the error counts).
    if (memory := await read_memory(state.redis)) is not None:
        state.metrics.set_redis_memory(*memory)
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)
