"""End-to-end fixtures: the service as a user sees it, over HTTP, on the shipped default
bundle (real ONNX Runtime) and a real Redis (the session's embedded redis-server, flushed
per test, or a server of the test's own that it can stop and restart).

- ``make_client(**settings)`` and ``client`` (tests/conftest.py): the app in process.
- ``live_server(redis_url, workers=N)``: ``python -m app.cli serve`` on a free loopback
  port, for what only a real server shows (several workers, Redis dying under it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app.core.bundle import DEFAULT_BUNDLE, load_bundle
from app.metrics import MULTIPROC_ENV

from .e2e_support import LiveServer


@pytest.fixture(scope="session")
def bundle_meta() -> dict[str, Any]:
    """bundle.json of the shipped default bundle (what the service loads by default)."""
    b = load_bundle(DEFAULT_BUNDLE)
    return {"version": b.version, "arch": b.arch, "window": b.window, "history": b.spec.history,
            "thresholds": b.thresholds.as_dict()}


@pytest.fixture(autouse=True, scope="session")
def _single_process_metrics() -> None:
    # The in-process apps use a registry of their own; multiprocess mode is for `serve --workers`.
    assert not os.environ.get(MULTIPROC_ENV), f"unset {MULTIPROC_ENV} to run the e2e tests"


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """Factory of started live servers, stopped after the test."""
    servers: list[LiveServer] = []

    def start(redis_url: str | None, **kw: Any) -> LiveServer:
        server = LiveServer(redis_url, tmp_path, **kw)
        servers.append(server)
        return server.start()

    yield start
    for s in servers:
        s.stop()
