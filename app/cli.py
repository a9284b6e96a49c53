"""The `seqguard` command line: train, export, evaluate, score (offline) and, with the
service, serve and replay.

Offline commands import the `model_export` side lazily, so the service's commands work
where only the service is installed (no PyTorch).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler

cli = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="seqguard: real-time anomaly scoring of user event sequences.")
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

FORMAT_HELP = "auto|taobao|retailrocket|rees46|csv|jsonl|parquet"
EventsOpt = Annotated[Path, typer.Option("--events", help="Event log (CSV, JSONL, Parquet; .gz ok).")]
FormatOpt = Annotated[str, typer.Option("--format", help=FORMAT_HELP)]
InjectOpt = Annotated[str, typer.Option("--inject", help="Scenarios to inject: all, none or NAME,...")]


def _friendly(fn: F) -> F:
    """Input errors become one red line naming what is wrong, and exit code 2."""

    @wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        from app.bundle import BundleError

        try:
            return fn(*args, **kwargs)
        except (BundleError, FileNotFoundError, ValueError) as e:
            err.print(f"[red]error:[/red] {e}", highlight=False)
            raise typer.Exit(2) from None

    return run  # type: ignore[return-value]


def _logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False)], force=True)


@cli.command()
@_friendly
def train(
    events: EventsOpt,
    out: Annotated[Path, typer.Option("--out", help="Run directory to write.")],
    fmt: FormatOpt = "auto",
    inject: InjectOpt = "all",
    arch: Annotated[str, typer.Option("--arch", help="transformer|gru|lstm")] = "transformer",
    window: Annotated[int, typer.Option("--window", min=4, max=1024)] = 64,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 12,
    seed: Annotated[int, typer.Option("--seed")] = 7,
    calibration: Annotated[str, typer.Option("--calibration", help="auto|platt|isotonic|tail")] = "auto",
) -> None:
    """Train a detector on an event log (scenarios injected unless --inject none)."""
    _logging()
    from model_export.data import FORMATS
    from model_export.scenarios import parse_inject
    from model_export.train import TrainConfig, run

    _check_format(fmt, FORMATS)
    cfg = TrainConfig(arch=arch, window=window, epochs=epochs, seed=seed, calibration=calibration)
    summary = run(events, fmt, parse_inject(inject), cfg, out)
    t = summary["thresholds"]
    err.print(f"run written to {out}: {summary['parameters']:,} parameters, "
              f"thresholds review {t['review']:.4f} / block {t['block']:.4f}")


@cli.command()
@_friendly
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `seqguard train`.")],
    out: Annotated[Path, typer.Option("--out", help="Bundle directory to write.")],
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write model.fp16.onnx for GPUs.")] = False,
    report: Annotated[bool, typer.Option("--report/--no-report", help="Evaluate into out/report.")] = True,
) -> None:
    """Export a trained run as a bundle: ONNX, bundle.json (parity included), report/."""
    _logging()
    from model_export.export import export as do_export

    meta = do_export(run_dir, out, fp16=fp16, evaluate=report)
    p = meta["parity"]["fp32"]
    err.print(f"bundle {meta['model_version']} in {out}; fp32 parity max |diff| {p['max_abs_diff']:.2e} "
              f"on {p['n_windows']} held-out windows")


@cli.command()
@_friendly
def evaluate(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    events: EventsOpt,
    out: Annotated[Path, typer.Option("--out", help="Report directory to write.")],
    fmt: FormatOpt = "auto",
    inject: InjectOpt = "all",
) -> None:
    """Evaluate a bundle on the test users of an event log, against the baselines."""
    _logging()
    from model_export.data import FORMATS
    from model_export.evaluate import evaluate_file
    from model_export.scenarios import parse_inject

    _check_format(fmt, FORMATS)
    summary = evaluate_file(bundle, events, fmt, parse_inject(inject), out)
    err.print(f"report written to {out}")
    err.print_json(data=summary)


@cli.command()
@_friendly
def score(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    events: EventsOpt,
    out: Annotated[Path, typer.Option("--out", help="Results JSONL (one object per input event).")],
    fmt: FormatOpt = "auto",
    threads: Annotated[int, typer.Option("--threads", help="ONNX Runtime threads (0 = all cores).")] = 0,
) -> None:
    """Score every event of a log (ONNX Runtime only) into JSONL, in input order."""
    _logging()
    from app.backfill import score_events, write_results
    from app.bundle import load_bundle
    from app.scorer import OnnxModel
    from model_export.data import FORMATS, read_events

    _check_format(fmt, FORMATS)
    t0 = time.perf_counter()
    model = OnnxModel(load_bundle(bundle), threads=threads)
    ev, report = read_events(events, fmt, dedupe=False, sort=False)
    t1 = time.perf_counter()
    scores = score_events(model, ev)
    t2 = time.perf_counter()
    n = write_results(out, ev, scores, model.bundle.thresholds)
    t3 = time.perf_counter()
    err.print(
        f"{n:,} events scored on {model.provider} in {t3 - t0:.2f}s ({n / (t3 - t0):,.0f} events/s): "
        f"load {t1 - t0:.2f}s, score {t2 - t1:.2f}s, write {t3 - t2:.2f}s; {report.summary()}"
    )


def _check_format(fmt: str, formats: tuple[str, ...]) -> None:
    if fmt not in formats:
        raise ValueError(f"--format {fmt!r}: expected one of {', '.join(formats)}")


def main() -> None:
    cli(prog_name="seqguard")


if __name__ == "__main__":
    main()
