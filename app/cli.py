"""The `seqguard` command line: train, export, evaluate, score (offline) and, with the
service, serve and replay.

Offline commands import the `model_export` side lazily, so the service's commands work
where only the service is installed (no PyTorch).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from enum import StrEnum
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import orjson
import typer
from rich.console import Console
from rich.markup import escape
from typer._click.exceptions import UsageError
from typer.core import TyperCommand, TyperGroup, TyperOption


def _flags_as_flags(params: list[Any]) -> list[Any]:
    """Flags without a type: typer 0.29's rich help prints ``<bool>`` after each (``--fp16
    <bool>``, ``--help <bool>``), as if it took a value."""
    for p in params:
        if isinstance(p, TyperOption) and p.is_flag and p.metavar is None:
            p.metavar = ""
    return params


class _Command(TyperCommand):
    """A command whose help shows flags as flags, and whose bad option values (a choice
    not offered, a number out of range, a missing option) are one line and exit code 2,
    like every other input error here, instead of typer's usage panel."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_as_flags(super().get_params(ctx))

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except UsageError as e:  # a bad value, an unknown option, a flag given a value, ...
            _usage_error(e)


class _Group(TyperGroup):
    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_as_flags(super().get_params(ctx))

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        try:
            return super().resolve_command(ctx, args)
        except UsageError as e:  # no such command
            _usage_error(e)


def _usage_error(e: UsageError) -> NoReturn:
    """A command-line mistake (a bad value, an unknown option or command, a flag given a
    value, an extra argument): one line saying what is wrong, exit code 2."""
    _say(e.format_message().replace("Value error, ", "", 1), logging.ERROR)  # pydantic's prefix
    raise typer.Exit(2) from None


cli = typer.Typer(cls=_Group, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="seqguard: real-time anomaly scoring of user event sequences.")
err = Console(stderr=True, soft_wrap=True)  # never folds a path or message at 80 columns
F = TypeVar("F", bound=Callable[..., Any])


# Choices: typer validates them and lists them in --help. The values are the loaders' and
# the trainer's own (tests/test_cli.py holds them to model_export's tuples).
class Format(StrEnum):
    """Event file formats (``model_export.data.FORMATS``)."""

    auto = "auto"
    taobao = "taobao"
    retailrocket = "retailrocket"
    rees46 = "rees46"
    csv = "csv"
    jsonl = "jsonl"
    parquet = "parquet"


class Precision(StrEnum):
    """A bundle's model files (``app.core.bundle.MODEL_FILES``)."""

    fp32 = "fp32"
    fp16 = "fp16"
    int8 = "int8"


class Arch(StrEnum):
    """Detector architectures (``model_export.model.ARCHS``)."""

    transformer = "transformer"
    gru = "gru"
    lstm = "lstm"


class Calibration(StrEnum):
    """Calibrations (``model_export.model.Calibration.KINDS``; auto: fisher with labels, else tail)."""

    auto = "auto"
    platt = "platt"
    isotonic = "isotonic"
    tail = "tail"
    fisher = "fisher"


class FprUnit(StrEnum):
    """What the false-positive targets count."""

    event = "event"
    user = "user"


class Engine(StrEnum):
    """HTTP clients of ``seqguard replay``."""

    httpx = "httpx"
    raw = "raw"


EventsOpt = Annotated[Path, typer.Option("--events", help="Event log (CSV, JSONL, Parquet; .gz ok).")]
# The choices in the help text, not the type column: rich wraps a long column mid-word.
FormatOpt = Annotated[Format, typer.Option(
    "--format", metavar="FORMAT",
    help=f"Format of the event log: {', '.join(Format)}; auto tells it from the file's name and first line.")]
InjectOpt = Annotated[str, typer.Option("--inject", help="Scenarios to inject: all, none or NAME,...")]
AliasOpt = Annotated[list[str] | None, typer.Option(
    "--alias", metavar="NAME=TYPE",
    help="Event type alias on top of the known sources' names (repeatable), e.g. --alias checkout=purchase.")]
#: Share of events with types unknown to the model past which `seqguard score` warns.
UNKNOWN_SHARE_WARN = 0.01


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"seqguard {version('seqguard')}")
        raise typer.Exit()


@cli.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """seqguard: real-time anomaly scoring of user event sequences."""


#: Top-level modules of the `train` extra: `train`, `export` and `evaluate` need them.
TRAINING_EXTRAS = {"torch", "onnx", "onnxscript", "sklearn", "pyod", "matplotlib", "pandas"}


