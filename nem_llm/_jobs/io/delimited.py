"""CSV and TSV query files: ``csv.reader`` over decoded lines, one record at a time.

The decoded physical lines are fed to ``csv.reader``, which pulls further lines only while
it is inside a quoted field, so quoted fields with embedded newlines come out whole and
``QueryRow.line`` is the line where the record starts.
"""

from __future__ import annotations

import csv
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import BinaryIO

from ..._sniff import CSV_QUOTED, delimiter_hint, ends_inside_quotes, scan_csv_line, sniff_delimiter
from ...errors import InputError
from ._lines import EncodingErrors, decode_line, line_cap, open_binary, physical_lines
from .rows import QueryRow, ReadOptions, Schema, error_row

__all__ = ["read_delimited_queries"]


class _LineFeeder:
    """Decoded physical lines for ``csv.reader``, remembering which lines each record used.

    ``csv.reader`` pulls exactly the lines one record needs (several for a quoted field
    with embedded newlines), so the line numbers, invalid-UTF-8 offsets and over-long lines
    seen between two :meth:`start_record` calls belong to that record.
    """

    def __init__(
        self, lines: Iterator[tuple[int, bytes, int, int]], mode: EncodingErrors, source: str
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
        self.first_end = -1  # byte offset just after the record's first line

    @property
    def last_line(self) -> int:
        """The last physical line the current record used."""
        return self.record_start + max(self.nlines, 1) - 1

    def span(self) -> str:
        """`` (the record runs from line 9 to line 12)`` for a record of several lines."""
        if self.nlines <= 1:
            return ""
        return f" (the record runs from line {self.record_start} to line {self.last_line})"

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
            lineno, raw, dropped, end = next(self._lines)
        except StopIteration:
            self.exhausted = True
            raise
        self.lineno = lineno
        self.nlines += 1
        if self.nlines == 1:
            self.first_end = end
        text, bad = decode_line(raw, self._mode, self._source, lineno)
        if bad is not None and self.bad_utf8 is None:
            self.bad_utf8 = (lineno, bad)
        if dropped and self.too_long is None:
            self.too_long = lineno
        if self.keep:
            self.record_lines.append(text)
        return text


def _skip_rest_of_record(feeder: _LineFeeder, delimiter: str) -> bool:
    """After ``csv.Error``, consume the rest of the record if it stopped inside quotes.

    The csv module resets itself after an error, so without this the remaining lines of a
    long quoted field would be parsed as records of their own. The skipped lines are only
    scanned, never kept, so a long field costs time, not memory. Returns False when the
    quote is never closed (the scan ran to the end of the file).
    """
    if not ends_inside_quotes(feeder.record_lines, delimiter):
        return True
    feeder.keep = False
    try:
        for text in feeder:
            if scan_csv_line(text, CSV_QUOTED, delimiter) != CSV_QUOTED:
                return True
    finally:
        feeder.keep = True
    return False


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


def _header_text(fh: BinaryIO, cap: int) -> str:
    """The file's first non-blank line, decoded leniently (for sniffing only)."""
    for _, raw, _, _ in physical_lines(fh, cap):
        if raw.strip():
            return raw.decode("utf-8", "replace")
    return ""


class _Records:
    """``csv.reader`` over a file's lines, able to start again on any line.

    A quote that is never closed swallows the rest of the file into one field, and a
    stray quote closed by another row's quote swallows the rows between; either way the
    lines after the record's first one are read again as records of their own, so every
    input line ends as a row (or in an error row that names the lines it covers).
    """

    def __init__(
        self, fh: BinaryIO, cap: int, mode: EncodingErrors, label: str, delimiter: str
    ) -> None:
        self._fh = fh
        self._cap = cap
        self._mode = mode
        self._label = label
        self.delimiter = delimiter
        self._open(1, 0)

    def _open(self, first_line: int, offset: int) -> None:
        self._fh.seek(offset)
        lines = physical_lines(self._fh, self._cap, first_line=first_line, offset=offset)
        self.feeder = _LineFeeder(lines, self._mode, self._label)
        self.feeder.lineno = first_line - 1
        self.feeder.start_record()
        self._reader = csv.reader(self.feeder, delimiter=self.delimiter, strict=True)

    def restart_after_first_line(self) -> None:
        """Read on from the line after the current record's first line."""
        feeder = self.feeder
        self._open(feeder.record_start + 1, feeder.first_end)

    def header(self) -> list[str]:
        """Read the header (the first non-blank record); fatal if missing or unreadable."""
        feeder = self.feeder
        while True:
            feeder.start_record()
            try:
                fields = next(self._reader)
            except StopIteration:
                raise InputError("file is empty", source=self._label, line=1) from None
            except csv.Error as exc:
                why = "a quote that is never closed" if feeder.exhausted else str(exc)
                raise InputError(
                    f"unreadable CSV header: {why}",
                    source=self._label,
                    line=feeder.record_start,
                ) from None
            if fields and not (len(fields) == 1 and not fields[0].strip()):
                break
        problem = feeder.utf8_error()
        if feeder.too_long is not None:
            problem = "header line is too long"
        if problem is not None:
            raise InputError(
                f"{problem} in the header", source=self._label, line=feeder.record_start
            )
        return fields

    def next_record(self) -> tuple[int, list[str] | str | None]:
        """The next record's first line and fields (or what is wrong with it; None: the end).

        The fields' lines are ``self.feeder.record_start`` to ``.last_line``. A record
        whose quotes are broken across lines becomes an error about its first line, and
        reading goes on from its second line.
        """
        feeder = self.feeder
        feeder.start_record()
        start = feeder.record_start
        try:
            return start, next(self._reader)
        except StopIteration:
            return start, None
        except csv.Error as exc:
            return start, self._after_error(exc)

    def _after_error(self, exc: csv.Error) -> list[str] | str:
        feeder = self.feeder
        text = str(exc)
        if feeder.exhausted:  # "unexpected end of data": inside quotes at the end
            return self._stray_quote("a quote opened on this line is never closed")
        if text.startswith("field larger than field limit"):
            if not _skip_rest_of_record(feeder, self.delimiter):
                return self._stray_quote("a quote opened on this line is never closed")
            return _csv_error_message(exc) + feeder.span()
        if "expected after" in text:  # a closing quote followed by more text
            if feeder.nlines == 1:
                # one line: read it as the lenient parser does (``"a"b`` is ``ab``)
                return next(csv.reader(feeder.record_lines, delimiter=self.delimiter))
            return self._stray_quote(
                f"a quote opened on this line closes on line {feeder.last_line} "
                "in the middle of a field"
            )
        _skip_rest_of_record(feeder, self.delimiter)
        return _csv_error_message(exc) + feeder.span()

    def _stray_quote(self, problem: str) -> str:
        """The error of a record with a stray quote; the lines after its first are re-read."""
        feeder = self.feeder
        if feeder.nlines > 1:
            self.restart_after_first_line()
            return f"{problem} (a stray quote?); reading goes on with the next line"
        return f"{problem} (a stray quote?)"


def read_delimited_queries(
    path: Path, label: str, options: ReadOptions, *, default_delimiter: str = ","
) -> Generator[QueryRow, None, None]:
    """Yield the rows of a CSV/TSV file, validating its header first.

    The delimiter is ``options.delimiter``, else sniffed from the header line for files
    whose default is the comma (``;``, tab and ``|`` are recognised).
    """
    cap = line_cap(options.max_chars)
    with open_binary(path, label) as fh:
        delimiter = options.delimiter
        if delimiter is None:
            delimiter = default_delimiter
            if default_delimiter == ",":
                delimiter = sniff_delimiter(_header_text(fh, cap), default_delimiter)
        records = _Records(fh, cap, options.encoding_errors, label, delimiter)
        header = records.header()
        schema = options.schema(
            header,
            noun="column",
            where="in header",
            source=label,
            line=records.feeder.record_start,
            hint=delimiter_hint(header, delimiter, "name it with --delimiter (delimiter=)"),
        )
        yield from _rows(records, schema, header, options.max_chars)


def _rows(
    records: _Records, schema: Schema, header: list[str], max_chars: int
) -> Generator[QueryRow, None, None]:
    ncols = len(header)
    index = 0
    while True:
        start, got = records.next_record()
        if got is None:
            return
        feeder = records.feeder
        if isinstance(got, str):
            yield error_row(index, start, got)
            index += 1
            continue
        if _is_blank(got, feeder, ncols):
            continue
        error: str | None = None
        if feeder.too_long is not None:
            error = f"line {feeder.too_long} is longer than {line_cap(max_chars):,} bytes"
        elif len(got) != ncols:
            error = feeder.utf8_error() or (
                f"expected {ncols} fields, got {len(got)}{feeder.span()}"
            )
        if error is not None:
            yield error_row(index, start, error)
        else:
            yield schema.row(index, start, dict(zip(header, got, strict=True)), feeder.utf8_error())
        index += 1
