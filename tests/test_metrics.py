"""Metrics: every contract metric is exposed with its type, the helpers move the values,
apps do not share registries, and several real processes aggregate in multiprocess mode."""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import signal
from pathlib import Path

import httpx
import numpy as np
import pytest
from e2e.e2e_support import T0, LiveServer, event
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from app import metrics as metrics_module
from app.metrics import (
    MULTIPROC_ENV,
    PROBABILITY_BUCKETS,
    STREAM_ERROR_STATUSES,
    UNKNOWN_TYPE_LABELS,
    Metrics,
    mark_process_dead,
    multiproc_dir,
    reset_multiproc_dir,
    sweep_dead_processes,
)

CONTRACT = {
    "seqguard_requests_total": "counter",
    "seqguard_stream_errors_total": "counter",
    "seqguard_request_duration_seconds": "histogram",
    "seqguard_events_scored_total": "counter",
    "seqguard_decisions_total": "counter",
    "seqguard_anomaly_probability": "histogram",
    "seqguard_inference_batch_size": "histogram",
    "seqguard_inference_duration_seconds": "histogram",
    "seqguard_scoring_queue_depth": "gauge",
    "seqguard_window_store_duration_seconds": "histogram",
    "seqguard_window_store_errors_total": "counter",
    "seqguard_duplicate_events_total": "counter",
    "seqguard_model_info": "gauge",
    "seqguard_model_reloads_total": "counter",
    "seqguard_unknown_event_types_total": "counter",
    "seqguard_redis_memory_used_bytes": "gauge",
    "seqguard_redis_memory_max_bytes": "gauge",
    "seqguard_shadow_model_info": "gauge",
    "seqguard_shadow_decisions_total": "counter",
    "seqguard_shadow_disagreements_total": "counter",
    "seqguard_shadow_anomaly_probability": "histogram",
    "seqguard_shadow_dropped_total": "counter",
}


@pytest.fixture(autouse=True)
def _single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)


def types_in(text: str) -> dict[str, str]:
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.M))


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_every_contract_metric_is_exposed_with_its_type() -> None:
    m = Metrics()
    body, content_type = m.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    types = types_in(body.decode())
    assert {k: types.get(k) for k in CONTRACT} == CONTRACT
    # Nothing of ours beyond the contract (process_* and python_* come from the client).
    assert {k for k in types if k.startswith("seqguard_")} == set(CONTRACT)


def test_helpers_update_values() -> None:
    m = Metrics()
    m.track_request("/events", 200, 0.003)
    m.track_request("/events", 200, 0.0004)
    m.track_request("/events", 503, 0.001)
    assert value(m, "seqguard_requests_total", route="/events", status="200") == 2
    assert value(m, "seqguard_requests_total", route="/events", status="503") == 1
    assert value(m, "seqguard_request_duration_seconds_count", route="/events") == 3
    assert value(m, "seqguard_request_duration_seconds_bucket", route="/events", le="0.0005") == 1

    m.track_scored("online", np.array([0.01, 0.6, 0.97], np.float32), np.array(["allow", "review", "block"], object))
    m.track_scored("batch", np.array([0.2]), ["allow"])
    m.track_scored("batch", np.array([]), [])
    assert value(m, "seqguard_events_scored_total", path="online") == 3
    assert value(m, "seqguard_events_scored_total", path="batch") == 1
    assert value(m, "seqguard_decisions_total", decision="allow") == 2
    assert value(m, "seqguard_decisions_total", decision="block") == 1
    assert value(m, "seqguard_anomaly_probability_count") == 4
    assert value(m, "seqguard_anomaly_probability_sum") == pytest.approx(0.01 + 0.6 + 0.97 + 0.2, rel=1e-6)

    m.track_inference(48, 0.0021)
    assert value(m, "seqguard_inference_batch_size_bucket", le="32.0") == 0
    assert value(m, "seqguard_inference_batch_size_bucket", le="64.0") == 1
    assert value(m, "seqguard_inference_duration_seconds_sum") == pytest.approx(0.0021)

    m.set_queue_depth(17)
    assert value(m, "seqguard_scoring_queue_depth") == 17
    m.track_store("append", 0.0003)
    m.track_store_error()
    m.track_duplicate()
    m.track_duplicate(2)
    assert value(m, "seqguard_window_store_duration_seconds_count", op="append") == 1
    assert value(m, "seqguard_window_store_errors_total") == 1
    assert value(m, "seqguard_duplicate_events_total") == 3


