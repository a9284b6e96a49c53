"""Training: load → split by user → inject scenarios → fit the featurizer → train the
detector with validation early stopping → calibrate and choose thresholds on
validation data → write a run directory that `seqguard export` turns into a bundle.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sklearn.metrics import average_precision_score
from torch.nn import functional as F

from app.events import Events
from app.features import FeatureSpec, group_starts
from model_export.calibrate import choose_thresholds, fit_calibration
from model_export.data import read_events, split_by_user
from model_export.model import Detector, ModelConfig, count_parameters
from model_export.scenarios import InjectConfig, inject

log = logging.getLogger("seqguard.train")


@dataclass
class TrainConfig:
    arch: str = "transformer"
    window: int = 64
    lookback: int = 16
    epochs: int = 12
    seed: int = 7
    batch_size: int = 32
    chunk_len: int = 128  # events per training chunk: W-1 of context + the positions trained on
    lr: float = 2e-3
    weight_decay: float = 0.01
    aux_weight: float = 0.2  # weight of the next-event loss when labels exist
    patience: int = 3
    reinject: bool = True  # fresh scenario draws in the training users every epoch
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 128
    dropout: float = 0.1
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)
    fpr_targets: dict[str, float] = field(default_factory=lambda: {"review": 0.01, "block": 0.001})
    calibration: str = "auto"  # auto | platt | isotonic | tail
    threads: int = 0  # 0 = torch default

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """As stored in run.json / bundle.json (JSON lists back to tuples)."""
        kw: dict[str, Any] = {k: tuple(v) if k == "split" else v for k, v in d.items()}
        return cls(**kw)


@dataclass
class Prepared:
    """The three splits, labelled (injected or real labels) and featurized."""

    spec: FeatureSpec
    splits: dict[str, Events]  # train / val / test, each sorted by (user, time)
    features: dict[str, np.ndarray]  # split → (N, F) int64
    supervised: bool
    source: dict[str, Any]
    train_real: Events | None = None  # training users before injection
    inject_names: list[str] = field(default_factory=list)


def prepare(events_path: Path, fmt: str, inject_names: list[str], cfg: TrainConfig) -> Prepared:
    """Load, split by user, inject scenarios into each split separately, fit the spec."""
    events, report = read_events(events_path, fmt, dedupe=True, sort=True)  # logs its summary
    parts = dict(zip(("train", "val", "test"), split_by_user(events, cfg.split, seed=cfg.seed), strict=True))
    train_real = parts["train"]
    if inject_names:
        parts = {
            name: inject(ev, inject_names, InjectConfig(seed=cfg.seed * 10 + i))
            for i, (name, ev) in enumerate(parts.items())
        }
    supervised = parts["train"].label is not None and bool(parts["train"].label.any())
    train = parts["train"]
    normal = train.take(train.label == 0) if train.label is not None else train
    spec = FeatureSpec.fit(normal, window=cfg.window, lookback=cfg.lookback,
                           utc_offset_minutes=report.utc_offset_minutes)
    feats = {name: spec.transform(ev) for name, ev in parts.items()}
    source = {
        "path": str(events_path),
        "name": Path(events_path).name,
        "format": report.format,
        "inject": inject_names,
        "sha256": file_sha256(Path(events_path)),
        "load_report": {k: v for k, v in asdict(report).items() if k != "malformed_examples"},
        "splits": {
            name: {"events": len(ev), "users": int(np.unique(ev.user).size),
                   "anomalous_events": int(ev.label.sum()) if ev.label is not None else 0}
            for name, ev in parts.items()
        },
    }
    return Prepared(spec, parts, feats, supervised, source, train_real, list(inject_names))


def make_chunks(
    features: np.ndarray, groups: np.ndarray, labels: np.ndarray | None, chunk_len: int, window: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut grouped sequences into left-padded chunks of ``chunk_len`` rows.

    Every event is trained on exactly once, with its full W-1 events of context: a chunk
    carries up to W-1 rows of context before the positions it trains on.

    Returns (X (M, C, F) int64, y (M, C) float32, train_mask (M, C) bool).
    """
    stride = chunk_len - (window - 1)
    if stride < 1:
        raise ValueError("chunk_len must exceed window - 1")
    n = features.shape[0]
    starts = group_starts(groups)
    is_first = np.zeros(n, bool)
    is_first[np.unique(starts)] = True
    # Chunk k of a group trains rows [a + k·stride, a + (k+1)·stride).
    rank = np.arange(n) - starts
    seg_first = is_first | (rank % stride == 0)
    seg_start = np.flatnonzero(seg_first)
    seg_end = np.append(seg_start[1:], n)
    g_start = starts[seg_start]
    lo = np.maximum(g_start, seg_start - (window - 1))
    hi = seg_end  # exclusive
    idx = hi[:, None] - chunk_len + np.arange(chunk_len)[None, :]  # (M, C)
    inside = idx >= lo[:, None]
    x = features[np.clip(idx, 0, None)]
    x[~inside] = 0
    train_mask = idx >= seg_start[:, None]
    y = np.zeros(idx.shape, np.float32)
    if labels is not None:
        y = labels[np.clip(idx, 0, None)].astype(np.float32) * inside
    return x, y, train_mask


