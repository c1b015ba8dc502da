"""Stream query files (JSONL, CSV, TSV, text) row by row and write results JSONL safely.

Batch jobs read files of millions of rows, so every reader here is lazy and works in
constant memory (apart from the set of ids seen, for the duplicate check): files are read
as binary lines and each line is decoded on its own, so one line of invalid UTF-8 spoils
only its own row.

Two kinds of problem, the same split as :func:`nem_llm.catalog.load_catalog` uses for its
messages (``"invalid UTF-8 at byte 17"``, ``"malformed JSON: ... (column 5)"``,
``"duplicate id 'q7' (first seen at line 3)"``):

* **Fatal** problems make the whole file unusable and raise :class:`~nem_llm.errors.InputError`
  naming the file (and the line, where there is one): the file is missing, has an unknown
  extension or is empty; a CSV header lacks the query or id column; the first non-empty
  line of a JSONL file is not JSON at all. :func:`read_queries` raises them when it is
  *called*, before any row is consumed, so a job fails before it loads a model.
* **Row-level** problems become a :class:`QueryRow` whose ``error`` says what is wrong
  (``query`` is then ``None``); reading continues with the next row.

Results are written with :class:`AtomicLineWriter` (one ``os.write`` per row on an
``O_APPEND`` descriptor) and read back with :func:`read_jsonl_rows`; on resume,
:func:`repair_jsonl_tail` cuts the torn last line a crash may have left.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, BinaryIO, Literal

from ..errors import ConfigError, InputError

__all__ = [
    "MAX_LINE_BYTES",
    "QUERY_COLUMNS",
    "AtomicLineWriter",
    "EncodingErrors",
    "QueryRow",
    "count_rows",
    "read_jsonl_rows",
    "read_queries",
    "repair_jsonl_tail",
]

EncodingErrors = Literal["row", "replace", "raise"]
"""What :func:`read_queries` does with invalid UTF-8: ``"row"`` makes that row an error row,
``"replace"`` decodes it with U+FFFD replacement characters and keeps the row, ``"raise"``
raises :class:`~nem_llm.errors.InputError`."""

QUERY_COLUMNS: tuple[str, ...] = ("query", "text", "mention", "name")
"""Column (CSV) or field (JSONL) names tried in order when no query column is given."""

MAX_LINE_BYTES = 64 * 1024 * 1024
"""The longest physical line read into memory (raised to ``16 * max_query_chars`` if that is
larger). A longer line (say, a file with no newlines at all) becomes a row error and is
skipped without being held in memory."""

_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv", ".txt": "txt"}
_READ_BUFFER = 256 * 1024
_json_decode = json.JSONDecoder().decode  # json.loads minus its per-call type checks
_COUNT_CHUNK = 1024 * 1024

StrPath = str | os.PathLike[str]


@dataclass(frozen=True, slots=True)
class QueryRow:
    """One data row of a query file: its position, id, query text, or what is wrong with it.

    Attributes:
        index: 0-based position among the data rows (blank lines and the CSV header are
            not data rows). Every data row, good or bad, gets the next index.
        line: 1-based physical line where the row starts, for messages.
        id: The value of the id column, or ``str(index)`` when the file has no id column
            (or the id could not be read from a bad row).
        query: The query text, exactly as in the file; ``None`` when ``error`` is set.
        error: What is wrong with the row (``"empty query"``, ``"invalid UTF-8 at byte
            17"``, ...), or ``None``.
        record: The parsed row (the JSON object, or the CSV row as a header->value dict),
            for extra fields such as ``gold_id``; ``None`` for text files and for rows that
            could not be parsed or decoded.
    """

    index: int
    line: int
    id: str
    query: str | None
    error: str | None
    record: dict[str, Any] | None

    @property
    def ok(self) -> bool:
        """Whether the row has a usable query (``error is None``)."""
        return self.error is None


# --------------------------------------------------------------------------- helpers


def _check_input(path: StrPath) -> tuple[Path, str, str]:
    """Return ``(path, label, kind)`` or raise the fatal not-found/unknown-format error."""
    p = Path(path)
    label = str(p)
    if not p.is_file():
        raise InputError("file not found", source=label)
    kind = _FORMATS.get(p.suffix.lower())
    if kind is None:
        raise InputError(
            f"unknown file extension {p.suffix or '(none)'!r} "
            "(use .jsonl, .ndjson, .csv, .tsv or .txt)",
            source=label,
        )
    return p, label, kind


def _open_binary(path: Path, label: str) -> BinaryIO:
    """Open ``path`` for binary reading, turning OS errors into InputError."""
    try:
        return open(path, "rb", buffering=_READ_BUFFER)
    except OSError as exc:
        raise InputError(f"cannot read file: {exc.strerror or exc}", source=label) from None


def _lines(fh: BinaryIO, cap: int) -> Iterator[tuple[int, bytes, int]]:
    """Yield ``(line_number, raw_line, dropped_bytes)``, cutting lines longer than ``cap``.

    A UTF-8 BOM at the start of the file is removed. The part of an over-long line beyond
    ``cap`` bytes is read and discarded (``dropped_bytes`` > 0), never held in memory.
    """
    readline = fh.readline
    lineno = 0
    while True:
        raw = readline(cap)
        if not raw:
            return
        lineno += 1
        dropped = 0
        if len(raw) >= cap and not raw.endswith(b"\n"):
            while True:
                more = readline(cap)
                dropped += len(more)
                if not more or more.endswith(b"\n"):
                    break
        if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        yield lineno, raw, dropped


def _decode(raw: bytes, mode: EncodingErrors, source: str, line: int) -> tuple[str, int | None]:
    """Decode one line; return the text and the offset of the first invalid byte, if any.

    With ``mode="row"`` a bad line is decoded with ``surrogateescape`` (so it can still be
    parsed, e.g. for its id) and the offset is returned; ``"replace"`` substitutes U+FFFD and
    reports nothing; ``"raise"`` raises InputError.
    """
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        if mode == "raise":
            raise InputError(
                f"invalid UTF-8 at byte {exc.start}", source=source, line=line
            ) from None
        if mode == "replace":
            return raw.decode("utf-8", "replace"), None
        return raw.decode("utf-8", "surrogateescape"), exc.start


def _json_type(value: Any) -> str:
    """Name a parsed JSON value's type the way users know it (``null`` rather than NoneType)."""
    return "null" if value is None else type(value).__name__


def _json_problem(exc: ValueError | RecursionError) -> str:
    """Describe why a line failed to parse as JSON (``Expecting value (column 5)``)."""
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} (column {exc.colno})"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).split(":", 1)[0]  # e.g. an integer of more than 4300 digits