def _friendly(fn: F) -> F:
    """Input errors become one red line naming what is wrong, and exit code 2."""

    @wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        from app.core.bundle import BundleError
        from app.embedded_redis import EmbeddedRedisError

        try:
            return fn(*args, **kwargs)
        except ModuleNotFoundError as e:
            top = (e.name or "").split(".")[0]
            if top not in TRAINING_EXTRAS:
                raise
            _say(f"this command needs the training extras ({top} is not installed): run `make venv` (PyTorch "
                 "CPU, ONNX, scikit-learn, ...); `make run` installs only what the service needs", logging.ERROR)
            raise typer.Exit(2) from None
        except (BundleError, EmbeddedRedisError, FileNotFoundError, FileExistsError, NotADirectoryError,
                PermissionError, ValueError) as e:
            _say(str(e), logging.ERROR)
            raise typer.Exit(2) from None

    return run  # type: ignore[return-value]


def _logging(verbose: bool = False) -> None:
    """Logs as ``SEQGUARD_LOG_FORMAT`` says (app/core/logs.py): rich on a terminal, else plain or JSON lines."""
    from app.core import logs

    logs.setup(logging.DEBUG if verbose else logging.INFO, os.environ.get("SEQGUARD_LOG_FORMAT", "auto"))


@cli.command(cls=_Command)
@_friendly
def train(
    events: Annotated[list[Path], typer.Option("--events", help="Event log(s) (CSV, JSONL, Parquet; .gz ok); "
                                                                "repeat to train on several, split by user.")],
    out: Annotated[Path, typer.Option("--out", help="Run directory to write.")],
    fmt: FormatOpt = Format.auto,
    inject: InjectOpt = "all",
    arch: Annotated[Arch, typer.Option("--arch", help="Detector: a causal Transformer, a GRU or an LSTM.")
                    ] = Arch.transformer,
    window: Annotated[int, typer.Option("--window", min=4, max=1024,
                                        help="Events the detector sees: the window ending at each event.")] = 64,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Most passes over the training users "
                                                                  "(early stopping may end sooner).")] = 12,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the split, the injection and the weights: "
                                                     "the same seed and data give the same model.")] = 7,
    calibration: Annotated[Calibration, typer.Option(
        "--calibration", help="How scores become probabilities; auto: fisher (the supervised score fused with the "
                              "recent surprise) when training has labels (injected scenarios or a label column), "
                              "else tail.")
    ] = Calibration.auto,
    fpr_unit: Annotated[FprUnit, typer.Option("--fpr-unit", help="What the review/block false-positive targets count: "
                                                                 "event (normal events flagged; every canonical type "
                                                                 "held to 2x the target) or user (normal users ever "
                                                                 "flagged).")
                        ] = FprUnit.event,
    unknown_type_rate: Annotated[float, typer.Option(
        "--unknown-type-rate", min=0.0, max=0.5,
        help="Share of normal training events shown with an unknown event type, so that a type the model never "
             "saw is no evidence (storefronts); 0 keeps unseen types novel (system logs, where a new log key is "
             "the anomaly).")] = 0.01,
    alias: AliasOpt = None,
) -> None:
    """Train a detector on event logs (scenarios injected unless --inject none)."""
    from app.core.vocabulary import alias_warnings, parse_alias_pairs

    aliases = parse_alias_pairs(alias or ())
    try:  # a run directory that cannot be written fails now
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create the run directory ({e.strerror})") from None
    for path in events:  # every file, before the first is loaded (a long load, then a typo)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
    _warn(alias_warnings(aliases))  # new types are fine here: the model learns them
    _logging()
    from model_export.dataset import TrainConfig
    from model_export.scenarios import parse_inject
    from model_export.train import run

    cfg = TrainConfig(arch=arch.value, window=window, epochs=epochs, seed=seed, calibration=calibration.value,
                      aliases=aliases, fpr_unit=fpr_unit.value, unknown_type_rate=unknown_type_rate)
    summary = run(events, fmt.value, parse_inject(inject), cfg, out, progress=_bars())
    t = summary["thresholds"]
    key = "validation_user_fpr" if fpr_unit == "user" else "validation_fpr"
    reached = {k: t["chosen"][k][key] for k in ("review", "block")}
    _say(f"run written to {out}: {summary['parameters']:,} parameters, thresholds review {t['review']:.4f} / "
         f"block {t['block']:.4f} (validation {fpr_unit}s flagged: {reached['review']:.4%} / "
         f"{reached['block']:.4%})")


