"""Streaming loaders: event logs (Taobao, RetailRocket, REES46, generic CSV/JSONL/Parquet,
each optionally gzipped) into columnar :class:`~app.core.events.Events`.

Event types come out in their canonical names (``pv`` → ``view``, ``addtocart`` →
``cart``, ...: :mod:`app.core.vocabulary`), renamed on each chunk's small dictionary, never per
row; :func:`iter_records`, the request stream of ``seqguard replay``, keeps the file's
own names, which the service maps itself.

Files are read in chunks with pyarrow and every chunk is reduced to compact columns at
once (codes, 64-bit hashes, int64 times), so memory follows the number of rows (about
30 bytes each), never the size of the text (the column parsers: :mod:`model_export.columns`).
Malformed rows are skipped and counted; a file with too many of them is refused with an
error naming the first bad line and field.
"""

from __future__ import annotations

import csv
import io
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from app.core.events import HASHED_FIELDS, PLAUSIBLE_MS, Events, implausible_time
from app.core.vocabulary import build_aliases, canonical
from model_export.columns import (
    as_py,
    combined,
    hash_column,
    is_missing,
    json_object,
    json_table,
    json_text,
    parse_label,
    parse_price,
    parse_time,
    rechunk,
    strings,
)

log = logging.getLogger("seqguard.data")

FORMATS = ("auto", "taobao", "retailrocket", "rees46", "csv", "jsonl", "parquet")
#: Columns of generic files: the contract's event fields plus the optional label.
FIELDS = ("event_id", "user_id", "event_type", "timestamp", *HASHED_FIELDS, "price", "label")
REQUIRED = ("user_id", "event_type", "timestamp")
_MAX_EXAMPLES = 5
_BOM = b"\xef\xbb\xbf"


class DataError(ValueError):
    """Bad input file; the message names the file, the 1-based line (when known) and field."""

    def __init__(self, path: Any, message: str, *, line: int | None = None,
                 field: str | None = None, unit: str = "line") -> None:
        self.path, self.line, self.field, self.reason = str(path), line, field, message
        where = [self.path] + [f"{unit} {line}"] * (line is not None)
        where += [f"field {field!r}"] * (field is not None)
        super().__init__(f"{', '.join(where)}: {message}")


@dataclass
class LoadReport:
    """What a load read, kept and skipped."""

    path: str
    format: str
    rows_read: int = 0  # data rows seen (header and blank lines excluded)
    rows_kept: int = 0
    malformed: int = 0  # rows skipped as malformed
    malformed_examples: list[str] = field(default_factory=list)  # "line N: reason", first 5
    duplicates_dropped: int = 0
    utc_offset_minutes: int = 0  # local time of the source (taobao: 480, Asia/Shanghai)
    ignored_columns: list[str] = field(default_factory=list)  # unknown columns of generic files
    type_aliases_applied: dict[str, str] = field(default_factory=dict)  # raw event type -> canonical, as renamed

    def summary(self) -> str:
        """One human line, e.g. for the CLI."""
        s = (f"{self.path} ({self.format}): kept {self.rows_kept:,} of {self.rows_read:,} rows, "
             f"{self.malformed:,} malformed, {self.duplicates_dropped:,} duplicates dropped")
        if self.malformed_examples:
            s += f" (first: {self.malformed_examples[0]})"
        if self.ignored_columns:
            s += f"; ignored columns: {', '.join(self.ignored_columns)}"
        if self.type_aliases_applied:
            s += "; event types renamed: " + ", ".join(f"{a}→{b}" for a, b in self.type_aliases_applied.items())
        return s


@dataclass(frozen=True)
class _Spec:
    columns: dict[str, str]  # source column -> contract field
    header: bool = True
    seconds: bool = False  # timestamps are Unix seconds (else epoch ms or RFC 3339)
    utc_suffix: bool = False  # RFC 3339 times may end in " UTC" for "Z" (REES46)
    utc_offset_minutes: int = 0


@dataclass(frozen=True)
class _Rows:
    """The valid rows of one raw chunk: source text columns named by contract field, and
    the parsed times, prices and labels (None where the source lacks the column)."""

    cols: dict[str, pa.Array]
    ms: np.ndarray  # (n,) int64 epoch milliseconds
    price: np.ndarray | None  # (n,) float64, NaN = missing
    label: np.ndarray | None  # (n,) int8