def _is_clean(text: str) -> bool:
    """Whether ``text`` is free of lone surrogates (left by ``surrogateescape`` decoding)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _error_row(index: int, line: int, error: str) -> QueryRow:
    """A row that could not be parsed at all: index id, no query, no record."""
    return QueryRow(index=index, line=line, id=str(index), query=None, error=error, record=None)


def _line_cap(max_query_chars: int) -> int:
    return max(MAX_LINE_BYTES, 16 * max_query_chars)


@dataclass
class _Schema:
    """Which columns hold the query and the id, the length limit, and the ids seen so far."""

    query_column: str
    id_column: str | None
    max_chars: int
    seen: dict[str, int] = field(default_factory=dict)

    def row(
        self, index: int, line: int, record: dict[str, Any], utf8_error: str | None
    ) -> QueryRow:
        """Validate one parsed record and build its QueryRow.

        A row reports its first problem in this order: invalid UTF-8, missing query, query
        not a string, empty query, query too long, missing/bad id, duplicate id. Every id
        read from the id column is remembered (even from a bad row), so a later row with
        the same id is a duplicate.
        """
        error = utf8_error
        query: str | None = None
        if error is None:
            query, error = self._query(record)
        row_id = str(index)
        id_ok = False
        if self.id_column is not None:
            value, id_error = self._id(record)
            if value is not None:
                row_id, id_ok = value, True
            elif error is None:
                error = id_error
        if id_ok:
            first = self.seen.get(row_id)
            if first is None:
                self.seen[row_id] = line
            elif error is None:
                error = f"duplicate id {row_id!r} (first seen at line {first})"
        if error is not None:
            kept = None if utf8_error is not None else record
            return QueryRow(index=index, line=line, id=row_id, query=None, error=error, record=kept)
        return QueryRow(index=index, line=line, id=row_id, query=query, error=None, record=record)

    def _query(self, record: dict[str, Any]) -> tuple[str | None, str | None]:
        if self.query_column not in record:
            return None, f"missing query field {self.query_column!r}"
        value = record[self.query_column]
        if not isinstance(value, str):
            return None, f"query is not a string (got {_json_type(value)})"
        if not value.strip():
            return None, "empty query"
        if len(value) > self.max_chars:
            return None, f"query is {len(value):,} characters (limit {self.max_chars:,})"
        return value, None

    def _id(self, record: dict[str, Any]) -> tuple[str | None, str]:
        assert self.id_column is not None
        if self.id_column not in record:
            return None, f"missing id field {self.id_column!r}"
        value = record[self.id_column]
        if isinstance(value, bool) or not isinstance(value, str | int):
            return None, f"id is not a string or integer (got {_json_type(value)})"
        text = str(value)
        if not text.strip():
            return None, "empty id"
        if not _is_clean(text):
            return None, "invalid UTF-8 in id"
        return text, ""


# --------------------------------------------------------------------------- JSONL


def _jsonl_rows(
    path: Path,
    label: str,
    query_column: str | None,
    id_column: str | None,
    max_chars: int,
    mode: EncodingErrors,
) -> Generator[QueryRow, None, None]:
    """Yield the rows of a JSONL file; the first JSON object fixes the query and id fields."""
    cap = _line_cap(max_chars)
    schema: _Schema | None = None
    index = 0
    seen_content = False
    with _open_binary(path, label) as fh:
        for lineno, raw, dropped in _lines(fh, cap):
            if not raw.strip():
                continue
            first = not seen_content
            seen_content = True
            if dropped:
                yield _error_row(index, lineno, f"line is longer than {cap:,} bytes")
                index += 1
                continue
            text, bad = _decode(raw.rstrip(b"\r\n"), mode, label, lineno)
            utf8_error = None if bad is None else f"invalid UTF-8 at byte {bad}"
            try:
                obj = _json_decode(text)
            except (ValueError, RecursionError) as exc:
                detail = _json_problem(exc)
                if first and isinstance(exc, json.JSONDecodeError):
                    raise InputError(
                        f"not a JSONL file: the first line is not JSON ({detail})",
                        source=label,
                        line=lineno,
                    ) from None
                yield _error_row(index, lineno, utf8_error or f"malformed JSON: {detail}")
                index += 1
                continue
            if not isinstance(obj, dict):
                error = utf8_error or f"expected a JSON object, got {_json_type(obj)}"
                yield _error_row(index, lineno, error)
                index += 1
                continue
            if schema is None:
                schema = _jsonl_schema(obj, label, lineno, query_column, id_column, max_chars)
            yield schema.row(index, lineno, obj, utf8_error)
            index += 1
    if not seen_content:
        raise InputError("file is empty", source=label, line=1)


def _jsonl_schema(
    obj: dict[str, Any],
    label: str,
    line: int,
    query_column: str | None,
    id_column: str | None,
    max_chars: int,
) -> _Schema:
    """Resolve the query and id fields from the file's first JSON object (fatal if absent)."""
    fields = [str(k) for k in obj]
    return _resolve_schema(
        fields,
        ("field", "in the first object", ", ".join(fields) or "no fields"),
        label,
        line,
        query_column,
        id_column,
        max_chars,
    )