@cli.command(cls=_Command)
@_friendly
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `seqguard train`.")],
    out: Annotated[Path, typer.Option("--out", help="Bundle directory to write.")],
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write model.fp16.onnx for GPUs.")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Also write model.int8.onnx for CPUs (ONNX Runtime dynamic "
                                                      "quantization), with its decision agreement against fp32 "
                                                      "in bundle.json.")] = False,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Evaluate into out/report.")] = True,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT when it is not empty.")] = False,
) -> None:
    """Export a trained run as a bundle: ONNX, bundle.json (parity included), report/."""
    _logging()
    from app.core import progress
    from model_export.export import export as do_export

    with progress.bars(_bars()) as shown:
        meta = do_export(run_dir, out, fp16=fp16, int8=int8, evaluate=report, force=force,
                         on_step=progress.stepper(shown, "export", before="load the run"))
    p = meta["parity"]["fp32"]
    _say(f"bundle {meta['model_version']} in {out}; fp32 parity max |diff| {p['max_abs_diff']:.2e} "
         f"on {p['n_windows']} held-out windows")
    for variant in ("fp16", "int8"):
        if (d := meta["parity"].get(variant, {}).get("decisions")) is not None:
            _say(f"{variant}: decisions agree with fp32 on {d['agreement']:.4%} of {d['events']:,} test events "
                 f"(flagged {d['flagged'][variant]:.3%} vs {d['flagged']['fp32']:.3%}); "
                 + ("within tolerance" if d["within_tolerance"] else "OUT OF TOLERANCE: not for serving by default"))


@cli.command(cls=_Command)
@_friendly
def evaluate(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    events: EventsOpt,
    out: Annotated[Path, typer.Option("--out", help="Report directory to write.")],
    fmt: FormatOpt = Format.auto,
    inject: InjectOpt = "all",
    alias: AliasOpt = None,
    precision: Annotated[Precision, typer.Option("--precision", help="The bundle's model file to evaluate: fp32, "
                                                 "fp16 or int8.", case_sensitive=False)] = Precision.fp32,
) -> None:
    """Evaluate a bundle on the test users of an event log, against the baselines."""
    from app.core.bundle import load_bundle
    from app.core.vocabulary import parse_alias_pairs

    aliases = parse_alias_pairs(alias or ())
    _check_aliases(load_bundle(bundle).spec, aliases)
    _logging()
    from app.core import progress
    from model_export.evaluate import evaluate_file
    from model_export.scenarios import parse_inject

    names = parse_inject(inject)
    with progress.bars(_bars()) as shown:
        on_step = progress.stepper(shown, "evaluate", before=f"load, split and inject {events.name}")
        summary = evaluate_file(bundle, events, fmt.value, names, out, aliases=aliases, on_step=on_step,
                                precision=precision.value)
    _say(f"report written to {out}")
    Console(soft_wrap=True).print_json(data=summary)  # stdout: `seqguard evaluate ... > summary.json`


@cli.command(cls=_Command)
@_friendly
def score(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    events: EventsOpt,
    out: Annotated[Path, typer.Option("--out", help="Results file, one answer per input event in input order: "
                                      "Parquet if its name ends in .parquet (any case), else JSONL.")],
    fmt: FormatOpt = Format.auto,
    threads: Annotated[int, typer.Option("--threads", help="ONNX Runtime threads (0 = all cores).")] = 0,
    alias: AliasOpt = None,
    precision: Annotated[Precision, typer.Option("--precision", help="The bundle's model file to run: fp32, fp16 "
                                                 "or int8 (where the bundle has it; else fp32, said in the log).",
                                                 case_sensitive=False)] = Precision.fp32,
) -> None:
    """Score every event of a log (ONNX Runtime only) into JSONL or Parquet, in input order."""
    from app.core.vocabulary import parse_alias_pairs

    aliases = parse_alias_pairs(alias or ())
    _logging()
    from app.core import progress
    from app.core.batch_engine import score_events, write_results
    from app.core.bundle import load_bundle
    from app.core.scorer import OnnxModel
    from model_export.data import read_events

    t0 = time.perf_counter()
    loaded = load_bundle(bundle)
    _check_aliases(loaded.spec, aliases)
    model = OnnxModel(loaded.with_aliases(aliases), threads=threads, precision=precision.value)
    spec = model.bundle.spec
    # The file is read through the model's own table (the bundle's, with --alias on top).
    ev, report = read_events(events, fmt.value, dedupe=False, sort=False, aliases=spec.aliases)
    t1 = time.perf_counter()
    with progress.bars(_bars()) as shown:
        scores = score_events(model, ev, on_progress=progress.counter(shown, "score", total=len(ev)))
    t2 = time.perf_counter()
    n = write_results(out, ev, scores, model.bundle.thresholds)
    t3 = time.perf_counter()
    _say(
        f"{n:,} events scored on {model.provider} ({model.precision_used}) in {t3 - t0:.2f}s "
        f"({n / (t3 - t0):,.0f} events/s): "
        f"load {t1 - t0:.2f}s, score {t2 - t1:.2f}s, write {t3 - t2:.2f}s; {report.summary()}"
    )
    if repeats := int(scores.is_duplicate().sum()):
        _say(f"repeats of an earlier (user_id, event_id): {repeats:,}, answered as the first with "
             f'"duplicate": true and left out of every window (as the live service does)')
    _report_unknown_types(spec.unknown_types(ev), len(ev), spec.event_types)


