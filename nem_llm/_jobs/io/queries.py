"""Query files in, rows out: :func:`read_queries` picks the reader by extension.

One reader per format (``jsonl``, ``delimited`` for CSV and TSV, ``text``, ``parquet``),
all yielding :class:`~nem_llm._jobs.io.rows.QueryRow` values with the same row checks;
:func:`count_rows` sizes a file for progress bars.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from functools import partial
from pathlib import Path

from ..._parquet import parquet_row_count
from ...errors import ConfigError, InputError
from ._lines import EncodingErrors, StrPath, open_binary
from .delimited import read_delimited_queries
from .jsonl import read_jsonl_queries
from .parquet import read_parquet_queries
from .rows import QueryRow, ReadOptions
from .text import read_text_queries

__all__ = ["FORMATS", "count_rows", "read_queries"]

Reader = Callable[[Path, str, ReadOptions], Generator[QueryRow, None, None]]

#: extension -> (format name, reader)
FORMATS: dict[str, tuple[str, Reader]] = {
    ".jsonl": ("jsonl", read_jsonl_queries),
    ".ndjson": ("jsonl", read_jsonl_queries),
    ".csv": ("csv", read_delimited_queries),
    ".tsv": ("tsv", partial(read_delimited_queries, default_delimiter="\t")),
    ".txt": ("txt", read_text_queries),
    ".parquet": ("parquet", read_parquet_queries),
}
_COUNT_CHUNK = 1024 * 1024


def _check_input(path: StrPath) -> tuple[Path, str, str, Reader]:
    """Return ``(path, label, kind, reader)`` or raise the not-found/unknown-format error."""
    p = Path(path)
    label = str(p)
    if not p.is_file():
        raise InputError("file not found", source=label)
    known = FORMATS.get(p.suffix.lower())
    if known is None:
        raise InputError(
            f"unknown file extension {p.suffix or '(none)'!r} (use {', '.join(FORMATS)})",
            source=label,
        )
    return p, label, known[0], known[1]


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
    delimiter: str | None = None,
) -> Generator[QueryRow, None, None]:
    """Stream the rows of a query file as :class:`QueryRow` values, lazily and in order.

    Formats, chosen by extension: ``.jsonl``/``.ndjson`` (one JSON object per line),
    ``.csv``, ``.tsv`` (tab-separated, same quoting rules as CSV), ``.txt`` (one query
    per line; ids are the row indexes) and ``.parquet`` (through pyarrow; ``line`` is the
    row number). Blank lines are skipped and are not data rows; a UTF-8 BOM at the start
    of the file is ignored. A ``.csv`` file's delimiter is ``delimiter`` if given, else
    sniffed from its header line (comma, semicolon, tab or ``|``, whichever occurs most).

    Columns: without ``query_column`` the first of :data:`QUERY_COLUMNS` present is used
    (in the CSV header, the Parquet schema, or the first JSON object of a JSONL file);
    without ``id_column``
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

    A stray quote never loses rows: a quote that is never closed, or one closed on a later
    line in the middle of a field, makes an error row of the line where it opened, and the
    lines after it are read again as rows of their own.

    Args:
        path: The file to read.
        query_column: Column or field holding the query text.
        id_column: Column or field holding the row id (strings or integers for JSONL).
        max_query_chars: Longer queries are row errors.
        encoding_errors: See :data:`EncodingErrors`; the default makes bad lines row errors.
        delimiter: The CSV field delimiter (one character); None: sniffed for ``.csv``,
            a tab for ``.tsv``.

    Returns:
        A generator of rows; close it (or exhaust it) to close the file early.

    Raises:
        InputError: when called, for the fatal problems: file not found, unknown extension,
            empty file, a header (or first JSON object) without the query or the configured
            id column, a JSONL file whose first non-empty line is not JSON, a CSV header
            with a quote that is never closed, a file that is not Parquet; while iterating,
            only for invalid UTF-8 with ``encoding_errors="raise"``.
        ConfigError: ``max_query_chars`` < 1, an unknown ``encoding_errors``, a delimiter
            that is not one character, or pyarrow missing for a ``.parquet`` file.

    Row errors (``error`` set, ``query`` None, reading continues): malformed JSON, JSON that
    is not an object, missing query field, query not a string, empty or whitespace-only
    query, query longer than ``max_query_chars``, invalid UTF-8, a bad or missing id, an id
    already seen (``"duplicate id 'q7' (first seen at line 3)"``; the first row keeps it),
    a CSV record with the wrong number of fields or a stray quote.
    """
    if max_query_chars < 1:
        raise ConfigError(f"max_query_chars must be at least 1, got {max_query_chars}")
    if encoding_errors not in ("row", "replace", "raise"):
        raise ConfigError(
            f"encoding_errors must be 'row', 'replace' or 'raise', got {encoding_errors!r}"
        )
    if delimiter is not None and (len(delimiter) != 1 or delimiter in '"\r\n'):
        raise ConfigError(f"delimiter must be one character (not a quote), got {delimiter!r}")
    p, label, _, reader = _check_input(path)
    options = ReadOptions(
        query_column=query_column,
        id_column=id_column,
        max_chars=max_query_chars,
        encoding_errors=encoding_errors,
        delimiter=delimiter,
    )
    rows = reader(p, label, options)
    # Read the first row now, so that fatal problems (header, first line, empty file)
    # surface when read_queries is called rather than when iteration starts.
    first = next(rows, None)
    return _prepend(first, rows)


def count_rows(path: StrPath) -> int:
    """Count a query file's data rows quickly, for progress bars.

    Parquet: the row count in the file's footer. Text formats: newlines counted in 1 MiB
    binary chunks (plus a last line without one), minus the header for CSV/TSV; exact for
    files without blank lines and, for CSV, without quoted fields spanning lines;
    otherwise an overestimate. (A stray quote does not make it wrong: its lines are rows.)

    Raises:
        InputError: file not found or unknown extension.
    """
    p, label, kind, _ = _check_input(path)
    if kind == "parquet":
        return parquet_row_count(p)
    count = 0
    last = b""
    with open_binary(p, label) as fh:
        while chunk := fh.read(_COUNT_CHUNK):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    if last and last != b"\n":
        count += 1
    if kind in ("csv", "tsv"):
        count -= 1
    return max(count, 0)
