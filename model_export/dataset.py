"""The dataset a run trains on: event logs loaded (:mod:`model_export.data`), split by
user, training and validation users widened with mid-history crops and item-less copies,
scenarios injected into each split, and the featurizer fitted on the training split's
normal events (:func:`prepare`); the run's configuration (:class:`TrainConfig`, kept in
``run.json``); and ``prepared.npz``, the splits a run directory keeps
(:func:`save_prepared`, :func:`load_prepared`).

No PyTorch here: export and evaluation rebuild or reload a run's splits without the
trainer (:mod:`model_export.train`).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from app.core.events import Events
from app.core.features import FeatureSpec
from app.core.vocabulary import build_aliases
from model_export.data import read_events, split_by_user
from model_export.scenarios import InjectConfig, inject

# Preparation was part of training: its warnings keep the logger name (JSON logs carry it).
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


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a file's bytes, read in blocks."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