def train_model(prep: Prepared, cfg: TrainConfig, progress: bool = True) -> tuple[Detector, dict[str, Any]]:
    """Train with validation early stopping; returns the best model and its history."""
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    mcfg = ModelConfig(cardinalities=prep.spec.cardinalities, arch=cfg.arch, window=cfg.window,
                       d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                       d_ff=cfg.d_ff, dropout=cfg.dropout)
    model = Detector(mcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    data = {
        name: make_chunks(prep.features[name], prep.splits[name].user, prep.splits[name].label,
                          cfg.chunk_len, cfg.window)
        for name in ("train", "val")
    }
    pos_weight = _pos_weight(prep.splits["train"].label) if prep.supervised else 1.0
    history: list[dict[str, float]] = []
    best, best_state, bad = float("inf"), None, 0
    n_batches = -(-data["train"][0].shape[0] // cfg.batch_size)
    started = time.perf_counter()
    with _progress(progress) as bar:
        task = bar.add_task(f"train {cfg.arch}", total=cfg.epochs * n_batches)
        for epoch in range(cfg.epochs):
            model.train()
            if epoch and cfg.reinject and prep.inject_names and prep.train_real is not None:
                data["train"] = _reinjected(prep, cfg, epoch)
            x, y, m = data["train"]
            order = rng.permutation(x.shape[0])
            total = 0.0
            for i in range(0, len(order), cfg.batch_size):
                b = order[i : i + cfg.batch_size]
                loss, _ = _loss(model, x[b], y[b], m[b], prep.supervised, cfg.aux_weight, pos_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                total += float(loss.detach()) * len(b)
                bar.advance(task)
            val = evaluate_loss(model, data["val"], prep.supervised, cfg.aux_weight, pos_weight)
            history.append({"epoch": epoch + 1, "train_loss": total / len(order), **val})
            # Labels: stop on validation average precision (what the thresholds live on);
            # none: on the next-event loss.
            crit = -val["val_average_precision"] if prep.supervised else val["val_loss"]
            bar.console.log(f"epoch {epoch + 1}: train {total / len(order):.4f}  "
                            + "  ".join(f"{k} {v:.4f}" for k, v in val.items()))
            if crit < best - 1e-4:
                best, bad = crit, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
                if bad >= cfg.patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    info = {"history": history, "best_val_criterion": best, "parameters": count_parameters(model),
            "train_seconds": round(time.perf_counter() - started, 1), "model": mcfg.to_dict()}
    return model, info


@torch.no_grad()
def evaluate_loss(model: Detector, chunks: tuple[np.ndarray, np.ndarray, np.ndarray], supervised: bool,
                  aux_weight: float, pos_weight: float, batch: int = 256) -> dict[str, float]:
    model.eval()
    x, y, m = chunks
    tot, n = 0.0, 0
    parts: dict[str, float] = {}
    logits, labels = [], []
    for i in range(0, x.shape[0], batch):
        xb, yb, mb = x[i : i + batch], y[i : i + batch], m[i : i + batch]
        loss, comp = _loss(model, xb, yb, mb, supervised, aux_weight, pos_weight)
        k = xb.shape[0]
        tot, n = tot + float(loss) * k, n + k
        for key, v in comp.items():
            parts[key] = parts.get(key, 0.0) + v * k
        if supervised:
            keep = mb & (xb[..., 0] != 0)
            logits.append(model(torch.from_numpy(xb))["logit"].numpy()[keep])
            labels.append(yb[keep])
    out = {"val_loss": tot / max(n, 1), **{f"val_{k}": v / max(n, 1) for k, v in parts.items()}}
    if supervised:
        out["val_average_precision"] = float(average_precision_score(np.concatenate(labels),
                                                                     np.concatenate(logits)))
    return out


@torch.no_grad()
def score_splits(
    model: Detector, prep: Prepared, names: tuple[str, ...] = ("val",)
) -> dict[str, dict[str, np.ndarray]]:
    """Per-event logit, surprise and probability of each named split (PyTorch, exact windows)."""
    out = {}
    for name in names:
        x, _, m = make_chunks(prep.features[name], prep.splits[name].user, None, 256, model.cfg.window)
        res: dict[str, list[np.ndarray]] = {"logit": [], "surprise": [], "anomaly_probability": []}
        for i in range(0, x.shape[0], 128):
            o = model(torch.from_numpy(x[i : i + 128]))
            keep = m[i : i + 128] & (x[i : i + 128, :, 0] != 0)
            for k in res:
                res[k].append(o[k].numpy()[keep])
        out[name] = {k: np.concatenate(v) for k, v in res.items()}
    return out


def run(events_path: Path, fmt: str, inject_names: list[str], cfg: TrainConfig, out: Path,
        progress: bool = True) -> dict[str, Any]:
    """The whole of `seqguard train`. Returns the run summary written to run.json."""
    prep = prepare(events_path, fmt, inject_names, cfg)
    model, info = train_model(prep, cfg, progress)
    val = score_splits(model, prep)["val"]
    y_val = prep.splits["val"].label if prep.supervised else None
    kind = cfg.calibration if cfg.calibration != "auto" else ("platt" if prep.supervised else "tail")
    fit_calibration(model.calibration, kind, logit=val["logit"], surprise=val["surprise"], label=y_val)
    prob = score_splits(model, prep)["val"]["anomaly_probability"]
    normal = prob if y_val is None else prob[y_val == 0]
    thresholds = choose_thresholds(normal, cfg.fpr_targets)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"config": model.cfg.to_dict(), "state_dict": model.state_dict(),
                "calibration": model.calibration.describe()}, out / "model.pt")
    summary = {
        "train_config": asdict(cfg),
        "supervised": prep.supervised,
        "feature_spec": prep.spec.to_dict(),
        "calibration": model.calibration.describe(),
        "thresholds": thresholds,
        "training_data": prep.source,
        **info,
    }
    (out / "run.json").write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    return summary


def load_run(run_dir: Path) -> tuple[Detector, dict[str, Any]]:
    """The trained detector (eval mode, calibrated) and the run summary of a run directory."""
    summary = orjson.loads((run_dir / "run.json").read_bytes())
    ckpt = torch.load(run_dir / "model.pt", weights_only=False)
    model = Detector(ModelConfig.from_dict(ckpt["config"]))
    cal = ckpt["calibration"]
    model.calibration.set(cal["kind"], ab=(cal.get("a", 1.0), cal.get("b", 0.0)),
                          knots_x=cal.get("knots_x"), knots_y=cal.get("knots_y"))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), summary


