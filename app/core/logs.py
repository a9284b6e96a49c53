"""How seqguard writes its logs: one line per record, in the form the reader needs.

``SEQGUARD_LOG_FORMAT`` (or :func:`setup`'s ``fmt``):

- ``auto`` (default): rich, coloured lines on a terminal; plain lines otherwise.
- ``plain``: ``TIME LEVEL LOGGER MESSAGE``, one record per line, never wrapped (a file
  or a pipe must not get lines split at 80 columns mid-path).
- ``json``: one JSON object per line (python-json-logger), what log shippers expect:
  ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``, plus the record's
  structured fields (``user_hash``, ``error_id``, ... given with ``extra=``).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

FORMATS = ("auto", "plain", "json")
PLAIN = "%(asctime)s %(levelname)s %(name)s %(message)s"


class _UTCFormatter(logging.Formatter):
    """Times in ISO 8601, UTC, to the millisecond (``2026-11-29T19:38:20.387Z``)."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def handler(fmt: str = "auto", stream: IO[str] | None = None) -> logging.Handler:
    """A handler writing ``stream`` (default: stderr) in ``fmt`` (one of :data:`FORMATS`).

    Raises:
        ValueError: an unknown format.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    stream = stream or sys.stderr
    if fmt == "auto" and stream.isatty():
        from rich.console import Console
        from rich.logging import RichHandler

        rich = RichHandler(console=Console(file=stream), show_path=False)
        # Its own columns say the time and level: the message alone (setup's basicConfig
        # would otherwise give it "INFO:seqguard.scorer:" in front, the level twice).
        rich.setFormatter(logging.Formatter("%(message)s"))
        return rich
    h = logging.StreamHandler(stream)
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        class _Json(JsonFormatter, _UTCFormatter):
            pass

        h.setFormatter(_Json("%(asctime)s %(levelname)s %(name)s %(message)s",
                             rename_fields={"asctime": "time", "levelname": "level", "name": "logger"}))
    else:
        h.setFormatter(_UTCFormatter(PLAIN))
    return h


def console() -> Console | None:
    """The rich console the logs are written to (``auto`` on a terminal), else ``None``.
    A progress bar drawn on it (app/core/progress.py) keeps the records above the bar; on
    another console they would be written over it."""
    from rich.logging import RichHandler

    return next((h.console for h in logging.getLogger().handlers if isinstance(h, RichHandler)), None)


def setup(level: int | str = logging.INFO, fmt: str = "auto", stream: IO[str] | None = None) -> None:
    """Route every logger through one :func:`handler` at ``level`` (replacing any)."""
    logging.basicConfig(level=level, handlers=[handler(fmt, stream)], force=True)
