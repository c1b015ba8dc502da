"""Binary lines in, decoded text out: what every line-based reader of this package shares.

Files are read as binary lines and each line is decoded on its own, so one line of invalid
UTF-8 spoils only its own row; a line longer than the cap is cut (the rest is read and
thrown away, never held in memory).
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Literal

from ...errors import InputError

__all__ = [
    "MAX_LINE_BYTES",
    "EncodingErrors",
    "StrPath",
    "decode_line",
    "is_clean",
    "json_problem",
    "json_type",
    "line_cap",
    "open_binary",
    "physical_lines",
]

StrPath = str | os.PathLike[str]

EncodingErrors = Literal["row", "replace", "raise"]
"""What :func:`~nem_llm._jobs.io.read_queries` does with invalid UTF-8: ``"row"`` makes that
row an error row, ``"replace"`` decodes it with U+FFFD replacement characters and keeps the
row, ``"raise"`` raises :class:`~nem_llm.errors.InputError`."""

MAX_LINE_BYTES = 64 * 1024 * 1024
"""The longest physical line read into memory (raised to ``16 * max_query_chars`` if that is
larger). A longer line (say, a file with no newlines at all) becomes a row error and is
skipped without being held in memory."""

_READ_BUFFER = 256 * 1024


def open_binary(path: Path, label: str) -> BinaryIO:
    """Open ``path`` for binary reading, turning OS errors into InputError."""
    try:
        return open(path, "rb", buffering=_READ_BUFFER)
    except OSError as exc:
        raise InputError(f"cannot read file: {exc.strerror or exc}", source=label) from None


def line_cap(max_query_chars: int) -> int:
    """The longest physical line kept for a reader whose queries may be this long."""
    return max(MAX_LINE_BYTES, 16 * max_query_chars)


def physical_lines(
    fh: BinaryIO, cap: int, *, first_line: int = 1, offset: int = 0
) -> Iterator[tuple[int, bytes, int, int]]:
    """Yield ``(line_number, raw_line, dropped_bytes, end_offset)``, cutting long lines.

    A UTF-8 BOM at the start of the file is removed. The part of an over-long line beyond
    ``cap`` bytes is read and discarded (``dropped_bytes`` > 0), never held in memory.
    ``end_offset`` is the byte offset just after the line: seeking there and calling this
    again with ``first_line`` = the next line number and ``offset`` = that offset re-reads
    the rest of the file (the CSV reader does, to recover from a stray quote).
    """
    readline = fh.readline
    lineno = first_line - 1
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
        offset += len(raw) + dropped
        if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        yield lineno, raw, dropped, offset


def decode_line(raw: bytes, mode: EncodingErrors, source: str, line: int) -> tuple[str, int | None]:
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


def json_type(value: Any) -> str:
    """Name a parsed JSON value's type the way users know it (``null`` rather than NoneType)."""
    return "null" if value is None else type(value).__name__


def json_problem(exc: ValueError | RecursionError) -> str:
    """Describe why a line failed to parse as JSON (``Expecting value (column 5)``)."""
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} (column {exc.colno})"
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).split(":", 1)[0]  # e.g. an integer of more than 4300 digits


def is_clean(text: str) -> bool:
    """Whether ``text`` is free of lone surrogates (left by ``surrogateescape`` decoding)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
