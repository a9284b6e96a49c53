"""Reason codes: which trait of which event made a window surprising, in stable codes.

The exported graph gives, for every event of a window, each predicted feature's share of
the event's surprise (``feature_surprise``, nats: −log of twice the mid-p-value of the
observed value of that feature under the model's prediction from the events before it;
the shares sum to the event's surprise, model_export/model.py). A reason code names one
(event, feature) pair with a large share. The codes are part of the API: they never
change meaning, and a new feature gets a new code (docs/DESIGN.md, "Reason codes").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: Feature → (stable code, what it says), for every feature a detector predicts.
REASON_CODES: dict[str, tuple[str, str]] = {
    "event_type": ("UNUSUAL_EVENT_TYPE", "an event type unusual after this history"),
    "item_repeat": ("UNUSUAL_ITEM_REPEAT", "an item seen again (or a new one) where the model expected otherwise"),
    "category_new": ("UNUSUAL_CATEGORY_SWITCH", "a switch to a new category (or staying) against the history"),
    "gap": ("UNUSUAL_GAP", "an unusual time since the user's previous event"),
    "price": ("UNUSUAL_PRICE", "a price unusual after this history"),
    "device_change": ("UNUSUAL_DEVICE_CHANGE", "a change of device (or its absence) against the history"),
    "country_change": ("UNUSUAL_COUNTRY_CHANGE", "a change of country (or its absence) against the history"),
}
#: Shares below this many nats are no reason (2.3 nats: ten times rarer than typical).
MIN_CONTRIBUTION = 1.0


def reason_codes(events: Sequence[Mapping[str, Any]], feature_surprise: np.ndarray, targets: Sequence[str], *,
                 top: int = 5, min_contribution: float = MIN_CONTRIBUTION) -> list[dict[str, Any]]:
    """The ``top`` (event, feature) pairs of a window with the largest shares of surprise,
    largest first (ties: the later event first), each at least ``min_contribution`` nats.

    Parameters
    ----------
    events : the window's events, oldest first (contract dicts); the last
        ``len(feature_surprise)`` are the ones the model saw.
    feature_surprise : (seen, len(targets)) float, nats.
    targets : the features of the columns (``bundle.json`` ``feature_surprise_targets``).

    Returns
    -------
    ``{"code", "feature", "event_id", "event_type", "timestamp", "contribution"}`` each;
    ``timestamp`` as the event holds it (epoch ms).

    Examples
    --------
    >>> evs = [{"event_id": "a", "event_type": "view", "timestamp": 1}, {"event_id": "b", "event_type": "buy",
    ...        "timestamp": 2}]
    >>> [r["code"] for r in reason_codes(evs, np.array([[0.1, 3.0], [2.0, 0.2]]), ["gap", "device_change"])]
    ['UNUSUAL_DEVICE_CHANGE', 'UNUSUAL_GAP']
    """
    seen = list(events)[-len(feature_surprise):] if len(feature_surprise) else []
    x = np.asarray(feature_surprise, dtype=np.float64).reshape(len(seen), len(targets))
    pos, col = np.nonzero(x >= min_contribution)
    order = np.lexsort((-pos, -x[pos, col]))[:top]
    out = []
    for i in order.tolist():
        e, feature = seen[int(pos[i])], targets[int(col[i])]
        code = REASON_CODES.get(feature, (f"UNUSUAL_{feature.upper()}", ""))[0]
        out.append({"code": code, "feature": feature, "event_id": e.get("event_id"), "event_type": e["event_type"],
                    "timestamp": e["timestamp"], "contribution": round(float(x[pos[i], col[i]]), 4)})
    return out
