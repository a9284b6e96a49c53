"""The report written beside a bundle (``report/``): ``metrics.json`` (every number of
:func:`model_export.evaluate.compare`, with real traffic and user level where measured),
ROC and precision–recall curves with the operating points, a score histogram,
``scenarios.md`` (per-scenario and per-user tables) and ``model_card.md`` (the model, its
training data and configuration, thresholds, false positives on real traffic, detection of
injected scenarios, intended use and limitations). Numbers in, files out: nothing here
computes a metric."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from matplotlib.figure import Figure
from sklearn import metrics as skm

if TYPE_CHECKING:  # evaluate.py imports this module; the detectors' type only
    from model_export.evaluate import DetectorScores

REPORT_FILES = ("metrics.json", "roc.png", "pr.png", "score_hist.png", "scenarios.md",
                "model_card.md")
_MAX_CURVE_POINTS = 2000  # plotted points per curve: keeps the PNGs small and fast
ROC_MIN_FPR = 1e-4  # left end of the log false-positive-rate axis


def write_report(
    out_dir: Path, comparison: dict[str, Any], *, label: np.ndarray, scenario: np.ndarray | None,
    scenario_names: Sequence[str], detectors: Sequence[DetectorScores], model_card: dict[str, Any],
) -> list[Path]:
    """Write :data:`REPORT_FILES` into ``out_dir`` (created if needed); returns their paths.
    Numbers come from ``comparison`` (:func:`model_export.evaluate.compare`, plus
    ``real_traffic`` and ``user_level`` where measured); the curves from the scores
    (``scenario`` and ``scenario_names`` are accepted for symmetry with ``compare``)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    y = np.asarray(label).astype(bool)
    paths = {n: out_dir / n for n in REPORT_FILES}
    opts = orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
    paths["metrics.json"].write_bytes(orjson.dumps(comparison, option=opts) + b"\n")
    _save(curve_figure(y, detectors, roc=True), paths["roc.png"])
    _save(curve_figure(y, detectors, roc=False), paths["pr.png"])
    _save(_hist_figure(y, detectors[0] if detectors else None), paths["score_hist.png"])
    paths["scenarios.md"].write_text(_scenarios_md(comparison), encoding="utf-8")
    paths["model_card.md"].write_text(model_card_md(comparison, model_card), encoding="utf-8")
    return list(paths.values())


# -- plots ---------------------------------------------------------------------------------


def _thin(*xs: np.ndarray) -> tuple[np.ndarray, ...]:
    if xs[0].size <= _MAX_CURVE_POINTS:
        return xs
    keep = np.unique(np.linspace(0, xs[0].size - 1, _MAX_CURVE_POINTS).astype(np.int64))
    return tuple(x[keep] for x in xs)


def _figure(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Any]:
    # A bare Figure draws with Agg and touches no global pyplot state: nothing to close,
    # no backend switched for the whole process. Constrained layout makes room for the
    # legend below the axes, where it hides no curve.
    fig = Figure(figsize=(6.4, 5.4), layout="constrained")
    ax = fig.subplots()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _legend(fig: Figure) -> None:
    if fig.axes and fig.axes[0].get_legend_handles_labels()[0]:
        fig.legend(loc="outside lower center", ncols=2, fontsize=8, frameon=False)


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=100, bbox_inches="tight")


_MARKERS = ("o", "s", "^", "D")