@cli.command(cls=_Command)
@_friendly
def serve(
    bundle: Annotated[Path | None, typer.Option("--bundle", help="Bundle directory (default: shipped).")] = None,
    redis_url: Annotated[str | None, typer.Option("--redis-url", help="Redis URL (default: embedded).")] = None,
    host: Annotated[str | None, typer.Option("--host", help="Address to listen on (SEQGUARD_HOST; "
                                                            "default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="TCP port (SEQGUARD_PORT; default 8000).")] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=1, help="Worker processes (SEQGUARD_WORKERS; "
                                                                         "one per core on a CPU host).")] = None,
    alias: AliasOpt = None,
    review: Annotated[float | None, typer.Option("--review", min=0.0, max=1.0, help=(
        "Review threshold instead of the bundle's (SEQGUARD_REVIEW_THRESHOLD); `seqguard info` shows the "
        "bundle's and the validation FPR it was chosen at."))] = None,
    block: Annotated[float | None, typer.Option("--block", min=0.0, max=1.0, help=(
        "Block threshold instead of the bundle's (SEQGUARD_BLOCK_THRESHOLD); not below the review one."))] = None,
) -> None:
    """Serve the scoring API (uvicorn, uvloop, httptools). Flags override SEQGUARD_* settings."""
    import contextlib
    import json
    import os
    import signal

    import uvicorn

    from app import serving
    from app.core.vocabulary import parse_alias_pairs
    from app.embedded_redis import EmbeddedRedis
    from app.settings import Settings

    aliases = json.dumps(parse_alias_pairs(alias)) if alias else None
    # Flags reach the workers as SEQGUARD_* variables: uvicorn starts each worker as a new
    # process from an import string (app.main:app_from_env), and the environment is the one
    # thing it inherits; the same Settings() then reads flags and variables alike.
    for name, value in (("BUNDLE", bundle), ("REDIS_URL", redis_url), ("HOST", host), ("PORT", port),
                        ("WORKERS", workers), ("EVENT_ALIASES", aliases), ("REVIEW_THRESHOLD", review),
                        ("BLOCK_THRESHOLD", block)):
        if value is not None:
            os.environ[f"SEQGUARD_{name}"] = str(value)
    settings = _settings(Settings)  # validates the environment before anything starts
    from app.core.bundle import BundleError, load_bundle
    from app.live import check_bundle

    # A bad --bundle stops here, in one line (the service checks it again, and warns about
    # risky aliases); the checks are those a hot reload passes.
    if problems := check_bundle(load_bundle(settings.bundle), store_history=None):
        raise BundleError(f"{settings.bundle or 'the shipped bundle'} cannot be served: " + "; ".join(problems))

    _logging()
    embedded = None
    if settings.redis_url is None:
        # One embedded Redis for all workers, owned by this process.
        embedded = EmbeddedRedis(settings.redis_data_dir, maxmemory=settings.redis_maxmemory)
        embedded.start()
        os.environ["SEQGUARD_REDIS_URL"] = embedded.url
        _say(f"embedded Redis (append-only) at {embedded.url}, data in {settings.redis_data_dir}")
    from app.metrics import multiproc_dir

    # Several workers share metrics through prometheus-client's multiprocess mode, from a
    # directory emptied at start (PROMETHEUS_MULTIPROC_DIR, or one made here and removed at exit).
    metrics_dir = contextlib.ExitStack()
    metrics_dir.enter_context(multiproc_dir(settings.workers))
    # uvicorn re-raises a SIGTERM once it has shut down gracefully; the default action would
    # end this process at once, skipping the `finally` and orphaning the embedded Redis.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    signal.signal(signal.SIGINT, _exit_on_sigterm)  # Ctrl-C: the same clean stop
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until a worker installs the reload (app.live)
    # log_config=None: uvicorn's own records go through this process's handler (plain or JSON lines)
    options: dict[str, Any] = dict(factory=True, host=settings.host, port=settings.port, workers=settings.workers,
                                   loop="uvloop", http="httptools", log_level="warning", access_log=False,
                                   log_config=None,
                                   timeout_graceful_shutdown=10)
    options |= serving.http_options(settings)  # limits on slow clients (header, keep-alive timeouts)
    try:
        if settings.workers > 1 and serving.SUPPORTED and settings.port != 0:
            # One socket per worker: the kernel balances connections (see app/serving.py).
            serving.run_workers(uvicorn.Config("app.main:app_from_env", **options), announce=_listening)
        elif settings.workers > 1:
            uvicorn.run("app.main:app_from_env", **options)
        else:
            serving.AnnouncingServer(uvicorn.Config("app.main:app_from_env", **options), _listening).run()
    finally:
        metrics_dir.close()
        if embedded is not None:
            embedded.stop()


@cli.command(cls=_Command)
@_friendly
def info(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory (e.g. app/bundles/default).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print bundle.json's summary as JSON instead.")] = False,
) -> None:
    """What a bundle is: version, architecture, vocabulary, thresholds, calibration, evaluation, parity.

    Thresholds come with how validation chose them; the evaluation summary covers the
    scenarios and held-out real users; the training data files are listed."""
    from app.core.bundle import load_bundle

    b = load_bundle(bundle)
    m = b.meta
    t, chosen = m["thresholds"], m["thresholds"].get("chosen", {})
    arch = m["architecture"]
    summary: dict[str, Any] = {
        "model_version": b.version, "created_at": m.get("created_at"), "schema_version": m.get("schema_version"),
        "architecture": {k: arch.get(k) for k in ("arch", "window", "d_model", "n_layers", "n_heads", "parameters",
                                                   "surprise")},
        "supervised": m.get("supervised"), "calibration": m["calibration"].get("kind"),
        "event_types": list(b.spec.event_types), "aliases": len(b.spec.aliases),
        "thresholds": {"review": t["review"], "block": t["block"], "unit": t.get("unit", "event"),
                       **{k: {x: chosen[k].get(x) for x in ("target_fpr", "validation_fpr", "validation_user_fpr",
                                                            "set_by")} for k in ("review", "block") if k in chosen}},
        "evaluation": {"detector": (m.get("evaluation") or {}).get("detectors", {}).get(f"seqguard-{b.arch}"),
                       "real_traffic": (m.get("evaluation") or {}).get("real_traffic")},
        "parity": {k: {"max_abs_diff": v.get("max_abs_diff"), "n_windows": v.get("n_windows")}
                   for k, v in m.get("parity", {}).items()},
        "training_data": [f.get("name") for f in m.get("training_data", {}).get("files", [])],
    }
    if as_json:
        typer.echo(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
        return
    out = Console(soft_wrap=True)
    a = summary["architecture"]
    out.print(f"[bold]{b.version}[/bold]  created {summary['created_at']}  (bundle schema {summary['schema_version']})")
    out.print(f"architecture: {a['arch']}, window {a['window']}, d_model {a['d_model']}, {a['n_layers']} layers, "
              f"{a['parameters']:,} parameters; surprise {a['surprise']}; "
              f"{'supervised' if summary['supervised'] else 'self-supervised'}, calibration {summary['calibration']}")
    out.print(f"event types: {', '.join(summary['event_types'])} (+{summary['aliases']} aliases; the rest: unknown)",
              highlight=False)
    th = summary["thresholds"]
    for k in ("review", "block"):
        row = th.get(k) if isinstance(th.get(k), dict) else {}
        reached = row.get("validation_user_fpr") if th["unit"] == "user" else row.get("validation_fpr")
        out.print(f"{k}: {t[k]:.6g}  target {th['unit']} FPR {row.get('target_fpr')}, validation "
                  f"{reached if reached is None else f'{reached:.4%}'}, set by {row.get('set_by')}", highlight=False)
    if det := summary["evaluation"]["detector"]:
        out.print(f"evaluation (injected scenarios, test users): ROC-AUC {det['roc_auc']:.4f}, recall at 1% FPR "
                  f"{det['recall_at_1pct_fpr']:.3f}")
    if rt := summary["evaluation"]["real_traffic"]:
        out.print(f"held-out real users ({rt['users']:,} users, {rt['events']:,} events): flagged "
                  f"{rt['flagged_share']:.3%}, blocked {rt['blocked_share']:.3%}, users blocked "
                  f"{rt['users_blocked_share']:.3%}")
    for k, v in summary["parity"].items():
        out.print(f"parity {k}: max |PyTorch − ONNX Runtime| {v['max_abs_diff']:.2e} on {v['n_windows']} windows")
    if summary["training_data"]:
        out.print(f"trained on: {', '.join(summary['training_data'])}", highlight=False)


@cli.command(cls=_Command)
@_friendly
def replay(
    url: Annotated[str, typer.Option("--url", help="Base URL of the service, e.g. http://127.0.0.1:8000.")],
    events: EventsOpt,
    fmt: FormatOpt = Format.auto,
    rate: Annotated[float, typer.Option("--rate", min=0, help="Events per second (0 = as fast as possible).")] = 0.0,
    bulk: Annotated[int, typer.Option("--bulk", min=1, max=1000, help="Events per request (1 = single).")] = 1,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="Requests in flight.")] = 16,
    api_key: Annotated[str | None, typer.Option("--api-key", envvar="SEQGUARD_API_KEY",
                                                help="Bearer key (scope events).")] = None,
    limit: Annotated[int, typer.Option("--limit", min=0, help="Stop after N events (0 = no limit).")] = 0,
    duration: Annotated[float, typer.Option("--duration", min=0, help="Stop after S seconds (0 = no limit).")] = 0.0,
    loop: Annotated[bool, typer.Option("--loop", help="Replay the file again, with fresh ids, until "
                                                      "--limit or --duration.")] = False,
    tag: Annotated[str, typer.Option("--tag", help="Prefix of event and user ids (replay a file as new "
                                                   "traffic).")] = "",
    retries: Annotated[int, typer.Option("--retries", min=0, help="Retries of a 503 (after Retry-After).")] = 5,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the summary as JSON here.")] = None,
    engine: Annotated[Engine, typer.Option("--engine", help="HTTP client: httpx, or raw (a minimal HTTP/1.1 "
                                                            "client, for load tests on the same machine).")
                      ] = Engine.httpx,
) -> None:
    """Replay an event log against a running service, as a storefront would; exit 1 if any request failed."""
    import orjson
    from rich.console import Console

    from app.replay import ReplayConfig, Replayer, summary_table

    if not events.is_file():
        raise FileNotFoundError(f"{events}: no such file")
    _check_reachable(url)
    cfg = ReplayConfig(url=url, events=events, format=fmt.value, rate=rate, bulk=bulk, concurrency=concurrency,
                       api_key=api_key, limit=limit, duration_s=duration, loop=loop, tag=tag, retries=retries,
                       engine=engine.value)
    stats = Replayer(cfg, console=err).run_sync()
    summary = stats.summary()
    Console().print(summary_table(summary, cfg))
    if json_out is not None:
        json_out.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2) + b"\n")
    if summary["errors"]:
        raise typer.Exit(1)


