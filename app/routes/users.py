"""Privacy requests about one user: what the store holds (access), and erasure.

Both need the ``admin`` scope and are audit-logged with the user's keyed hash
(``AppState.user_ref``), never the raw id. A storefront answers a data subject's access or
erasure request (GDPR art. 15 and 17) with them.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Response
from redis.exceptions import RedisError

from app.deps import StateDep, require
from app.errors import ServiceUnavailable
from app.routes import json_response

router = APIRouter(tags=["privacy"])
log = logging.getLogger("seqguard.audit")
UserIdPath = Annotated[str, Path(min_length=1, max_length=128, description="The user id as events carry it.")]


@router.get("/users/{user_id}/window", dependencies=[Depends(require("admin"))], responses={503: {}})
async def user_window(user_id: UserIdPath, state: StateDep) -> Response:
    """Access request: every event the window store keeps for this user (oldest first) and
    the event ids its idempotency records remember. A user never seen gets empty lists."""
    try:
        held: dict[str, Any] = await state.store.stored(user_id)
    except (RedisError, OSError):
        state.metrics.track_store_error()
        raise ServiceUnavailable("the window store is unavailable; retry") from None
    ref = state.user_ref(user_id)
    log.info("privacy access: user %s, %d events, %d event ids", ref, len(held["events"]), len(held["event_ids"]),
             extra={"user_hash": ref, "audit": "access"})
    return json_response({"user_id": user_id, **held})


@router.delete("/users/{user_id}", status_code=204, dependencies=[Depends(require("admin"))],
               responses={503: {}})
async def forget_user(user_id: UserIdPath, state: StateDep) -> Response:
    """Erasure request: remove every key of this user (window, arrival counter, idempotency
    records) at once. 204 whether or not anything was stored; a retry is harmless."""
    try:
        removed = await state.store.forget(user_id)
    except (RedisError, OSError):
        state.metrics.track_store_error()
        raise ServiceUnavailable("the window store is unavailable; nothing was erased, retry") from None
    ref = state.user_ref(user_id)
    log.info("privacy erasure: user %s, %d keys removed", ref, removed,
             extra={"user_hash": ref, "audit": "erasure"})
    return Response(status_code=204)