def test_stream_errors_counted_by_route_and_status_from_zero() -> None:
    """Each known status of /batch-score has its series at 0 before any stream was cut, so
    that the first cut of a process shows in ``increase()``; an unforeseen status gets one."""
    m = Metrics()
    for status in STREAM_ERROR_STATUSES:
        assert value(m, "seqguard_stream_errors_total", route="/batch-score", status=str(status)) == 0
    m.track_stream_error("/batch-score", 413)
    m.track_stream_error("/batch-score", 413)
    m.track_stream_error("/batch-score", 503)
    m.track_stream_error("/batch-score", 429)
    assert value(m, "seqguard_stream_errors_total", route="/batch-score", status="413") == 2
    assert value(m, "seqguard_stream_errors_total", route="/batch-score", status="503") == 1
    assert value(m, "seqguard_stream_errors_total", route="/batch-score", status="429") == 1
    assert value(m, "seqguard_stream_errors_total", route="/batch-score", status="408") == 0
    assert value(m, "seqguard_requests_total", route="/batch-score", status="200") is None  # a count of its own


def test_unknown_event_types_bounded_labels_and_one_warning_each(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    m = Metrics()
    m.track_unknown_types({"login": 3, "logout": 0})
    m.track_unknown_types({"login": 2})
    assert value(m, "seqguard_unknown_event_types_total", event_type="login") == 5
    assert value(m, "seqguard_unknown_event_types_total", event_type="logout") is None  # no events, no series
    names = [f"t{i:02d}" for i in range(UNKNOWN_TYPE_LABELS + 5)]  # login + these: 26 distinct names
    for name in names:
        m.track_unknown_types({name: 1})
    m.track_unknown_types({names[-1]: 4, names[0]: 1})
    labelled = UNKNOWN_TYPE_LABELS - 1  # the first names after login
    for name in names[:labelled]:
        assert value(m, "seqguard_unknown_event_types_total", event_type=name) == 1 + (name == names[0])
    for name in names[labelled:]:
        assert value(m, "seqguard_unknown_event_types_total", event_type=name) is None
    assert value(m, "seqguard_unknown_event_types_total", event_type="other") == len(names) - labelled + 4
    series = [line for line in m.render()[0].decode().splitlines()
              if line.startswith("seqguard_unknown_event_types_total{")]
    assert len(series) == UNKNOWN_TYPE_LABELS + 1  # the bounded label set, plus "other"
    warned = [r.getMessage() for r in caplog.records if r.name == "seqguard.vocabulary"]
    assert len(warned) == 1 + len(names)  # once per name, however often it comes
    assert "'login' is unknown to the model" in warned[0] and "out-of-vocabulary id" in warned[0]
    assert """SEQGUARD_EVENT_ALIASES='{"login": "TYPE"}'""" in warned[0] and "--alias NAME=TYPE" in warned[0]

    # The warnings' memory is bounded too: past it, one last line, then silence.
    caplog.clear()
    monkeypatch.setattr(metrics_module, "UNKNOWN_TYPE_WARNINGS", 3)
    small = Metrics()
    for i in range(6):
        small.track_unknown_types({f"x{i}\nforged log line": 1})
    warned = [r.getMessage() for r in caplog.records if r.name == "seqguard.vocabulary"]
    assert len(warned) == 4 and "no more warnings" in warned[-1]
    assert all("\n" not in w for w in warned)  # a name cannot forge log lines
    assert value(small, "seqguard_unknown_event_types_total", event_type="x5\nforged log line") == 1


def test_fixed_label_values_exist_at_zero() -> None:
    m = Metrics()
    for d in ("allow", "review", "block"):
        assert value(m, "seqguard_decisions_total", decision=d) == 0
    for p in ("online", "batch"):
        assert value(m, "seqguard_events_scored_total", path=p) == 0


def test_vectorised_probability_histogram_matches_observe() -> None:
    rng = np.random.default_rng(0)
    probs = np.concatenate([rng.random(5000) ** 4, np.asarray(PROBABILITY_BUCKETS), [0.0, 1.0, np.nan]])
    decisions = ["allow"] * probs.size
    m = Metrics()
    m.track_scored("online", probs, decisions)
    ref_registry = CollectorRegistry()
    ref = Histogram("seqguard_anomaly_probability", "x", buckets=PROBABILITY_BUCKETS, registry=ref_registry)
    for p in probs[np.isfinite(probs)]:
        ref.observe(float(p))

    def samples(text: str) -> dict[str, float]:
        fam = {f.name: f for f in text_string_to_metric_families(text)}["seqguard_anomaly_probability"]
        return {s.name + str(sorted(s.labels.items())): s.value for s in fam.samples if not s.name.endswith("created")}

    got, want = samples(m.render()[0].decode()), samples(generate_latest(ref_registry).decode())
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-12), k


