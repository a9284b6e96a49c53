"""The command line: help everywhere, and input errors that name file, line and field."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TAOBAO_100
from typer.testing import CliRunner

from app.cli import cli

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def fails(*args: str | Path) -> str:
    res = runner.invoke(cli, [str(a) for a in args])
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output
    return " ".join(res.output.split())  # unwrap the console's line folding


@pytest.mark.parametrize("command", ["train", "export", "evaluate", "score", "serve", "replay", "info", "rekey"])
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
    assert "nobundle: no such directory" in out
    (tmp_path / "empty").mkdir()
    out = fails("score", tmp_path / "empty", "--events", TAOBAO_100, "--out", tmp_path / "r.jsonl")
    assert "no bundle.json" in out


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


def score_log(tmp_path: Path, types: list[str], *extra: str) -> str:
    f = tmp_path / "events.csv"
    f.write_text("user_id,event_type,timestamp\n" + "".join(
        f"u{i % 7},{t},{1_700_000_000_000 + 1000 * i}\n" for i, t in enumerate(types)))
    res = runner.invoke(cli, ["score", "app/bundles/default", "--events", str(f), "--out", str(tmp_path / "r.jsonl"),
                              *extra])
    assert res.exit_code == 0, res.output
    assert len((tmp_path / "r.jsonl").read_bytes().splitlines()) == len(types)
    return " ".join(res.output.split())


def test_score_reports_unknown_event_types_and_warns_past_one_percent(tmp_path):
    types = ["pv", "addtocart", "view", "buy"] * 24 + ["login", "login", "signup", "pv"]  # 3 of 100 unknown
    out = score_log(tmp_path, types)
    assert "unknown event types: 3.00% of events (3): login 2.00% (2), signup 1.00% (1)" in out
    assert "warning: 3.00% of the events have an event type the model does not know" in out
    assert "--alias NAME=TYPE" in out and "pv→view" in out  # the loader's renames, in the load summary
    # Aliased, they are known; at 1% or less, reported without a warning.
    out = score_log(tmp_path, types, "--alias", "login=view", "--alias", "SignUp=view")
    assert "unknown event types: none" in out and "warning" not in out
    out = score_log(tmp_path, types, "--alias", "login=view")
    assert "unknown event types: 1.00% of events (1): signup 1.00% (1)" in out and "warning" not in out


@pytest.mark.parametrize("command", [
    ["train", "--events", str(TAOBAO_100), "--out", "unused-run"],
    ["score", "app/bundles/default", "--events", str(TAOBAO_100), "--out", "unused.jsonl"],
    ["evaluate", "app/bundles/default", "--events", str(TAOBAO_100), "--out", "unused-report"],
    ["serve", "--port", "1"],
])
@pytest.mark.parametrize("alias", ["checkout", "=purchase", "checkout="])
def test_bad_alias_is_one_clear_line(command, alias, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(cli, [*command, "--alias", "buy=purchase", "--alias", alias])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert lines == [f"error: alias {alias!r}: expected NAME=TYPE, e.g. addtocart=cart"]
    assert not list(tmp_path.iterdir())  # nothing started, nothing written


@pytest.mark.parametrize(("value", "said"), [
    ("checkout=purchase", "SEQGUARD_EVENT_ALIASES: not valid JSON"),
    ('["checkout"]', "SEQGUARD_EVENT_ALIASES: Input should be a valid dictionary"),
    ('{"checkout": 3}', "SEQGUARD_EVENT_ALIASES['checkout']: Input should be a valid string"),
    ('{" ": "view"}', "names and types must be non-empty"),
    ('{"Checkout": "purchase", "checkout": "view"}', "contradicts"),
])
def test_bad_alias_setting_is_one_clear_line(value, said, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SEQGUARD_EVENT_ALIASES", value)
    res = runner.invoke(cli, ["serve", "--port", "1"])
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    assert out.startswith("error: ") and said in out and "Traceback" not in out and "errors.pydantic.dev" not in out
    assert not list(tmp_path.iterdir())  # nothing started, nothing written


def test_score_warns_about_aliases_that_change_or_lose_types(tmp_path):
    out = score_log(tmp_path, ["pv", "buy", "view"] * 10, "--alias", "view=purchase", "--alias", "a=b=c",
                    "--alias", "checkout=buy")
    assert "warning: alias view → purchase replaces view → view" in out
    assert "warning: alias a → b=c: not among the model's event types" in out
    assert "checkout" not in out


def test_unknown_types_from_a_file_cannot_write_escape_sequences_to_the_terminal(tmp_path):
    out = score_log(tmp_path, ["pv"] * 8 + ["\x1b]0;pwned\x07\x1b[2Jx"])
    assert "\x1b" not in out and "\\x1b]0;pwned\\x07\\x1b[2Jx" in out


def test_train_checks_every_file_and_option_before_loading_any(tmp_path):
    out = fails("train", "--events", TAOBAO_100, "--events", tmp_path / "nope.jsonl", "--out", tmp_path / "run")
    assert "nope.jsonl: no such file" in out and "kept" not in out  # the first file was not loaded
    out = fails("train", "--events", TAOBAO_100, "--fpr-unit", "bogus", "--out", tmp_path / "run")
    assert "'--fpr-unit': 'bogus' is not one of 'event', 'user'" in out and "kept" not in out


def score_jsonl(tmp_path: Path, name: str, data: bytes) -> tuple[list[dict], str]:
    src = tmp_path / f"{name}.jsonl"
    src.write_bytes(data)
    out = tmp_path / f"{name}.out.jsonl"
    res = runner.invoke(cli, ["score", "app/bundles/default", "--events", str(src), "--out", str(out)])
    assert res.exit_code == 0, res.output
    return [orjson.loads(x) for x in out.read_bytes().splitlines()], " ".join(res.output.split())


T = 1_511_596_870_000
LOG = [{"event_id": f"e{i}", "user_id": "u1", "event_type": t, "timestamp": T + 20_000 * i, "item_id": "i1"}
       for i, t in enumerate(["pv", "cart", "buy"])]


def test_score_skips_a_byte_order_mark(tmp_path):
    """The issue's input: a 3-event JSONL with a BOM gives 3 results, the third scored with
    the first in its history (as without the BOM; without the first event it scores otherwise)."""
    text = b"".join(orjson.dumps(e) + b"\n" for e in LOG)
    with_bom, said = score_jsonl(tmp_path, "bom", b"\xef\xbb\xbf" + text)
    plain, _ = score_jsonl(tmp_path, "plain", text)
    assert "0 malformed" in said
    assert with_bom == plain and [r["event_id"] for r in with_bom] == ["e0", "e1", "e2"]
    without_first, _ = score_jsonl(tmp_path, "two", text.split(b"\n", 1)[1])
    assert without_first[-1]["anomaly_probability"] != plain[-1]["anomaly_probability"]


def test_score_answers_a_repeat_as_the_live_service_does(tmp_path):
    """ord-1, ord-1, ord-2 a minute apart: the repeat gets ord-1's answer and is flagged, and
    ord-2 scores as if ord-1 had come once."""
    ord1 = {"event_id": "ord-1", "user_id": "u1", "event_type": "buy", "timestamp": T, "item_id": "i1"}
    ord2 = {**ord1, "event_id": "ord-2", "timestamp": T + 60_000, "item_id": "i2"}
    twice, said = score_jsonl(tmp_path, "twice", b"\n".join(orjson.dumps(e) for e in (ord1, ord1, ord2)))
    assert "repeats of an earlier (user_id, event_id): 1," in said
    once, _ = score_jsonl(tmp_path, "once", b"\n".join(orjson.dumps(e) for e in (ord1, ord2)))
    assert twice == [once[0], {**once[0], "duplicate": True}, once[1]]


def test_score_writes_parquet_when_out_ends_in_parquet(tmp_path):
    """`--out r.parquet` (any case): one row per input event, in input order, with the
    answers the JSONL output has (a repeat flagged; float32 probabilities)."""
    src = tmp_path / "log.jsonl"
    src.write_bytes(b"\n".join(orjson.dumps(e) for e in (*LOG, LOG[0])))
    for name in ("r.jsonl", "r.parquet", "R.Parquet"):
        res = runner.invoke(cli, ["score", "app/bundles/default", "--events", str(src), "--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
    lines = [orjson.loads(x) for x in (tmp_path / "r.jsonl").read_bytes().splitlines()]
    assert [x["event_id"] for x in lines] == ["e0", "e1", "e2", "e0"] and lines[3].get("duplicate") is True
    for name in ("r.parquet", "R.Parquet"):
        table = pq.read_table(tmp_path / name)
        assert table.schema.field("anomaly_probability").type == pa.float32()
        assert table.to_pylist() == [{**x, "duplicate": x.get("duplicate", False)} for x in lines]


def test_score_reads_the_one_timestamp_grammar(tmp_path):
    """Lower-case RFC 3339 is read as the service reads it; epoch seconds are refused with a hint."""
    rows = [dict(LOG[0], timestamp="2017-11-25T08:01:10z"), dict(LOG[1], timestamp=1511596870)]
    got, said = score_jsonl(tmp_path, "times", b"\n".join(orjson.dumps(e) for e in rows))
    assert [r["event_id"] for r in got] == ["e0"]
    assert "looks like epoch seconds; send milliseconds (1511596870000)" in said
    assert "1 malformed" in said


def test_version():
    res = runner.invoke(cli, ["--version"])
    assert res.exit_code == 0 and res.output.startswith("seqguard ")


@pytest.mark.parametrize(("args", "said"), [
    (["--calibration", "foo"], "'--calibration': 'foo' is not one of 'auto', 'platt', 'isotonic', 'tail'"),
    (["--arch", "cnn"], "'--arch': 'cnn' is not one of 'transformer', 'gru', 'lstm'"),
    (["--out", "/proc/seqguard-run"], "--out /proc/seqguard-run: cannot create the run directory"),
])
def test_train_refuses_bad_arguments_before_it_loads_or_trains(tmp_path, args, said):
    """Issue 9: --calibration foo trained to the end, then failed."""
    base = ["train", "--events", TAOBAO_100, "--format", "taobao", "--epochs", "1"]
    if "--out" not in args:
        base += ["--out", tmp_path / "run"]
    out = fails(*base, *args)
    assert said in out
    assert not (tmp_path / "run" / "model.pt").exists()


def test_every_option_of_train_and_serve_says_what_it_is_for():
    for command in ("train", "serve"):
        res = runner.invoke(cli, [command, "--help"], env={"COLUMNS": "250"})  # one line per option
        text = " ".join(res.output.split())
        for option, words in {"train": [("--window", "Events the detector sees"), ("--epochs", "Most passes"),
                                        ("--seed", "same seed and data give the same model")],
                              "serve": [("--host", "Address to listen on"), ("--port", "TCP port"),
                                        ("--workers", "Worker processes")]}[command]:
            assert option in text and words in text, (command, option)


def test_replay_against_a_closed_port_says_connection_refused(tmp_path):
    """Issue 9: it reported "5 in 0 requests" and nan latencies, and never why."""
    import socket

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = fails("replay", "--url", f"http://127.0.0.1:{port}", "--events", TAOBAO_100, "--limit", "5")
    assert f"cannot connect to http://127.0.0.1:{port}" in out and "Connection refused" in out


def test_serve_given_a_run_directory_says_to_export_it(tmp_path, monkeypatch):
    for name in ("SEQGUARD_BUNDLE", "SEQGUARD_PORT"):  # serve sets them in os.environ: undone after the test
        monkeypatch.setenv(name, "unset-by-the-test")
    (tmp_path / "run.json").write_text("{}")
    out = fails("serve", "--bundle", tmp_path, "--port", "8791")
    assert "no bundle.json" in out and "seqguard export" in out


def test_serve_refuses_a_bundle_a_reload_would_refuse(tmp_path, monkeypatch):
    """A fresh-user review: a bundle without a parity record was refused by SIGHUP but
    served by a restart; serve holds it to the same checks, in one line."""
    import shutil

    for name in ("SEQGUARD_BUNDLE", "SEQGUARD_PORT"):
        monkeypatch.setenv(name, "unset-by-the-test")
    bundle = tmp_path / "b"
    shutil.copytree(ROOT / "app/bundles/default", bundle)
    meta = json.loads((bundle / "bundle.json").read_text())
    del meta["parity"]
    (bundle / "bundle.json").write_text(json.dumps(meta))
    out = fails("serve", "--bundle", bundle, "--port", "8791")
    assert "cannot be served: no parity record" in out


def test_info_tells_what_a_bundle_is():
    """Issue 9: `seqguard info BUNDLE`."""
    meta = json.loads((ROOT / "app/bundles/default/bundle.json").read_text())
    res = runner.invoke(cli, ["info", str(ROOT / "app/bundles/default")])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert meta["model_version"] in text and "view, cart, purchase, favorite" in text
    assert f"review: {meta['thresholds']['review']:.6g}" in text and f"block: {meta['thresholds']['block']:.6g}" in text
    assert "held-out real users" in text and "parity fp32" in text
    res = runner.invoke(cli, ["info", str(ROOT / "app/bundles/default"), "--json"])
    summary = json.loads(res.output)
    assert summary["model_version"] == meta["model_version"]
    assert summary["thresholds"]["block"]["target_fpr"] == meta["thresholds"]["chosen"]["block"]["target_fpr"]
    assert summary["evaluation"]["real_traffic"] == meta["evaluation"]["real_traffic"]


def test_info_on_a_directory_without_a_bundle(tmp_path):
    assert "no bundle.json" in fails("info", tmp_path)


def test_serve_takes_threshold_flags_and_checks_them(monkeypatch):
    for name in ("SEQGUARD_REVIEW_THRESHOLD", "SEQGUARD_BLOCK_THRESHOLD", "SEQGUARD_PORT"):
        monkeypatch.setenv(name, "0.5" if "THRESHOLD" in name else "8792")  # undone after the test
    out = fails("serve", "--review", "0.9", "--block", "0.5", "--port", "8792")
    assert "SEQGUARD_REVIEW_THRESHOLD (--review) must not exceed SEQGUARD_BLOCK_THRESHOLD (--block)" in out
    assert "--review" in fails("serve", "--review", "1.5")  # out of [0, 1], refused by the flag itself


COMMANDS = ["train", "export", "evaluate", "score", "serve", "replay", "info"]
FORMATS = "auto, taobao, retailrocket, rees46, csv, jsonl, parquet"  # --format lists them in its help text


def help_text(*command: str) -> str:
    res = runner.invoke(cli, [*command, "--help"], env={"COLUMNS": "250"})  # one line per option
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.parametrize(("command", "choices"), [
    ("train", [("--format", FORMATS), ("--arch", "transformer|gru|lstm"),
               ("--calibration", "auto|platt|isotonic|tail|fisher"), ("--fpr-unit", "event|user")]),
    ("evaluate", [("--format", FORMATS)]),
    ("score", [("--format", FORMATS)]),
    ("replay", [("--format", FORMATS), ("--engine", "httpx|raw")]),
])
def test_help_lists_every_choice(command, choices):
    """Issue 9: --format's choices were a hand-typed help string, cut short in --help."""
    lines = help_text(command).splitlines()
    for option, listed in choices:
        shown = f"<{listed}>" if "|" in listed else listed
        assert any(f"{option} " in line and shown in line for line in lines), (command, option)