def _resolve_schema(
    fields: Sequence[str],
    wording: tuple[str, str, str],
    label: str,
    line: int,
    query_column: str | None,
    id_column: str | None,
    max_chars: int,
) -> _Schema:
    """Pick the query and id fields among ``fields``; ``wording`` is (noun, where, found)."""
    noun, where, found = wording
    if query_column is None:
        query_column = next((c for c in QUERY_COLUMNS if c in fields), None)
        if query_column is None:
            raise InputError(
                f"no query {noun} {where} (looked for {', '.join(QUERY_COLUMNS)}; "
                f"found: {found}); pass query_column",
                source=label,
                line=line,
            )
    elif query_column not in fields:
        raise InputError(
            f"no {noun} {query_column!r} {where} (found: {found})", source=label, line=line
        )
    if id_column is None:
        id_column = "id" if "id" in fields else None
    elif id_column not in fields:
        raise InputError(
            f"no id {noun} {id_column!r} {where} (found: {found})", source=label, line=line
        )
    return _Schema(query_column=query_column, id_column=id_column, max_chars=max_chars)


# --------------------------------------------------------------------------- CSV / TSV

# States of a simplified copy of the csv module's parser, used only to find where a record
# ends after the csv module gave up on it (see _skip_rest_of_record).
_START, _FIELD, _QUOTED, _AFTER_QUOTE = range(4)