def _reinjected(prep: Prepared, cfg: TrainConfig, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training chunks with a fresh draw of every scenario (seeds disjoint from val/test)."""
    assert prep.train_real is not None
    ev = inject(prep.train_real, prep.inject_names, InjectConfig(seed=cfg.seed * 10 + 1000 + epoch))
    return make_chunks(prep.spec.transform(ev), ev.user, ev.label, cfg.chunk_len, cfg.window)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _loss(model: Detector, x: np.ndarray, y: np.ndarray, m: np.ndarray, supervised: bool,
          aux_weight: float, pos_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    xt = torch.from_numpy(x)
    out = model(xt)
    mask = torch.from_numpy(m) & (xt[..., 0] != 0)  # (B, T) trained, real events
    yt = torch.from_numpy(y)
    normal = mask & (yt == 0)
    nll = (out["surprise"] * normal).sum() / normal.sum().clamp_min(1)
    if not supervised:
        return nll, {"nll": float(nll.detach())}
    bce = F.binary_cross_entropy_with_logits(
        out["logit"][mask], yt[mask], pos_weight=torch.tensor(pos_weight)
    )
    return bce + aux_weight * nll, {"nll": float(nll.detach()), "bce": float(bce.detach())}


def _pos_weight(label: np.ndarray | None) -> float:
    if label is None or not label.any():
        return 1.0
    pos = float(label.sum())
    return float(min(10.0, (label.size - pos) / pos))


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), disable=not enabled)
