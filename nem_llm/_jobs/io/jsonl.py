"""JSONL query files: one JSON object per line; the first object plays the header's part."""

from __future__ import annotations

import json
from collections.abc import Generator
from pathlib import Path

from ...errors import InputError
from ._lines import decode_line, json_problem, json_type, line_cap, open_binary, physical_lines
from .rows import QueryRow, ReadOptions, Schema, error_row

__all__ = ["read_jsonl_queries"]

_json_decode = json.JSONDecoder().decode  # json.loads minus its per-call type checks


def read_jsonl_queries(
    path: Path, label: str, options: ReadOptions
) -> Generator[QueryRow, None, None]:
    """Yield the rows of a JSONL file; the first JSON object fixes the query and id fields."""
    cap = line_cap(options.max_chars)
    schema: Schema | None = None
    index = 0
    seen_content = False
    with open_binary(path, label) as fh:
        for lineno, raw, dropped, _ in physical_lines(fh, cap):
            if not raw.strip():
                continue
            first = not seen_content
            seen_content = True
            if dropped:
                yield error_row(index, lineno, f"line is longer than {cap:,} bytes")
                index += 1
                continue
            text, bad = decode_line(raw.rstrip(b"\r\n"), options.encoding_errors, label, lineno)
            utf8_error = None if bad is None else f"invalid UTF-8 at byte {bad}"
            try:
                obj = _json_decode(text)
            except (ValueError, RecursionError) as exc:
                detail = json_problem(exc)
                if first and isinstance(exc, json.JSONDecodeError):
                    raise InputError(
                        f"not a JSONL file: the first line is not JSON ({detail})",
                        source=label,
                        line=lineno,
                    ) from None
                yield error_row(index, lineno, utf8_error or f"malformed JSON: {detail}")
                index += 1
                continue
            if not isinstance(obj, dict):
                error = utf8_error or f"expected a JSON object, got {json_type(obj)}"
                yield error_row(index, lineno, error)
                index += 1
                continue
            if schema is None:
                schema = options.schema(
                    [str(k) for k in obj],
                    noun="field",
                    where="in the first object",
                    source=label,
                    line=lineno,
                )
            yield schema.row(index, lineno, obj, utf8_error)
            index += 1
    if not seen_content:
        raise InputError("file is empty", source=label, line=1)