def test_model_info_switches_series() -> None:
    m = Metrics()
    m.set_model_info("v1", "CUDAExecutionProvider", "transformer")
    m.set_model_info("v1", "CUDAExecutionProvider", "transformer")
    m.set_model_info("v2", "CPUExecutionProvider", "gru")
    assert value(m, "seqguard_model_info", version="v2", provider="CPUExecutionProvider", arch="gru") == 1
    assert value(m, "seqguard_model_info", version="v1", provider="CUDAExecutionProvider", arch="transformer") is None


def test_two_instances_do_not_collide() -> None:
    a, b = Metrics(), Metrics()
    a.track_duplicate(5)
    a.track_request("/events", 200, 0.01)
    assert value(a, "seqguard_duplicate_events_total") == 5
    assert value(b, "seqguard_duplicate_events_total") == 0
    assert value(b, "seqguard_requests_total", route="/events", status="200") is None


def test_multiprocess_env_after_import_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    with pytest.raises(RuntimeError, match="before"):
        Metrics()


def test_multiproc_dir_helpers(tmp_path: Path) -> None:
    d = tmp_path / "prom"
    reset_multiproc_dir(d)
    (d / "counter_123.db").write_bytes(b"stale")
    (d / "keep.txt").write_text("x")
    reset_multiproc_dir(d)
    assert sorted(p.name for p in d.iterdir()) == ["keep.txt"]
    mark_process_dead(123)  # no directory configured: a no-op
    (d / "gauge_livesum_123.db").write_bytes(b"x")
    (d / "counter_123.db").write_bytes(b"x")
    mark_process_dead(123, d)
    assert sorted(p.name for p in d.iterdir()) == ["counter_123.db", "keep.txt"]


# Multiprocess: real worker processes (spawned, so prometheus_client is imported with the
# variable set), each writing its own values; a third process renders the aggregate.

def _worker(requests: int, depth: int, ready: mp.synchronize.Event, release: mp.synchronize.Event) -> None:
    m = Metrics()
    for _ in range(requests):
        m.track_request("/events", 200, 0.002)
    m.track_scored("online", np.array([0.01] * 5 + [0.97] * 5), ["allow"] * 5 + ["block"] * 5)  # vectorised path
    m.track_scored("online", np.array([0.5]), ["review"])
    m.track_inference(2, 0.001)
    m.track_stream_error("/batch-score", 408)
    m.set_queue_depth(depth)
    m.set_model_info("v1", "CPUExecutionProvider", "transformer")
    ready.set()
    release.wait(120)


def _render() -> tuple[int, str]:
    return os.getpid(), Metrics().render()[0].decode()


