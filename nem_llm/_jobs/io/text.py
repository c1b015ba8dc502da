"""Plain text query files: one query per non-blank line; ids are the row indexes."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

from ...errors import InputError
from ._lines import decode_line, line_cap, open_binary, physical_lines
from .rows import QueryRow, ReadOptions, error_row

__all__ = ["read_text_queries"]


def read_text_queries(
    path: Path, label: str, options: ReadOptions
) -> Generator[QueryRow, None, None]:
    """Yield one row per non-blank line of a text file; ids are the row indexes."""
    max_chars = options.max_chars
    cap = line_cap(max_chars)
    index = 0
    seen_content = False
    with open_binary(path, label) as fh:
        for lineno, raw, dropped, _ in physical_lines(fh, cap):
            if not raw.strip():
                continue
            seen_content = True
            text, bad = decode_line(raw, options.encoding_errors, label, lineno)
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
                yield error_row(index, lineno, error)
            else:
                yield QueryRow(index, lineno, str(index), text, None, None)
            index += 1
    if not seen_content:
        raise InputError("file is empty", source=label, line=1)