def _scan_csv_line(text: str, state: int, delimiter: str) -> int:
    """Return the CSV parser state after ``text``; ``_QUOTED`` means the record goes on."""
    i = 0
    n = len(text)
    while i < n:
        if state == _QUOTED:
            j = text.find('"', i)
            if j < 0:
                return _QUOTED
            state, i = _AFTER_QUOTE, j + 1
            continue
        c = text[i]
        i += 1
        if state == _FIELD:
            if c == delimiter or c in "\r\n":
                state = _START
        elif c == '"':
            state = _QUOTED  # opens a quoted field, or (after a quote) is an escaped quote
        elif c == delimiter or c in "\r\n":
            state = _START
        else:
            state = _FIELD
    return state


class _LineFeeder:
    """Decoded physical lines for ``csv.reader``, remembering which lines each record used.

    ``csv.reader`` pulls exactly the lines one record needs (several for a quoted field
    with embedded newlines), so the line numbers, invalid-UTF-8 offsets and over-long lines
    seen between two :meth:`start_record` calls belong to that record.
    """

    def __init__(
        self, lines: Iterator[tuple[int, bytes, int]], mode: EncodingErrors, source: str
    ) -> None:
        self._lines = lines
        self._mode = mode
        self._source = source
        self.lineno = 0
        self.keep = True
        self.start_record()

    def start_record(self) -> None:
        """Forget the previous record; the next line pulled starts a new one."""
        self.record_start = self.lineno + 1
        self.record_lines: list[str] = []
        self.nlines = 0
        self.bad_utf8: tuple[int, int] | None = None
        self.too_long: int | None = None
        self.exhausted = False

    def utf8_error(self) -> str | None:
        """The invalid-UTF-8 message for the current record, if any of its lines had one."""
        if self.bad_utf8 is None:
            return None
        line, offset = self.bad_utf8
        where = "" if line == self.record_start else f" of line {line}"
        return f"invalid UTF-8 at byte {offset}{where}"

    def __iter__(self) -> _LineFeeder:
        return self

    def __next__(self) -> str:
        try:
            lineno, raw, dropped = next(self._lines)
        except StopIteration:
            self.exhausted = True
            raise
        self.lineno = lineno
        self.nlines += 1
        text, bad = _decode(raw, self._mode, self._source, lineno)
        if bad is not None and self.bad_utf8 is None:
            self.bad_utf8 = (lineno, bad)
        if dropped and self.too_long is None:
            self.too_long = lineno
        if self.keep:
            self.record_lines.append(text)
        return text


def _skip_rest_of_record(feeder: _LineFeeder, delimiter: str) -> None:
    """After ``csv.Error``, consume the rest of the record if it stopped inside quotes.

    The csv module resets itself after an error, so without this the remaining lines of a
    long quoted field would be parsed as records of their own. The skipped lines are only
    scanned, never kept, so an unterminated quote costs time, not memory.
    """
    state = _START
    for text in feeder.record_lines:
        state = _scan_csv_line(text, _QUOTED if state == _QUOTED else _START, delimiter)
    if state != _QUOTED:
        return
    feeder.keep = False
    try:
        for text in feeder:
            if _scan_csv_line(text, _QUOTED, delimiter) != _QUOTED:
                break
    finally:
        feeder.keep = True


