"""Evaluation of detectors on labelled events: scores in, numbers out (the files they are
written to beside a bundle: :mod:`model_export.report`). Thresholds arrive chosen on validation data (the 1% FPR
one chosen here is a diagnostic); a metric a split cannot define is ``None``.

Three views of a bundle: event-level detection of injected scenarios against the
baselines (:func:`compare`), the same per user against simple per-user rules
(:func:`user_level`), and false positives on held-out real traffic (:func:`real_traffic`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn import metrics as skm

from app.core.decisions import Thresholds
from app.core.events import Events
from app.core.features import FeatureSpec, group_starts
from app.core.progress import OnStep, Steps
from app.core.vocabulary import CANONICAL, canonical_names
from model_export.calibrate import threshold_at_fpr
from model_export.report import bundle_card, write_report
from model_export.scenarios import LOOKALIKES

DIAGNOSTIC_FPR = 0.01


@dataclass
class DetectorScores:
    """One detector's scores on one split (higher = more anomalous), with the thresholds
    chosen for it on validation data, e.g. ``{"review": t1, "block": t2}``: named operating
    points on its own score (a baseline's is no probability, and it may have any of them),
    not the service's decision thresholds (:class:`app.core.decisions.Thresholds`)."""

    name: str
    score: np.ndarray
    thresholds: dict[str, float] = field(default_factory=dict)


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


def metrics(label: np.ndarray, scenario: np.ndarray | None, scenario_names: Sequence[str],
            scored: DetectorScores) -> dict[str, Any]:
    """Detection metrics of one detector on one split.

    ``label``: 1 = anomalous; ``scenario``: codes into ``scenario_names`` (0 = none). Each
    scenario's anomalous events are compared with every normal event of the split.

    Examples
    --------
    >>> m = metrics(np.array([0, 0, 1]), None, ["none"], DetectorScores("d", np.array([0.1, 0.2, 0.9])))
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
            if str(name) in LOOKALIKES:  # normal look-alikes: no anomalous events to detect
                continue
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
            detectors: Sequence[DetectorScores]) -> dict[str, Any]:
    """Metrics of several detectors on the same split, keyed by detector name."""
    names = [d.name for d in detectors]
    if len(set(names)) != len(names):
        raise ValueError(f"detector names must be distinct: {names}")
    per = {d.name: metrics(label, scenario, scenario_names, d) for d in detectors}
    return {"n_events": len(label), "n_anomalous": int(np.count_nonzero(label)), "detectors": per}


# -- real traffic: false positives on held-out real users ----------------------------------

#: History-length bins of :func:`real_traffic`: (name, first, last) 1-based positions.
HISTORY_BINS: tuple[tuple[str, int, int | None], ...] = (
    ("1", 1, 1), ("2-4", 2, 4), ("5-16", 5, 16), ("17+", 17, None),
)


def history_position(user: np.ndarray, timestamp_ms: np.ndarray) -> np.ndarray:
    """(N,) 1-based position of each event in its user's sequence, in time order (equal
    times in row order, as the batch engine scores them); rows may come in any order.

    Examples
    --------
    >>> history_position(np.array([1, 0, 1, 1]), np.array([50, 9, 10, 30])).tolist()
    [3, 1, 1, 2]
    """
    order = np.lexsort((timestamp_ms, user))
    pos = np.empty(user.shape[0], dtype=np.int64)
    pos[order] = np.arange(user.shape[0]) - group_starts(user[order]) + 1
    return pos


def history_bin(position: np.ndarray) -> np.ndarray:
    """(N,) name of the :data:`HISTORY_BINS` bin of each 1-based position.

    >>> history_bin(np.array([1, 2, 4, 5, 16, 17, 300])).tolist()
    ['1', '2-4', '2-4', '5-16', '5-16', '17+', '17+']
    """
    out = np.empty(position.shape[0], dtype=object)
    for name, lo, hi in HISTORY_BINS:
        out[(position >= lo) & (position <= (hi if hi is not None else np.inf))] = name
    return out


def flag_shares(flagged: np.ndarray, blocked: np.ndarray) -> dict[str, Any]:
    """Counts and shares of flagged (review or block) and blocked rows of (N,) bool masks;
    shares are ``None`` for no rows.

    >>> flag_shares(np.array([True, True, False, False]), np.array([True, False, False, False]))
    {'events': 4, 'flagged': 2, 'flagged_share': 0.5, 'blocked': 1, 'blocked_share': 0.25}
    """
    n, f, b = int(flagged.size), int(flagged.sum()), int(blocked.sum())
    return {"events": n, "flagged": f, "flagged_share": _ratio(f, n), "blocked": b, "blocked_share": _ratio(b, n)}


def shares_by(key: np.ndarray, flagged: np.ndarray, blocked: np.ndarray,
              keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """:func:`flag_shares` of the rows of each value of ``key`` (N,), in the order of ``keys``."""
    return {k: flag_shares(flagged[key == k], blocked[key == k]) for k in keys}


def real_traffic(events: Events, prob: np.ndarray, thresholds: Thresholds,
                 spec: FeatureSpec) -> dict[str, Any]:
    """False positives of the detector on real normal traffic.

    Parameters
    ----------
    events : (N rows) real users' events, any order. Rows labelled 1 (a log with real
        labels) are scored as part of their users' sequences but not counted.
    prob : (N,) the bundle's anomaly probability of each row.
    thresholds : the bundle's; decisions as the service makes them (:meth:`Thresholds.decide`).
    spec : the bundle's feature spec: its aliases name the canonical types, its vocabulary
        says which types the model knows.

    Returns
    -------
    ``overall`` and ``users`` (a user is flagged/blocked when any of its events is), and
    ``per_type`` (canonical types first, then any other type present; with
    ``known_to_model``), ``per_history_length`` (:data:`HISTORY_BINS`) and
    ``unknown_types`` (events of types unknown to the model, per type as named in the
    log); every share beside its count of events.
    """
    prob = np.asarray(prob)
    if prob.shape != (len(events),):
        raise ValueError(f"{prob.shape[0]} probabilities for {len(events)} events")
    position = history_position(events.user, events.timestamp_ms)
    normal = np.ones(len(events), bool) if events.label is None else events.label != 1
    ev, prob, position = events.take(normal), prob[normal], position[normal]
    decision = thresholds.decide(prob)
    flagged, blocked = decision != "allow", decision == "block"

    present = np.bincount(ev.user, minlength=ev.n_users) > 0
    users_flagged = np.bincount(ev.user[flagged], minlength=ev.n_users) > 0
    users_blocked = np.bincount(ev.user[blocked], minlength=ev.n_users) > 0
    users = flag_shares(users_flagged[present], users_blocked[present])
    users = {"users": users.pop("events"), **users}

    canon_of_code = np.asarray(canonical_names(ev.event_types, spec.aliases) or ("",), dtype=object)
    canon = canon_of_code[ev.event_type]
    types = [*CANONICAL, *sorted(set(canon.tolist()) - set(CANONICAL))]
    per_type = {t: {"known_to_model": t in spec.event_types} | row
                for t, row in shares_by(canon, flagged, blocked, types).items()}

    raw = np.asarray(ev.event_types or ("",), dtype=object)[ev.event_type]
    unknown = spec.unknown_types(ev)
    n_unknown = sum(unknown.values())
    return {
        "thresholds": thresholds.as_dict(),
        "n_excluded_labelled": int((~normal).sum()),
        "overall": flag_shares(flagged, blocked),
        "users": users,
        "per_type": per_type,
        "per_history_length": shares_by(history_bin(position), flagged, blocked,
                                        [name for name, _, _ in HISTORY_BINS]),
        "unknown_types": {
            "events": n_unknown, "share": _ratio(n_unknown, len(ev)),
            "per_type": {t: {"share": _ratio(c, len(ev))} | flag_shares(flagged[raw == t], blocked[raw == t])
                         for t, c in sorted(unknown.items(), key=lambda kv: -kv[1])},
        },
    }


def real_traffic_summary(rt: dict[str, Any]) -> dict[str, Any]:
    """The compact block of :func:`real_traffic` stored in ``bundle.json``: overall and
    per-user shares, the canonical type with the highest flagged share (then blocked
    share; with its events, as a type with few events is a noisy worst), and the share of
    events of types unknown to the model."""
    seen = {t: r for t, r in rt["per_type"].items() if t in CANONICAL and r["events"]}
    worst = max(seen, key=lambda t: (seen[t]["flagged_share"], seen[t]["blocked_share"]), default=None)
    return {
        "events": rt["overall"]["events"],
        "flagged_share": rt["overall"]["flagged_share"],
        "blocked_share": rt["overall"]["blocked_share"],
        "users": rt["users"]["users"],
        "users_flagged_share": rt["users"]["flagged_share"],
        "users_blocked_share": rt["users"]["blocked_share"],
        "worst_type": worst,
        "worst_type_events": seen[worst]["events"] if worst else None,
        "worst_type_flagged_share": seen[worst]["flagged_share"] if worst else None,
        "worst_type_blocked_share": seen[worst]["blocked_share"] if worst else None,
        "unknown_type_share": rt["unknown_types"]["share"],
    }


def real_test_events(prep: Any) -> tuple[Events, str]:
    """The test split's real users before injection, and where they came from:
    ``prep.real["test"]`` when ``prep`` has it, else the test split's rows that are real
    and normal (scenario 0, label 0, not an injected new account)."""
    real = getattr(prep, "real", None) or {}
    if "test" in real:
        return real["test"], "The test users' real events, before any injection"
    from model_export.scenarios import NEW_ACCOUNT_PREFIX

    test: Events = prep.splits["test"]
    keep = ~np.char.startswith(test.user_ids.astype(str), NEW_ACCOUNT_PREFIX)[test.user]
    if test.label is not None:
        keep &= test.label == 0
    if test.scenario is not None:
        keep &= test.scenario == 0
    return test.take(keep), ("The test split's rows with scenario 0 and label 0 of users not injected as new "
                             "accounts (they may hold injected decoy rows and device/country columns)")


# -- per user: the detector against simple rules -----------------------------------------


def user_max(user: np.ndarray, score: np.ndarray, n_users: int) -> np.ndarray:
    """(U,) highest ``score`` (N,) of each user's events; -inf for a user without events.

    >>> user_max(np.array([0, 0, 2]), np.array([0.1, 0.7, 0.3]), 3).tolist()
    [0.7, -inf, 0.3]
    """
    out = np.full(n_users, -np.inf)
    np.maximum.at(out, user, np.asarray(score, dtype=np.float64))
    return out


_AUC_TIE = 1e-9  # AUCs this close are a tie (the same fraction summed in another order)


def user_level(events: Events, user_scores: dict[str, np.ndarray], *, detector: str,
               rules: dict[str, str], min_events: int = 1) -> dict[str, Any]:
    """User-level ROC-AUC per scenario of per-user scores.

    Parameters
    ----------
    events : the split's labelled events (``label``, ``scenario``), ``U = events.n_users``.
    user_scores : name → (U,) score of each user (higher = more suspicious), e.g. the
        detector's :func:`user_max` and :func:`model_export.baselines.user_rule_scores`.
    detector : the name in ``user_scores`` that every rule is held against.
    rules : name → description of the scores in ``user_scores`` that are rules.
    min_events : negatives are the users with no anomalous event and at least this many
        events: injected accounts are never shorter than 3 events, and a counter must not
        win by the one-event users of a day's stream.

    Returns
    -------
    Per scenario (and ``any``: any anomalous event): ``users`` (positives: users with an
    anomalous event of it) and ``roc_auc`` per score against the negatives (users with no
    anomalous event; ``None`` without positives or negatives); ``rules_not_beaten``:
    scenario → the rules whose AUC is at least the detector's.
    """
    n = events.n_users
    label = np.zeros(len(events), bool) if events.label is None else events.label == 1
    code = np.zeros(len(events), np.int64) if events.scenario is None else events.scenario.astype(np.int64)
    counts = np.bincount(events.user, minlength=n)
    present = counts > 0
    negative = (counts >= max(1, min_events)) & ~(np.bincount(events.user[label], minlength=n) > 0)
    groups = {str(name): label & (code == k) for k, name in enumerate(events.scenarios)
              if k and str(name) not in LOOKALIKES}
    groups["any"] = label
    per: dict[str, dict[str, Any]] = {}
    not_beaten: dict[str, list[str]] = {}
    for name, rows in groups.items():
        positive = np.bincount(events.user[rows], minlength=n) > 0
        auc = {s: _auc(score[negative], score[positive]) for s, score in user_scores.items()}
        per[name] = {"users": int(positive.sum()), "roc_auc": auc}
        best = auc[detector]
        if best is not None:
            worse = [r for r in rules if (a := auc[r]) is not None and a >= best - _AUC_TIE]
            if worse:
                not_beaten[name] = worse
    return {"n_users": int(present.sum()), "n_negative_users": int(negative.sum()), "min_events": min_events,
            "detector": detector,
            "rules": dict(rules), "per_scenario": per, "rules_not_beaten": not_beaten}


def evaluate_bundle(bundle_dir: Path, prep: Any, out_dir: Path, *, aliases: Mapping[str, str] | None = None,
                    on_step: OnStep | None = None, precision: str = "fp32") -> dict[str, Any]:
    """Score the test users of ``prep`` with the exported bundle (ONNX Runtime, the batch
    engine) and the baselines (fitted on training users, thresholds on validation users),
    and the test users' real traffic with the bundle; write the report; return the
    summary stored in ``bundle.json``. ``aliases`` (NAME → TYPE) widen the bundle's table
    of event type names (:meth:`app.core.bundle.Bundle.with_aliases`). ``on_step`` is told
    each step as it begins (:class:`app.core.progress.Steps`). ``precision``: the bundle's
    model file to score with (fp32, fp16, int8: docs/PERFORMANCE.md compares them)."""
    from app.core.batch_engine import score_events
    from app.core.bundle import load_bundle
    from app.core.scorer import OnnxModel
    from model_export.baselines import USER_RULES, default_baselines, user_rule_scores
    from model_export.calibrate import choose_thresholds

    bundle = load_bundle(bundle_dir).with_aliases(aliases)
    model = OnnxModel(bundle, precision=precision)
    train, val, test = (prep.splits[k] for k in ("train", "val", "test"))
    fpr = bundle.meta["training"]["train_config"]["fpr_targets"]
    baselines = default_baselines(seed=0, window=bundle.window)
    steps = Steps(len(baselines) + 4, on_step)
    steps.begin(f"score the test users (seqguard-{bundle.arch})")
    seqguard = score_events(model, test, as_arrived=False).probability  # the log in time order
    detectors = [DetectorScores(f"seqguard-{bundle.arch}", seqguard, bundle.thresholds.as_dict())]
    for base in baselines:
        steps.begin(f"baseline {base.name}")
        base.fit(train)
        v = base.score(val)
        normal = v if val.label is None else v[val.label == 0]
        t = choose_thresholds(normal, fpr)
        detectors.append(DetectorScores(base.name, base.score(test), {k: t[k] for k in fpr}))
    label = test.label if test.label is not None else np.zeros(len(test), np.int8)
    comparison = compare(label, test.scenario, test.scenarios, detectors)

    steps.begin("per-user rules")
    rules = user_rule_scores(test)
    per_user = {d.name: user_max(test.user, d.score, test.n_users) for d in detectors} | rules
    comparison["user_level"] = user_level(test, per_user, detector=detectors[0].name,
                                          rules={r: USER_RULES[r] for r in rules}, min_events=3)
    steps.begin("real traffic of the test users")
    real, source = real_test_events(prep)
    real_prob = score_events(model, real, as_arrived=False).probability
    rt = real_traffic(real, real_prob, bundle.thresholds, bundle.spec)
    comparison["real_traffic"] = {"source": source, **rt}

    steps.begin("report")
    write_report(out_dir, comparison, label=label, scenario=test.scenario,
                 scenario_names=test.scenarios, detectors=detectors, model_card=bundle_card(bundle, model.provider))
    steps.end()
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
        "real_traffic": real_traffic_summary(rt),
    }


def evaluate_file(bundle_dir: Path, events_path: Path, fmt: str, inject_names: list[str],
                  out_dir: Path, *, aliases: Mapping[str, str] | None = None,
                  on_step: OnStep | None = None, precision: str = "fp32") -> dict[str, Any]:
    """`seqguard evaluate`: split a log by user the way training did, inject, evaluate.
    ``aliases`` (NAME → TYPE, e.g. ``--alias``) go on top of the training run's own, both
    to read the log and to score it. ``on_step``: :func:`evaluate_bundle`'s, once the log
    is split and injected."""
    from app.core.bundle import load_bundle
    from model_export.dataset import TrainConfig, prepare

    tc = load_bundle(bundle_dir).meta["training"]["train_config"]
    cfg = TrainConfig.from_dict(tc)
    cfg.aliases = {**cfg.aliases, **(aliases or {})}
    prep = prepare(events_path, fmt, inject_names, cfg)
    return evaluate_bundle(bundle_dir, prep, out_dir, aliases=aliases, on_step=on_step, precision=precision)
