"""`seqguard export`: a trained run → a servable bundle (ONNX + bundle.json + report/)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnx
import orjson
import torch
from torch import Tensor, nn

from app.core.bundle import MODEL_FILES, SCHEMA_VERSION
from app.core.features import FEATURES
from app.core.progress import OnStep, Steps
from model_export import parity
from model_export.dataset import TrainConfig, load_prepared, prepare
from model_export.model import Detector
from model_export.train import load_run

log = logging.getLogger("seqguard.export")
OPSET = 17
#: Each output's axes in bundle.json (``targets``: the features of ``feature_surprise_targets``).
_OUTPUT_AXES = {"anomaly_probability": ["batch", "time"], "surprise": ["batch", "time"],
                "feature_surprise": ["batch", "time", "targets"]}


class _Exported(nn.Module):
    """The graph the service runs: features → (anomaly_probability, surprise)."""

    def __init__(self, model: Detector) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.model(features)
        return out["anomaly_probability"], out["surprise"], out["feature_surprise"]


def to_onnx(model: Detector, path: Path) -> None:
    """Export with dynamic batch and time axes (opset 17)."""
    card = model.cfg.cardinalities
    gen = torch.Generator().manual_seed(0)
    dummy = torch.stack([torch.randint(1, c, (2, model.cfg.window), generator=gen) for c in card], dim=-1)
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated but exports this graph exactly (parity is
        # checked right after); its deprecation, tracer and constant-folding notices are
        # expected here and nowhere else.
        warnings.simplefilter("ignore")
        _export(model, dummy, path)
    onnx.checker.check_model(onnx.load(str(path)))


def _export(model: Detector, dummy: Tensor, path: Path) -> None:
    torch.onnx.export(
        _Exported(model).eval(),  # export restores the wrapper's mode afterwards: keep it eval
        (dummy,),
        str(path),
        input_names=["features"],
        output_names=list(parity.OUTPUTS),
        dynamic_axes={"features": {0: "batch", 1: "time"},
                      "anomaly_probability": {0: "batch", 1: "time"},
                      "surprise": {0: "batch", 1: "time"},
                      "feature_surprise": {0: "batch", 1: "time"}},
        opset_version=OPSET,
        dynamo=False,
    )


def to_fp16(src: Path, dst: Path) -> None:
    """fp16 weights and compute for the GPU, fp32 inputs/outputs kept."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with warnings.catch_warnings():
        # onnxruntime marks its converter deprecated in favour of a package we do not
        # ship; it still does exactly this job, and parity is measured on its output.
        warnings.simplefilter("ignore", DeprecationWarning)
        m16 = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save(m16, str(dst))


def to_int8(src: Path, dst: Path) -> None:
    """int8 weights for CPUs: ONNX Runtime's dynamic quantization (``quantize_dynamic``:
    MatMul/Gemm weights stored as int8 per tensor, activations quantized at run time,
    fp32 inputs and outputs), after its pre-processing pass (graph optimisation; the
    symbolic shape inference is skipped, as it cannot follow the dynamic time axis).
    Source: https://onnxruntime.ai/docs/performance/model-optimizations/quantization.html"""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = dst.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_dynamic(str(pre), str(dst), weight_type=QuantType.QInt8)
    finally:
        pre.unlink(missing_ok=True)


def export(run_dir: Path, out: Path, *, fp16: bool = False, int8: bool = False, evaluate: bool = True,
           parity_windows: int = 512, force: bool = False, on_step: OnStep | None = None) -> dict[str, Any]:
    """Write the bundle ``out/`` from ``run_dir``; returns its ``bundle.json``. ``on_step``
    is told each step as it begins, after the run is loaded (ONNX export, parity checks,
    fp16 and int8 conversions, their decision agreement, report: :class:`app.core.progress.Steps`).

    ``int8`` writes ``model.int8.onnx`` (:func:`to_int8`) and records, beside its parity,
    how often its decisions agree with fp32's on every test event
    (:func:`model_export.parity.decision_agreement`), and whether that is within
    :data:`model_export.parity.VARIANT_TOLERANCE` (``parity.int8.within_tolerance``); so
    does ``fp16``.

    The bundle is built in a sibling directory and moved into place whole, so an export
    that fails (parity beyond tolerance, an interrupt) leaves ``out`` as it was, and one
    that succeeds leaves nothing of an older bundle behind (no stale report or fp16 model).

    Raises:
        FileExistsError: ``out`` exists and is not an empty directory, and not ``force``.
        RuntimeError: fp32 parity between PyTorch and ONNX Runtime beyond tolerance.
    """
    out = Path(out)
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} is not empty; pass --force to replace it")
    staging = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        variants = [v for v, wanted in (("fp16", fp16), ("int8", int8)) if wanted]
        meta = _build_bundle(Path(run_dir), staging, variants=variants, evaluate=evaluate,
                             parity_windows=parity_windows,
                             steps=Steps(2 + 3 * len(variants) + (1 if evaluate else 0), on_step))
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("bundle %s written to %s", meta["model_version"], out)
    return meta


