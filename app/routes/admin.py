"""Operating the model: ``POST /admin/model`` serves another bundle without a restart
(hot reload, :mod:`app.live`), runs a shadow beside it (:mod:`app.shadow`), or promotes
the shadow."""

from __future__ import annotations

import os

from fastapi import APIRouter, Depends, Request, Response
from redis.exceptions import RedisError

from app.deps import StateDep, require
from app.errors import ServiceUnavailable
from app.live import bundle_path
from app.routes import JSON, json_response, media_type
from app.routes.events import read_body
from app.schemas import ModelChanged, parse_model_change

router = APIRouter(tags=["operations"])
#: Largest body of POST /admin/model (one path).
MAX_BODY_BYTES = 16 * 1024


@router.post("/admin/model", response_model=ModelChanged, dependencies=[Depends(require("admin"))],
             responses={409: {}, 422: {}, 503: {}})
async def change_model(request: Request, state: StateDep) -> Response:
    """Serve the bundle at ``bundle`` from now on, in every worker and replica on this Redis:
    as the live model, or with ``"role": "shadow"`` as its shadow (``"bundle": null``: no
    shadow); ``"promote": true`` makes the shadow the live model.

    This worker loads the bundle beside the live model, checks it (bundle.json's schema,
    its parity record, a featurizer the window store can feed), warms it up and swaps it
    in; requests in flight finish on the model they started with. A shadow scores the same
    windows after each answer is sent and changes no answer (app/shadow.py). The other
    workers follow within ``SEQGUARD_MODEL_POLL_S``. A bundle that fails a check is a 422
    naming each problem, and the models served stay as they were; promoting with no shadow
    is a 409.
    """
    media_type(request, (JSON,))
    change = parse_model_change(await read_body(request, MAX_BODY_BYTES))
    assert state.watch is not None
    base = bundle_path(state.settings)
    shadow_before = state.shadow.version if state.shadow is not None else None
    previous = state.live.version
    try:
        # BundleRefused: a 422, the models serving on. The record is written before
        # another load can start in this worker (app.live.ModelWatch.load).
        # Absolute: the record is read by workers and replicas whatever their directory.
        if change.promote:
            new = await state.watch.promote(publish=base)
        elif change.role == "shadow":
            shadow = await state.watch.load_shadow(
                None if change.bundle is None else os.path.abspath(change.bundle), publish=base)
            return json_response({"role": "shadow", "version": shadow.version if shadow else None,
                                  "previous": shadow_before, "bundle": shadow.path if shadow else None,
                                  "workers_follow_within_s": state.settings.model_poll_s})
        else:
            assert change.bundle is not None  # parse_model_change
            new = await state.watch.load(os.path.abspath(change.bundle), publish=base)
    except (RedisError, OSError):  # swapped in here, the record not written
        state.metrics.track_store_error()
        if change.promote:  # the shadow is gone here: a second promote would be a 409
            raise ServiceUnavailable(
                f"this worker serves {state.live.version} now, but Redis did not confirm the records the other "
                f"workers follow (they may still be written when Redis answers); to make sure, post "
                f'{{"bundle": "{state.live.path}"}} and {{"bundle": null, "role": "shadow"}}') from None
        raise ServiceUnavailable("this worker serves the change now, but Redis did not confirm the record the "
                                 "other workers follow (it may still be written when Redis answers); "
                                 "retry") from None
    return json_response({"role": "live", "version": new.version, "previous": previous, "bundle": new.path,
                          "workers_follow_within_s": state.settings.model_poll_s})