def _values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_multiprocess_aggregates_workers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(MULTIPROC_ENV, str(reset_multiproc_dir(tmp_path / "prom")))
    ctx = mp.get_context("spawn")
    ready = [ctx.Event(), ctx.Event()]
    release = ctx.Event()
    workers = [ctx.Process(target=_worker, args=(n, d, r, release)) for n, d, r in ((3, 5, ready[0]), (4, 6, ready[1]))]
    for w in workers:
        w.start()
    try:
        for r in ready:
            assert r.wait(120), "worker did not start"
        with ctx.Pool(1) as pool:
            render_pid, text = pool.apply(_render)
        v = _values(text)
        assert types_in(text).get("seqguard_requests_total") == "counter"
        assert v["seqguard_requests_total", (("route", "/events"), ("status", "200"))] == 7
        assert v["seqguard_request_duration_seconds_count", (("route", "/events"),)] == 7
        assert v["seqguard_events_scored_total", (("path", "online"),)] == 22
        assert v["seqguard_decisions_total", (("decision", "block"),)] == 10
        assert v["seqguard_decisions_total", (("decision", "review"),)] == 2
        assert v["seqguard_anomaly_probability_count", ()] == 22
        assert v["seqguard_anomaly_probability_bucket", (("le", "0.01"),)] == 10
        assert v["seqguard_anomaly_probability_bucket", (("le", "0.5"),)] == 12
        assert v["seqguard_anomaly_probability_sum", ()] == pytest.approx(2 * (0.05 + 4.85 + 0.5))
        assert v["seqguard_inference_batch_size_count", ()] == 2
        assert v["seqguard_stream_errors_total", (("route", "/batch-score"), ("status", "408"))] == 2
        assert v["seqguard_stream_errors_total", (("route", "/batch-score"), ("status", "503"))] == 0
        assert v["seqguard_scoring_queue_depth", ()] == 11  # livesum over live workers
        model_info = {labels: n for (name, labels), n in v.items() if name == "seqguard_model_info"}
        assert sorted(dict(labels)["pid"] for labels in model_info) == sorted(str(w.pid) for w in workers)
        assert all(dict(labels)["version"] == "v1" and n == 1 for labels, n in model_info.items())  # liveall
    finally:
        release.set()
        for w in workers:
            w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]

    for pid in (*(w.pid for w in workers), render_pid):
        assert pid is not None
        mark_process_dead(pid)
    with ctx.Pool(1) as pool:
        _, text = pool.apply(_render)
    v = _values(text)
    assert v["seqguard_requests_total", (("route", "/events"), ("status", "200"))] == 7  # counters outlive workers
    assert v.get(("seqguard_scoring_queue_depth", ()), 0) == 0  # dead workers' live gauges are gone
    assert not [k for k in v if k[0] == "seqguard_model_info"]


def test_a_sigkilled_workers_live_gauges_go_at_the_next_scrape(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    # A worker killed with work queued never calls mark_process_dead: its queue depth
    # must not stay in the total of an idle service.
    prom = reset_multiproc_dir(tmp_path / "prom")
    monkeypatch.setenv(MULTIPROC_ENV, str(prom))
    ctx = mp.get_context("spawn")
    # Events of their own: a process killed while it waits on one leaves it unusable.
    ready, never = ctx.Event(), ctx.Event()
    victim = ctx.Process(target=_worker, args=(2, 1000, ready, never))
    survivor_ready, release = ctx.Event(), ctx.Event()
    survivor = ctx.Process(target=_worker, args=(1, 3, survivor_ready, release))
    victim.start()
    survivor.start()
    try:
        assert ready.wait(120) and survivor_ready.wait(120), "workers did not start"
        with ctx.Pool(1) as pool:
            _, text = pool.apply(_render)
        assert _values(text)["seqguard_scoring_queue_depth", ()] == 1003
        victim.kill()  # SIGKILL: no shutdown, no mark_process_dead
        victim.join(60)
        assert (prom / f"gauge_livesum_{victim.pid}.db").exists()
        with ctx.Pool(1) as pool:
            _, text = pool.apply(_render)
        v = _values(text)
        assert v["seqguard_scoring_queue_depth", ()] == 3  # the live worker's alone
        assert v["seqguard_requests_total", (("route", "/events"), ("status", "200"))] == 3  # counters stay
        assert not (prom / f"gauge_livesum_{victim.pid}.db").exists()
    finally:
        # Killed, not released: setting an Event another process may have stopped
        # waiting on (its 120 s wait ran out on a slow machine) can block for ever.
        for p in (victim, survivor):
            if p.is_alive():
                p.kill()
            p.join(60)


def test_sweep_keeps_live_processes_and_other_files(tmp_path: Path) -> None:
    dead = mp.get_context("spawn").Process(target=os.getpid)
    dead.start()
    dead.join(60)
    assert dead.pid is not None
    for name in (f"gauge_livesum_{dead.pid}.db", f"gauge_livemax_{dead.pid}.db", f"counter_{dead.pid}.db",
                 f"gauge_livesum_{os.getpid()}.db", f"gauge_all_{dead.pid}.db"):
        (tmp_path / name).write_bytes(b"x")
    assert sweep_dead_processes(tmp_path) == [dead.pid]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"counter_{dead.pid}.db", f"gauge_livesum_{os.getpid()}.db", f"gauge_all_{dead.pid}.db"])
    assert sweep_dead_processes(tmp_path / "missing") == []


