"""Evaluation of detectors on labelled events, and the report written beside a bundle:
scores in, numbers and files out. Thresholds arrive chosen on validation data (the 1% FPR
one chosen here is a diagnostic); a metric a split cannot define is ``None``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from matplotlib.figure import Figure
from sklearn import metrics as skm

from model_export.calibrate import threshold_at_fpr

DIAGNOSTIC_FPR = 0.01
REPORT_FILES = ("metrics.json", "roc.png", "pr.png", "score_hist.png", "scenarios.md",
                "model_card.md")
_MAX_CURVE_POINTS = 2000  # plotted points per curve: keeps the PNGs small and fast


@dataclass
class Scored:
    """One detector's scores on one split (higher = more anomalous), with the thresholds
    chosen for it on validation data, e.g. ``{"review": t1, "block": t2}``."""

    name: str
    score: np.ndarray
    thresholds: dict[str, float] = field(default_factory=dict)


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def metrics(label: np.ndarray, scenario: np.ndarray | None, scenario_names: Sequence[str],
            scored: Scored) -> dict[str, Any]:
    """Detection metrics of one detector on one split.

    ``label``: 1 = anomalous; ``scenario``: codes into ``scenario_names`` (0 = none). Each
    scenario's anomalous events are compared with every normal event of the split.

    Examples
    --------
    >>> m = metrics(np.array([0, 0, 1]), None, ["none"], Scored("d", np.array([0.1, 0.2, 0.9])))
    >>> m["roc_auc"], m["n_anomalous"]
    (1.0, 1)
    """
    y = np.asarray(label).astype(bool)
    s = np.asarray(scored.score, dtype=np.float64)
    if y.shape != s.shape:
        raise ValueError(f"{scored.name}: {s.shape[0]} scores for {y.shape[0]} labels")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{scored.name}: scores must be finite")
    normal = ~y
    out: dict[str, Any] = {
        "n_events": int(y.size),
        "n_anomalous": int(y.sum()),
        "roc_auc": _auc(s[normal], s[y]),
        "pr_auc": float(skm.average_precision_score(y, s)) if y.any() and normal.any() else None,
        "thresholds": {k: float(t) for k, t in scored.thresholds.items()},
        "at_threshold": {k: _at_threshold(y, s, t) for k, t in scored.thresholds.items()},
    }
    diag = threshold_at_fpr(s[normal], DIAGNOSTIC_FPR) if normal.any() else None
    out["threshold_at_1pct_fpr"] = diag
    out["recall_at_1pct_fpr"] = _recall(s[y], diag)

    per: dict[str, dict[str, Any]] = {}
    if scenario is not None:
        code = np.asarray(scenario)
        for k, name in enumerate(scenario_names[1:], start=1):  # 0 = none
            pos = s[y & (code == k)]
            row: dict[str, Any] = {"n_events": int(pos.size), "roc_auc": _auc(s[normal], pos),
                                   "recall_at_1pct_fpr": _recall(pos, diag)}
            row.update({f"recall_at_{t}": _recall(pos, v) for t, v in scored.thresholds.items()})
            per[str(name)] = row
    out["per_scenario"] = per
    aucs = [r["roc_auc"] for r in per.values() if r["roc_auc"] is not None]
    out["roc_auc_mean_over_scenarios"] = float(np.mean(aucs)) if aucs else None
    return out


def _auc(neg: np.ndarray, pos: np.ndarray) -> float | None:
    if neg.size == 0 or pos.size == 0:
        return None
    return float(skm.roc_auc_score(np.r_[np.zeros(neg.size), np.ones(pos.size)], np.r_[neg, pos]))


def _recall(pos: np.ndarray, threshold: float | None) -> float | None:
    return None if threshold is None or pos.size == 0 else float(np.mean(pos >= threshold))


def _at_threshold(y: np.ndarray, s: np.ndarray, t: float) -> dict[str, Any]:
    flag = s >= t
    tp, fp = int(np.sum(flag & y)), int(np.sum(flag & ~y))
    fn = int(y.sum()) - tp
    f1 = _ratio(2 * tp, 2 * tp + fp + fn) if tp + fn else None  # 0 if nothing is flagged
    return {"threshold": float(t), "n_flagged": tp + fp, "precision": _ratio(tp, tp + fp),
            "recall": _ratio(tp, tp + fn), "f1": f1, "fpr": _ratio(fp, int((~y).sum()))}


def compare(label: np.ndarray, scenario: np.ndarray | None, scenario_names: Sequence[str],
            detectors: Sequence[Scored]) -> dict[str, Any]:
    """Metrics of several detectors on the same split, keyed by detector name."""
    names = [d.name for d in detectors]
    if len(set(names)) != len(names):
        raise ValueError(f"detector names must be distinct: {names}")
    per = {d.name: metrics(label, scenario, scenario_names, d) for d in detectors}
    return {"n_events": len(label), "n_anomalous": int(np.count_nonzero(label)), "detectors": per}


_HEADLINE = [
    ("detector", "detector"), ("ROC-AUC", "roc_auc"), ("PR-AUC", "pr_auc"),
    ("recall@1%FPR", "recall_at_1pct_fpr"), ("scenario ROC-AUC", "roc_auc_mean_over_scenarios"),
]
_AT = [("precision", "precision"), ("recall", "recall"), ("FPR", "fpr")]


def headline_rows(comparison: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per detector: ranking metrics, then precision/recall/FPR per threshold."""
    rows, columns = [], {title: None for title, _ in _HEADLINE}  # ordered set
    for name, m in comparison["detectors"].items():
        row = {title: m.get(key) for title, key in _HEADLINE} | {"detector": name}
        for t, at in m["at_threshold"].items():
            row |= {f"{title}@{t}": at[key] for title, key in _AT}
        columns |= dict.fromkeys(row)
        rows.append(row)
    return rows, list(columns)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A GitHub-flavoured Markdown table; missing or undefined values show as "–".

    Examples
    --------
    >>> print(markdown_table([{"a": 1, "b": 0.5}, {"a": None}], ["a", "b"]))
    | a | b |
    |---|---|
    | 1 | 0.5 |
    | – | – |
    """

    def cell(v: Any) -> str:
        if v is None or (isinstance(v, float) and not np.isfinite(v)):
            return "–"
        if isinstance(v, float | np.floating):
            return f"{v:.4g}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_report(
    out_dir: Path, comparison: dict[str, Any], *, label: np.ndarray, scenario: np.ndarray | None,
    scenario_names: Sequence[str], detectors: Sequence[Scored], model_card: dict[str, Any],
) -> list[Path]:
    """Write :data:`REPORT_FILES` into ``out_dir`` (created if needed); returns their paths.
    Numbers come from ``comparison``; the curves from the scores (``scenario`` and
    ``scenario_names`` are accepted for symmetry with :func:`compare`)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    y = np.asarray(label).astype(bool)
    paths = {n: out_dir / n for n in REPORT_FILES}
    opts = orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
    paths["metrics.json"].write_bytes(orjson.dumps(comparison, option=opts) + b"\n")
    _plot_curves(paths["roc.png"], y, detectors, roc=True)
    _plot_curves(paths["pr.png"], y, detectors, roc=False)
    _plot_hist(paths["score_hist.png"], y, detectors[0] if detectors else None)
    paths["scenarios.md"].write_text(_scenarios_md(comparison), encoding="utf-8")
    paths["model_card.md"].write_text(_model_card_md(comparison, model_card), encoding="utf-8")
    return list(paths.values())


