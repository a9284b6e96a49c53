"""The service's routers, one module per resource."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request, Response

from app.errors import UnsupportedMediaType

JSON = "application/json"


def json_response(body: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    """JSON bytes via orjson (numpy-aware), without a response-model pass."""
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status_code,
                    headers=headers, media_type="application/json")


def media_type(request: Request, accepted: tuple[str, ...] = (JSON,)) -> str:
    """The request's media type (lower case, parameters dropped), JSON when it sends none.

    Raises:
        UnsupportedMediaType: a declared type not in ``accepted`` (a ``+json`` suffix
            counts as JSON), e.g. curl's ``application/x-www-form-urlencoded`` when it
            is given ``-d`` without a content-type header.
    """
    declared = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not declared or declared.endswith("+json"):
        return JSON
    if declared not in accepted:
        raise UnsupportedMediaType(f"content-type {declared!r} is not accepted here; send {' or '.join(accepted)}")
    return declared