@cli.command(cls=_Command)
@_friendly
def rekey(
    users: Annotated[Path, typer.Option("--users", help="The user ids to move, one per line (UTF-8; a leading BOM "
                                                        "and blank lines are skipped); - reads them from stdin.")],
    from_key_env: Annotated[str | None, typer.Option(
        "--from-key-env", metavar="NAME",
        help="Name of the environment variable holding the old tag key (what SEQGUARD_USER_TAG_KEY was); unset or "
             "empty: the unkeyed tag. A name, never the key: a key on the command line lands in shell history.")
    ] = None,
    to_key_env: Annotated[str | None, typer.Option(
        "--to-key-env", metavar="NAME",
        help="Name of the environment variable holding the new tag key (what SEQGUARD_USER_TAG_KEY will be); "
             "unset or empty: the unkeyed tag.")] = None,
    redis_url: Annotated[str | None, typer.Option(
        "--redis-url", help="URL of the service's Redis (redis://, rediss:// or unix://), as in its "
                            "SEQGUARD_REDIS_URL. Unset: the embedded Redis's data directory "
                            "(SEQGUARD_REDIS_DATA_DIR), opened here; the service must be stopped.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Count what would move; write nothing.")] = False,
) -> None:
    """Move users' Redis keys from one user tag key (SEQGUARD_USER_TAG_KEY) to another, TTLs kept.

    Run it with the service stopped (with the embedded Redis of `make run` / `seqguard
    serve`, leave out --redis-url: the command opens its data directory itself, and refuses
    while the service holds it), or before the service serves with the new key, then
    switch SEQGUARD_USER_TAG_KEY to it: an event of a user stored while that user moves is
    lost, and one stored under the old key afterwards stays there until its TTL. Users not
    listed start new windows under the new key and lose their idempotency records (a replay
    of their earlier events is scored as new); their old keys expire with their TTL. A user
    with keys under the new key already (the service wrote there) is skipped, nothing of
    theirs overwritten, and counted as a conflict. Each key moves by DUMP, PTTL, RESTORE and
    DEL, which works on one Redis and on a Redis Cluster. Prints counts, never a user id;
    exit code 2 for a bad file or variable, or a Redis that cannot be reached."""
    import asyncio

    from redis.exceptions import RedisError

    from app.core import progress
    from app.redis_client import connect
    from app.windows import Moved, Rekeyer

    old, old_said = _tag_key_from("--from-key-env", from_key_env)
    new, new_said = _tag_key_from("--to-key-env", to_key_env)
    if old == new:
        raise ValueError(f"the old tag key ({old_said}) and the new one ({new_said}) are the same: nothing to move")
    ids = _read_user_ids(users)
    distinct = len(set(ids))
    embedded = None
    if redis_url is None:  # the embedded Redis's data, the service stopped (its lock says so otherwise)
        from app.embedded_redis import EmbeddedRedis
        from app.settings import Settings

        settings = _settings(Settings)
        embedded = EmbeddedRedis(settings.redis_data_dir, maxmemory=settings.redis_maxmemory)
        embedded.start()
        redis_url = embedded.url
        _say(f"embedded Redis data in {settings.redis_data_dir}, opened at {embedded.url}")
    where = _redacted(redis_url)
    done = 0

    async def run() -> dict[Moved, int]:
        redis = connect(redis_url, pool_size=32, timeout_s=10.0)
        try:
            try:
                await redis.ping()
            except (RedisError, OSError) as e:
                raise ValueError(f"cannot reach Redis at {where}: {e}") from None
            with progress.bars(_bars()) as shown:
                bar = progress.counter(shown, "rekey", total=distinct)

                def on_progress(n: int, total: int) -> None:
                    nonlocal done
                    done = n
                    bar(n, total)

                counts = await Rekeyer(redis, from_key=old, to_key=new).move_many(
                    ids, dry_run=dry_run, in_flight=32, on_progress=on_progress)
            return counts
        except (RedisError, OSError) as e:
            raise ValueError(f"Redis at {where} failed after {done:,} of {distinct:,} users: {e}; run the command "
                             "again (users moved already count as absent then)") from None
        finally:
            await redis.aclose()
            await redis.connection_pool.aclose()

    try:
        counts = asyncio.run(run())
    finally:
        if embedded is not None:
            embedded.stop()
    repeats = len(ids) - distinct
    _say(f"{'dry run, nothing written: ' if dry_run else ''}{len(ids):,} users read"
         f"{f' ({repeats:,} listed more than once, counted once)' if repeats else ''}; "
         f"{'would move' if dry_run else 'moved'} {counts['moved']:,}, absent {counts['absent']:,} (no keys under "
         f"the old tag), conflicts {counts['conflict']:,}; from {old_said} to {new_said}")
    if counts["conflict"]:
        _say(f"{counts['conflict']:,} users {'would be' if dry_run else 'were'} skipped: they have keys under the new "
             "tag already (the service wrote there); their old keys are left as they are and expire with their TTL",
             logging.WARNING)