def _thin(*xs: np.ndarray) -> tuple[np.ndarray, ...]:
    if xs[0].size <= _MAX_CURVE_POINTS:
        return xs
    keep = np.unique(np.linspace(0, xs[0].size - 1, _MAX_CURVE_POINTS).astype(np.int64))
    return tuple(x[keep] for x in xs)


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Any]:
    # A bare Figure draws with Agg and touches no global pyplot state: nothing to close,
    # no backend switched for the whole process.
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig: Figure, ax: Any, path: Path, loc: str = "upper right") -> None:
    if ax.get_legend_handles_labels()[0]:  # an explicit loc: "best" warns on big data
        ax.legend(loc=loc, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _plot_curves(path: Path, y: np.ndarray, detectors: Sequence[Scored], roc: bool) -> None:
    """ROC (with each detector's operating points) or precision–recall curves."""
    xlabel, ylabel = ("false-positive rate", "recall") if roc else ("recall", "precision")
    fig, ax = _figure("ROC" if roc else "Precision–recall", xlabel, ylabel)
    ax.set(xlim=(0, 1), ylim=(0, 1.02))
    if not (y.any() and (~y).any()):
        ax.text(0.5, 0.5, "undefined: the split lacks positives or negatives", ha="center")
        return _save(fig, ax, path)
    ax.plot([0, 1], [0, 1] if roc else [y.mean()] * 2, color="grey", lw=0.8, ls=":")
    for d in detectors:
        if roc:
            x, v, _ = skm.roc_curve(y, d.score)
            tag = f"AUC {skm.roc_auc_score(y, d.score):.3f}"
        else:
            v, x, _ = skm.precision_recall_curve(y, d.score)
            tag = f"AP {skm.average_precision_score(y, d.score):.3f}"
        (line,) = ax.plot(*_thin(x, v), lw=1.4, label=f"{d.name} ({tag})")
        for t in d.thresholds.values() if roc else ():  # operating points chosen on validation
            flag = np.asarray(d.score) >= t
            ax.plot(flag[~y].mean(), flag[y].mean(), "o", ms=4, color=line.get_color())
    return _save(fig, ax, path, "lower right" if roc else "upper right")


def _plot_hist(path: Path, y: np.ndarray, d: Scored | None) -> None:
    fig, ax = _figure(f"Scores of {d.name if d else '–'}", "score", "events (log)")
    if d is not None and np.asarray(d.score).size:
        s = np.asarray(d.score, dtype=np.float64)
        bins = np.histogram_bin_edges(s, bins=60)
        for mask, name, color in ((~y, "normal", "tab:blue"), (y, "anomalous", "tab:red")):
            if mask.any():  # log=True on an empty histogram would warn
                ax.hist(s[mask], bins=bins, log=True, alpha=0.55, color=color, label=name)
        for (name, t), ls in zip(d.thresholds.items(), ("--", "-", "-.", ":"), strict=False):
            if np.isfinite(t):
                ax.axvline(t, color="black", lw=1, ls=ls, label=f"{name} ≥ {t:.3g}")
    _save(fig, ax, path)


def _scenarios_md(comparison: dict[str, Any]) -> str:
    dets = comparison["detectors"]
    first: dict[str, Any] = next(iter(dets.values()), {"per_scenario": {}})["per_scenario"]
    metric_cols = (f"{d} {w}" for d in dets for w in ("ROC-AUC", "recall@1%FPR"))
    columns = ["scenario", "events", *metric_cols]
    rows: list[dict[str, Any]] = []
    for sc, per in first.items():  # every detector has the same scenarios
        row = {"scenario": sc, "events": per["n_events"]}
        for d, m in dets.items():
            p = m["per_scenario"][sc]
            row |= {f"{d} ROC-AUC": p["roc_auc"], f"{d} recall@1%FPR": p["recall_at_1pct_fpr"]}
        rows.append(row)
    mean = {f"{d} ROC-AUC": m["roc_auc_mean_over_scenarios"] for d, m in dets.items()}
    return (
        "# Per-scenario detection\n\n"
        "Each scenario's anomalous events against every normal event of the split. "
        "recall@1%FPR uses the threshold at which 1% of this split's normal events are "
        "flagged (a diagnostic, not an operating threshold).\n\n"
        + markdown_table([*rows, {"scenario": "**mean**", **mean}], columns) + "\n"
    )


_CARD_FIELDS = {  # shown first, in this order, with these titles; other keys follow
    "name": "Model", "version": "Version", "arch": "Architecture", "params": "Parameters",
    "window": "Window (events)", "training_data": "Training data",
    "fingerprint": "Training-data fingerprint", "thresholds": "Thresholds",
    "threshold_method": "How thresholds were chosen", "calibration": "Calibration",
}
_CARD_SECTIONS = {"intended_use": "Intended use", "limitations": "Limitations"}


def _md_value(v: Any, indent: int = 0) -> str:
    """A value as Markdown after "**Field**: ": nested bullets for mappings and lists."""
    if isinstance(v, dict | list | tuple):
        items = v.items() if isinstance(v, dict) else ((None, x) for x in v)
        pad = "  " * (indent + 1)
        return "".join(f"\n{pad}- " + (f"{k}: " if k is not None else "") + _md_value(x, indent + 1)
                       for k, x in items)
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _model_card_md(comparison: dict[str, Any], card: dict[str, Any]) -> str:
    lines = [f"# Model card: {card.get('name', 'seqguard detector')}", "", "## Model details", ""]
    keys = [k for k in _CARD_FIELDS if k in card] + [k for k in card if k not in _CARD_FIELDS]
    for k in (k for k in keys if k not in _CARD_SECTIONS):
        value = _md_value(card[k])
        title = _CARD_FIELDS.get(k, k.replace("_", " ").capitalize())
        lines.append(f"- **{title}**:{'' if value.startswith(chr(10)) else ' '}{value}")
    for key in (k for k in _CARD_SECTIONS if k in card):  # top-level bullets or a paragraph
        lines += ["", f"## {_CARD_SECTIONS[key]}", "", _md_value(card[key], -1).lstrip("\n")]
    rows, columns = headline_rows(comparison)
    return "\n".join([
        *lines, "", "## Evaluation", "",
        f"{comparison['n_events']} events, {comparison['n_anomalous']} anomalous. Operating "
        "thresholds were chosen on validation data; recall@1%FPR is a diagnostic on this split.",
        "", markdown_table(rows, columns), "",
        "Per scenario: [scenarios.md](scenarios.md). All numbers: [metrics.json](metrics.json).",
        "", "![ROC curves](roc.png)", "", "![Precision–recall curves](pr.png)", "",
        "![Score histogram](score_hist.png)", "",
    ])


# -- a bundle on real data ------------------------------------------------------------


def evaluate_bundle(bundle_dir: Path, prep: Any, out_dir: Path) -> dict[str, Any]:
    """Score the test users of ``prep`` with the exported bundle (ONNX Runtime, the batch
    engine) and the baselines (fitted on training users, thresholds on validation users);
    write the report; return the summary stored in ``bundle.json``."""
    from app.backfill import score_events
    from app.bundle import load_bundle
    from app.scorer import OnnxModel
    from model_export.baselines import default_baselines
    from model_export.calibrate import choose_thresholds

    bundle = load_bundle(bundle_dir)
    model = OnnxModel(bundle)
    train, val, test = (prep.splits[k] for k in ("train", "val", "test"))
    fpr = bundle.meta["training"]["train_config"]["fpr_targets"]
    detectors = [Scored(f"seqguard-{bundle.arch}", score_events(model, test).probability,
                        bundle.thresholds)]
    for base in default_baselines(seed=0, window=bundle.window):
        base.fit(train)
        v = base.score(val)
        normal = v if val.label is None else v[val.label == 0]
        t = choose_thresholds(normal, fpr)
        detectors.append(Scored(base.name, base.score(test), {k: t[k] for k in fpr}))
    label = test.label if test.label is not None else np.zeros(len(test), np.int8)
    comparison = compare(label, test.scenario, test.scenarios, detectors)
    meta = bundle.meta
    card = {
        "model": meta["model_version"],
        "architecture": {k: meta["architecture"][k] for k in ("arch", "d_model", "n_layers", "parameters")},
        "window": meta["window"],
        "execution_provider_at_evaluation": model.provider,
        "training_data": meta["training_data"],
        "calibration": meta["calibration"]["kind"],
        "thresholds": meta["thresholds"],
        "parity": {k: v["max_abs_diff"] for k, v in meta["parity"].items()},
        "intended_use": (
            "Real-time scoring of storefront user events: anomaly probability and an "
            "allow/review/block decision per event, from the user's last events."
        ),
        "limitations": (
            "Trained on the data named above with injected attack scenarios; real abuse "
            "differs from any simulation. Recall on the test users is measured on injected "
            "scenarios. Thresholds hold their false-positive rates only on traffic like the "
            "validation users'. Re-train and re-evaluate on your own logs before blocking."
        ),
    }
    write_report(out_dir, comparison, label=label, scenario=test.scenario,
                 scenario_names=test.scenarios, detectors=detectors, model_card=card)
    keys = ("roc_auc", "pr_auc", "recall_at_1pct_fpr", "roc_auc_mean_over_scenarios")
    return {
        "split": "test users",
        "n_events": comparison["n_events"],
        "n_anomalous": comparison["n_anomalous"],
        "detectors": {
            name: {k: m.get(k) for k in keys}
            | {f"{t}_{q}": m["at_threshold"][t][q] for t in m["at_threshold"]
               for q in ("precision", "recall", "fpr")}
            for name, m in comparison["detectors"].items()
        },
    }


def evaluate_file(bundle_dir: Path, events_path: Path, fmt: str, inject_names: list[str],
                  out_dir: Path) -> dict[str, Any]:
    """`seqguard evaluate`: split a log by user the way training did, inject, evaluate."""
    from app.bundle import load_bundle
    from model_export.train import TrainConfig, prepare

    tc = load_bundle(bundle_dir).meta["training"]["train_config"]
    cfg = TrainConfig.from_dict(tc)
    return evaluate_bundle(bundle_dir, prepare(events_path, fmt, inject_names, cfg), out_dir)
