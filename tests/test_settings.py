"""Settings refused at start say which variable to set (issue 9: the prod refusal named a
field, not the environment variable, and the README did not mention the hash key)."""

from __future__ import annotations

import hashlib

import pytest
from pydantic import ValidationError

from app.settings import Settings

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