def _csv_error_message(exc: csv.Error) -> str:
    """Say what ``csv.reader`` objected to, without its advice about opening files."""
    text = str(exc)
    if text.startswith("field larger than field limit"):
        return (
            f"a field is longer than {csv.field_size_limit():,} characters "
            "(the csv module's field_size_limit)"
        )
    if text.startswith("new-line character seen in unquoted field"):
        return "unreadable CSV record: a line break (\\r) inside an unquoted field"
    return f"unreadable CSV record: {text}"


def _is_blank(fields: list[str], feeder: _LineFeeder, ncols: int) -> bool:
    """Whether a parsed record is a blank line rather than a data row."""
    if not fields:
        return True
    return feeder.nlines == 1 and len(fields) == 1 and ncols > 1 and not fields[0].strip()


def _csv_rows(
    path: Path,
    label: str,
    delimiter: str,
    query_column: str | None,
    id_column: str | None,
    max_chars: int,
    mode: EncodingErrors,
) -> Generator[QueryRow, None, None]:
    """Yield the rows of a CSV/TSV file, validating its header first."""
    with _open_binary(path, label) as fh:
        feeder = _LineFeeder(_lines(fh, _line_cap(max_chars)), mode, label)
        reader = csv.reader(feeder, delimiter=delimiter)
        header = _csv_header(reader, feeder, label)
        header_line = feeder.record_start
        schema = _csv_schema(header, label, header_line, query_column, id_column, max_chars)
        ncols = len(header)
        index = 0
        while True:
            feeder.start_record()
            start = feeder.record_start
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                _skip_rest_of_record(feeder, delimiter)
                yield _error_row(index, start, _csv_error_message(exc))
                index += 1
                continue
            if _is_blank(fields, feeder, ncols):
                continue
            error: str | None = None
            if feeder.too_long is not None:
                error = f"line {feeder.too_long} is longer than {_line_cap(max_chars):,} bytes"
            elif feeder.exhausted:
                error = "unterminated quoted field (runs to the end of the file)"
            elif len(fields) != ncols:
                error = feeder.utf8_error() or f"expected {ncols} fields, got {len(fields)}"
            if error is not None:
                yield _error_row(index, start, error)
            else:
                yield schema.row(
                    index, start, dict(zip(header, fields, strict=True)), feeder.utf8_error()
                )
            index += 1


def _csv_header(reader: Iterator[list[str]], feeder: _LineFeeder, label: str) -> list[str]:
    """Read the header (the first non-blank record); fatal if missing or unreadable."""
    while True:
        feeder.start_record()
        try:
            fields = next(reader)
        except StopIteration:
            raise InputError("file is empty", source=label, line=1) from None
        except csv.Error as exc:
            raise InputError(
                f"unreadable CSV header: {exc}", source=label, line=feeder.record_start
            ) from None
        if fields and not (len(fields) == 1 and not fields[0].strip()):
            break
    problem = feeder.utf8_error()
    if feeder.too_long is not None:
        problem = "header line is too long"
    if problem is not None:
        raise InputError(f"{problem} in the header", source=label, line=feeder.record_start)
    return fields


def _csv_schema(
    header: list[str],
    label: str,
    line: int,
    query_column: str | None,
    id_column: str | None,
    max_chars: int,
) -> _Schema:
    """Resolve the query and id columns from the header (fatal if a needed one is absent)."""
    return _resolve_schema(
        header,
        ("column", "in header", ", ".join(header)),
        label,
        line,
        query_column,
        id_column,
        max_chars,
    )


# --------------------------------------------------------------------------- text


