"""Shared fixtures: a small real Taobao slice, and a detector trained and exported on it
once per test session through the real command line (real PyTorch, real ONNX Runtime)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from app.cli import cli

DATA = Path(__file__).resolve().parent / "data"
TAOBAO_100 = DATA / "taobao_100users.csv.gz"  # the first 100 users of the shared Taobao sample
WINDOW = 16  # small window: a fast session fixture that still exercises every code path


def invoke(*args: str | Path) -> str:
    """Run `seqguard ARGS`; fail the test with its output when it exits non-zero."""
    res = CliRunner().invoke(cli, [str(a) for a in args])
    if res.exit_code != 0:
        raise AssertionError(f"seqguard {' '.join(map(str, args))} → {res.exit_code}\n{res.output}\n{res.exception!r}")
    return res.output


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run_dir, bundle_dir) of a transformer trained on TAOBAO_100 with every scenario."""
    root = tmp_path_factory.mktemp("trained")
    run_dir, bundle = root / "run", root / "bundle"
    invoke("train", "--events", TAOBAO_100, "--format", "taobao", "--inject", "all", "--window", WINDOW,
           "--epochs", "2", "--seed", "3", "--out", run_dir)
    invoke("export", run_dir, "--out", bundle, "--fp16", "--int8")
    return run_dir, bundle


# ---------------------------------------------------------------------------------------
# Redis (issue #3): one real embedded redis-server per test session, flushed per test.
# Set SEQGUARD_TEST_REDIS_URL to run against another server instead (it is FLUSHALLed!).
# Tests create their asyncio clients inside asyncio.run(...) and close them there.
# ---------------------------------------------------------------------------------------
import os  # noqa: E402
from collections.abc import Iterator  # noqa: E402


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of the session's Redis: SEQGUARD_TEST_REDIS_URL, else an EmbeddedRedis in a tmp dir."""
    url = os.environ.get("SEQGUARD_TEST_REDIS_URL")
    if url:
        yield url
        return
    from app.embedded_redis import EmbeddedRedis

    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """URL of an empty database (FLUSHALL before the test)."""
    import redis

    with redis.Redis.from_url(redis_server) as client:
        client.flushall()
    return redis_server


# ---------------------------------------------------------------------------------------
# The service in process: TestClient(create_app(Settings(...))), lifespan run (model load,
# warm-up, Redis pool, batcher), on the flushed session Redis. Used by tests/ and tests/e2e/.
# ---------------------------------------------------------------------------------------
from collections.abc import Callable  # noqa: E402
from contextlib import ExitStack  # noqa: E402
from typing import Any  # noqa: E402

from e2e.e2e_support import TestClient  # noqa: E402


@pytest.fixture
def make_client(redis_url: str) -> Iterator[Callable[..., TestClient]]:
    """Factory of started TestClients on the flushed session Redis (keyword arguments
    override Settings; ``redis_url=`` points one elsewhere)."""
    from app.main import create_app
    from app.settings import Settings

    with ExitStack() as stack:

        def make(**overrides: Any) -> TestClient:
            settings = Settings(**{"redis_url": redis_url, "inference_threads": 1} | overrides)
            return stack.enter_context(TestClient(create_app(settings)))

        yield make


@pytest.fixture
def client(make_client: Callable[..., TestClient]) -> TestClient:
    """The service with default settings on an empty Redis."""
    return make_client()