_GENERIC = _Spec({f: f for f in FIELDS})
_SPECS = {
    "taobao": _Spec({"user_id": "user_id", "item_id": "item_id", "category_id": "category_id",
                     "behavior_type": "event_type", "timestamp": "timestamp"},
                    header=False, seconds=True, utc_offset_minutes=480),
    "retailrocket": _Spec({"timestamp": "timestamp", "visitorid": "user_id", "event": "event_type",
                           "itemid": "item_id"}),
    "rees46": _Spec({"event_time": "timestamp", "event_type": "event_type", "product_id": "item_id",
                     "category_id": "category_id", "price": "price", "user_id": "user_id",
                     "user_session": "session_id"}, utc_suffix=True),
    "csv": _GENERIC, "jsonl": _GENERIC, "parquet": _GENERIC,
}


def detect_format(path: str | Path) -> str:
    """The format of an event file, from its name and its first line.

    ``.parquet``/``.pq`` is parquet and ``.jsonl``/``.ndjson``/``.json`` is jsonl (also
    under ``.gz``); otherwise the first line decides: RetailRocket and REES46 headers by
    their column names, a headerless ``user,item,category,pv|buy|cart|fav,seconds`` line is
    taobao, a header with ``user_id,event_type,timestamp`` is csv.

    Raises
    ------
    DataError
        The file is missing or its format cannot be told.
    """
    p = _existing(path)
    name = p.name.lower().removesuffix(".gz")
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    with _open_binary(p) as f:
        head = f.readline(1 << 16)
    if head.startswith(b"PAR1"):
        return "parquet"
    text = head.decode("utf-8-sig", "replace").strip()
    if not text:
        raise DataError(p, "no events")
    if text.startswith("{"):
        return "jsonl"
    cells = [c.strip() for c in next(csv.reader([text]), [])]
    names = {c.lower() for c in cells}
    if {"visitorid", "itemid", "event"} <= names:
        return "retailrocket"
    if {"event_time", "product_id", "user_session"} <= names:
        return "rees46"
    if (len(cells) == 5 and cells[3] in {"pv", "buy", "cart", "fav"}
            and all(cells[i].isdigit() for i in (0, 1, 2, 4))):
        return "taobao"
    if set(REQUIRED) <= names:
        return "csv"
    raise DataError(p, f"cannot tell the format from the name and first line {text[:80]!r}; "
                       f"pass one of {', '.join(FORMATS[1:])}")


def read_events(path: str | Path, format: str = "auto", *, dedupe: bool = True, sort: bool = True,
                chunk_rows: int = 1_000_000, max_malformed_fraction: float = 0.01,
                on_chunk: Callable[[int], None] | None = None,
                aliases: Mapping[str, str] | None = None) -> tuple[Events, LoadReport]:
    """Load an event file into :class:`Events`, streaming.

    Parameters
    ----------
    path, format
        The file (``.gz`` allowed) and one of :data:`FORMATS`.
    dedupe
        Drop rows equal in every parsed column to an earlier row (the first is kept).
    sort
        Group by user, time-ordered within a user (stable); ``False`` keeps file order.
    chunk_rows
        Rows parsed at a time; memory beyond the result is about this many rows of text.
    max_malformed_fraction
        Malformed rows are skipped, but more than this fraction of the rows read (and more
        than one) is an error.
    on_chunk
        Called after each chunk with the number of rows it read (for progress bars).
    aliases
        Event type aliases (NAME → TYPE) on top of the project's table
        (:func:`app.core.vocabulary.build_aliases`); event types come out renamed through it,
        and ``LoadReport.type_aliases_applied`` says which were.

    Returns
    -------
    (Events, LoadReport)

    Raises
    ------
    DataError
        Missing file or required column, too many malformed rows, or no events.

    Examples
    --------
    >>> events, report = read_events("UserBehavior.csv.gz")  # doctest: +SKIP
    >>> print(report.summary())  # doctest: +SKIP
    """
    loader = _Loader(path, format, aliases)
    parts = []
    for ev in loader.chunks(chunk_rows):
        parts.append(ev)
        if on_chunk is not None:
            on_chunk(loader.take_progress())
    if on_chunk is not None and (rest := loader.take_progress()):
        on_chunk(rest)  # rows of trailing chunks that were all malformed
    rep = loader.report
    _check_malformed(loader, max_malformed_fraction)
    if not parts:
        raise DataError(rep.path, "no events")
    events = Events.concat(parts)
    if dedupe:
        dup = _duplicates(events)
        rep.duplicates_dropped = int(dup.sum())
        if rep.duplicates_dropped:
            events = events.take(~dup)
    if sort:
        events = events.sorted()
    rep.rows_kept = len(events)
    log.info("%s", rep.summary())
    return events, rep