def _txt_rows(
    path: Path, label: str, max_chars: int, mode: EncodingErrors
) -> Generator[QueryRow, None, None]:
    """Yield one row per non-blank line of a text file; ids are the row indexes."""
    cap = _line_cap(max_chars)
    index = 0
    seen_content = False
    with _open_binary(path, label) as fh:
        for lineno, raw, dropped in _lines(fh, cap):
            if not raw.strip():
                continue
            seen_content = True
            text, bad = _decode(raw, mode, label, lineno)
            text = text.rstrip("\r\n")
            error: str | None = None
            if dropped:
                error = f"line is longer than {cap:,} bytes"
            elif bad is not None:
                error = f"invalid UTF-8 at byte {bad}"
            elif not text.strip():
                error = "empty query"
            elif len(text) > max_chars:
                error = f"query is {len(text):,} characters (limit {max_chars:,})"
            if error is not None:
                yield _error_row(index, lineno, error)
            else:
                yield QueryRow(index, lineno, str(index), text, None, None)
            index += 1
    if not seen_content:
        raise InputError("file is empty", source=label, line=1)


# --------------------------------------------------------------------------- public readers


def _prepend(
    first: QueryRow | None, rest: Generator[QueryRow, None, None]
) -> Generator[QueryRow, None, None]:
    """Yield ``first`` (if any), then ``rest``; closing this closes ``rest`` (and its file)."""
    try:
        if first is not None:
            yield first
            yield from rest
    finally:
        rest.close()


def read_queries(
    path: StrPath,
    *,
    query_column: str | None = None,
    id_column: str | None = None,
    max_query_chars: int = 100_000,
    encoding_errors: EncodingErrors = "row",
) -> Generator[QueryRow, None, None]:
    """Stream the rows of a query file as :class:`QueryRow` values, lazily and in order.

    Formats, chosen by extension: ``.jsonl``/``.ndjson`` (one JSON object per line),
    ``.csv``, ``.tsv`` (tab-separated, same quoting rules as CSV) and ``.txt`` (one query
    per line; ids are the row indexes). Blank lines are skipped and are not data rows; a
    UTF-8 BOM at the start of the file is ignored.

    Columns: without ``query_column`` the first of :data:`QUERY_COLUMNS` present is used
    (in the CSV header, or in the first JSON object of a JSONL file); without ``id_column``
    an ``id`` column is used if present, otherwise each row's id is ``str(index)``. The
    first JSON object plays the role of the header: the query (and a configured id) field
    must be in it, and a later object that lacks it is a row error.

    Streaming: the file is read as binary lines and each line is decoded on its own, so
    invalid UTF-8 spoils only its own row. For CSV the decoded lines are fed to
    ``csv.reader``, which pulls further lines only while it is inside a quoted field, so
    quoted fields with embedded newlines come out whole and ``QueryRow.line`` is the line
    where the record starts. Memory stays constant except for the ids seen (kept for the
    duplicate check) and the longest line; a line over :data:`MAX_LINE_BYTES` is a row
    error and is skipped without being held in memory. CSV fields longer than
    ``csv.field_size_limit()`` (131,072 characters by default) are a row error; raise that
    limit yourself if you set ``max_query_chars`` above it.

    Args:
        path: The file to read.
        query_column: Column or field holding the query text.
        id_column: Column or field holding the row id (strings or integers for JSONL).
        max_query_chars: Longer queries are row errors.
        encoding_errors: See :data:`EncodingErrors`; the default makes bad lines row errors.

    Returns:
        A generator of rows; close it (or exhaust it) to close the file early.

    Raises:
        InputError: when called, for the fatal problems: file not found, unknown extension,
            empty file, a header (or first JSON object) without the query or the configured
            id column, a JSONL file whose first non-empty line is not JSON; while iterating,
            only for invalid UTF-8 with ``encoding_errors="raise"``.
        ConfigError: ``max_query_chars`` < 1 or an unknown ``encoding_errors``.

    Row errors (``error`` set, ``query`` None, reading continues): malformed JSON, JSON that
    is not an object, missing query field, query not a string, empty or whitespace-only
    query, query longer than ``max_query_chars``, invalid UTF-8, a bad or missing id, an id
    already seen (``"duplicate id 'q7' (first seen at line 3)"``; the first row keeps it),
    a CSV record with the wrong number of fields or an unterminated quote.
    """
    if max_query_chars < 1:
        raise ConfigError(f"max_query_chars must be at least 1, got {max_query_chars}")
    if encoding_errors not in ("row", "replace", "raise"):
        raise ConfigError(
            f"encoding_errors must be 'row', 'replace' or 'raise', got {encoding_errors!r}"
        )
    p, label, kind = _check_input(path)
    rows: Generator[QueryRow, None, None]
    if kind == "jsonl":
        rows = _jsonl_rows(p, label, query_column, id_column, max_query_chars, encoding_errors)
    elif kind == "txt":
        rows = _txt_rows(p, label, max_query_chars, encoding_errors)
    else:
        delimiter = "\t" if kind == "tsv" else ","
        rows = _csv_rows(
            p, label, delimiter, query_column, id_column, max_query_chars, encoding_errors
        )
    # Read the first row now, so that fatal problems (header, first line, empty file)
    # surface when read_queries is called rather than when iteration starts.
    first = next(rows, None)
    return _prepend(first, rows)