def test_format_choices_are_not_cut_mid_word_at_80_columns():
    """Issue 9: at 80 columns the type column wrapped ``<auto|taobao|retailrocket|r`` /
    ``ees46|...>``; the choices are in the help text now, wrapped between words."""
    out = runner.invoke(cli, ["score", "--help"], env={"COLUMNS": "80"}).output
    words = {w.strip("│,;.<>|") for w in out.split()}
    assert {"retailrocket", "rees46", "parquet"} <= words


@pytest.mark.parametrize(("args", "said"), [
    # an attack review: these were typer's boxed usage panel, on stderr even in a pipe
    (["score", "app/bundles/default", "--bogus"], "error: No such option: --bogus (Possible options: --out)"),
    (["bogus"], "error: No such command 'bogus'."),
    (["info", "app/bundles/default", "--json=1"], "error: Option '--json' does not take a value."),
    (["score", "app/bundles/default", "--events", str(TAOBAO_100), "--out", "r.jsonl", "--format", "xml"],
     "error: Invalid value for '--format': 'xml' is not one of 'auto', 'taobao', 'retailrocket', 'rees46', 'csv', "
     "'jsonl', 'parquet'."),
    (["replay", "--url", "http://127.0.0.1:9", "--events", str(TAOBAO_100), "--format", "Taobao"],
     "error: Invalid value for '--format': 'Taobao' is not one of 'auto', 'taobao', 'retailrocket', 'rees46', 'csv', "
     "'jsonl', 'parquet'."),
    (["replay", "--url", "http://127.0.0.1:9", "--events", str(TAOBAO_100), "--engine", "curl"],
     "error: Invalid value for '--engine': 'curl' is not one of 'httpx', 'raw'."),
    (["train", "--events", str(TAOBAO_100), "--out", "run", "--window", "2"],
     "error: Invalid value for '--window': Input should be greater than or equal to 4"),
])
def test_a_bad_option_value_is_one_line_and_exit_2(args, said, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(cli, args, env={"COLUMNS": "250"})
    assert res.exit_code == 2, res.output
    assert [line for line in res.output.splitlines() if line.strip()] == [said]
    assert not list(tmp_path.iterdir())  # refused before anything ran


def test_choices_are_the_pipeline_s_own():
    """The command line's choices are the values the loaders and the trainer take."""
    from app.cli import Arch, Calibration, Format
    from model_export.data import FORMATS as LOADER_FORMATS
    from model_export.model import ARCHS
    from model_export.model import Calibration as Calibrator

    assert tuple(Format) == LOADER_FORMATS and ", ".join(Format) == FORMATS
    assert tuple(Arch) == ARCHS
    assert tuple(Calibration) == ("auto", *(k for k in Calibrator.KINDS if k != "identity"))


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)])
def test_flags_read_as_flags_in_help(command):
    """Issue 9: typer printed `<bool>` after every flag (`--fp16 <bool>`), as if it took a value."""
    text = help_text(*command)
    assert "<bool>" not in text
    assert re.search(r"--help\s+Show this message and exit\.", text)


def test_export_flags_in_help():
    text = help_text("export")
    assert re.search(r"--fp16\s+Also write model\.fp16\.onnx for GPUs\.", text)
    assert re.search(r"--report\s+--no-report\s+Evaluate into out/report\. \[default: report\]", text)
    assert re.search(r"--force\s+Replace OUT when it is not empty\.", text)