def iter_event_chunks(path: str | Path, format: str = "auto", *, chunk_rows: int = 1_000_000,
                      aliases: Mapping[str, str] | None = None) -> Iterator[Events]:
    """Events of a file chunk by chunk, in file order, malformed rows skipped (and logged),
    event types renamed through ``aliases`` as :func:`read_events` renames them.

    Each chunk has its own user and event-type dictionaries; ``Events.concat`` merges them.
    """
    yield from _Loader(path, format, aliases).chunks(chunk_rows)


def iter_records(path: str | Path, format: str = "auto", *, chunk_rows: int = 10_000,
                 max_malformed_fraction: float = 0.01) -> RecordStream:
    """Events of a file as the service's request dicts, chunk by chunk, in file order.

    Each event is a contract dict: ``event_id``, ``user_id``, ``event_type``, ``timestamp``
    (epoch milliseconds, an int) and, where the file has them, the optional string fields
    and ``price``; ids are the RAW strings of the file (``Events`` keeps only hashes of
    items and categories), and so are event types (no aliases applied: the service maps
    them through its model's table). Malformed rows are skipped and counted as
    :func:`read_events` counts them (``stream.report``), and the same fraction of them is
    refused at the end.
    An event without an id gets the one ``Events.event_ids()`` gives it after
    ``read_events(path, dedupe=False, sort=False)``: ``f"{user_id}-{timestamp_ms}-{row}"``,
    ``row`` counting the kept rows of the file from 0.

    Parameters
    ----------
    path, format
        The file (``.gz`` allowed) and one of :data:`FORMATS`.
    chunk_rows
        Rows parsed at a time; every list yielded has at most this many events.

    Returns
    -------
    RecordStream
        An iterator of ``list[dict]``; ``.report`` is its :class:`LoadReport` so far.

    Raises
    ------
    DataError
        Missing file or required column; while iterating, too many malformed rows or none kept.

    Examples
    --------
    >>> stream = iter_records("UserBehavior.csv.gz")  # doctest: +SKIP
    >>> next(stream)[0]  # doctest: +SKIP
    {'event_id': '1-1511544070000-0', 'user_id': '1', 'event_type': 'pv', 'timestamp': 1511544070000,
     'item_id': '2268318', 'category_id': '2520377'}
    """
    return RecordStream(_Loader(path, format), chunk_rows, max_malformed_fraction)


class RecordStream(Iterator[list[dict[str, Any]]]):
    """What :func:`iter_records` returns: lists of request dicts, and the load's report."""

    def __init__(self, loader: _Loader, chunk_rows: int, max_malformed_fraction: float) -> None:
        self.report = loader.report
        self._it = self._run(loader, chunk_rows, max_malformed_fraction)

    def __iter__(self) -> RecordStream:
        return self

    def __next__(self) -> list[dict[str, Any]]:
        return next(self._it)

    def _run(self, loader: _Loader, chunk_rows: int, fraction: float) -> Iterator[list[dict[str, Any]]]:
        for recs in loader.record_chunks(chunk_rows):
            self.report.rows_kept += len(recs)
            yield recs
        _check_malformed(loader, fraction)
        if not self.report.rows_kept:
            raise DataError(self.report.path, "no events")


