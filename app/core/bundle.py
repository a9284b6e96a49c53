"""The model bundle on disk: `model.onnx` (+ optional `model.fp16.onnx`, `model.int8.onnx`), `bundle.json`
and `report/`. The service never re-declares what the bundle knows."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from app.core.decisions import Thresholds
from app.core.features import FeatureSpec

SCHEMA_VERSION = 2
DEFAULT_BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "default"


class BundleError(RuntimeError):
    """A bundle directory that cannot be served."""


@dataclass(frozen=True)
class Bundle:
    path: Path
    meta: dict[str, Any]
    spec: FeatureSpec

    @property
    def version(self) -> str:
        return str(self.meta["model_version"])

    @property
    def arch(self) -> str:
        return str(self.meta["architecture"]["arch"])

    @property
    def window(self) -> int:
        return int(self.meta["window"])

    @property
    def thresholds(self) -> Thresholds:
        """The review and block thresholds of ``bundle.json`` (which also says how they
        were chosen)."""
        return Thresholds.from_mapping(self.meta["thresholds"])

    def with_aliases(self, extra: Mapping[str, str] | None) -> Bundle:
        """This bundle with a deployment's event type aliases on top of its spec's table."""
        return replace(self, spec=self.spec.with_aliases(dict(extra))) if extra else self

    def model_path(self, precision: str = "fp32") -> Path:
        """The model file of ``precision`` (:data:`MODEL_FILES`). Raises BundleError where
        the bundle has none (fp16 and int8 are written only on request: ``seqguard export
        --fp16 / --int8``)."""
        if precision not in MODEL_FILES:
            raise BundleError(f"precision {precision!r}: one of {', '.join(MODEL_FILES)}")
        p = self.path / MODEL_FILES[precision]
        if not p.is_file():
            raise BundleError(f"{p}: missing")
        return p

    def has_precision(self, precision: str) -> bool:
        """Whether the bundle has a model file of ``precision``."""
        return precision in MODEL_FILES and (self.path / MODEL_FILES[precision]).is_file()


#: The model file of each precision a bundle may carry: fp32 always; fp16 (weights and
#: compute, for GPUs) and int8 (ONNX Runtime dynamic quantization, for CPUs) on request.
MODEL_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
#: The longest window a bundle may declare (the batcher warms every padded length up to it).
MAX_WINDOW = 1024
#: The largest bundle.json read (a real one is about 20 KB).
MAX_META_BYTES = 16 << 20


def load_bundle(path: Path | str | None = None) -> Bundle:
    """Read ``bundle.json`` of a bundle directory (default: the shipped bundle).

    Raises:
        BundleError: not a directory, no (or an oversized, unreadable, non-JSON)
            ``bundle.json``, another schema version, or a window the feature spec does not
            share or past :data:`MAX_WINDOW`; one line naming the file and the problem.
    """
    root = Path(path) if path is not None else DEFAULT_BUNDLE
    if not root.is_dir():
        raise BundleError(f"{root}: {'not a directory' if root.exists() else 'no such directory'}")
    meta_path = root / "bundle.json"
    if not meta_path.is_file():
        raise BundleError(f"{root}: no bundle.json (build one with `seqguard export`)")
    if meta_path.stat().st_size > MAX_META_BYTES:
        raise BundleError(f"{meta_path}: {meta_path.stat().st_size} bytes, not a bundle.json")
    try:
        meta = orjson.loads(meta_path.read_bytes())
    except orjson.JSONDecodeError as e:
        raise BundleError(f"{meta_path}: not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_path}: not a JSON object")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise BundleError(f"{meta_path}: schema_version {meta.get('schema_version')}, expected {SCHEMA_VERSION}")
    try:
        spec = FeatureSpec.from_dict(meta["feature_spec"])
        window = meta["window"]
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{meta_path}: no usable feature_spec or window ({type(e).__name__}: {e})") from None
    if window != spec.window or not isinstance(window, int) or not 1 <= window <= MAX_WINDOW:
        raise BundleError(f"{meta_path}: window {window!r} must equal feature_spec.window ({spec.window}) "
                          f"and lie in 1..{MAX_WINDOW}")
    return Bundle(root, meta, spec)
