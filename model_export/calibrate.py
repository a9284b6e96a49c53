"""Calibration of raw detector scores into probabilities, and threshold choice.

Thresholds are chosen on validation data only, at target false-positive rates.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

log = logging.getLogger("seqguard.calibrate")

#: Closest knots of a piecewise-linear map (in its input's units: logit or nats of
#: surprise). Bounds the map's slope, so float error in its input cannot be amplified
#: beyond ``max slope × error`` (the parity check allows exactly that).
MIN_KNOT_SPACING = 1e-3
#: No canonical event type may exceed this multiple of a target FPR on validation.
PER_TYPE_FACTOR = 2.0
FPR_UNITS = ("event", "user")


def threshold_at_fpr(normal_scores: np.ndarray, fpr: float) -> float:
    """Smallest threshold ``t`` with ``mean(normal_scores >= t) <= fpr``.

    Examples
    --------
    >>> threshold_at_fpr(np.arange(100, dtype=float), 0.05)
    95.0
    """
    s = np.sort(np.asarray(normal_scores, dtype=np.float64))
    n = s.size
    if n == 0:
        raise ValueError("no normal scores to choose a threshold on")
    allowed = int(np.floor(fpr * n))  # normal events allowed at or above t
    if allowed >= n:
        return float(s[0])
    # t must exceed s[n - allowed - 1]; the next distinct value (or a hair above) works.
    bar = s[n - allowed - 1]
    above = s[s > bar]
    return float(above[0]) if above.size else float(np.nextafter(bar, np.inf))


def fit_calibration(
    calibration: Any,
    kind: str,
    *,
    logit: np.ndarray,
    surprise: np.ndarray,
    label: np.ndarray | None,
    recent: np.ndarray | None = None,
    max_knots: int = 128,
) -> dict[str, Any]:
    """Fit the detector's in-graph calibration on validation scores (each (N,), one per
    validation event; ``recent`` the recent surprise, needed by ``fisher``).

    - ``platt``: logistic regression of the label on the anomaly logit (keeps the ranking).
    - ``isotonic``: isotonic regression of the label on the logit, interpolated.
    - ``tail`` (no labels): the distribution function of the surprise under normal
      validation data, so p = 0.99 means "more surprising than 99% of normal events";
      past the most surprising normal event it rises on from n/(n+1) to 1.
    - ``fisher``: −log of the survival function under normal validation events of the
      logit and of the recent surprise (:func:`neg_log_survival`), summed (Fisher's
      method: each is −log of a p-value), then logistic regression of the label on the
      sum. Strictly increasing in both scores, so a pattern the supervised head was never
      taught still ranks by how surprising its recent events were.
    """
    if kind in ("platt", "isotonic", "fisher") and (label is None or label.min() == label.max()):
        raise ValueError(f"{kind} calibration needs validation labels of both classes")
    if kind == "platt":
        lr = LogisticRegression(C=1e4, max_iter=1000).fit(logit.reshape(-1, 1), label)
        calibration.set("platt", ab=(float(lr.coef_[0, 0]), float(lr.intercept_[0])))
    elif kind == "isotonic":
        iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(logit, label)
        kx, ky = _thin(iso.X_thresholds_, iso.y_thresholds_, max_knots, min_spacing=MIN_KNOT_SPACING)
        calibration.set("isotonic", knots_x=kx, knots_y=ky)
    elif kind == "tail":
        normal = (surprise if label is None else surprise[label == 0]).astype(np.float64)
        qs = np.unique(np.concatenate([np.linspace(0, 0.9, 19), 1 - np.geomspace(0.1, 1e-4, 40), [1.0]]))
        kx = np.quantile(normal, qs)
        # The empirical CDF with n/(n+1) at the largest normal surprise, rising on to 1 over
        # the spread of normal surprise past it: more surprising than every normal event
        # still ranks, where a map that saturates at 1 would tie every such event (and a
        # threshold above every validation event could never be reached).
        n = normal.size
        span = max(1.0, float(kx[-1] - np.median(normal)))
        kx, ky = _thin(np.append(kx, kx[-1] + span), np.append(qs * n / (n + 1), 1.0), max_knots,
                       min_spacing=MIN_KNOT_SPACING)
        calibration.set("tail", knots_x=kx, knots_y=ky)
    elif kind == "fisher":
        if recent is None:
            raise ValueError("fisher calibration needs the recent surprise")
        assert label is not None
        normal = label == 0
        lx, ly = neg_log_survival(logit[normal], max_knots)
        rx, ry = neg_log_survival(recent[normal], max_knots)
        combined = np.interp(logit, lx, ly) + np.interp(recent, rx, ry)
        lr = LogisticRegression(C=1e4, max_iter=1000).fit(combined.reshape(-1, 1), label)
        calibration.set("fisher", ab=(float(lr.coef_[0, 0]), float(lr.intercept_[0])),
                        logit_x=lx, logit_y=ly, recent_x=rx, recent_y=ry)
    else:
        raise ValueError(f"unknown calibration {kind!r}: platt, isotonic, tail or fisher")
    return calibration.describe()


def neg_log_survival(normal: np.ndarray, max_knots: int = 128) -> tuple[list[float], list[float]]:
    """Knots of −log P(normal score ≥ x): 0 at and below the lowest, log(n+1) at the highest
    normal score (the empirical survival function, n/(n+1)-smoothed), then one decade
    more over the spread of the scores past it, flat beyond.

    >>> x, y = neg_log_survival(np.arange(1000, dtype=float))
    >>> round(float(np.interp(989.0, x, y)), 1)  # 1% of normal scores are at or above 990
    4.5
    """
    normal = np.asarray(normal, np.float64)
    n = normal.size
    qs = np.unique(np.concatenate([np.linspace(0, 0.9, 19), 1 - np.geomspace(0.1, 1e-4, 40), [1.0]]))
    kx = np.quantile(normal, qs)
    ky = -np.log1p(-qs * n / (n + 1))
    span = max(1.0, float(kx[-1] - np.median(normal)))
    return _thin(np.append(kx, kx[-1] + span), np.append(ky, ky[-1] + np.log(10.0)), max_knots,
                 min_spacing=MIN_KNOT_SPACING)


def lipschitz(describe: dict[str, Any]) -> float:
    """Largest slope of a calibration map (``Calibration.describe()``): how much an error
    in its input can grow in the probability.

    >>> lipschitz({"kind": "platt", "a": 2.0, "b": 0.0})
    0.5
    """
    kind = describe["kind"]
    if kind in ("identity", "platt"):
        return abs(float(describe.get("a", 1.0))) / 4.0  # the sigmoid's slope is at most 1/4
    if kind == "fisher":  # the sigmoid of the sum of two maps: each input's error, summed
        inner = max(_slope(describe["logit_x"], describe["logit_y"]),
                    _slope(describe["recent_x"], describe["recent_y"]))
        return abs(float(describe["a"])) / 4.0 * inner
    return _slope(describe["knots_x"], describe["knots_y"])


def _slope(knots_x: list[float], knots_y: list[float]) -> float:
    """Largest slope of a piecewise-linear map."""
    x, y = np.asarray(knots_x), np.asarray(knots_y)
    return float(np.max(np.diff(y) / np.maximum(np.diff(x), 1e-12))) if x.size > 1 else 0.0


def choose_thresholds(
    normal_probs: np.ndarray,
    targets: dict[str, float],
    *,
    event_types: np.ndarray | None = None,
    users: np.ndarray | None = None,
    unit: str = "event",
    constrained_types: tuple[str, ...] = (),
    per_type_factor: float = PER_TYPE_FACTOR,
    constrain_on: np.ndarray | None = None,
) -> dict[str, Any]:
    """Decision thresholds at target false-positive rates, on validation normal events.

    Parameters
    ----------
    normal_probs : (N,) probabilities of the validation users' normal events.
    targets : e.g. ``{"review": 0.01, "block": 0.001}``.
    event_types : (N,) canonical event type of each event (object array), for the
        per-type constraint and the per-type report.
    users : (N,) user code of each event; needed with ``unit="user"``.
    unit : ``"event"``: a target is the share of normal events at or above the threshold,
        and no type of ``constrained_types`` with enough events to tell (at least
        ``1 / (per_type_factor · target)``) may exceed ``per_type_factor ×`` the target;
        the threshold is the smallest that meets all of these (a constrained threshold).
        ``"user"``: a target is the share of normal users (sessions) with any event at
        or above the threshold, the number an operator budgets.
    constrain_on : (N,) bool, the events the per-type bounds count (default: all). Training
        passes the validation users' real events: synthetic normal events (look-alikes of
        the scenarios) are easy for the model that was taught them, and counted in, they
        let a type's real events pass the bound (purchases: 0.06% blocked on validation,
        0.33% on held-out real users).

    Returns
    -------
    ``{"review": t, "block": t, "unit": unit, "chosen": {...}}``: ``chosen`` records, per
    threshold, the target, the event and user FPR reached on validation, per type the
    events and FPR reached, which bound set the threshold, and whether the validation set
    can resolve the target (a warning is logged when it cannot).
    """
    if unit not in FPR_UNITS:
        raise ValueError(f"fpr unit must be one of {FPR_UNITS}, not {unit!r}")
    p = np.asarray(normal_probs, dtype=np.float64)
    if unit == "user" and users is None:
        raise ValueError("unit='user' needs the user of every event")
    user_max = None
    if users is not None:
        codes, inv = np.unique(np.asarray(users), return_inverse=True)
        user_max = np.full(codes.size, -np.inf)
        np.maximum.at(user_max, inv, p)
    types = None if event_types is None else np.asarray(event_types, dtype=object)
    out: dict[str, Any] = {"unit": unit}
    how: dict[str, Any] = {}
    previous = 0.0
    for name, fpr in sorted(targets.items(), key=lambda kv: -kv[1]):  # loosest first
        bounds: dict[str, float] = {}
        if unit == "user":
            assert user_max is not None
            bounds["users"] = threshold_at_fpr(user_max, fpr)
            n_unit = user_max.size
        else:
            bounds["overall"] = threshold_at_fpr(p, fpr)
            n_unit = p.size
        unresolved = []
        if unit == "event" and types is not None:
            for t_name in constrained_types:
                mask = types == t_name if constrain_on is None else (types == t_name) & constrain_on
                if not mask.any():
                    continue
                if mask.sum() * per_type_factor * fpr < 1:
                    unresolved.append(t_name)
                    continue
                bounds[f"type:{t_name}"] = threshold_at_fpr(p[mask], per_type_factor * fpr)
        bound = max(bounds, key=lambda k: bounds[k])
        t = max(bounds[bound], previous)
        previous = t
        out[name] = t
        resolvable = n_unit * fpr >= 1
        if not resolvable:
            log.warning("the %s threshold rests on %d normal %ss: too few to resolve a %.2g%% FPR "
                        "(it sits above every one of them)", name, n_unit, unit, 100 * fpr)
        if unresolved:
            log.warning("the %s threshold: too few validation events of %s to hold them to %g× the target",
                        name, ", ".join(unresolved), per_type_factor)
        row: dict[str, Any] = {
            "target_fpr": fpr,
            "validation_fpr": float(np.mean(p >= t)),
            "set_by": bound if t == bounds[bound] else "the looser threshold before it",
            "resolvable": resolvable,
        }
        if user_max is not None:
            row["validation_user_fpr"] = float(np.mean(user_max >= t))
        if types is not None:
            row["per_type"] = {str(k): {"events": int((types == k).sum()), "fpr": float(np.mean(p[types == k] >= t))}
                               for k in dict.fromkeys(types.tolist())}
            if constrain_on is not None:
                counted, counted_p = types[constrain_on], p[constrain_on]
                row["per_type_constrained_on"] = {
                    str(k): {"events": int((counted == k).sum()), "fpr": float(np.mean(counted_p[counted == k] >= t))}
                    for k in dict.fromkeys(counted.tolist())}
            if unresolved:
                row["types_too_few_to_constrain"] = unresolved
        how[name] = row
    out["chosen"] = {
        "on": "validation split (normal events only), never test",
        "unit": unit,
        "per_type_factor": per_type_factor if unit == "event" and constrained_types else None,
        "per_type_on": None if constrain_on is None else f"{int(np.sum(constrain_on))} of the events (real users)",
        "n_normal_events": int(p.size),
        "n_normal_users": None if user_max is None else int(user_max.size),
        **how,
    }
    return out


def _thin(x: np.ndarray, y: np.ndarray, max_knots: int,
          min_spacing: float = 0.0) -> tuple[list[float], list[float]]:
    """Knots at least ``min_spacing`` apart (of knots closer than that, the last, with the
    largest y, is kept), at most ``max_knots``.

    >>> _thin(np.array([0.0, 0.0004, 1.0]), np.array([0.1, 0.5, 0.9]), 10, min_spacing=1e-3)
    ([0.0004, 1.0], [0.5, 0.9])
    """
    x = np.asarray(x, np.float64)
    y = np.maximum.accumulate(np.asarray(y, np.float64))
    keep = np.append(x[1:] > x[:-1], True)
    x, y = x[keep], y[keep]
    if min_spacing > 0 and x.size > 1:
        kept = [x.size - 1]  # walk down from the top, keeping knots min_spacing below the last kept
        for i in range(x.size - 2, -1, -1):
            if x[kept[-1]] - x[i] >= min_spacing:
                kept.append(i)
        x, y = x[kept[::-1]], y[kept[::-1]]
    if x.size > max_knots:
        pick = np.unique(np.linspace(0, x.size - 1, max_knots).round().astype(int))
        x, y = x[pick], y[pick]
    if x.size == 1:
        x, y = np.array([x[0], x[0] + 1e-6]), np.array([y[0], y[0]])
    return [float(v) for v in x], [float(v) for v in y]