def split_by_user(events: Events, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
                  seed: int = 0) -> tuple[Events, Events, Events]:
    """Train/validation/test split with disjoint users.

    The distinct user ids, in sorted order, are permuted with ``seed`` and cut by
    ``fractions``, so a user lands in the same split whatever the row order. Each result
    is sorted by (user, time).

    Examples
    --------
    >>> train, val, test = split_by_user(events, (0.8, 0.1, 0.1), seed=1)  # doctest: +SKIP
    """
    frac = np.asarray(fractions, dtype=np.float64)
    if frac.shape != (3,) or (frac < 0).any() or frac.sum() <= 0:
        raise ValueError(f"fractions must be three non-negative numbers, got {fractions!r}")
    present = np.unique(events.user)
    present = present[np.argsort(events.user_ids[present].astype(str), kind="stable")]
    shuffled = present[np.random.default_rng(seed).permutation(len(present))]
    cuts = np.round(np.cumsum(frac) / frac.sum() * len(present)).astype(np.int64)
    split = np.zeros(max(events.n_users, 1), dtype=np.int8)
    for k, (a, b) in enumerate(zip((0, *cuts[:2]), cuts, strict=True)):
        split[shuffled[a:b]] = k
    parts = [events.take(split[events.user] == k).sorted() for k in range(3)]
    return parts[0], parts[1], parts[2]


