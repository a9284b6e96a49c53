"""Shadow scoring: a candidate model scores the same windows as the live one, after the
live answers are sent, and the metrics compare the two.

``POST /events`` hands the windows it scored, with the live decisions, to
:func:`score_soon` just before it answers. That only queues a task: the shadow's
micro-batcher (``AppState.shadow``, :mod:`app.live`) scores in the background, on its
own thread at a lower CPU priority, and never touches an answer, a decision or a stored
idempotency record. What it finds goes to the shadow's metrics:

- ``seqguard_shadow_decisions_total{version, live, shadow}``: each event's pair of
  decisions, by the shadow's version (a new candidate starts its own series);
- ``seqguard_shadow_disagreements_total{version}``: the events whose decisions differ (their
  share is this over the sum of the first);
- ``seqguard_shadow_anomaly_probability``: the shadow's score histogram, beside the live
  ``seqguard_anomaly_probability``;
- ``seqguard_shadow_dropped_total{reason}``: windows the shadow did not score (its queue
  full, it was stopped or swapped, or it failed), never a reason to fail a request.

``SEQGUARD_SHADOW_SAMPLE`` (0 < share <= 1) shadows a random share of the windows: the
shadow's CPU comes out of the live model's on a busy host (docs/PERFORMANCE.md).

Backfills (``/batch-score``) are not shadowed: they are the operator's, and a candidate is
compared offline on a log with ``seqguard score`` and ``seqguard evaluate``.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from typing import Any

from app.microbatcher import QueueFull, Stopped, Window

log = logging.getLogger("seqguard.shadow")


def score_soon(state: Any, windows: Sequence[Window], live_decisions: Sequence[str]) -> None:
    """Queue the shadow's scoring of ``windows`` (each oldest first, the scored event last)
    and its comparison with ``live_decisions`` (one per window); returns at once. Nothing
    is done where no shadow is served (``state``: an ``AppState``)."""
    shadow = state.shadow
    if shadow is None or not windows:
        return
    if (share := state.settings.shadow_sample) < 1.0:  # SEQGUARD_SHADOW_SAMPLE: a random share of the windows
        picked = [i for i in range(len(windows)) if random.random() < share]
        if not picked:
            return
        windows, live_decisions = [windows[i] for i in picked], [live_decisions[i] for i in picked]
    if not shadow.batcher.has_room(len(windows)):
        state.metrics.track_shadow_dropped("queue_full", len(windows))
        return
    task = asyncio.create_task(_compare(state, shadow, windows, live_decisions), name="shadow-score")
    state.shadow_tasks.add(task)
    task.add_done_callback(state.shadow_tasks.discard)


async def _compare(state: Any, shadow: Any, windows: Sequence[Window], live_decisions: Sequence[str]) -> None:
    metrics = state.metrics
    try:
        scores = await shadow.batcher.score(windows)
    except Stopped:
        metrics.track_shadow_dropped("stopped", len(windows))
        return
    except QueueFull:
        metrics.track_shadow_dropped("queue_full", len(windows))
        return
    except Exception:  # a shadow's failure is the shadow's: logged, counted, never the request's
        log.exception("the shadow %s failed to score %d windows", shadow.version, len(windows))
        metrics.track_shadow_dropped("failed", len(windows))
        return
    metrics.track_shadow(shadow.version, live_decisions, scores.decision, scores.probability)
