"""Training: load → split by user → inject scenarios → fit the featurizer → train the
detector with validation early stopping → calibrate and choose thresholds on
validation data → write a run directory that `seqguard export` turns into a bundle.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch
from sklearn.metrics import average_precision_score
from torch.nn import functional as F

from app.events import Events
from app.features import FeatureSpec, group_starts
from app.progress import bars as _progress
from app.vocabulary import CANONICAL, build_aliases, canonical_names
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
    calibration: str = "auto"  # auto | platt | isotonic | tail | fisher (auto: fisher with labels, tail without)
    surprise_span: int | None = None  # events in the recent surprise (model.recent_mean; None: window // 4)
    threads: int = 0  # 0 = torch default
    fpr_unit: str = "event"  # event | user: what the fpr_targets count (see calibrate.choose_thresholds)
    crops_per_user: int = 2  # mid-history crops of each long training/validation user
    unknown_type_rate: float = 0.01  # share of normal training events shown with an unknown event type
    max_batch_rows: int | None = None  # cap on chunks per batch (batches hold batch_size × chunk_len tokens)
    without_items_share: float = 0.05  # training/validation users also shown without item and category ids
    aliases: dict[str, str] = field(default_factory=dict)  # event type aliases on top of the project's table

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
    real: dict[str, Events] = field(default_factory=dict)  # split → its real users and rows, before injection


#: Where a run directory keeps the prepared splits export and evaluation need.
PREPARED_FILE = "prepared.npz"


def save_prepared(prep: Prepared, path: Path) -> None:
    """Write the three splits (as injected) and the test split's real users to ``path``
    (compressed npz, one array per Events column, ``<part>/<column>``), so that a run
    directory holds everything `seqguard export` needs and export never re-reads, or even
    needs, the training files. The spec and the source are in ``run.json``; features are
    recomputed from the spec (deterministic)."""
    parts = {f"split.{k}": ev for k, ev in prep.splits.items()}
    if "test" in prep.real:
        parts["real.test"] = prep.real["test"]
    arrays: dict[str, np.ndarray] = {}
    for part, ev in parts.items():
        for f in fields(Events):
            value = getattr(ev, f.name)
            if value is None:
                continue
            if isinstance(value, tuple):
                arrays[f"{part}/{f.name}"] = np.array(value, dtype=str)
            elif value.dtype == object:  # strings, None where missing
                missing = np.array([v is None for v in value], dtype=bool)
                arrays[f"{part}/{f.name}"] = np.where(missing, "", value).astype(str)
                arrays[f"{part}/{f.name}:none"] = missing
            else:
                arrays[f"{part}/{f.name}"] = value
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]


def load_prepared(run_dir: Path, summary: dict[str, Any]) -> Prepared | None:
    """The :class:`Prepared` of a run, from its ``prepared.npz`` and ``run.json``
    (``summary``); None for a run written before runs kept their splits."""
    path = run_dir / PREPARED_FILE
    if not path.exists():
        return None
    tuples = {f.name for f in fields(Events) if f.name in ("event_types", "scenarios")}
    parts: dict[str, dict[str, Any]] = {}
    with np.load(path, allow_pickle=False) as z:
        for key in z.files:
            part, column = key.split("/", 1)
            if column.endswith(":none"):
                continue
            value = z[key]
            if column in tuples:
                value = tuple(str(v) for v in value)
            elif value.dtype.kind == "U":
                value = value.astype(object)
                if f"{key}:none" in z.files:
                    value[z[f"{key}:none"]] = None
            parts.setdefault(part, {})[column] = value
    events = {part: Events(**cols) for part, cols in parts.items()}
    spec = FeatureSpec.from_dict(summary["feature_spec"])
    splits = {k: events[f"split.{k}"] for k in ("train", "val", "test")}
    real = {"test": events["real.test"]} if "real.test" in events else {}
    return Prepared(spec, splits, {k: spec.transform(ev) for k, ev in splits.items()}, bool(summary["supervised"]),
                    summary["training_data"], None, list(summary["training_data"].get("inject", [])), real)


#: Fewest real users a split may hold: fewer cannot train, stop early or choose thresholds.
MIN_SPLIT_USERS = 10


def _check_split_sizes(real: dict[str, Events], fractions: tuple[float, float, float], name: str) -> None:
    """Refuse (``ValueError``, one line) a log whose split leaves a part with fewer than
    ``MIN_SPLIT_USERS`` users; a part with a zero fraction may stay empty."""
    sizes = {k: int(np.unique(ev.user).size) for k, ev in real.items()}
    small = [k for (k, n), f in zip(sizes.items(), fractions, strict=True) if f > 0 and n < MIN_SPLIT_USERS]
    if small:
        total = sum(sizes.values())
        need = math.ceil(MIN_SPLIT_USERS * sum(fractions) / min(f for f in fractions if f > 0))
        got = ", ".join(f"{sizes[k]} {'validation' if k == 'val' else k}" for k in small)
        raise ValueError(f"{name}: {total} users are too few to train on: the split {tuple(fractions)} leaves "
                         f"{got} users, and every part needs at least {MIN_SPLIT_USERS} (about {need} users in all)")


def prepare(events_paths: Path | str | Sequence[Path | str], fmt: str, inject_names: list[str],
            cfg: TrainConfig) -> Prepared:
    """Load one or more logs, split by user, add mid-history crops to the training and
    validation users, inject scenarios (and their look-alikes) into each split
    separately, fit the spec on the training split's normal events.

    Several files are concatenated (rows repeated across files counted once) before the
    split, so each user lands in one split. ``Prepared.real`` keeps each split's real
    users as loaded: the held-out real traffic of the report.
    """
    paths = [Path(events_paths)] if isinstance(events_paths, str | Path) else [Path(p) for p in events_paths]
    if not paths:
        raise ValueError("no event files to train on")
    loaded = [read_events(p, fmt, dedupe=True, sort=True, aliases=cfg.aliases) for p in paths]  # logs summaries
    _warn_shared_users(paths, loaded)
    events = _drop_repeats(Events.concat([ev for ev, _ in loaded])) if len(loaded) > 1 else loaded[0][0]
    events = events.sorted()
    real = dict(zip(("train", "val", "test"), split_by_user(events, cfg.split, seed=cfg.seed), strict=True))
    _check_split_sizes(real, cfg.split, " + ".join(p.name for p in paths))
    rng = np.random.default_rng(cfg.seed)
    parts = {name: add_without_items(add_crops(ev, rng, cfg.crops_per_user), rng, cfg.without_items_share)
             if name != "test" else ev for name, ev in real.items()}
    train_real = parts["train"]
    if inject_names:
        # Validation and test accounts are as long as real users with complete histories:
        # early stopping and the report measure behaviour, not length.
        parts = {
            name: inject(ev, inject_names, InjectConfig(seed=cfg.seed * 10 + i, match_lengths=name != "train"))
            for i, (name, ev) in enumerate(parts.items())
        }
    supervised = parts["train"].label is not None and bool(parts["train"].label.any())
    train = parts["train"]
    normal = train.take(train.label == 0) if train.label is not None else train
    offsets = {r.utc_offset_minutes for _, r in loaded}
    if len(offsets) > 1:
        raise ValueError(f"files of different local times ({sorted(offsets)} minutes from UTC) cannot share a model")
    spec = FeatureSpec.fit(normal, window=cfg.window, lookback=cfg.lookback, utc_offset_minutes=offsets.pop(),
                           aliases=build_aliases(cfg.aliases))
    feats = {name: spec.transform(ev) for name, ev in parts.items()}
    files = [{"path": str(p), "name": p.name, "format": r.format, "sha256": file_sha256(p),
              "load_report": {k: v for k, v in asdict(r).items() if k != "malformed_examples"}}
             for p, (_, r) in zip(paths, loaded, strict=True)]
    source = {
        "path": files[0]["path"], "name": " + ".join(f["name"] for f in files),
        "format": files[0]["format"], "sha256": files[0]["sha256"],
        "files": files,
        "inject": inject_names,
        "load_report": files[0]["load_report"],
        "splits": {
            name: {"events": len(ev), "users": int(np.unique(ev.user).size),
                   "anomalous_events": int(ev.label.sum()) if ev.label is not None else 0,
                   "real_events": len(real[name]), "real_users": int(np.unique(real[name].user).size)}
            for name, ev in parts.items()
        },
    }
    return Prepared(spec, parts, feats, supervised, source, train_real, list(inject_names), real)


def add_crops(events: Events, rng: np.random.Generator, per_user: int, min_events: int = 8) -> Events:
    """``events`` plus, for each user with at least ``min_events`` events, ``per_user``
    copies of a stretch of its history that starts at a random point (user id
    ``<id>@crop<k>``), with lengths drawn from the users' own history lengths.

    Real logs often show a user mid-history (a day's stream, a sampled log): the first
    events we have of a user are rarely its first events. Crops teach the detector that a
    short history starting with a cart or a purchase is ordinary.
    """
    if per_user <= 0 or not len(events):
        return events
    ev = events.sorted()
    starts = np.flatnonzero(np.r_[True, ev.user[1:] != ev.user[:-1]])
    sizes = np.diff(np.r_[starts, len(ev)])
    long_users = np.flatnonzero(sizes >= min_events)
    if not long_users.size:
        return events
    rows, users, names = [], [], []
    for g in np.repeat(long_users, per_user):
        n = int(sizes[g])
        a = int(rng.integers(1, n))  # never from the first event: that is the user's real start
        length = int(min(n - a, sizes[rng.integers(sizes.size)]))
        rows.append(starts[g] + a + np.arange(length))
        users.append(np.full(length, len(names), np.int32))
        names.append(f"{ev.user_ids[ev.user[starts[g]]]}@crop{len(names)}")
    crops = ev.take(np.concatenate(rows)).with_columns(user=np.concatenate(users),
                                                       user_ids=np.asarray(names, dtype=object))
    if crops.event_id is not None:  # ids are unique per event: the copies get their own
        crops = crops.with_columns(event_id=np.full(len(crops), None, dtype=object))
    return Events.concat([ev, crops]).sorted()


def add_without_items(events: Events, rng: np.random.Generator, share: float) -> Events:
    """``events`` plus a copy of a ``share`` of its users (user id ``<id>@noitem``) with
    no item and no category ids: the contract makes both optional, and a storefront that
    never sends them must not look anomalous for it (as with unknown event types)."""
    if share <= 0 or not len(events) or (events.item_id is None and events.category_id is None):
        return events
    users = np.unique(events.user)
    chosen = rng.choice(users, max(1, round(share * users.size)), replace=False)
    rows = np.flatnonzero(np.isin(events.user, chosen))
    copy = events.take(rows)
    codes, user = np.unique(copy.user, return_inverse=True)
    bare = copy.with_columns(
        user=user.astype(np.int32), user_ids=np.array([f"{u}@noitem" for u in events.user_ids[codes]], dtype=object),
        **{c: np.zeros(len(copy), np.uint64) for c in ("item_id", "category_id") if getattr(copy, c) is not None},
        **({"event_id": np.full(len(copy), None, dtype=object)} if copy.event_id is not None else {}))
    return Events.concat([events, bare]).sorted()


def _warn_shared_users(paths: list[Path], loaded: list[tuple[Events, Any]]) -> int:
    """Warn when files of different formats (different stores) share user ids: their
    histories are merged into one user. Files of one log (the two Taobao samples) share
    users by design. Returns the number of shared ids warned about."""
    shared = 0
    for i in range(len(loaded)):
        for j in range(i + 1, len(loaded)):
            if loaded[i][1].format == loaded[j][1].format:
                continue
            both = np.intersect1d(loaded[i][0].user_ids.astype(str), loaded[j][0].user_ids.astype(str))
            if both.size:
                shared += int(both.size)
                log.warning("%s (%s) and %s (%s) share %d user ids: their events are merged into one history "
                            "per id; give each store's users their own ids if they are different people",
                            paths[i].name, loaded[i][1].format, paths[j].name, loaded[j][1].format, both.size)
    return shared


def _drop_repeats(events: Events) -> Events:
    """Rows equal in user, time, type, item and category to an earlier row dropped (the
    same event in two sample files of one log)."""
    cols = [c for c in (events.user, events.timestamp_ms, events.event_type, events.item_id, events.category_id)
            if c is not None]
    order = np.lexsort(cols[::-1])
    same = np.ones(len(events) - 1, bool)
    for c in cols:
        same &= c[order][1:] == c[order][:-1]
    dup = np.zeros(len(events), bool)
    dup[order[1:][same]] = True
    if dup.any():
        log.info("%d rows found in more than one file counted once", int(dup.sum()))
    return events.take(~dup)


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
    longest chunk rounded up to ``quantum``, at most ``tokens`` chunk rows × T each (and
    at most ``max_rows`` rows: short sequences still take many optimizer steps).

    Chunks are right-aligned (``make_chunks`` pads on the left), so ``x[b, -T:]`` drops
    only padding. A log of mostly short users (a day's stream: 1–4 events each) then
    costs its events, not 128 padded positions a user. With ``rng``: shuffled within
    equal lengths and in batch order (training); without: in length order (evaluation).
    """
    n = x.shape[0]
    if n == 0:
        return []
    length = (x[..., 0] != 0).sum(axis=1)
    padded = np.maximum(quantum, -(-length // quantum) * quantum)
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
    only); the user unit counts users with no anomalous event."""
    val = prep.splits["val"]
    label = val.label if val.label is not None else np.zeros(len(val), np.int8)
    types = np.asarray(canonical_names(val.event_types, prep.spec.aliases), dtype=object)[val.event_type]
    normal = label == 0
    if cfg.fpr_unit == "user":
        tainted = np.zeros(val.n_users, bool)
        tainted[val.user[label != 0]] = True
        normal &= ~tainted[val.user]
    real = None if val.scenario is None else (val.scenario == 0)[normal]
    return choose_thresholds(prob[normal], cfg.fpr_targets, event_types=types[normal], users=val.user[normal],
                             unit=cfg.fpr_unit, constrained_types=CANONICAL, constrain_on=real)


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


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a file's bytes, read in blocks."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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
