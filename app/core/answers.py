"""The answers of scored events, as `seqguard score` writes them and ``/batch-score``
answers them: one definition of their fields, held as columns (:class:`Answers`), from
which every form is written (dicts, JSON lines, Parquet), so that no two forms can differ.

An answer has ``event_id``, ``user_id``, ``anomaly_probability`` (the exact float32 value
the decision was made on, so readers can re-derive it), ``decision``
(:meth:`~app.core.decisions.Thresholds.decide`) and ``duplicate``: whether it repeats an
earlier (user_id, event_id). A JSON answer carries ``"duplicate": true`` on repeats only;
Parquet has a bool column.

The JSON and Parquet writers build no object per answer. JSON encodes each column of a
block of rows with one orjson call (strings that need an escape: one call each) and joins
the columns row by row in Arrow (``binary_join_element_wise``): byte for byte what
``orjson.dumps`` gives for each of :meth:`Answers.records` (tests/test_batch_engine.py),
over 5x faster than a dict and a call per answer (tests/benchmarks/bench_score.py).
pyarrow is imported by the writers only, so the service's ``records`` do not load it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import orjson

from app.core.decisions import DECISIONS, Thresholds

#: An answer's fields, in the order JSON writes them.
EVENT_ID, USER_ID, PROBABILITY, DECISION, DUPLICATE = FIELDS = (
    "event_id", "user_id", "anomaly_probability", "decision", "duplicate")
#: Answers per block of JSON lines written at once, and per Parquet row group.
BLOCK_ROWS = 65536
#: ``--out`` names ending in this (any case) are written as Parquet, any other as JSON lines.
PARQUET_SUFFIX = ".parquet"


def is_parquet(out: Path | IO[bytes]) -> bool:
    """Whether ``out`` is written as Parquet: a path whose name ends in ``.parquet`` (any case).

    >>> is_parquet(Path("r.parquet")), is_parquet(Path("r.PARQUET")), is_parquet(Path("r.jsonl"))
    (True, True, False)
    """
    return isinstance(out, Path) and out.suffix.lower() == PARQUET_SUFFIX


@dataclass(frozen=True)
class Answers:
    """N answers as columns, in input order.

    Examples
    --------
    >>> a = Answers.of(["e1", "e1"], np.array([0, 0]), np.array(["u"], object),
    ...                np.array([0.25, 0.25], np.float32), np.array([False, True]), Thresholds(0.2, 0.9))
    >>> a.records()[1]
    {'event_id': 'e1', 'user_id': 'u', 'anomaly_probability': 0.25, 'decision': 'review', 'duplicate': True}
    >>> for line in b"".join(a.json_lines()).splitlines():
    ...     print(line.decode())
    {"event_id":"e1","user_id":"u","anomaly_probability":0.25,"decision":"review"}
    {"event_id":"e1","user_id":"u","anomaly_probability":0.25,"decision":"review","duplicate":true}
    """

    event_id: np.ndarray  # (N,) object, str (None only where a caller passed it)
    user: np.ndarray  # (N,) int, code into user_ids
    user_ids: np.ndarray  # (U,) object, str
    probability: np.ndarray  # (N,) float32, the value decided on
    decision: np.ndarray  # (N,) int8, code into DECISIONS
    duplicate: np.ndarray  # (N,) bool

    @classmethod
    def of(cls, event_ids: Sequence[str | None] | np.ndarray, user: np.ndarray, user_ids: np.ndarray,
           probability: np.ndarray, duplicate: np.ndarray, thresholds: Thresholds) -> Answers:
        """The answers of events scored ``probability`` (float32), decided by ``thresholds``."""
        n = len(probability)
        decided = thresholds.decide(probability)
        code = {name: i for i, name in enumerate(DECISIONS)}
        return cls(event_id=np.asarray(event_ids, dtype=object).reshape(n), user=np.asarray(user),
                   user_ids=np.asarray(user_ids, dtype=object), probability=np.asarray(probability, np.float32),
                   decision=np.fromiter(map(code.__getitem__, decided), np.int8, n),
                   duplicate=np.asarray(duplicate, bool).reshape(n))

    def __len__(self) -> int:
        return int(self.probability.shape[0])

    def records(self) -> list[dict[str, Any]]:
        """One dict per answer (``duplicate`` only on repeats), as ``/batch-score`` answers."""
        names = np.asarray(DECISIONS, dtype=object)[self.decision].tolist()
        out = [{EVENT_ID: e, USER_ID: u, PROBABILITY: p, DECISION: d} for e, u, p, d in zip(
            self.event_id.tolist(), self.user_ids[self.user].tolist(), self.probability.astype(np.float64).tolist(),
            names, strict=True)]
        for i in np.flatnonzero(self.duplicate).tolist():
            out[i][DUPLICATE] = True
        return out

    def json_lines(self, block_rows: int = BLOCK_ROWS) -> Iterator[bytes]:
        """Blocks of up to ``block_rows`` JSON lines, each line ended by a newline: per
        answer, what ``orjson.dumps`` gives for its :meth:`records` dict."""
        import pyarrow as pa
        import pyarrow.compute as pc

        def const(text: bytes) -> Any:
            return pa.scalar(text, pa.large_binary())

        users = _json_column(self.user_ids.tolist())  # (U,) '"u",'
        repeat = b"," + _key(DUPLICATE) + b"true"
        tails = pa.array([_key(DECISION) + orjson.dumps(name) + (repeat if dup else b"") + b"}\n"
                          for dup in (False, True) for name in DECISIONS], pa.large_binary())
        tail_code = self.decision.astype(np.int64) + len(DECISIONS) * self.duplicate  # into tails
        for lo in range(0, len(self), block_rows):
            rows = slice(lo, lo + block_rows)
            # {"event_id":  "e",  "user_id":  "u",  "anomaly_probability":  0.25,  "decision":"allow"}\n
            lines = pc.binary_join_element_wise(
                const(b"{" + _key(EVENT_ID)), _json_column(self.event_id[rows].tolist()),
                const(_key(USER_ID)), users.take(pa.array(self.user[rows])),
                const(_key(PROBABILITY)), _json_floats(self.probability[rows]),
                tails.take(pa.array(tail_code[rows])), const(b""))
            offsets = np.frombuffer(lines.buffers()[1], np.int64, len(lines) + 1)
            yield lines.buffers()[2][offsets[0]: offsets[-1]].to_pybytes()

    def write_jsonl(self, out: Path | IO[bytes], block_rows: int = BLOCK_ROWS) -> None:
        """Write :meth:`json_lines` to a path or an open binary file."""
        fh = out.open("wb") if isinstance(out, Path) else out
        try:
            for block in self.json_lines(block_rows):
                fh.write(block)
        finally:
            if isinstance(out, Path):
                fh.close()

    def write_parquet(self, out: Path, block_rows: int = BLOCK_ROWS) -> None:
        """Write Parquet, one row group per ``block_rows`` answers: ``event_id`` and
        ``user_id`` strings, ``anomaly_probability`` float32, ``decision`` a dictionary-encoded
        string, ``duplicate`` bool (false on answers that repeat nothing)."""
        import pyarrow.parquet as pq

        # Dictionary pages only where values repeat: trying them on unique ids costs a third of the write.
        with pq.ParquetWriter(out, parquet_schema(), use_dictionary=[USER_ID, DECISION]) as writer:
            for batch in self.record_batches(block_rows):
                writer.write_batch(batch, row_group_size=block_rows)

    def record_batches(self, block_rows: int = BLOCK_ROWS) -> Iterator[Any]:
        """Arrow record batches (:func:`parquet_schema`) of up to ``block_rows`` answers."""
        import pyarrow as pa

        schema = parquet_schema()
        users = pa.array(self.user_ids, pa.string())
        names = pa.array(DECISIONS, pa.string())
        for lo in range(0, len(self), block_rows):
            rows = slice(lo, lo + block_rows)
            yield pa.record_batch([
                pa.array(self.event_id[rows], pa.string()),
                users.take(pa.array(self.user[rows])),
                pa.array(self.probability[rows], pa.float32()),
                pa.DictionaryArray.from_arrays(pa.array(self.decision[rows]), names),
                pa.array(self.duplicate[rows], pa.bool_()),
            ], schema=schema)

    def write(self, out: Path | IO[bytes], block_rows: int = BLOCK_ROWS) -> None:
        """Parquet to a path named ``*.parquet`` (:func:`is_parquet`), else JSON lines."""
        if is_parquet(out):
            assert isinstance(out, Path)
            self.write_parquet(out, block_rows)
        else:
            self.write_jsonl(out, block_rows)


def parquet_schema() -> Any:
    """The Arrow schema of the Parquet answers (:meth:`Answers.write_parquet`)."""
    import pyarrow as pa

    return pa.schema([(EVENT_ID, pa.string()), (USER_ID, pa.string()), (PROBABILITY, pa.float32()),
                      (DECISION, pa.dictionary(pa.int8(), pa.string())), (DUPLICATE, pa.bool_())])


def _key(name: str) -> bytes:
    return orjson.dumps(name) + b":"


def _json_column(values: list[Any]) -> Any:
    r"""(N,) Arrow large_binary: the JSON text of each value as ``orjson.dumps`` writes it,
    and a comma. From one call when every value is a string that needs no escape: then
    the text has no backslash, so its quotes are exactly the strings' delimiters, two a
    value (fewer would mean a value that is no string). Else one call per value.

    >>> [_json_column(v).to_pylist() for v in (["a", "é,"], ["a", None], ['"'], [])]
    [[b'"a",', b'"\xc3\xa9,",'], [b'"a",', b'null,'], [b'"\\"",'], []]
    """
    import pyarrow as pa

    whole = orjson.dumps(values)
    quotes = np.flatnonzero(np.frombuffer(whole, np.uint8) == ord('"'))
    if b"\\" not in whole and quotes.size == 2 * len(values):
        return _pieces(whole, quotes[0::2])  # from each opening quote to the next
    return pa.array([orjson.dumps(v) + b"," for v in values], pa.large_binary())


def _json_floats(values: np.ndarray) -> Any:
    """(N,) Arrow large_binary: the JSON text of each float32 value as ``orjson.dumps``
    writes the float64 of it (the shortest text that reads back as that float64), and a
    comma; from one call.

    >>> _json_floats(np.array([0.25, 1, 0.1], np.float32)).to_pylist()
    [b'0.25,', b'1.0,', b'0.10000000149011612,']
    """
    whole = orjson.dumps(values.astype(np.float64), option=orjson.OPT_SERIALIZE_NUMPY)
    commas = np.flatnonzero(np.frombuffer(whole, np.uint8) == ord(","))
    return _pieces(whole, np.append(1, commas + 1)[: values.size])


def _pieces(whole: bytes, starts: np.ndarray) -> Any:
    """(len(starts),) Arrow large_binary: the pieces of the JSON array text ``whole`` that
    begin at ``starts``, each up to the next (the last, up to its closing bracket, which
    becomes a comma like the others' ends)."""
    import pyarrow as pa

    data = np.frombuffer(whole, np.uint8).copy()
    data[-1] = ord(",")
    offsets = np.append(starts, data.size).astype(np.int64)
    return pa.Array.from_buffers(pa.large_binary(), starts.size, [None, pa.py_buffer(offsets), pa.py_buffer(data)])
