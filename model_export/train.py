"""Training: the prepared dataset (:mod:`model_export.dataset`: load → split by user →
inject scenarios → fit the featurizer) → train the detector with validation early
stopping → calibrate and choose thresholds on validation data → write a run directory
that `seqguard export` turns into a bundle.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch
from sklearn.metrics import average_precision_score
from torch.nn import functional as F

from app.core.decisions import Thresholds
from app.core.features import Padding, chunk_segments
from app.core.progress import bars as _progress
from app.core.vocabulary import CANONICAL, canonical_names
from model_export.calibrate import choose_thresholds, fit_calibration
from model_export.dataset import PREPARED_FILE, Prepared, TrainConfig, prepare, save_prepared
from model_export.model import Detector, ModelConfig, count_parameters
from model_export.scenarios import InjectConfig, inject

log = logging.getLogger("seqguard.train")


def novel_types(prep: Prepared, cfg: TrainConfig) -> tuple[int, ...]:
    """Event type ids no training event has, when no unknown types are taught
    (``unknown_type_rate == 0``): the model holds them impossible as a next event
    (``ModelConfig.novel_types``). Otherwise none: every id the model can see was taught.

    Returns: sorted ids in [0, cardinality of ``event_type``), padding and unknown included.
    """
    if cfg.unknown_type_rate > 0:
        return ()
    seen = np.unique(prep.features["train"][:, 0])
    return tuple(int(i) for i in np.setdiff1d(np.arange(prep.spec.cardinalities[0]), seen))


def make_chunks(
    features: np.ndarray, groups: np.ndarray, labels: np.ndarray | None, chunk_len: int, window: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut grouped sequences into left-padded chunks of ``chunk_len`` rows.

    Every event is trained on exactly once, with its full W-1 events of context: a chunk
    carries up to W-1 rows of context before the positions it trains on. The chunks are
    the batch engine's (:func:`app.core.features.chunk_segments`), so training sees each event
    on the window it is scored on.

    Returns (X (M, C, F) int64, y (M, C) float32, train_mask (M, C) bool).
    """
    seg = chunk_segments(groups, window, chunk_len)
    x = seg.windows(features, chunk_len)  # (M, C, F), padding 0 before each chunk's context
    idx = seg.positions(chunk_len)  # (M, C)
    train_mask = seg.scored(chunk_len)
    y = np.zeros(idx.shape, np.float32)
    if labels is not None:
        y = labels[np.clip(idx, 0, None)].astype(np.float32) * (idx >= seg.context[:, None])
    return x, y, train_mask