def test_multiproc_dir_of_a_serve_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # One worker, no directory: single-process metrics.
    with multiproc_dir(1, tmp=tmp_path) as d:
        assert d is None and MULTIPROC_ENV not in os.environ
    # A directory given: emptied of a previous run's values (whatever the workers), kept.
    given = tmp_path / "given"
    given.mkdir()
    (given / "counter_1.db").write_bytes(b"old run")
    monkeypatch.setenv(MULTIPROC_ENV, str(given))
    with multiproc_dir(1, tmp=tmp_path) as d:
        assert d == given and not list(given.iterdir())
    assert given.is_dir() and os.environ[MULTIPROC_ENV] == str(given)
    monkeypatch.delenv(MULTIPROC_ENV)
    # Several workers: a directory of this run, in the environment while it runs, removed after;
    # those of killed runs (their process gone) go too, those of running ones stay.
    dead = mp.get_context("spawn").Process(target=os.getpid)
    dead.start()
    dead.join(60)
    stale = tmp_path / f"seqguard-metrics-{dead.pid}-abc"
    running = tmp_path / f"seqguard-metrics-{os.getppid()}-def"
    for old in (stale, running):
        old.mkdir()
        (old / "counter_9.db").write_bytes(b"x")
    with multiproc_dir(2, tmp=tmp_path) as d:
        assert d is not None and d.parent == tmp_path and d.name.startswith(f"seqguard-metrics-{os.getpid()}-")
        assert os.environ[MULTIPROC_ENV] == str(d)
        (d / "counter_2.db").write_bytes(b"x")
    assert MULTIPROC_ENV not in os.environ
    assert sorted(p.name for p in tmp_path.glob("seqguard-metrics-*")) == [running.name]


# Real `seqguard serve` runs (issue 8): what a run leaves behind for the next.


def _events_counted(server: LiveServer) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return sum(v for (name, labels), v in _values(text).items()
               if name == "seqguard_requests_total" and dict(labels).get("route") == "/events")


def test_one_worker_with_a_multiproc_dir_starts_from_zero(tmp_path: Path) -> None:
    prom = tmp_path / "prom"
    prom.mkdir()
    for run in range(2):
        with LiveServer(None, tmp_path, env={MULTIPROC_ENV: str(prom)}, data_dir=tmp_path / "redis") as server:
            assert _events_counted(server) == 0, f"run {run}: a previous run's counters came back"
            for i in range(3):
                assert httpx.post(server.url + "/events", json=event(f"r{run}-{i}", "u1", T0 + i),
                                  timeout=10).status_code == 200
            assert _events_counted(server) == 3


def test_multi_worker_runs_leave_no_metrics_folder(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {"TMPDIR": str(tmp)}
    with LiveServer(None, tmp_path, workers=2, env=env, data_dir=tmp_path / "redis") as server:
        [folder] = tmp.glob("seqguard-metrics-*")
        assert list(folder.glob("*.db"))  # the workers' values live there
        assert _events_counted(server) == 0
    assert not list(tmp.glob("seqguard-metrics-*"))  # SIGTERM: removed at exit
    killed = LiveServer(None, tmp_path, workers=2, env=env, data_dir=tmp_path / "redis").start()
    assert killed.proc is not None
    os.killpg(killed.proc.pid, signal.SIGKILL)  # the whole run, workers included: no cleanup
    killed.proc.wait(30)
    killed.proc = None
    [left] = tmp.glob("seqguard-metrics-*")
    with LiveServer(None, tmp_path, workers=2, env=env, data_dir=tmp_path / "redis"):
        assert left not in tmp.glob("seqguard-metrics-*")  # swept by the next run
    assert not list(tmp.glob("seqguard-metrics-*"))