def curve_figure(y: np.ndarray, detectors: Sequence[DetectorScores], roc: bool) -> Figure:
    """ROC curves on a log false-positive-rate axis (:data:`ROC_MIN_FPR` to 1, a rate of 0
    drawn at the minimum) with each detector's operating points, or precision–recall
    curves; ``y`` (N,) bool, each detector's score (N,). The legend sits below the axes."""
    xlabel, ylabel = ("false-positive rate (log)", "recall") if roc else ("recall", "precision")
    fig, ax = _figure("ROC" if roc else "Precision–recall", xlabel, ylabel)
    if roc:
        ax.set_xscale("log")
    ax.set(xlim=(ROC_MIN_FPR, 1) if roc else (0, 1), ylim=(0, 1.02))
    if not (y.any() and (~y).any()):
        ax.text(0.5, 0.5, "undefined: the split lacks positives or negatives", ha="center",
                transform=ax.transAxes)
        return fig
    if roc:
        chance = np.geomspace(ROC_MIN_FPR, 1, 50)
        ax.plot(chance, chance, color="grey", lw=0.8, ls=":")
    else:
        ax.plot([0, 1], [y.mean()] * 2, color="grey", lw=0.8, ls=":")
    names: dict[str, str] = {}
    for d in detectors:
        if roc:
            x, v, _ = skm.roc_curve(y, d.score)
            x = np.maximum(x, ROC_MIN_FPR)
            tag = f"AUC {skm.roc_auc_score(y, d.score):.3f}"
        else:
            v, x, _ = skm.precision_recall_curve(y, d.score)
            tag = f"AP {skm.average_precision_score(y, d.score):.3f}"
        (line,) = ax.plot(*_thin(x, v), lw=1.4, label=f"{d.name} ({tag})")
        for k, (t_name, t) in enumerate(d.thresholds.items() if roc else ()):  # chosen on validation
            names.setdefault(t_name, _MARKERS[k % len(_MARKERS)])
            flag = np.asarray(d.score) >= t
            ax.plot(max(flag[~y].mean(), ROC_MIN_FPR), flag[y].mean(), names[t_name], ms=5,
                    color=line.get_color())
    for t_name, marker in names.items():  # one legend entry per operating point, not per detector
        ax.plot([], [], marker, color="grey", ls="", label=f"at the {t_name} threshold")
    _legend(fig)
    return fig


def _hist_figure(y: np.ndarray, d: DetectorScores | None) -> Figure:
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
    _legend(fig)
    return fig


# -- Markdown ------------------------------------------------------------------------------


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


def _scenario_table(comparison: dict[str, Any]) -> str:
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
    return markdown_table([*rows, {"scenario": "**mean**", **mean}], columns)


_PER_SCENARIO_TEXT = (
    "Each scenario's anomalous events against every normal event of the split. recall@1%FPR "
    "uses the threshold at which 1% of this split's normal events are flagged (a diagnostic, "
    "not an operating threshold)."
)


def _scenarios_md(comparison: dict[str, Any]) -> str:
    parts = ["# Per-scenario detection", "", _PER_SCENARIO_TEXT, "", _scenario_table(comparison), ""]
    if comparison.get("user_level"):
        parts += ["## User-level ROC-AUC per scenario", "", user_level_md(comparison["user_level"]), ""]
    return "\n".join(parts)


def user_level_md(ul: dict[str, Any]) -> str:
    """The "user-level ROC-AUC per scenario" table (a row per scenario, a column per
    detector or rule) and a line naming the scenarios where a rule beats or ties the detector."""
    names = list(next(iter(ul["per_scenario"].values()), {"roc_auc": {}})["roc_auc"])
    rows = [{"scenario": "any scenario" if sc == "any" else sc, "positive users": r["users"], **r["roc_auc"]}
            for sc, r in ul["per_scenario"].items()]
    det, rules = ul["detector"], ul["rules"]
    if ul["rules_not_beaten"]:
        where = []
        for sc, rs in ul["rules_not_beaten"].items():
            auc = ul["per_scenario"][sc]["roc_auc"]
            beating = ", ".join(f"{r} {auc[r]:.3f}" for r in rs)
            where.append(f"{sc} ({beating} ≥ {det} {auc[det]:.3f})")
        verdict = f"**A per-user rule beats or ties the detector on:** {'; '.join(where)}."
    else:
        verdict = f"{det} beats every per-user rule ({', '.join(rules)}) on every scenario with positive users."
    return "\n".join([
        f"{ul['n_users']} users; positives are the users with an anomalous event of the scenario, "
        f"negatives the {ul['n_negative_users']} users with no anomalous event and at least "
        f"{ul.get('min_events', 1)} events (injected accounts are cut to lengths drawn from these "
        "users', so a count of events tells them apart from no one). A detector's user "
        "score is its highest event score; a rule's is its statistic over the user's events "
        f"({'; '.join(f'{r}: {d}' for r, d in rules.items())}).",
        "", markdown_table(rows, ["scenario", "positive users", *names]), "", verdict,
    ])