class _Loader:
    """One pass over one file: raw chunks in, Events chunks out, tallies kept."""

    def __init__(self, path: str | Path, format: str, aliases: Mapping[str, str] | None = None) -> None:
        if format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
        self.path = _existing(path)
        self.fmt = detect_format(self.path) if format == "auto" else format
        self.spec = _SPECS[self.fmt]
        self.unit = "row" if self.fmt == "parquet" else "line"
        self.report = LoadReport(str(path), self.fmt,
                                 utc_offset_minutes=self.spec.utc_offset_minutes)
        self.examples: list[tuple[int, str | None, str]] = []  # earliest bad rows
        self._invalid_lines: list[int] = []  # CSV rows with the wrong number of fields
        self._reported = 0
        self._blank_lines = self.fmt not in ("jsonl", "parquet")  # CSV: all fields empty
        self.aliases = build_aliases(aliases)

    def take_progress(self) -> int:
        n, self._reported = self.report.rows_read - self._reported, self.report.rows_read
        return n

    def chunks(self, chunk_rows: int) -> Iterator[Events]:
        for rows in self._clean_chunks(chunk_rows):
            ev = self._events(rows)
            if len(ev):
                yield self._canonical(ev)

    def _canonical(self, ev: Events) -> Events:
        """``ev`` with canonical event types (a few distinct names: no per-row work)."""
        renamed = self.report.type_aliases_applied
        for raw in ev.event_types:
            if raw not in renamed and (name := canonical(raw, self.aliases)) != raw:
                renamed[raw] = name
        return ev.with_canonical_types(self.aliases)

    def record_chunks(self, chunk_rows: int) -> Iterator[list[dict[str, Any]]]:
        """Kept rows as contract dicts (raw strings, epoch-ms ints), chunk by chunk."""
        kept = 0  # kept rows before this chunk: the row index of generated event ids
        for rows in self._clean_chunks(chunk_rows):
            recs = _records(rows, kept)
            kept += len(recs)
            if recs:
                yield recs

    def _clean_chunks(self, chunk_rows: int) -> Iterator[_Rows]:
        raw = {"jsonl": self._jsonl, "parquet": self._parquet}.get(self.fmt, self._csv)
        try:
            for table, lines in raw(max(int(chunk_rows), 1)):
                yield self._clean(table, lines)
        except (pa.ArrowException, OSError) as e:
            raise DataError(self.path, f"cannot read: {e}") from e
        if self.report.ignored_columns:
            log.info("%s: ignoring unknown columns %s", self.path, self.report.ignored_columns)
        if self.report.malformed:
            log.warning("%s: skipped %d malformed of %d rows; first: %s", self.path,
                        self.report.malformed, self.report.rows_read,
                        self.report.malformed_examples[0])

    # ---- raw chunks: (table of source columns, 1-based line of each row) -------------------

    def _columns(self, names: list[str]) -> list[str]:
        """Source columns to read; refuses a file without a required one."""
        for src, dst in self.spec.columns.items():
            if dst in REQUIRED and src not in names:
                err = DataError(self.path, f"missing required column {src!r}")
                err.field = src
                raise err
        if self.spec is _GENERIC:
            self.report.ignored_columns = [c for c in names if c not in self.spec.columns]
        return list(dict.fromkeys(c for c in names if c in self.spec.columns))

    def _csv(self, chunk_rows: int) -> Iterator[tuple[pa.Table, np.ndarray]]:
        if self.spec.header:
            with _open_binary(self.path) as f:
                head = f.readline(1 << 20).decode("utf-8-sig", "replace").strip()
            if not head:
                raise DataError(self.path, "no events")
            names = [c.strip() for c in next(csv.reader([head]), [])]
        else:
            names = list(self.spec.columns)
        cols = self._columns(names)
        first_line = 2 if self.spec.header else 1
        block = 1 << 24  # bytes of text per parse; rows are re-cut into chunks below
        stream = pcsv.open_csv(
            pa.input_stream(str(self.path), compression=_compression(self.path)),
            # single-threaded so that the invalid-row handler knows line numbers
            read_options=pcsv.ReadOptions(use_threads=False, column_names=names,
                                          skip_rows=first_line - 1, block_size=block),
            parse_options=pcsv.ParseOptions(invalid_row_handler=self._invalid_row,
                                            ignore_empty_lines=False),
            convert_options=pcsv.ConvertOptions(include_columns=cols,
                                                column_types=dict.fromkeys(cols, pa.string())))
        done = 0
        for table in rechunk(stream, chunk_rows):
            # Every physical line is a row or an invalid row, so a row's line follows from
            # the invalid lines before it (all known: the reader reports them as it parses).
            bad = np.sort(np.asarray(self._invalid_lines, dtype=np.int64)) - first_line
            j = np.arange(done, done + table.num_rows, dtype=np.int64)
            skipped = np.searchsorted(bad - np.arange(len(bad)), j, side="right")
            yield table, first_line + j + skipped
            done += table.num_rows

    def _invalid_row(self, row: Any) -> str:
        self._invalid_lines.append(row.number)
        self.report.rows_read += 1
        self._bad(row.number, None, f"expected {row.expected_columns} fields, got "
                                    f"{row.actual_columns}: {row.text[:60]!r}")
        return "skip"

    def _jsonl(self, chunk_rows: int) -> Iterator[tuple[pa.Table, np.ndarray]]:
        rows: dict[str, list[str | None]] = {f: [] for f in FIELDS}
        lines: list[int] = []
        seen: set[str] = set()  # keys met so far: required ones must be among them
        with _open_binary(self.path) as f:
            for n, raw in enumerate(f, 1):
                if n == 1:
                    raw = raw.removeprefix(_BOM)  # a text editor's byte order mark is no event
                if not raw.strip():
                    continue
                obj = json_object(raw)
                if isinstance(obj, tuple):
                    self.report.rows_read += 1
                    self._bad(n, *obj)
                    continue
                seen.update(obj)
                for k, col in rows.items():
                    col.append(json_text(obj.get(k)))
                lines.append(n)
                if len(lines) >= chunk_rows:
                    self._columns(sorted(seen))
                    yield json_table(rows, REQUIRED), np.asarray(lines)
                    rows, lines = {f: [] for f in FIELDS}, []
        if lines:
            self._columns(sorted(seen))
            yield json_table(rows, REQUIRED), np.asarray(lines)

    def _parquet(self, chunk_rows: int) -> Iterator[tuple[pa.Table, np.ndarray]]:
        with ExitStack() as stack:
            source: Any = str(self.path)
            if _compression(self.path):  # parquet needs to seek: unpack to a temporary file
                source = stack.enter_context(tempfile.TemporaryFile())
                with _open_binary(self.path) as f:
                    shutil.copyfileobj(f, source, 1 << 24)
                source.seek(0)
            pf = stack.enter_context(pq.ParquetFile(source))
            cols = self._columns(pf.schema_arrow.names)
            done = 0
            for table in rechunk(pf.iter_batches(batch_size=chunk_rows, columns=cols), chunk_rows):
                yield table, np.arange(done + 1, done + table.num_rows + 1)
                done += table.num_rows

    # ---- one raw chunk -> its valid rows -> Events ------------------------------------------

    def _clean(self, table: pa.Table, lines: np.ndarray) -> _Rows:
        """The chunk's valid rows (malformed ones skipped and counted), columns parsed."""
        cols = {self.spec.columns[c]: combined(table.column(c)) for c in table.column_names}
        n = table.num_rows
        missing = {f: is_missing(a) for f, a in cols.items()}
        blank = np.zeros(n, bool)
        if self._blank_lines:  # an empty line is not a row
            blank = np.logical_and.reduce(list(missing.values()))
        self.report.rows_read += n - int(blank.sum())
        bad = blank.copy()

        def check(mask: np.ndarray, fld: str, why: Callable[[int], str]) -> None:
            new = mask & ~bad
            if new.any():
                idx = np.flatnonzero(new)
                self.report.malformed += len(idx)
                for i in idx[:_MAX_EXAMPLES]:
                    self._note(int(lines[i]), fld, why(int(i)))
                bad[new] = True

        for f in REQUIRED:
            check(missing[f], f, lambda i: "missing value")
        ts = cols["timestamp"]
        ms, ts_bad = parse_time(ts, self.spec.seconds, self.spec.utc_suffix)
        kind = "Unix seconds" if self.spec.seconds else "RFC 3339 with an offset, or epoch milliseconds"
        check(ts_bad, "timestamp", lambda i: f"cannot parse {as_py(ts, i)!r} as {kind}")
        # The plausible window of every path (app.core.events): epoch seconds sent for
        # milliseconds, or digits cut off a line, never reach a window.
        lo, hi = PLAUSIBLE_MS
        check((ms < lo) | (ms >= hi), "timestamp",
              (lambda i: f"{as_py(ts, i)!r} is outside 2000–2100 (a cut-off line?)") if self.spec.seconds
              else (lambda i: f"{as_py(ts, i)!r}: {implausible_time(int(ms[i]))}"))
        price = label = None
        if "price" in cols:
            price, price_bad = parse_price(cols["price"])
            check(price_bad, "price",
                  lambda i: f"price {as_py(cols['price'], i)!r} is not a finite number ≥ 0")
        if "label" in cols:
            label, label_bad = parse_label(cols["label"])
            check(label_bad, "label", lambda i: f"label {as_py(cols['label'], i)!r} is not 0 or 1")

        keep = np.flatnonzero(~bad)
        if len(keep) < n:
            cols = {f: a.take(pa.array(keep)) for f, a in cols.items()}
        return _Rows(cols, ms[keep], None if price is None else price[keep], None if label is None else label[keep])

    @staticmethod
    def _events(rows: _Rows) -> Events:
        cols = rows.cols
        users = pc.dictionary_encode(strings(cols["user_id"]))
        etypes = pc.dictionary_encode(strings(cols["event_type"]))
        out: dict[str, Any] = {
            "user": users.indices.to_numpy(zero_copy_only=False).astype(np.int32),
            "user_ids": np.asarray(users.dictionary.to_pylist(), dtype=object),
            "timestamp_ms": rows.ms,
            "event_type": etypes.indices.to_numpy(zero_copy_only=False).astype(np.int32),
            "event_types": tuple(etypes.dictionary.to_pylist()),
        }
        for f in HASHED_FIELDS:
            if f in cols:
                out[f] = hash_column(cols[f])
        if rows.price is not None:
            out["price"] = rows.price.astype(np.float32)
        if rows.label is not None:
            out["label"] = rows.label
        if "event_id" in cols:
            ids = strings(cols["event_id"]).to_numpy(zero_copy_only=False)
            out["event_id"] = np.where(ids == "", None, ids).astype(object)
        return Events(**out)

    # ---- malformed rows ------------------------------------------------------------------

    def _bad(self, line: int, fld: str | None, why: str) -> None:
        self.report.malformed += 1
        self._note(line, fld, why)

    def _note(self, line: int, fld: str | None, why: str) -> None:
        """Keep the earliest few examples (rows can be reported out of line order)."""
        if len(self.examples) >= _MAX_EXAMPLES and line >= self.examples[-1][0]:
            return
        self.examples = sorted([*self.examples, (line, fld, why)], key=lambda e: e[0])
        self.examples = self.examples[:_MAX_EXAMPLES]
        self.report.malformed_examples = [f"{self.unit} {ln}: " + (f"field {f!r}: " if f else "")
                                          + w for ln, f, w in self.examples]


