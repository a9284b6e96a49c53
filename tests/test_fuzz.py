"""Property-based fuzzing of the service against its own OpenAPI document (schemathesis).

The app runs in-process over ASGI with its lifespan (the shipped model on ONNX Runtime, a
real Redis: the session's embedded server); every request carries an admin key, so the
cases reach the handlers. Valid and invalid requests, generated from the document, must
never get a 5xx, and every answer must be one the document lists for its operation, with
its content type and body schema. Bounded by example counts, derandomized: a CI gate that
does not flake, and that any divergence between the document and the service fails.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi import checks as openapi_checks

from app.main import create_app
from app.settings import Settings

KEY = "fuzz-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
#: Examples per generation mode, spread over the operations (a few seconds each on 2 cores).
EXAMPLES = 200
# Not negative_data_rejection: the service ignores unknown query parameters, as HTTP APIs do.
CHECKS = [
    schemathesis.checks.not_a_server_error,
    openapi_checks.status_code_conformance,
    openapi_checks.content_type_conformance,
    openapi_checks.response_schema_conformance,
]


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx: schemathesis.SerializationContext, value: Any) -> bytes:
    """The document gives an NDJSON body as the array of its lines' events."""
    lines = value if isinstance(value, list) else [value]
    return b"".join(json.dumps(v).encode() + b"\n" for v in lines)


@pytest.fixture
def schema(redis_url: str) -> schemathesis.BaseSchema:
    """The document as the app serves it; loading it starts the app's lifespan (stopped by
    schemathesis' pytest plugin when the test ends)."""
    app = create_app(Settings(redis_url=redis_url, inference_threads=1,
                              api_keys={hashlib.sha256(KEY.encode()).hexdigest(): ["admin"]}))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_no_5xx_and_only_documented_answers(schema: schemathesis.BaseSchema, mode: GenerationMode) -> None:
    seen: dict[str, set[int]] = {}

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=schema.as_strategy(generation_mode=mode))
    def fuzz(case: schemathesis.Case) -> None:
        response = case.call(headers=AUTH)
        seen.setdefault(case.operation.label, set()).add(response.status_code)
        case.validate_response(response, checks=CHECKS)

    fuzz()
    print(mode.value, {op: sorted(s) for op, s in seen.items()})
    if mode is GenerationMode.POSITIVE:
        # Every operation was reached, and valid requests were scored (past the key check).
        assert set(seen) == {"POST /events", "POST /batch-score", "GET /healthz", "GET /readyz", "GET /model",
                             "GET /users/{user_id}/window", "DELETE /users/{user_id}", "POST /admin/model"}, seen
        assert 200 in seen["POST /events"] and 200 in seen["POST /batch-score"], seen
    else:  # only operations with inputs have invalid ones
        assert set(seen) == {"POST /events", "POST /batch-score", "GET /model", "GET /users/{user_id}/window",
                             "DELETE /users/{user_id}", "POST /admin/model"}, seen
        assert 422 in seen["POST /events"] and 422 in seen["POST /batch-score"], seen
