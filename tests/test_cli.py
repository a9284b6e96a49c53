"""The command line: help everywhere, and input errors that name file, line and field."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from conftest import TAOBAO_100
from typer.testing import CliRunner

from app.cli import cli

runner = CliRunner()


def fails(*args: str | Path) -> str:
    res = runner.invoke(cli, [str(a) for a in args])
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output
    return " ".join(res.output.split())  # unwrap the console's line folding


@pytest.mark.parametrize("command", ["train", "export", "evaluate", "score"])
def test_every_command_has_help(command):
    res = runner.invoke(cli, [command, "--help"])
    assert res.exit_code == 0 and "Usage" in res.output


def test_missing_column_names_the_file_and_column(tmp_path):
    f = tmp_path / "events.csv"
    f.write_text("event_id,user_id,event_type\ne1,u1,view\n")
    out = fails("train", "--events", f, "--format", "csv", "--out", tmp_path / "run")
    assert "events.csv" in out and "timestamp" in out


def test_unparseable_timestamps_name_file_line_and_field(tmp_path):
    f = tmp_path / "events.csv"
    rows = ["event_id,user_id,event_type,timestamp"] + [f"e{i},u1,view,yesterday-{i}" for i in range(20)]
    f.write_text("\n".join(rows) + "\n")
    out = fails("train", "--events", f, "--format", "csv", "--out", tmp_path / "run")
    assert "events.csv" in out and "line 2" in out and "timestamp" in out


def test_empty_file(tmp_path):
    f = tmp_path / "events.jsonl"
    f.write_text("")
    out = fails("score", "--events", f, "--out", tmp_path / "r.jsonl", "app/bundles/default")
    assert "events.jsonl" in out and "no events" in out


def test_missing_file_and_bad_choices(tmp_path):
    assert "nope.csv" in fails("train", "--events", tmp_path / "nope.csv", "--out", tmp_path / "run")
    assert "--format" in fails("train", "--events", TAOBAO_100, "--format", "xml", "--out", tmp_path / "run")
    out = fails("train", "--events", TAOBAO_100, "--inject", "bots", "--out", tmp_path / "run")
    assert "bots" in out and "scraping_bot" in out
    out = fails("score", tmp_path / "nobundle", "--events", TAOBAO_100, "--out", tmp_path / "r.jsonl")
    assert "bundle.json" in out


def test_cut_off_last_line_is_skipped_and_counted(tmp_path):
    with gzip.open(TAOBAO_100, "rt") as f:
        lines = f.read().splitlines()[:500]
    src = tmp_path / "cut.csv"
    src.write_text("\n".join(lines) + "\n" + lines[-1].rsplit(",", 1)[0] + "\n")  # a line without timestamp
    res = runner.invoke(cli, ["score", "app/bundles/default", "--events", str(src), "--format", "taobao",
                              "--out", str(tmp_path / "r.jsonl")])
    assert res.exit_code == 0, res.output
    assert len((tmp_path / "r.jsonl").read_bytes().splitlines()) == 500
    assert "1 malformed" in " ".join(res.output.split())
