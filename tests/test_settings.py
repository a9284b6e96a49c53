"""Settings refused at start say which variable to set (issue 9: the prod refusal named a
field, not the environment variable, and the README did not mention the hash key)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable

import pytest
import redis
from e2e.e2e_support import T0, TestClient, event
from pydantic import ValidationError

from app.settings import Settings
from app.windows import user_keys

KEYS = {hashlib.sha256(b"k").hexdigest(): ["admin"]}


def test_prod_needs_api_keys_named_as_the_variable() -> None:
    with pytest.raises(ValidationError, match="SEQGUARD_ENVIRONMENT=prod needs SEQGUARD_API_KEYS"):
        Settings(environment="prod")


def test_prod_needs_a_secret_user_hash_key_named_as_the_variable() -> None:
    with pytest.raises(ValidationError, match="needs a secret SEQGUARD_USER_HASH_KEY"):
        Settings(environment="prod", api_keys=KEYS)
    assert Settings(environment="prod", api_keys=KEYS, user_hash_key="s3cret").environment == "prod"


def test_the_minimum_rate_grace_follows_the_read_timeout_unless_set() -> None:
    """A fresh-user review: the README promised the grace defaults to the read timeout (so a
    stall that timeout allows is never cut by the rate), but it was a fixed 30 s."""
    from app.settings import Settings

    assert Settings().min_rate_grace_s == 30.0
    assert Settings(body_read_timeout_s=60.0).min_rate_grace_s == 60.0
    assert Settings(body_read_timeout_s=60.0, body_min_rate_grace_s=5.0).min_rate_grace_s == 5.0


def test_a_user_tag_key_over_64_bytes_is_refused_naming_the_variable_never_the_key() -> None:
    """BLAKE2b takes a key of at most 64 bytes; counted in UTF-8 (33 × "é" is 66 bytes)."""
    assert Settings(user_tag_key="é" * 32).user_tag_key == "é" * 32  # 64 bytes
    assert Settings().user_tag_key == ""  # unkeyed: the tags deployments have now
    for key in ("S3CRET" + "k" * 59, "S3CRET" + "é" * 30):
        with pytest.raises(ValidationError, match=r"SEQGUARD_USER_TAG_KEY is 6[56] bytes long") as e:
            Settings(user_tag_key=key)
        assert "S3CRET" not in str(e.value)  # pydantic's input_value=... would show it
    assert "top-secret" not in repr(Settings(user_tag_key="top-secret"))


def _tag_key_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "SEQGUARD_USER_TAG_KEY" in r.getMessage()]


def test_prod_warns_once_at_start_without_a_user_tag_key(make_client: Callable[..., TestClient],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Refusing to start would cost existing deployments their windows: prod warns instead."""
    caplog.set_level(logging.WARNING, logger="seqguard")
    make_client(environment="prod", api_keys=KEYS, user_hash_key="s3cret")  # started: the lifespan ran
    [warning] = _tag_key_warnings(caplog)
    assert "seqguard rekey" in warning and [r.levelname for r in caplog.records if r.getMessage() == warning] == [
        "WARNING"]
    caplog.clear()
    make_client(environment="prod", api_keys=KEYS, user_hash_key="s3cret", user_tag_key="t0p-s3cret")
    make_client()  # dev: no warning either
    assert _tag_key_warnings(caplog) == []


def test_the_service_keeps_users_under_its_user_tag_key(make_client: Callable[..., TestClient], redis_url: str) -> None:
    """The key reaches the window store of the service: events, access and erasure requests."""
    user, key, admin = "carol@example.com", "t0p-s3cret", {"Authorization": "Bearer k"}
    client = make_client(api_keys=KEYS, user_tag_key=key)
    for i in range(2):
        assert client.post("/events", json=event(f"e{i}", user, T0 + i), headers=admin).status_code == 200
    with redis.Redis.from_url(redis_url) as r:
        assert sorted(k.decode() for k in r.scan_iter(match="sg:{*")) == sorted(user_keys(user, key.encode()))
    assert [e["event_id"] for e in client.get(f"/users/{user}/window", headers=admin).json()["events"]] == ["e0", "e1"]
    assert client.post("/events", json=event("e0", user, T0), headers=admin).json()["duplicate"] is True
    assert client.delete(f"/users/{user}", headers=admin).status_code == 204
    with redis.Redis.from_url(redis_url) as r:
        assert list(r.scan_iter(match="sg:{*")) == []
