"""Progress of the long commands (issue 9: `seqguard score` sat silent for 55 s on a 110k
event file): the jobs tell their progress to the end, and the command line draws bars on
a terminal only, never into pipes, files or JSON logs."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TAOBAO_100
from typer.testing import CliRunner

from app.cli import cli
from app.core.batch_engine import score_events
from app.core.bundle import load_bundle
from app.core.events import Events
from app.core.scorer import OnnxModel
from model_export.data import read_events

ROOT = Path(__file__).resolve().parents[1]
BAR = "━"  # what rich draws a bar with
SCORE = ["score", str(ROOT / "app/bundles/default"), "--events", str(TAOBAO_100), "--format", "taobao"]


@pytest.fixture(scope="module")
def model() -> OnnxModel:
    return OnnxModel(load_bundle(), threads=1)


@pytest.fixture(autouse=True)
def _no_forced_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):  # rich would draw into a pipe
        monkeypatch.delenv(name, raising=False)


def test_score_events_tells_its_progress_up_to_every_event(model: OnnxModel) -> None:
    events, _ = read_events(TAOBAO_100, "taobao")
    told: list[tuple[int, int]] = []
    # Small calls: many of them, as a big file has.
    scores = score_events(model, events, batch_tokens=2048, on_progress=lambda done, total: told.append((done, total)))
    assert len(told) > 5
    assert told[-1] == (len(events), len(events))
    assert {total for _, total in told} == {len(events)}
    assert all(a < b for (a, _), (b, _) in itertools.pairwise(told))
    # Telling changes nothing scored.
    np.testing.assert_array_equal(scores.probability, score_events(model, events, batch_tokens=2048).probability)


def test_score_events_counts_the_events_it_scores_not_the_repeats(model: OnnxModel) -> None:
    records = [{"event_id": e, "user_id": "u1", "event_type": "view", "timestamp": 1_700_000_000_000 + i}
               for i, e in enumerate(["a", "b", "a", "c"])]
    told: list[tuple[int, int]] = []
    score_events(model, Events.from_records(records), on_progress=lambda *t: told.append(t))
    assert told[-1] == (3, 3)


def test_score_output_off_a_terminal_is_unchanged_and_has_no_bar(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, [*SCORE, "--out", str(tmp_path / "r.jsonl")])
    assert res.exit_code == 0, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert BAR not in res.output and "\r" not in res.output and "\x1b" not in res.output
    assert lines[-2].startswith("11,003 events scored on ") and lines[-1].startswith("unknown event types: none")
    assert all(" INFO seqguard." in line for line in lines[:-2])  # the plain log lines, and nothing else


def _on_a_terminal(tmp_path: Path, log_format: str) -> tuple[int, str]:
    """(exit code, what reached stderr) of `seqguard score` run with stderr on a pseudo-terminal."""
    master, slave = os.openpty()
    env = os.environ | {"SEQGUARD_LOG_FORMAT": log_format, "COLUMNS": "120"}
    with subprocess.Popen([sys.executable, "-m", "app.cli", *SCORE, "--out", str(tmp_path / "r.jsonl")],
                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave, env=env,
                          cwd=ROOT) as proc:
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other side closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(master)
        code = proc.wait(timeout=120)
    return code, b"".join(chunks).decode()


def test_score_draws_a_bar_on_a_terminal(tmp_path: Path) -> None:
    code, said = _on_a_terminal(tmp_path, "auto")
    assert code == 0, said
    assert BAR in said and "score" in said and "11003/11003" in said


def test_json_logs_get_no_bar_even_on_a_terminal(tmp_path: Path) -> None:
    code, said = _on_a_terminal(tmp_path, "json")
    assert code == 0, said
    assert BAR not in said and "11003/11003" not in said
    assert '"logger": "seqguard.data"' in said


def test_export_and_evaluate_off_a_terminal_draw_no_bar(trained: tuple[Path, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["export", str(trained[0]), "--out", str(tmp_path / "bundle"), "--no-report"])
    assert res.exit_code == 0, res.output
    assert BAR not in res.output and "\r" not in res.output and "\x1b" not in res.output
    assert res.stderr.splitlines()[-1].startswith("bundle ")
    res = runner.invoke(cli, ["evaluate", str(trained[1]), "--events", str(TAOBAO_100), "--format", "taobao",
                              "--out", str(tmp_path / "report")])
    assert res.exit_code == 0, res.output
    assert BAR not in res.output and "\r" not in res.output and "\x1b" not in res.output
    assert json.loads(res.stdout)["detectors"]  # stdout: the summary alone, as before


def test_export_tells_each_step(trained: tuple[Path, Path], tmp_path: Path) -> None:
    from model_export.export import export

    told: list[tuple[str, int, int]] = []
    export(trained[0], tmp_path / "bundle", fp16=True, int8=True, evaluate=False, parity_windows=32,
           on_step=lambda *t: told.append(t))
    assert told == [("export to ONNX", 0, 8), ("parity check (fp32)", 1, 8), ("fp16 conversion", 2, 8),
                    ("parity check (fp16)", 3, 8), ("int8 conversion", 4, 8), ("parity check (int8)", 5, 8),
                    ("decision agreement (fp16 vs fp32, test users)", 6, 8),
                    ("decision agreement (int8 vs fp32, test users)", 7, 8), ("done", 8, 8)]


def test_evaluate_tells_each_step(trained: tuple[Path, Path], tmp_path: Path) -> None:
    from model_export.evaluate import evaluate_file
    from model_export.scenarios import parse_inject

    told: list[tuple[str, int, int]] = []
    evaluate_file(trained[1], TAOBAO_100, "taobao", parse_inject("all"), tmp_path / "report",
                  on_step=lambda *t: told.append(t))
    names = [name for name, _, _ in told]
    assert names[0].startswith("score the test users (seqguard-") and names[-2:] == ["report", "done"]
    assert any(name.startswith("baseline ") for name in names) and "real traffic of the test users" in names
    assert [(done, total) for _, done, total in told] == [(i, len(told) - 1) for i in range(len(told))]


def test_force_color_into_a_pipe_draws_no_bar(tmp_path: Path) -> None:
    """An attack review: FORCE_COLOR (common in CI) made rich call a pipe a terminal, and
    the bar's escape codes went into it."""
    env = os.environ | {"FORCE_COLOR": "1", "TTY_COMPATIBLE": "1"}
    res = subprocess.run([sys.executable, "-m", "app.cli", *SCORE, "--out", str(tmp_path / "r.jsonl")],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert BAR not in res.stderr and "\x1b[?25l" not in res.stderr