def _check_malformed(loader: _Loader, fraction: float) -> None:
    """Refuse a file with more than ``fraction`` of its rows (and more than one) malformed."""
    rep = loader.report
    if rep.malformed > 1 and rep.malformed > fraction * rep.rows_read:
        line, fld, why = loader.examples[0]
        raise DataError(rep.path, f"{why} ({rep.malformed:,} of {rep.rows_read:,} rows malformed, "
                                  f"more than the {fraction:.1%} tolerated)",
                        line=line, field=fld, unit=loader.unit)


def _records(rows: _Rows, start: int) -> list[dict[str, Any]]:
    """Request dicts of ``rows``; ``start`` is the file's kept-row index of the first one."""
    cols = rows.cols
    n = len(rows.ms)
    users = strings(cols["user_id"]).to_pylist()
    ids = strings(cols["event_id"]).to_pylist() if "event_id" in cols else [None] * n
    recs: list[dict[str, Any]] = [
        {"event_id": e or f"{u}-{t}-{start + i}", "user_id": u, "event_type": k, "timestamp": t}
        for i, (e, u, k, t) in enumerate(zip(ids, users, strings(cols["event_type"]).to_pylist(),
                                             rows.ms.tolist(), strict=True))
    ]
    for f in HASHED_FIELDS:
        if f in cols:
            for r, v in zip(recs, strings(cols[f]).to_pylist(), strict=True):
                if v:  # "" is missing, as in the hashed columns
                    r[f] = v
    if rows.price is not None:
        for r, p in zip(recs, rows.price.tolist(), strict=True):
            if p == p:  # NaN: missing
                r["price"] = p
    return recs


