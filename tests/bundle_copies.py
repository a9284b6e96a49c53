"""Real bundles for hot-reload tests: copies of the shipped bundle under another version
(the same ONNX model, so every copy serves), or broken on purpose through ``edit``."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from app.core.bundle import DEFAULT_BUNDLE


def bundle_copy(root: Path, version: str, edit: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """The shipped bundle under ``root / version`` with that ``model_version`` (and ``edit``
    applied to its bundle.json)."""
    out = root / version
    shutil.copytree(DEFAULT_BUNDLE, out, ignore=shutil.ignore_patterns("report"))
    meta = orjson.loads((out / "bundle.json").read_bytes())
    meta["model_version"] = version
    if edit is not None:
        edit(meta)
    (out / "bundle.json").write_bytes(orjson.dumps(meta))
    return out