def _build_bundle(run_dir: Path, out: Path, *, variants: list[str], evaluate: bool, parity_windows: int,
                  steps: Steps) -> dict[str, Any]:
    model, run = load_run(run_dir)
    cfg = TrainConfig.from_dict(run["train_config"])
    prep = load_prepared(run_dir, run)
    if prep is None:  # a run from before runs kept their splits: prepare them again
        src = run["training_data"]
        files = src.get("files") or [src]
        prep = prepare([Path(f["path"]) for f in files], src["format"], list(src["inject"]), cfg)
        for was, now in zip(files, prep.source["files"], strict=True):
            if was["sha256"] != now["sha256"]:
                raise RuntimeError(f"{was['path']} changed since training (sha256 differs)")

    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "model.onnx"
    steps.begin("export to ONNX")
    to_onnx(model, onnx_path)
    steps.begin("parity check (fp32)")
    windows = parity.held_out_windows(prep.features["test"], prep.splits["test"].user,
                                      parity_windows, cfg.window, cfg.seed)
    checks = {"fp32": parity.check(model, onnx_path, windows, parity.FP32_TOLERANCE)}
    convert = {"fp16": to_fp16, "int8": to_int8}
    for variant in variants:
        path = out / MODEL_FILES[variant]
        steps.begin(f"{variant} conversion")
        convert[variant](onnx_path, path)
        steps.begin(f"parity check ({variant})")
        checks[variant] = parity.check(model, path, windows, tolerance=None)

    meta: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "model_version": "",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "architecture": model.cfg.to_dict() | {"parameters": run["parameters"]},
        "window": model.cfg.window,
        "inputs": {"features": {"dtype": "int64", "shape": ["batch", "time", len(FEATURES)]}},
        "outputs": {k: {"dtype": "float32", "shape": _OUTPUT_AXES[k]} for k in parity.OUTPUTS},
        "feature_surprise_targets": list(model.cfg.targets),
        "opset": OPSET,
        "feature_spec": prep.spec.to_dict(),
        "supervised": run["supervised"],
        "calibration": run["calibration"],
        "thresholds": run["thresholds"],
        "training_data": _fingerprint(run["training_data"]),
        "training": {k: run[k] for k in ("train_config", "history", "best_val_criterion", "train_seconds")},
        "parity": checks,
        "evaluation": None,
    }
    meta["model_version"] = _version(onnx_path, meta)
    _write(out / "bundle.json", meta)
    for variant in variants:  # the bundle is loadable now: its variants against its fp32, event by event
        steps.begin(f"decision agreement ({variant} vs fp32, test users)")
        checks[variant]["decisions"] = parity.decision_agreement(out, variant, prep.splits["test"])
        _write(out / "bundle.json", meta)
    if evaluate:
        from model_export.evaluate import evaluate_bundle

        steps.begin("evaluation report")
        summary = evaluate_bundle(out, prep, out / "report")
        meta["evaluation"] = summary
        _write(out / "bundle.json", meta)
    steps.end()
    return meta


def _version(onnx_path: Path, meta: dict[str, Any]) -> str:
    h = hashlib.sha256(onnx_path.read_bytes())
    for key in ("feature_spec", "calibration", "thresholds"):
        h.update(orjson.dumps(meta[key], option=orjson.OPT_SORT_KEYS | orjson.OPT_SERIALIZE_NUMPY))
    return f"{meta['architecture']['arch']}-{h.hexdigest()[:12]}"


def _fingerprint(src: dict[str, Any]) -> dict[str, Any]:
    """What the bundle says of its training data: names and hashes, no local paths."""
    keep = ("name", "format", "sha256", "files", "inject", "splits", "load_report")
    out = {k: src[k] for k in keep if k in src}
    if "files" in out:
        out["files"] = [{k: v for k, v in f.items() if k != "path"}
                        | {"load_report": {k: v for k, v in f.get("load_report", {}).items() if k != "path"}}
                        for f in out["files"]]
    return out


def _write(path: Path, meta: dict[str, Any]) -> None:
    path.write_bytes(orjson.dumps(meta, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY) + b"\n")


__all__ = ["export", "to_fp16", "to_int8", "to_onnx"]
