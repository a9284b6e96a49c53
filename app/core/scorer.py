"""The ONNX Runtime session of a bundle: CUDA first where it really loads, else CPU."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from app.core.bundle import MODEL_FILES, Bundle, BundleError

log = logging.getLogger("seqguard.scorer")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
#: The outputs every bundle's graph has, in this order.
_OUTPUTS = ["anomaly_probability", "surprise"]


@dataclass
class OnnxModel:
    """Runs ``features (B, T, F) int64 → (anomaly_probability, surprise)``, each (B, T)."""

    bundle: Bundle
    threads: int = 0  # 0 = ONNX Runtime's default (one per core)
    prefer_cuda: bool = True
    #: Asked for: fp32, fp16 or int8 (``MODEL_FILES``); a bundle without that file runs fp32
    #: (said in the log), and :attr:`precision_used` says what runs.
    precision: str = "fp32"
    session: ort.InferenceSession = field(init=False)
    provider: str = field(init=False)
    #: The bundle's model file this session runs (``model.onnx``, ``model.fp16.onnx`` or ``model.int8.onnx``).
    model_file: str = field(init=False)
    #: The precision of :attr:`model_file`.
    precision_used: str = field(init=False)
    #: Whether the graph has the ``feature_surprise`` output (bundles exported since reason
    #: codes; :meth:`run_explained`): read once, not per micro-batch.
    explains: bool = field(init=False)

    def __post_init__(self) -> None:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        wanted = [CUDA, CPU] if self.prefer_cuda and CUDA in ort.get_available_providers() else [CPU]
        if self.precision not in MODEL_FILES:
            raise BundleError(f"precision {self.precision!r}: one of {', '.join(MODEL_FILES)}")
        self.precision_used = self.precision if self.bundle.has_precision(self.precision) else "fp32"
        if self.precision_used != self.precision:
            log.warning("bundle %s has no %s model (%s); running fp32", self.bundle.version, self.precision,
                        MODEL_FILES[self.precision])
        path = self.bundle.model_path(self.precision_used)
        self.model_file = path.name
        # onnxruntime-gpu logs a failed CUDA load as an error of its own; it is not one for
        # us (CPU is a supported fallback), so it is reported once below, in our words.
        ort.set_default_logger_severity(4)
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=wanted)
        finally:
            ort.set_default_logger_severity(2)
        # What the session really got, not what was asked for: without CUDA libraries
        # onnxruntime-gpu silently falls back to the CPU.
        self.provider = self.session.get_providers()[0]
        self.explains = any(o.name == "feature_surprise" for o in self.session.get_outputs())
        if CUDA in wanted and self.provider != CUDA:
            _say_cpu_fallback_once()
        log.info("model %s (%s) on %s", self.bundle.version, path.name, self.provider)

    @property
    def runs_fp16(self) -> bool:
        """Whether the session runs ``model.fp16.onnx`` (fp16 asked for and the bundle has one)."""
        return self.precision_used == "fp16"

    @property
    def device(self) -> str:
        return "cuda" if self.provider == CUDA else "cpu"


    def run_explained(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`run` and ``feature_surprise`` (B, T, targets) float32: each predicted
        feature's share of the surprise (``bundle.meta["feature_surprise_targets"]``).
        Raises ``ValueError`` where the graph has no such output (:attr:`explains`)."""
        if not self.explains:
            raise ValueError(f"bundle {self.bundle.version} has no feature_surprise output")
        prob, surprise, per_feature = self.session.run([*_OUTPUTS, "feature_surprise"], {"features": features})
        return prob, surprise, per_feature

    def run(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(anomaly_probability, surprise), each (B, T) float32, of ``features`` (B, T, F)
        int64; a graph's other outputs (``feature_surprise``) are not asked for."""
        prob, surprise = self.session.run(_OUTPUTS, {"features": features})
        return prob, surprise


_fallback_said = False


def host_has_gpu() -> bool:
    """Whether this host shows an NVIDIA GPU to its kernel (a driver's device nodes)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return Path("/dev/nvidia0").exists() or (gpus.is_dir() and any(gpus.iterdir()))


def _say_cpu_fallback_once() -> None:
    """Running on the CPU though CUDA was asked for: information on a host with no GPU,
    a warning where a GPU is present (its CUDA libraries failed to load). Once a process."""
    global _fallback_said
    if _fallback_said:
        return
    _fallback_said = True
    if host_has_gpu():
        log.warning("this host has an NVIDIA GPU but the CUDA execution provider did not load "
                    "(CUDA or cuDNN libraries missing?); running on CPU")
    else:
        log.info("no GPU on this host; running on CPU")