def count_rows(path: StrPath) -> int:
    """Count a query file's data rows quickly, for progress bars (an estimate for some files).

    Counts newlines in 1 MiB binary chunks (plus a last line without one) and subtracts the
    header for CSV/TSV. Exact for files without blank lines and, for CSV, without quoted
    fields spanning lines; otherwise an overestimate.

    Raises:
        InputError: file not found or unknown extension.
    """
    p, label, kind = _check_input(path)
    count = 0
    last = b""
    with _open_binary(p, label) as fh:
        while chunk := fh.read(_COUNT_CHUNK):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    if last and last != b"\n":
        count += 1
    if kind in ("csv", "tsv"):
        count -= 1
    return max(count, 0)


# --------------------------------------------------------------------------- results JSONL


def _parse_result_line(raw: bytes) -> dict[str, Any] | str:
    """Parse one results line into a dict, or return what is wrong with it."""
    try:
        obj = json.loads(raw.rstrip(b"\r\n").decode("utf-8"))
    except UnicodeDecodeError as exc:
        return f"invalid UTF-8 at byte {exc.start}"
    except (ValueError, RecursionError) as exc:
        return f"malformed JSON: {_json_problem(exc)}"
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {_json_type(obj)}"
    return obj


def read_jsonl_rows(path: StrPath) -> Generator[tuple[int, dict[str, Any]], None, None]:
    """Read a results JSONL file as ``(line_number, row)`` pairs (1-based line numbers).

    Tolerates exactly what a crash can leave and nothing else:

    * blank lines are skipped;
    * the **last** line is skipped, silently, if it has no trailing newline or is not a
      JSON object: this is the torn line :func:`repair_jsonl_tail` would remove, so the rows
      this yields are the rows that survive a repair;
    * any other bad line (malformed JSON, not an object, invalid UTF-8) raises
      :class:`~nem_llm.errors.InputError` naming the file and line: the file was damaged
      by something other than a crash and should not be resumed blindly.

    Raises:
        InputError: file not found (when called), or a bad line before the last.
    """
    p = Path(path)
    label = str(p)
    if not p.is_file():
        raise InputError("file not found", source=label)
    return _result_rows(p, label)


def _result_rows(path: Path, label: str) -> Generator[tuple[int, dict[str, Any]], None, None]:
    """Yield the parsed rows of a results file, one line of look-ahead to spot the last."""
    with _open_binary(path, label) as fh:
        pending: tuple[int, bytes] | None = None
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            if pending is not None:
                line, prev = pending
                if prev.strip():
                    parsed = _parse_result_line(prev)
                    if isinstance(parsed, str):
                        raise InputError(parsed, source=label, line=line)
                    yield line, parsed
            pending = (lineno, raw)
        if pending is not None:
            line, last = pending
            if last.endswith(b"\n") and last.strip():
                parsed = _parse_result_line(last)
                if not isinstance(parsed, str):
                    yield line, parsed


