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
