"""Log output (issue 9): never wrapped off a terminal, JSON lines on request, and the CPU
fallback said once, as information on a host with no GPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TAOBAO_100

from app.core import logs
from app.core.scorer import host_has_gpu

ROOT = Path(__file__).resolve().parents[1]


def _score(tmp_path: Path, fmt: str) -> tuple[list[str], str]:
    """stderr lines of `seqguard score` on an events file under a long path, stderr a pipe."""
    deep = tmp_path / ("a_directory_name_long_enough_to_pass_eighty_columns_" * 2) / "events.csv.gz"
    deep.parent.mkdir(parents=True)
    deep.write_bytes(TAOBAO_100.read_bytes())
    env = os.environ | {"SEQGUARD_LOG_FORMAT": fmt}
    res = subprocess.run([sys.executable, "-m", "app.cli", "score", str(ROOT / "app/bundles/default"),
                          "--events", str(deep), "--format", "taobao", "--out", str(tmp_path / "r.jsonl")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120, check=True)
    return [line for line in res.stderr.splitlines() if line.strip()], str(deep)


def test_json_lines_and_one_cpu_fallback_record(tmp_path: Path):
    lines, deep = _score(tmp_path, "json")
    records = [json.loads(line) for line in lines]  # every line: the summaries were plain text (attack review)
    assert any(r["logger"] == "seqguard.cli" and "events scored on" in r["message"] for r in records)
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    assert any(deep in r["message"] for r in records), "the path arrives whole, in one record"
    fallback = [r for r in records if "running on CPU" in r["message"]]
    assert len(fallback) == 1
    if not host_has_gpu():
        assert fallback[0]["level"] == "INFO" and "no GPU" in fallback[0]["message"]


def test_plain_lines_are_never_wrapped(tmp_path: Path):
    lines, deep = _score(tmp_path, "plain")
    assert any(deep in line for line in lines), lines  # the long path stays on one line
    assert not any(line.startswith(" ") for line in lines), "no continuation lines"
    assert not any("WARNING" in line and "CUDA" in line for line in lines) or host_has_gpu()


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="json"):
        logs.handler("xml")


@pytest.mark.parametrize("missing", ["torch", "sklearn"])
def test_training_commands_without_the_extras_say_how_to_get_them(tmp_path: Path, missing: str):
    """Issue 9: on `make run`'s base install, train ended in a 40-line traceback."""
    code = (f"import sys; sys.modules[{missing!r}] = None\n"
            "from app.cli import main\n"
            f"sys.argv = ['seqguard', 'train', '--events', {str(TAOBAO_100)!r}, '--format', 'taobao',"
            f" '--epochs', '1', '--out', {str(tmp_path / 'run')!r}]\n"
            "main()\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert f"needs the training extras ({missing} is not installed)" in res.stderr and "make venv" in res.stderr


def test_serve_in_json_mode_writes_only_json_lines(tmp_path: Path):
    """Issue 9: with SEQGUARD_LOG_FORMAT=json, `seqguard serve` still wrote plain lines of its
    own (embedded Redis, listening) and uvicorn's: a log shipper needs one format."""
    from e2e.e2e_support import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEQGUARD_")}
    env |= {"SEQGUARD_LOG_FORMAT": "json", "SEQGUARD_LOG_LEVEL": "INFO", "SEQGUARD_INFERENCE_THREADS": "1",
            "SEQGUARD_REDIS_DATA_DIR": str(tmp_path / "redis"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "listening on" in line:
                break
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        lines += rest.splitlines()
    finally:
        if proc.poll() is None:
            proc.kill()
    records = [json.loads(line) for line in lines if line.strip()]  # every line a JSON object
    said = [r["message"] for r in records]
    assert f"listening on http://127.0.0.1:{port}" in said
    assert any(m.startswith("embedded Redis (append-only) at") for m in said)
    assert proc.returncode == 0