def train_model(prep: Prepared, cfg: TrainConfig, progress: bool = True) -> tuple[Detector, dict[str, Any]]:
    """Train with validation early stopping; returns the best model and its history."""
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    mcfg = ModelConfig(cardinalities=prep.spec.cardinalities, arch=cfg.arch, window=cfg.window,
                       d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                       d_ff=cfg.d_ff, dropout=cfg.dropout, novel_types=novel_types(prep, cfg),
                       surprise_span=(max(1, cfg.window // 4) if cfg.surprise_span is None else cfg.surprise_span)
                       if prep.supervised else 1)
    model = Detector(mcfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    train = prep.splits["train"]
    data = {
        "train": make_chunks(with_unknown_types(prep.features["train"], train.label, cfg.unknown_type_rate, rng),
                             train.user, train.label, cfg.chunk_len, cfg.window),
        "val": make_chunks(prep.features["val"], prep.splits["val"].user, prep.splits["val"].label,
                           cfg.chunk_len, cfg.window),
    }
    pos_weight = _pos_weight(prep.splits["train"].label) if prep.supervised else 1.0
    history: list[dict[str, float]] = []
    best, best_state, bad = float("inf"), None, 0
    tokens = cfg.batch_size * cfg.chunk_len
    max_rows = cfg.max_batch_rows
    n_batches = len(length_batches(data["train"][0], tokens, max_rows=max_rows))
    started = time.perf_counter()
    with _progress(progress) as bar:
        task = bar.add_task(f"train {cfg.arch}", total=cfg.epochs * n_batches)
        for epoch in range(cfg.epochs):
            model.train()
            if epoch and cfg.reinject and prep.inject_names and prep.train_real is not None:
                data["train"] = _reinjected(prep, cfg, epoch, rng)
            x, y, m = data["train"]
            total, n_chunks = 0.0, x.shape[0]
            for b, t in length_batches(x, tokens, rng, max_rows=max_rows):
                loss, _ = _loss(model, x[b, -t:], y[b, -t:], m[b, -t:], prep.supervised, cfg.aux_weight, pos_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                total += float(loss.detach()) * len(b)
                bar.advance(task)
            val = evaluate_loss(model, data["val"], prep.supervised, cfg.aux_weight, pos_weight, tokens)
            history.append({"epoch": epoch + 1, "train_loss": total / n_chunks, **val})
            # Labels: stop on validation average precision (what the thresholds live on);
            # none: on the next-event loss.
            crit = -val["val_average_precision"] if prep.supervised else val["val_loss"]
            log.info("epoch %d: train %.4f  %s", epoch + 1, total / n_chunks,
                     "  ".join(f"{k} {v:.4f}" for k, v in val.items()))
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
                  aux_weight: float, pos_weight: float, tokens: int = 32768) -> dict[str, float]:
    model.eval()
    x, y, m = chunks
    tot, n = 0.0, 0
    parts: dict[str, float] = {}
    logits, labels = [], []
    for b, t in length_batches(x, tokens):
        xb, yb, mb = x[b, -t:], y[b, -t:], m[b, -t:]
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
    keys = ("logit", "surprise", "recent_surprise", "anomaly_probability")
    for name in names:
        x, _, m = make_chunks(prep.features[name], prep.splits[name].user, None, 256, model.cfg.window)
        res: dict[str, list[np.ndarray]] = {k: [np.empty(0, np.float32)] * x.shape[0] for k in keys}
        for b, t in length_batches(x, 32768):
            o = model(torch.from_numpy(x[b, -t:]))
            keep = m[b, -t:] & (x[b, -t:, 0] != 0)
            for k in keys:
                values = o[k].numpy()
                for j, chunk in enumerate(b.tolist()):
                    res[k][chunk] = values[j][keep[j]]
        out[name] = {k: np.concatenate(v) if v else np.empty(0, np.float32) for k, v in res.items()}
    return out


def length_batches(x: np.ndarray, tokens: int, rng: np.random.Generator | None = None,
                   quantum: int = 8, max_rows: int | None = None) -> list[tuple[np.ndarray, int]]:
    """Batches of chunks of similar length: ``(chunk indices, T)`` with T the batch's
    longest chunk rounded up to ``quantum`` (a :class:`app.core.features.Padding` in steps of
    ``quantum``), at most ``tokens`` chunk rows × T each (and at most ``max_rows`` rows:
    short sequences still take many optimizer steps).

    Chunks are right-aligned (``make_chunks`` pads on the left), so ``x[b, -T:]`` drops
    only padding. A log of mostly short users (a day's stream: 1–4 events each) then
    costs its events, not 128 padded positions a user. With ``rng``: shuffled within
    equal lengths and in batch order (training); without: in length order (evaluation).
    """
    n = x.shape[0]
    if n == 0:
        return []
    length = (x[..., 0] != 0).sum(axis=1)
    padded = Padding(-(-x.shape[1] // quantum) * quantum, short=quantum, step=quantum).padded(length)
    tie = rng.permutation(n) if rng is not None else np.arange(n)
    order = tie[np.argsort(padded[tie], kind="stable")]
    batches, i = [], 0
    while i < n:
        t = int(padded[order[i]])
        j = i
        while j < n and (j - i + 1) * max(t, int(padded[order[j]])) <= tokens and (
                max_rows is None or j - i < max_rows):
            t = max(t, int(padded[order[j]]))
            j += 1
        j = max(j, i + 1)
        batches.append((order[i:j], t))
        i = j
    if rng is not None:
        batches = [batches[k] for k in rng.permutation(len(batches))]
    return batches


def run(events_paths: Path | Sequence[Path], fmt: str, inject_names: list[str], cfg: TrainConfig, out: Path,
        progress: bool = True) -> dict[str, Any]:
    """The whole of `seqguard train`. Returns the run summary written to run.json."""
    prep = prepare(events_paths, fmt, inject_names, cfg)
    model, info = train_model(prep, cfg, progress)
    val = score_splits(model, prep)["val"]
    y_val = prep.splits["val"].label if prep.supervised else None
    kind = cfg.calibration if cfg.calibration != "auto" else (
        ("fisher" if model.cfg.surprise_span > 1 else "platt") if prep.supervised else "tail")
    fit_calibration(model.calibration, kind, logit=val["logit"], surprise=val["surprise"], label=y_val,
                    recent=val["recent_surprise"])
    prob = score_splits(model, prep)["val"]["anomaly_probability"]
    thresholds = _thresholds(prep, cfg, prob)
    out.mkdir(parents=True, exist_ok=True)
    save_prepared(prep, out / PREPARED_FILE)
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


def _thresholds(prep: Prepared, cfg: TrainConfig, prob: np.ndarray) -> dict[str, Any]:
    """Review and block on the validation users' normal events (``prob`` in row order of
    the validation split): per ``cfg.fpr_unit``, every canonical type held to twice the
    target on the real users' events (event unit; look-alikes count in the overall rate
    only); the user unit counts users with no anomalous event. ``review`` and ``block``
    pass through :class:`app.core.decisions.Thresholds`: a run whose targets would give
    thresholds the service refuses (review above block) fails here, not at serve time."""
    val = prep.splits["val"]
    label = val.label if val.label is not None else np.zeros(len(val), np.int8)
    types = np.asarray(canonical_names(val.event_types, prep.spec.aliases), dtype=object)[val.event_type]
    normal = label == 0
    if cfg.fpr_unit == "user":
        tainted = np.zeros(val.n_users, bool)
        tainted[val.user[label != 0]] = True
        normal &= ~tainted[val.user]
    real = None if val.scenario is None else (val.scenario == 0)[normal]
    chosen = choose_thresholds(prob[normal], cfg.fpr_targets, event_types=types[normal], users=val.user[normal],
                               unit=cfg.fpr_unit, constrained_types=CANONICAL, constrain_on=real)
    return chosen | Thresholds.from_mapping(chosen).as_dict()


def load_run(run_dir: Path) -> tuple[Detector, dict[str, Any]]:
    """The trained detector (eval mode, calibrated) and the run summary of a run directory.

    Raises:
        FileNotFoundError: ``run_dir`` is not a run directory (one line saying what it is).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file() or not (run_dir / "model.pt").is_file():
        what = ("a bundle (it has bundle.json)" if (run_dir / "bundle.json").is_file()
                else "missing" if not run_dir.exists() else "not a run directory (no run.json and model.pt)")
        raise FileNotFoundError(f"{run_dir} is {what}: export takes the directory `seqguard train --out` wrote")
    summary = orjson.loads((run_dir / "run.json").read_bytes())
    ckpt = torch.load(run_dir / "model.pt", weights_only=False)
    model = Detector(ModelConfig.from_dict(ckpt["config"]))
    cal = ckpt["calibration"]
    model.calibration.restore(cal)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), summary


def _reinjected(prep: Prepared, cfg: TrainConfig, epoch: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training chunks with a fresh draw of every scenario and its look-alikes (seeds
    disjoint from val/test)."""
    assert prep.train_real is not None
    # Every other epoch the new accounts are cut to real users' lengths, as in evaluation.
    ev = inject(prep.train_real, prep.inject_names,
                InjectConfig(seed=cfg.seed * 10 + 1000 + epoch, match_lengths=epoch % 2 == 1))
    feats = with_unknown_types(prep.spec.transform(ev), ev.label, cfg.unknown_type_rate, rng)
    return make_chunks(feats, ev.user, ev.label, cfg.chunk_len, cfg.window)


def with_unknown_types(features: np.ndarray, label: np.ndarray | None, rate: float,
                       rng: np.random.Generator) -> np.ndarray:
    """``features`` (N, F) with the event type of a ``rate`` share of the normal events
    replaced by the out-of-vocabulary id (1): what an event type the model never saw
    means is then learnt from normal behaviour, so being unknown is no evidence by itself
    (as word dropout teaches a language model its unknown token)."""
    if rate <= 0:
        return features
    hit = rng.random(features.shape[0]) < rate
    if label is not None:
        hit &= label == 0
    out = features.copy()
    out[hit, 0] = 1
    return out


def _loss(model: Detector, x: np.ndarray, y: np.ndarray, m: np.ndarray, supervised: bool,
          aux_weight: float, pos_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    xt = torch.from_numpy(x)
    out = model(xt)
    mask = torch.from_numpy(m) & (xt[..., 0] != 0)  # (B, T) trained, real events
    yt = torch.from_numpy(y)
    normal = mask & (yt == 0)
    nll = (out["total_nll"] * normal).sum() / normal.sum().clamp_min(1)
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