def _tag_key_from(option: str, variable: str | None) -> tuple[bytes, str]:
    """The user tag key held by the environment variable named by ``option``, and how to say
    which tag it gives: never the key, and the name only of a variable that is set (an unset
    "name" may be a key typed by mistake)."""
    from app.settings import tag_key

    value = os.environ.get(variable) if variable is not None else None
    if variable is None:
        return b"", f"the unkeyed tag ({option} not given)"
    if not value:
        return b"", f"the unkeyed tag (the variable {option} names is {'empty' if value == '' else 'not set'})"
    return tag_key(value, variable), f"the tag keyed by ${variable}"


def _read_user_ids(path: Path) -> list[str]:
    """The user ids of a ``--users`` file (``-``: stdin), in file order: one per line, UTF-8,
    a leading BOM and blank lines skipped. Errors name the file and line, never an id."""
    import codecs
    import sys

    stdin = str(path) == "-"
    where = "stdin" if stdin else str(path)
    try:
        data = sys.stdin.buffer.read() if stdin else path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: a directory, not a file of user ids") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror})") from None
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{where}: line {line}: not UTF-8") from None
    ids = [line.removesuffix("\r") for line in text.split("\n") if line.strip()]
    if not ids:
        raise ValueError(f"{where}: no user ids (an empty file, or blank lines only)")
    return ids


