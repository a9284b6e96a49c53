"""Privacy requests (issue 9): a storefront answers a data subject's access request with
GET /users/{id}/window and an erasure request with DELETE /users/{id}; both need the admin
scope and are audit-logged with the user's keyed hash, never the raw id. Real Redis."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

import pytest
import redis

from app.windows import user_key_tag

from .e2e_support import T0, TestClient, event

KEYS = {"ev-key": ["events"], "admin-key": ["admin"]}
ADMIN = {"Authorization": "Bearer admin-key"}
EVENTS = {"Authorization": "Bearer ev-key"}
USER = "privacy.person@example.com"


@pytest.fixture
def secured(make_client: Callable[..., TestClient]) -> TestClient:
    return make_client(api_keys={hashlib.sha256(k.encode()).hexdigest(): s for k, s in KEYS.items()})


def _keys_of(redis_url: str, user_id: str) -> list[bytes]:
    with redis.Redis.from_url(redis_url) as r:
        return list(r.scan_iter(match=f"sg:{{{user_key_tag(user_id)}}}:*"))


def test_access_then_erasure(secured: TestClient, redis_url: str, caplog: pytest.LogCaptureFixture) -> None:
    evs = [event(f"pv-{i}", USER, T0 + 1000 * i, "pv", item_id=f"i{i}") for i in range(3)]
    for e in evs:
        assert secured.post("/events", json=e, headers=EVENTS).status_code == 200
    secured.post("/events", json=event("other-1", "someone-else", T0), headers=EVENTS)

    caplog.set_level(logging.INFO, logger="seqguard.audit")
    got = secured.get(f"/users/{USER}/window", headers=ADMIN)
    assert got.status_code == 200
    body = got.json()
    assert body["user_id"] == USER
    assert [e["event_id"] for e in body["events"]] == ["pv-0", "pv-1", "pv-2"]
    assert [e["timestamp"] for e in body["events"]] == [e["timestamp"] for e in evs]
    assert sorted(x["event_id"] for x in body["event_ids"]) == ["pv-0", "pv-1", "pv-2"]
    assert _keys_of(redis_url, USER)

    assert secured.delete(f"/users/{USER}", headers=ADMIN).status_code == 204
    assert _keys_of(redis_url, USER) == [], "every key of the user is gone"
    assert _keys_of(redis_url, "someone-else"), "and nobody else's"
    empty = secured.get(f"/users/{USER}/window", headers=ADMIN).json()
    assert empty == {"user_id": USER, "events": [], "event_ids": []}
    assert secured.delete(f"/users/{USER}", headers=ADMIN).status_code == 204  # again: harmless

    # Forgotten means forgotten: the same event is a new one now, on an empty window.
    again = secured.post("/events", json=evs[0], headers=EVENTS).json()
    assert again["duplicate"] is False and again["window_size"] == 1

    audit = [r for r in caplog.records if r.name == "seqguard.audit"]
    assert [r.audit for r in audit] == ["access", "erasure", "access", "erasure"]  # type: ignore[attr-defined]
    assert all(r.user_hash and USER not in r.getMessage() for r in audit)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("headers", "status"), [({}, 401), (EVENTS, 403)])
def test_privacy_routes_need_the_admin_scope(secured: TestClient, headers: dict[str, str], status: int) -> None:
    assert secured.get(f"/users/{USER}/window", headers=headers).status_code == status
    assert secured.delete(f"/users/{USER}", headers=headers).status_code == status


def test_a_user_id_longer_than_the_contract_is_422(secured: TestClient) -> None:
    r = secured.get("/users/" + "x" * 129 + "/window", headers=ADMIN)
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
