"""Every Prometheus metric of the service, and the small ``track_*`` helpers that update
them. Nothing else declares a metric.

One ``Metrics`` per app, each with its own ``CollectorRegistry``, so tests can build
several apps in one process.

Several workers (``uvicorn --workers N``) share metrics through prometheus_client's
multiprocess mode, switched on by ``PROMETHEUS_MULTIPROC_DIR``:

- the variable must be set before the process imports prometheus_client (the client
  picks its value storage at import): the ``serve`` command sets it, after emptying the
  directory with ``reset_multiproc_dir``, before it starts the workers;
- each worker then writes its values to mmap files in that directory and ``render()``
  aggregates all workers' files (``MultiProcessCollector`` on a fresh registry that holds
  nothing else, as the client's docs require);
- gauges: the queue depth is ``livesum`` (each worker has its own micro-batcher queue;
  the total of live workers is what is waiting), model info is ``livemax`` (one series
  per version/provider/arch that a live worker serves, value 1; a worker that fell back
  to CPU shows up as its own series, a dead worker's disappears);
- a worker calls ``mark_process_dead(os.getpid())`` at shutdown so that its live gauges
  stop counting (counters and histograms of dead workers stay, as they must); a worker
  that could not (SIGKILLed, out of memory) is found at the next scrape: ``render()``
  drops the live gauges of every process that is gone (``sweep_dead_processes``);
- Redis's memory (``seqguard_redis_memory_*``) is ``livemostrecent``: the value the last
  scrape read, whichever worker served it;
- ``seqguard serve`` owns the directory (:func:`multiproc_dir`): it empties it before the
  workers start, whatever their number, and removes a directory it created when it exits
  (and, at its next start, those of runs that were killed);
- only one ``Metrics`` per process in this mode: two would write the same file entries.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shlex
import shutil
import tempfile
from collections import Counter as _Tally
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from app.core.decisions import DECISIONS
from app.core.vocabulary import printable
from app.processes import pid_alive

#: Why the shadow skipped live windows (``seqguard_shadow_dropped_total{reason}``).
SHADOW_DROP_REASONS = ("queue_full", "stopped", "failed")
#: The classic text format, which every Prometheus version reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Request latency: 0.5 ms (a cached decision) .. 5 s (a large batch or a timeout).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: Inference and Redis calls: from 0.1 ms (a GPU batch, a local Redis) up.
FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: Probabilities: fine near 0 (review thresholds chosen at 1% FPR sit there) and near 1.
PROBABILITY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8,
                       0.9, 0.925, 0.95, 0.975, 0.99, 0.995, 0.999, 1.0)
BATCH_SIZE_BUCKETS = tuple(float(2**i) for i in range(13))  # 1 .. 4096
SCORE_PATHS = ("online", "batch")
#: Routes that stream their answer, and the statuses of the problems that can end a stream
#: after its 200 went out (body too slow, body or line too large, an unexpected error, the
#: window store down): their ``seqguard_stream_errors_total`` series exist from the start
#: at 0, so that the first error of a process is an increase (``increase()`` and
#: ``rate()`` do not see a series that appears at 1).
STREAM_ROUTES = ("/batch-score",)
STREAM_ERROR_STATUSES = (408, 413, 500, 503)
_SMALL = 8
#: Unknown event types with a label of their own (the first a process sees); later ones: ``other``.
UNKNOWN_TYPE_LABELS = 20
#: Unknown event types warned about in the log, once each (the first a process sees).
UNKNOWN_TYPE_WARNINGS = 1000

vocab_log = logging.getLogger("seqguard.vocabulary")


class Metrics:
    """The service's metrics on a registry of their own (or the multiprocess files).

    ``registry`` is what ``render()`` exposes: this instance's metrics, without the
    client's ``*_created`` series, plus the client's process/platform/GC collectors in
    single-process mode (they cannot be aggregated across workers); the workers' files in
    multiprocess mode.
    """

    def __init__(self) -> None:
        self.multiproc_dir = os.environ.get(MULTIPROC_ENV) or None
        if self.multiproc_dir is not None:
            if not getattr(values.ValueClass, "_multiprocess", False):
                raise RuntimeError(f"{MULTIPROC_ENV} was set after prometheus_client was imported: set it before "
                                   "the process starts (the client picks its value storage at import)")
            # Values live in the mmap files; the exposition registry holds only the collector.
            self.registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(self.registry, path=self.multiproc_dir)
            reg: CollectorRegistry | None = None
        else:
            reg = CollectorRegistry()
            self.registry = CollectorRegistry()
            for collector in (_WithoutCreated(reg), PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                self.registry.register(collector)

        self.requests = Counter("seqguard_requests_total", "HTTP requests answered, by route template and status.",
                                ("route", "status"), registry=reg)
        self.stream_errors = Counter(
            "seqguard_stream_errors_total",
            "Streamed answers (NDJSON /batch-score) that a problem ended after their status (200) was sent, by "
            "route and the problem's status (the stream's last line); seqguard_requests_total counts them as 200.",
            ("route", "status"), registry=reg)
        self.request_duration = Histogram("seqguard_request_duration_seconds", "HTTP request latency.", ("route",),
                                          buckets=LATENCY_BUCKETS, registry=reg)
        self.events_scored = Counter("seqguard_events_scored_total", "Events scored, online or in batch.", ("path",),
                                     registry=reg)
        self.decisions = Counter("seqguard_decisions_total", "Decisions taken on scored events.", ("decision",),
                                 registry=reg)
        self.anomaly_probability = Histogram("seqguard_anomaly_probability", "Anomaly probability of scored events.",
                                             buckets=PROBABILITY_BUCKETS, registry=reg)
        self.inference_batch_size = Histogram("seqguard_inference_batch_size", "Windows per ONNX Runtime call.",
                                              buckets=BATCH_SIZE_BUCKETS, registry=reg)
        self.inference_duration = Histogram("seqguard_inference_duration_seconds", "Duration of one ONNX Runtime call.",
                                            buckets=FAST_BUCKETS, registry=reg)
        self.queue_depth = Gauge("seqguard_scoring_queue_depth", "Windows waiting for inference.",
                                 multiprocess_mode="livesum", registry=reg)
        self.store_duration = Histogram("seqguard_window_store_duration_seconds", "Duration of window store calls.",
                                        ("op",), buckets=FAST_BUCKETS, registry=reg)
        self.store_errors = Counter("seqguard_window_store_errors_total", "Failed window store calls.", registry=reg)
        self.duplicates = Counter("seqguard_duplicate_events_total", "Replayed event ids answered from the record.",
                                  registry=reg)
        # liveall: with several workers, one series per worker (label pid), so a reload that
        # one worker refused shows.
        self.model_info = Gauge("seqguard_model_info", "The model being served (value 1).",
                                ("version", "provider", "arch"), multiprocess_mode="liveall", registry=reg)
        self.model_reloads = Counter("seqguard_model_reloads_total", "Bundles loaded to replace the live model "
                                     "(admin route, SIGHUP, another worker's reload), by result (ok, refused).",
                                     ("result",), registry=reg)
        self.redis_memory_used = Gauge("seqguard_redis_memory_used_bytes",
                                       "Memory the window store's Redis uses (INFO memory used_memory), read at "
                                       "each scrape.", multiprocess_mode="livemostrecent", registry=reg)
        self.redis_memory_max = Gauge("seqguard_redis_memory_max_bytes",
                                      "The window store's Redis memory limit (maxmemory; 0: none), read at each "
                                      "scrape. At the limit, writes are refused (503).",
                                      multiprocess_mode="livemostrecent", registry=reg)
        self.unknown_event_types = Counter(
            "seqguard_unknown_event_types_total",
            "Scored events whose event type the model does not know (scored with the out-of-vocabulary id), by "
            f"type: the first {UNKNOWN_TYPE_LABELS} types a process sees, later ones as 'other'.",
            ("event_type",), registry=reg)
        # The shadow (app/shadow.py): what a candidate would have decided on the live windows.
        self.shadow_info = Gauge("seqguard_shadow_model_info", "The shadow model scoring the live windows after "
                                 "their answers (value 1; no series: no shadow).", ("version", "provider", "arch"),
                                 multiprocess_mode="liveall", registry=reg)
        self.shadow_decisions = Counter("seqguard_shadow_decisions_total", "Events the shadow scored, by the "
                                        "shadow's version, the live decision and the shadow's.",
                                        ("version", "live", "shadow"), registry=reg)
        self.shadow_disagreements = Counter("seqguard_shadow_disagreements_total", "Events on which the shadow's "
                                            "decision differs from the live one, by the shadow's version (share: "
                                            "over the sum of seqguard_shadow_decisions_total).", ("version",),
                                            registry=reg)
        self.shadow_probability = Histogram("seqguard_shadow_anomaly_probability", "The shadow's anomaly "
                                            "probability of the events it scored.", buckets=PROBABILITY_BUCKETS,
                                            registry=reg)
        self.shadow_dropped = Counter("seqguard_shadow_dropped_total", "Live windows the shadow did not score, by "
                                      "reason (queue_full, stopped, failed); the live answers never wait on it.",
                                      ("reason",), registry=reg)

        # Children bound once: the hot path skips labels() (a lock and a tuple per call);
        # the fixed label values are created now so their series exist at 0.
        self._scored = {p: self.events_scored.labels(p) for p in SCORE_PATHS}
        self._decided = {d: self.decisions.labels(d) for d in DECISIONS}
        self._children: dict[tuple[Any, ...], Any] = {}
        for route in STREAM_ROUTES:
            for status in STREAM_ERROR_STATUSES:
                self._children["e", route, status] = self.stream_errors.labels(route, str(status))
        self._model_labels: tuple[str, str, str] | None = None
        self._shadow_labels: tuple[str, str, str] | None = None
        self._shadow_series: dict[str, tuple[dict[tuple[str, str], Any], Any]] = {}  # version -> its children
        for reason in SHADOW_DROP_REASONS:  # at 0 from the start, so increase() sees the first drop
            self.shadow_dropped.labels(reason)
        self._unknown: dict[str, Any] = {}  # unknown event type -> its child (at most UNKNOWN_TYPE_LABELS)
        self._warned: set[str] = set()  # unknown event types warned about (at most UNKNOWN_TYPE_WARNINGS)
        self._warned_full = False
        self._prob_bounds = np.asarray(self.anomaly_probability._upper_bounds, dtype=np.float64)

    # Requests -------------------------------------------------------------------------

    def track_request(self, route: str, status: int, seconds: float) -> None:
        """One answered request. ``route`` is the route template (``/events``), never the
        raw path, so that label values stay few."""
        key = ("r", route, status)
        pair = self._children.get(key)
        if pair is None:
            pair = self._children[key] = (self.requests.labels(route, str(status)), self.request_duration.labels(route))
        pair[0].inc()
        pair[1].observe(seconds)

    def track_stream_error(self, route: str, status: int) -> None:
        """A streamed answer that a problem of status ``status`` ended, as its last line,
        after the answer's 200 had gone out (``track_request`` counts that 200)."""
        key = ("e", route, status)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.stream_errors.labels(route, str(status))
        child.inc()

    # Scoring ----------------------------------------------------------------------------

    def track_scored(self, path: str, probs: np.ndarray, decisions: Iterable[str]) -> None:
        """Events scored on ``path`` (online|batch): counts, decisions and the probability
        histogram, vectorised over the batch."""
        probs = np.asarray(probs, dtype=np.float64).reshape(-1)
        n = int(probs.shape[0])
        if n == 0:
            return
        self._scored[path].inc(n)
        if n <= _SMALL:  # numpy's fixed cost exceeds a few observe() calls (~1 µs each)
            decided = self._decided
            for d in decisions:
                decided[d].inc()
            hist = self.anomaly_probability
            for p in probs.tolist():
                if math.isfinite(p):
                    hist.observe(p)
            return
        for decision, k in _Tally(decisions).items():
            self._decided[decision].inc(k)
        self._observe_many(self.anomaly_probability, probs)

    def _observe_many(self, hist: Histogram, x: np.ndarray) -> None:
        """``hist.observe`` for every finite value of ``x`` at the cost of one call per
        bucket: the client keeps per-bucket (not cumulative) counts and puts a value in
        the first bucket whose bound is >= it, which is ``searchsorted(side='left')``."""
        x = x[np.isfinite(x)]
        if not x.size:
            return
        counts = np.bincount(np.searchsorted(self._prob_bounds, x, side="left"), minlength=self._prob_bounds.size)
        for i in np.flatnonzero(counts):
            hist._buckets[i].inc(int(counts[i]))
        hist._sum.inc(float(x.sum()))

    def track_unknown_types(self, counts: Mapping[str, int]) -> None:
        """Scored events of event types the model does not know: ``{raw name: events}``.

        The label set is bounded: the first ``UNKNOWN_TYPE_LABELS`` names get a series of
        their own, later ones count under ``other``. A label is the name with control and
        other invisible characters escaped (:func:`unknown_type_label`), so a client's
        carriage return, NUL or escape sequence never reaches the exposition. Each name is
        warned about once in the log (the first ``UNKNOWN_TYPE_WARNINGS`` names; then once
        that more came).
        """
        for name, n in counts.items():
            if n <= 0:
                continue
            label = unknown_type_label(name)
            child = self._unknown.get(label)
            if child is None:
                if len(self._unknown) < UNKNOWN_TYPE_LABELS:
                    child = self._unknown[label] = self.unknown_event_types.labels(label)
                else:
                    child = self.unknown_event_types.labels("other")
            child.inc(n)
            if name not in self._warned and not self._warned_full:
                self._warn_unknown(name)

    def _warn_unknown(self, name: str) -> None:
        if len(self._warned) < UNKNOWN_TYPE_WARNINGS:
            self._warned.add(name)
            # The suggested setting is shell-quoted: a client's name (say '$(...)') must not
            # turn into a command when an operator pastes the line into a shell.
            vocab_log.warning(
                "event type %r is unknown to the model: its events are scored with the out-of-vocabulary id. If it "
                "is another name for one of the model's event types (GET /model lists them), alias it: "
                "SEQGUARD_EVENT_ALIASES=%s (seqguard score and serve: --alias NAME=TYPE)",
                name, shlex.quote(json.dumps({name: "TYPE"})))
        elif not self._warned_full:
            self._warned_full = True
            vocab_log.warning("more than %d distinct unknown event types: no more warnings about new ones "
                              "(seqguard_unknown_event_types_total counts them)", UNKNOWN_TYPE_WARNINGS)

    def track_inference(self, batch_size: int, seconds: float) -> None:
        """One ONNX Runtime call over ``batch_size`` windows."""
        self.inference_batch_size.observe(batch_size)
        self.inference_duration.observe(seconds)

    def set_queue_depth(self, n: int) -> None:
        self.queue_depth.set(n)

    # Window store -----------------------------------------------------------------------

    def track_store(self, op: str, seconds: float) -> None:
        key = ("s", op)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.store_duration.labels(op)
        child.observe(seconds)

    def track_model_reload(self, result: str) -> None:
        """A bundle loaded to replace the live model: ``ok`` (swapped in) or ``refused``."""
        self.model_reloads.labels(result).inc()

    def track_store_error(self, n: int = 1) -> None:
        self.store_errors.inc(n)

    def set_redis_memory(self, used_bytes: int, max_bytes: int) -> None:
        """Redis's ``used_memory`` and ``maxmemory`` (0: no limit), in bytes."""
        self.redis_memory_used.set(used_bytes)
        self.redis_memory_max.set(max_bytes)

    def track_duplicate(self, n: int = 1) -> None:
        if n:
            self.duplicates.inc(n)

    # Model ------------------------------------------------------------------------------

    def set_model_info(self, version: str, provider: str, arch: str) -> None:
        """The served model, as one series at 1; a previous model's series goes (to 0 in
        multiprocess mode, where a written value cannot be taken back)."""
        labels = (version, provider, arch)
        if self._model_labels is not None and self._model_labels != labels:
            self.model_info.labels(*self._model_labels).set(0)
            self.model_info.remove(*self._model_labels)
        self.model_info.labels(*labels).set(1)
        self._model_labels = labels

    def set_shadow_info(self, labels: tuple[str, str, str] | None) -> None:
        """The shadow model as (version, provider, arch), one series at 1; ``None``: no
        shadow, no series."""
        if self._shadow_labels is not None and self._shadow_labels != labels:
            self.shadow_info.labels(*self._shadow_labels).set(0)
            self.shadow_info.remove(*self._shadow_labels)
        if labels is not None:
            self.shadow_info.labels(*labels).set(1)
        self._shadow_labels = labels

    def track_shadow(self, version: str, live: Iterable[str], shadow: Iterable[str], probs: Iterable[float]) -> None:
        """The decisions and probabilities of the shadow ``version`` on windows the live
        model decided ``live``. Each version's pairs exist at 0 from its first batch, so a
        new candidate's share starts clean (``sum by (version)``)."""
        series = self._shadow_series.get(version)
        if series is None:
            pairs = {(a, b): self.shadow_decisions.labels(version, a, b) for a in DECISIONS for b in DECISIONS}
            series = self._shadow_series[version] = (pairs, self.shadow_disagreements.labels(version))
        pairs, disagreements = series
        differ = 0
        for (a, b), n in _Tally(zip(live, shadow, strict=True)).items():
            pairs[a, b].inc(n)
            differ += n if a != b else 0
        disagreements.inc(differ)
        self._observe_many(self.shadow_probability, np.asarray(list(probs), dtype=np.float64))

    def track_shadow_dropped(self, reason: str, n: int) -> None:
        """``n`` live windows the shadow did not score, and why."""
        self.shadow_dropped.labels(reason).inc(n)

    # Exposition -------------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of ``GET /metrics``; all workers' in multiprocess mode,
        without the live gauges of workers that are gone."""
        if self.multiproc_dir is not None:
            sweep_dead_processes(self.multiproc_dir)
        return generate_latest(self.registry), CONTENT_TYPE


class _WithoutCreated(Collector):
    """The metrics of ``inner`` without their ``*_created`` samples: in the classic text
    format they are extra gauge series per label set, and the multiprocess aggregate has
    none, so leaving them out makes both modes expose the same series."""

    def __init__(self, inner: CollectorRegistry) -> None:
        self.inner = inner

    def collect(self) -> Iterable[Metric]:
        for family in self.inner.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


def unknown_type_label(name: str) -> str:
    r"""The ``event_type`` label of an unknown type: the name, with the characters the
    text format has no escape for (control, format and separator characters but the
    newline, which prometheus_client writes as ``\n``) as Python escapes.

    >>> print(unknown_type_label("login"), unknown_type_label("a\r\nb\x1b[2J\u200b"))
    login a\r
    b\x1b[2J\u200b
    """
    if name.isprintable():
        return name
    return "".join(c if c == "\n" else printable(c) for c in name)


def mark_process_dead(pid: int, path: str | os.PathLike[str] | None = None) -> None:
    """Drop a worker's live gauges (``livesum``/``livemax``) from the aggregate. A no-op
    outside multiprocess mode."""
    path = path if path is not None else os.environ.get(MULTIPROC_ENV)
    if path:
        multiprocess.mark_process_dead(pid, str(path))


_LIVE_FILE = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")
_OWNED_PREFIX = "seqguard-metrics-"


def sweep_dead_processes(path: str | os.PathLike[str]) -> list[int]:
    """:func:`mark_process_dead` for every process whose live-gauge files are in ``path``
    but which is no longer running (a worker SIGKILLed before it could say so); the pids.
    A pid the system gave to a new process meanwhile keeps its files until that one ends."""
    dead = set()
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(path):
            m = _LIVE_FILE.match(name)
            if m is not None and not pid_alive(int(m.group(1))):
                dead.add(int(m.group(1)))
    for pid in dead:
        multiprocess.mark_process_dead(pid, str(path))
    return sorted(dead)


@contextlib.contextmanager
def multiproc_dir(workers: int, *, tmp: str | os.PathLike[str] | None = None) -> Iterator[Path | None]:
    """The metrics directory of one ``seqguard serve`` run, for the workers it starts.

    With ``PROMETHEUS_MULTIPROC_DIR`` set: that directory, emptied of the value files of a
    previous run (whatever the number of workers), kept at exit. Unset, with more than one
    worker: a new ``seqguard-metrics-<pid>-*`` directory in the temp dir, put into the
    environment for the workers, removed at exit (with those of earlier runs whose process
    is gone: a SIGKILLed run cannot clean up). Unset, one worker: None (single-process
    metrics).
    """
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        yield reset_multiproc_dir(given)
        return
    if workers <= 1:
        yield None
        return
    base = Path(tmp if tmp is not None else tempfile.gettempdir())
    for stale in base.glob(_OWNED_PREFIX + "*"):
        pid = stale.name[len(_OWNED_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)) and stale.is_dir() and stale.stat().st_uid == os.getuid():
            shutil.rmtree(stale, ignore_errors=True)
    root = Path(tempfile.mkdtemp(prefix=f"{_OWNED_PREFIX}{os.getpid()}-", dir=base))
    os.environ[MULTIPROC_ENV] = str(root)
    try:
        yield root
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(root, ignore_errors=True)


def reset_multiproc_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` and remove the value files of a previous run from it: the client's
    docs require an empty directory when the workers start, else old counts come back."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    for f in root.glob("*.db"):
        f.unlink()
    return root