def _duplicates(ev: Events) -> np.ndarray:
    """Mask of rows equal in every column to an earlier row.

    Rows are hashed, sorted by hash, and rows sharing a hash are compared exactly; a run
    whose rows differ (a hash collision) is settled row by row.
    """
    cols = [ev.user, ev.timestamp_ms, ev.event_type]
    cols += [c for c in (*(getattr(ev, f) for f in HASHED_FIELDS), ev.label) if c is not None]
    if ev.price is not None:
        cols.append(ev.price.view(np.uint32))  # NaN == NaN bitwise
    if ev.event_id is not None:
        ids = pc.dictionary_encode(pa.array(ev.event_id, pa.string())).indices
        cols.append(ids.fill_null(-1).to_numpy(zero_copy_only=False))
    h = np.zeros(len(ev), dtype=np.uint64)
    for c in cols:
        h ^= c.astype(np.uint64)
        h *= np.uint64(0x9E3779B97F4A7C15)
        h ^= h >> np.uint64(29)
    order = np.argsort(h, kind="stable")
    hs = h[order]
    later = np.flatnonzero(hs[1:] == hs[:-1]) + 1  # sorted positions repeating a hash
    first = np.searchsorted(hs, hs[later])  # start of each one's run
    a, b = order[later], order[first]
    same = np.logical_and.reduce([c[a] == c[b] for c in cols]) if len(a) else np.ones(0, bool)
    dup = np.zeros(len(ev), dtype=bool)
    dup[a[same]] = True
    for hv in np.unique(hs[later[~same]]):
        seen: set[tuple[int, ...]] = set()
        for r in np.flatnonzero(h == hv):
            key = tuple(int(c[r]) for c in cols)
            dup[r] = key in seen
            seen.add(key)
    return dup


def _existing(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "no such file")
    return p


def _compression(path: Path) -> str | None:
    with open(path, "rb") as f:
        return "gzip" if f.read(2) == b"\x1f\x8b" else None


def _open_binary(path: Path) -> io.BufferedReader:
    return io.BufferedReader(pa.input_stream(str(path), compression=_compression(path)), 1 << 20)