def _redacted(url: str) -> str:
    """``url`` without its password, fit to print: in the user part (``:pw@``) and in the
    query (``?password=``, redis-py's form for ``unix://``; an attack review found it
    printed).

    >>> _redacted("redis://:s3cret@h:6379/0"), _redacted("unix:///r.sock?db=1&password=s3cret")
    ('redis://:***@h:6379/0', 'unix:///r.sock?db=1&password=***')
    """
    from urllib.parse import parse_qsl, urlencode, urlsplit

    base, sep, query = url.partition("?")
    parts = urlsplit(base)
    if parts.password is not None:
        netloc = parts.netloc.rpartition("@")[2]
        user = f"{parts.username}:***@" if parts.username else ":***@"
        base = parts._replace(netloc=user + netloc).geturl()
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*")
    return base + sep + query


def _report_unknown_types(unknown: dict[str, int], n_events: int, known: tuple[str, ...]) -> None:
    """The share of events whose type the model does not know, per type; a warning past
    ``UNKNOWN_SHARE_WARN`` (those events were scored with the out-of-vocabulary id)."""
    from app.core.vocabulary import printable

    # Names come from the file: escape sequences and newlines must not reach the terminal.
    unknown = {printable(name): n for name, n in unknown.items()}
    total = sum(unknown.values())
    share = total / n_events if n_events else 0.0
    if not total:
        _say(f"unknown event types: none (0.00% of events; the model knows {', '.join(known)})")
        return
    ranked = sorted(unknown.items(), key=lambda kv: (-kv[1], kv[0]))
    per_type = ", ".join(f"{name} {n / n_events:.2%} ({n:,})" for name, n in ranked[:10])
    more = f", and {len(ranked) - 10} more" if len(ranked) > 10 else ""
    _say(f"unknown event types: {share:.2%} of events ({total:,}): {per_type}{more}")
    if share > UNKNOWN_SHARE_WARN:
        _say(f"{share:.2%} of the events have an event type the model does not know "
             f"and were scored with its out-of-vocabulary id; if they are other names for its types "
             f"({', '.join(known)}), alias them with --alias NAME=TYPE", logging.WARNING)