def repair_jsonl_tail(path: StrPath) -> int:
    """Cut a torn last line off a results JSONL file; return the number of bytes removed.

    The last line is torn if it has no trailing newline or is not a JSON object (what a
    crash during a write can leave). Only the last line is examined, read backwards from
    the end of the file, so the cost does not depend on the file's size. A missing or
    empty file, or one ending in a blank line, is left alone (returns 0).
    """
    p = Path(path)
    try:
        fh = open(p, "r+b")
    except FileNotFoundError:
        return 0
    with fh:
        size = fh.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        fh.seek(size - 1)
        complete = fh.read(1) == b"\n"
        end = size - 1 if complete else size
        start = _line_start(fh, end)
        if complete:
            fh.seek(start)
            last = fh.read(end - start)
            if start == 0 and last.startswith(codecs.BOM_UTF8):
                last = last[len(codecs.BOM_UTF8) :]
            if not last.strip() or not isinstance(_parse_result_line(last), str):
                return 0
        fh.truncate(start)
        fh.flush()
        os.fsync(fh.fileno())
        return size - start


def _line_start(fh: IO[bytes], end: int) -> int:
    """Offset just after the last ``\\n`` before ``end`` (0 if none), reading backwards."""
    pos = end
    while pos > 0:
        step = min(_COUNT_CHUNK, pos)
        fh.seek(pos - step)
        chunk = fh.read(step)
        nl = chunk.rfind(b"\n")
        if nl >= 0:
            return pos - step + nl + 1
        pos -= step
    return 0


class AtomicLineWriter:
    """Append JSON rows to a file, each with one ``os.write``, so a crash never tears a row.

    The file is opened with ``O_APPEND`` and each row is encoded (JSON, UTF-8, one line,
    trailing newline) *before* anything is written, then handed to the kernel in a single
    ``os.write``: a process crash leaves every earlier row intact and at worst a torn
    final line, which :func:`repair_jsonl_tail` removes. Rows go straight to the kernel
    (no user-space buffer), so :meth:`flush` has nothing to do; durability against power
    loss needs ``fsync=True`` (an ``fsync`` after every row, slow) or :meth:`sync`.
    :meth:`close` syncs once. (Should the kernel accept only part of a line, as when the
    disk is full, the rest is written with further calls.)

    Example:
        >>> with AtomicLineWriter("results.jsonl", append=True) as out:  # doctest: +SKIP
        ...     out.write({"id": "q1", "status": "matched"})

    Args:
        path: The results file; created if missing.
        append: Keep existing rows (resume) or truncate the file (a fresh run).
        fsync: ``os.fsync`` after every row.
    """

    def __init__(self, path: StrPath, *, append: bool, fsync: bool = False) -> None:
        self.path = Path(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        if not append:
            flags |= os.O_TRUNC
        self._fd = os.open(self.path, flags, 0o644)
        self._fsync = fsync
        self.rows_written = 0
        self.bytes_written = 0

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._fd < 0

    def write(self, row: Mapping[str, Any]) -> int:
        """Write ``row`` as one JSON line; return the number of bytes written.

        Raises:
            ValueError: the writer is closed, or the row holds NaN/infinity (not valid JSON).
            TypeError: a value is not JSON-serialisable.
            UnicodeEncodeError: a string holds a lone surrogate.
            In each case nothing is written.
        """
        obj = row if isinstance(row, dict) else dict(row)
        return self.write_line(json.dumps(obj, ensure_ascii=False, allow_nan=False))

    def write_line(self, text: str) -> int:
        """Write one already-serialized JSON row (no newline inside); return bytes written.

        Raises:
            ValueError: the writer is closed, or ``text`` holds a newline.
        """
        if self._fd < 0:
            raise ValueError("write to a closed AtomicLineWriter")
        if "\n" in text:
            raise ValueError("a JSONL row must not contain a newline")
        data = (text + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        if self._fsync:
            os.fsync(self._fd)
        self.rows_written += 1
        self.bytes_written += len(data)
        return len(data)

    def flush(self) -> None:
        """Do nothing: every row already went to the kernel (kept for file-like callers)."""
        if self._fd < 0:
            raise ValueError("flush of a closed AtomicLineWriter")

    def sync(self) -> None:
        """``os.fsync`` the file, making every row written so far durable."""
        if self._fd < 0:
            raise ValueError("sync of a closed AtomicLineWriter")
        os.fsync(self._fd)

    def close(self) -> None:
        """Sync and close the file; calling it again does nothing."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def __enter__(self) -> AtomicLineWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