def _fmt(v: Any) -> str:
    """A value for one Markdown table cell: no Python repr of a dict or list."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float | np.floating):
        return f"{v:.4g}" if np.isfinite(v) else "–"
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) or "–"
    if isinstance(v, list | tuple):
        return ", ".join(_fmt(x) for x in v) or "–"
    return str(v)


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.3g}%"


def _title(key: str) -> str:
    return str(key).replace("_", " ")


def kv_table(d: dict[str, Any], header: tuple[str, str] = ("field", "value")) -> str:
    """A two-column Markdown table of a mapping; nested values inline (``k: v, ...``).

    >>> print(kv_table({"lr": 0.002, "split": [0.7, 0.3], "fpr": {"review": 0.01}}))
    | field | value |
    |---|---|
    | lr | 0.002 |
    | split | 0.7, 0.3 |
    | fpr | review: 0.01 |
    """
    return markdown_table([{header[0]: k, header[1]: _fmt(v)} for k, v in d.items()], list(header))


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def rows_table(d: dict[str, Any] | list[Any], first: str = "name") -> str:
    """A Markdown table of a mapping of mappings (a row per key) or a list of mappings,
    nested keys flattened to ``a.b`` columns; a plain mapping falls back to :func:`kv_table`."""
    items = list(d.items()) if isinstance(d, dict) else [(None, x) for x in d]
    if not items or not all(isinstance(x, dict) for _, x in items):
        return kv_table(d) if isinstance(d, dict) else _fmt(d)
    rows = [({first: k} if k is not None else {}) | {_title(c): _fmt(v) for c, v in _flat(x).items()}
            for k, x in items]
    columns = list(dict.fromkeys(c for r in rows for c in r))
    return markdown_table(rows, columns)


def _section(title: str, body: str | list[str]) -> list[str]:
    return [f"## {title}", "", *([body] if isinstance(body, str) else body), ""]


def _training_data_md(td: dict[str, Any]) -> list[str]:
    splits = td.get("splits") or {}
    out: list[str] = []
    if splits:
        rows = [{"split": k, "events": v.get("events"), "users": v.get("users"),
                 "anomalous events": v.get("anomalous_events")} for k, v in splits.items()]
        out += [markdown_table(rows, ["split", "events", "users", "anomalous events"]), ""]
    for src in td.get("sources") or [td]:  # one file today; a list of them where a run merges several
        fields = {k: v for k, v in src.items() if k not in ("splits", "load_report", "sources")}
        out += [f"### Source: {src.get('name', 'events')}", "", kv_table(fields), ""]
        if src.get("load_report"):
            out += ["Load summary:", "", kv_table(src["load_report"]), ""]
    return out


def _chosen(th: dict[str, Any]) -> dict[str, Any]:
    chosen = th.get("chosen")
    return chosen if isinstance(chosen, dict) else {}


def _thresholds_md(th: dict[str, Any]) -> list[str]:
    chosen = _chosen(th)
    decisions = [k for k, v in th.items() if isinstance(v, int | float) and not isinstance(v, bool)]
    rows = [{"decision": k, "threshold (≥)": _fmt(th[k])}
            | {_title(c): _fmt(v) for c, v in _flat(chosen.get(k) or {}).items()} for k in decisions]
    out = [markdown_table(rows, list(dict.fromkeys(c for r in rows for c in r))), ""] if rows else []
    how = {k: v for k, v in chosen.items() if k not in decisions}
    if how:
        out += ["How they were chosen:", "", kv_table(how), ""]
    for key, v in th.items():
        if key in decisions or key == "chosen":
            continue
        if isinstance(v, dict | list):
            out += [f"### {_title(key).capitalize()}", "", rows_table(v, "type" if key == "per_type" else "name"), ""]
        else:
            out += [f"- **{_title(key).capitalize()}**: {_fmt(v)}", ""]
    return out


_SHARE_COLS = ["events", "flagged share", "blocked share"]


def _share_row(first: dict[str, Any], r: dict[str, Any]) -> dict[str, Any]:
    return first | {"events": r["events"], "flagged share": _pct(r["flagged_share"]),
                    "blocked share": _pct(r["blocked_share"])}


def _targets(th: dict[str, Any]) -> str:
    """"review 1%, block 0.1% of normal validation events" from thresholds.chosen, or ""."""
    chosen = _chosen(th)
    parts = [f"{k} {_pct(v['target_fpr'])}" for k, v in chosen.items()
             if isinstance(v, dict) and isinstance(v.get("target_fpr"), int | float)]
    unit = th.get("unit", "event")
    return f"{', '.join(parts)} of normal validation {unit}s" if parts else ""


def real_traffic_md(rt: dict[str, Any], targets: str = "") -> list[str]:
    """The model card's real-traffic section body: Markdown tables of
    :func:`model_export.evaluate.real_traffic`; ``targets`` names the false-positive rates
    the thresholds were chosen for."""
    o, u, unk = rt["overall"], rt["users"], rt["unknown_types"]
    t = rt["thresholds"]
    aimed = f" The thresholds were chosen to flag {targets}." if targets else ""
    out = [
        f"{rt.get('source', 'Real users')}: {o['events']} events of {u['users']} users, decided at "
        f"the bundle's thresholds (review ≥ {t['review']:.4g}, block ≥ {t['block']:.4g}). Every "
        f"flagged event here is a false positive on real traffic.{aimed}",
        "",
        markdown_table([
            {"counted": "events", "total": o["events"], "flagged": o["flagged"], "flagged share":
             _pct(o["flagged_share"]), "blocked": o["blocked"], "blocked share": _pct(o["blocked_share"])},
            {"counted": "users (any event flagged / blocked)", "total": u["users"], "flagged": u["flagged"],
             "flagged share": _pct(u["flagged_share"]), "blocked": u["blocked"],
             "blocked share": _pct(u["blocked_share"])},
        ], ["counted", "total", "flagged", "flagged share", "blocked", "blocked share"]),
        "", "### Per event type", "",
        markdown_table([_share_row({"type": k, "known to model": _fmt(r["known_to_model"])}, r)
                        for k, r in rt["per_type"].items()], ["type", "known to model", *_SHARE_COLS]),
        "", "### Per history length", "",
        "The event's position in its user's sequence (1 = the user's first event).", "",
        markdown_table([_share_row({"position": k}, r) for k, r in rt["per_history_length"].items()],
                       ["position", *_SHARE_COLS]),
        "", "### Event types unknown to the model", "",
    ]
    if not unk["per_type"]:
        return [*out, "None: every event type of this traffic is known to the model."]
    rows = [_share_row({"type as logged": k, "share of all events": _pct(r["share"])}, r)
            for k, r in unk["per_type"].items()]
    return [*out, f"{unk['events']} events ({_pct(unk['share'])}) have a type the model never saw.", "",
            markdown_table(rows, ["type as logged", "share of all events", *_SHARE_COLS])]


def _prose(v: Any) -> list[str]:
    return [f"- {x}" for x in v] if isinstance(v, list | tuple) else [str(v)]


def model_card_md(comparison: dict[str, Any], card: dict[str, Any]) -> str:
    """The model card as Markdown: sections from ``card`` (``model``, ``training_data``,
    ``train_config``, ``thresholds``, ``intended_use``, ``limitations``; each optional) and
    the measured numbers of ``comparison``. Tables throughout, never a dict dump."""
    lines = [f"# Model card: {card.get('name', 'seqguard detector')}", ""]
    if card.get("model"):
        lines += _section("Model", kv_table(card["model"]))
    if card.get("training_data"):
        lines += _section("Training data", _training_data_md(card["training_data"]))
    if card.get("train_config"):
        lines += _section("Training configuration", kv_table(card["train_config"], ("setting", "value")))
    if card.get("thresholds"):
        lines += _section("Thresholds", _thresholds_md(card["thresholds"]))
    rt = comparison.get("real_traffic")
    targets = _targets(card.get("thresholds") or {})
    lines += _section("Real traffic", real_traffic_md(rt, targets) if rt else "Not measured: no real held-out users.")
    rows, columns = headline_rows(comparison)
    injected = [
        f"{comparison['n_events']} events of the test users with injected scenarios, "
        f"{comparison['n_anomalous']} anomalous. Operating thresholds were chosen on validation "
        "data; recall@1%FPR is a diagnostic on this split.",
        "", markdown_table(rows, columns), "", "### Per scenario", "", _PER_SCENARIO_TEXT, "",
        _scenario_table(comparison), "",
    ]
    if comparison.get("user_level"):
        injected += ["### User-level ROC-AUC per scenario", "", user_level_md(comparison["user_level"]), ""]
    injected += ["All numbers: [metrics.json](metrics.json); per scenario: [scenarios.md](scenarios.md).",
                 "", "![ROC curves](roc.png)", "", "![Precision–recall curves](pr.png)", "",
                 "![Score histogram](score_hist.png)"]
    lines += _section("Injected scenarios", injected)
    for key, title in (("intended_use", "Intended use"), ("limitations", "Limitations")):
        if card.get(key):
            lines += _section(title, _prose(card[key]))
    return "\n".join(lines)


# -- the card of an exported bundle ----------------------------------------------------


def bundle_card(bundle: Any, provider: str) -> dict[str, Any]:
    """The ``card`` of :func:`model_card_md` for a loaded bundle (:class:`app.core.bundle.Bundle`),
    scored with the ONNX Runtime execution ``provider``."""
    meta = bundle.meta
    arch = meta["architecture"]
    model = {
        "version": meta["model_version"], "architecture": arch["arch"],
        "parameters": arch.get("parameters"),
        **{_title(k): arch[k] for k in ("d_model", "n_layers", "n_heads") if k in arch},
        "window (events)": meta["window"], "calibration": meta["calibration"]["kind"],
        "supervised": meta.get("supervised"), "execution provider at evaluation": provider,
    }
    model |= {f"ONNX parity {k} (max abs diff)": v["max_abs_diff"] for k, v in (meta.get("parity") or {}).items()}
    model |= {f"{k} decisions equal to fp32's (test events)":
              f"{d['agreement']:.4%} of {d['events']:,}" + ("" if d["within_tolerance"] else " (out of tolerance)")
              for k, v in (meta.get("parity") or {}).items() if isinstance(d := v.get("decisions"), dict)}
    return {
        "name": f"seqguard-{arch['arch']}",
        "model": model,
        "training_data": meta["training_data"],
        "train_config": meta["training"]["train_config"],
        "thresholds": meta["thresholds"],
        "intended_use": (
            "Real-time scoring of storefront user events: anomaly probability and an "
            "allow/review/block decision per event, from the user's last events."
        ),
        "limitations": [
            "Recall is measured on injected attack scenarios; real abuse differs from any simulation.",
            "False positives are measured on the held-out real users above; thresholds hold "
            "their validation rates only on traffic like theirs (see the per-type and "
            "history-length tables for where they do not).",
            "Event types unknown to the model are scored as out-of-vocabulary.",
            "Re-train and re-evaluate on your own logs before blocking.",
        ],
    }