def _warn(warnings: list[str]) -> None:
    for w in warnings:
        _say(w, logging.WARNING)


def _check_aliases(spec: Any, aliases: dict[str, str]) -> None:
    """Warn about ``--alias`` entries that change a name the bundle knows, or lead to a
    type the model does not know (its events would be scored with the out-of-vocabulary id)."""
    from app.core.vocabulary import alias_warnings

    _warn(alias_warnings(aliases, spec.aliases, spec.event_types))


def _settings(factory: Callable[[], Any]) -> Any:
    """``factory()`` (the service's ``Settings``), its errors as one line naming each
    environment variable at fault."""
    import re

    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    try:
        return factory()
    except ValidationError as e:
        problems = []
        for x in e.errors():
            loc = [str(p) for p in x["loc"]]
            where = f"SEQGUARD_{loc[0].upper()}" + "".join(f"[{p!r}]" for p in loc[1:]) if loc else "settings"
            msg = x["msg"].removeprefix("Value error, ")
            problems.append(msg if msg.startswith(where) else f"{where}: {msg}")  # named once
        raise ValueError("; ".join(problems)) from None
    except SettingsError as e:
        m = re.search(r'field "([^"]+)"', str(e))
        where = f"SEQGUARD_{m.group(1).upper()}" if m else "a SEQGUARD_ setting"
        raise ValueError(f"{where}: not valid JSON ({e.__cause__ or e})") from None


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """A SIGTERM (or Ctrl-C's SIGINT) is how a service is asked to stop: once stopped,
    exit 0 (cleanly)."""
    raise SystemExit(0)


def _check_reachable(url: str) -> None:
    """Refuse, in one line, a service that does not answer ``GET /healthz``.

    Raises:
        ValueError: connection refused, unknown host or timeout, saying which.
    """
    import httpx

    try:
        httpx.get(url.rstrip("/") + "/healthz", timeout=5.0)
    except httpx.ConnectError as e:
        raise ValueError(f"cannot connect to {url}: {e or 'connection refused'} (is `seqguard serve` running "
                         "there?)") from None
    except httpx.TimeoutException:
        raise ValueError(f"{url} did not answer GET /healthz within 5 s") from None
    except httpx.TransportError as e:
        raise ValueError(f"cannot reach {url}: {e}") from None


def _listening(url: str) -> None:
    _say(f"listening on {url}")


def _say(message: str, level: int = logging.INFO) -> None:
    """A line for the person at the terminal, or, with SEQGUARD_LOG_FORMAT=json, a JSON log
    record like every other line (logger ``seqguard.cli``)."""
    if os.environ.get("SEQGUARD_LOG_FORMAT") == "json":
        if not logging.getLogger().handlers:
            _logging()
        logging.getLogger("seqguard.cli").log(level, message)
    else:
        prefix = "[red]error:[/red] " if level >= logging.ERROR else "[yellow]warning:[/yellow] " if (
            level >= logging.WARNING) else ""
        err.print(prefix + escape(message), highlight=False)


def _bars() -> bool:
    """Whether progress bars may be drawn: with rich logs (``SEQGUARD_LOG_FORMAT`` auto, the
    default) on a terminal; never into plain or JSON logs, a file or a pipe."""
    return os.environ.get("SEQGUARD_LOG_FORMAT", "auto") == "auto" and err.is_terminal


def main() -> None:
    cli(prog_name="seqguard")


if __name__ == "__main__":
    main()
