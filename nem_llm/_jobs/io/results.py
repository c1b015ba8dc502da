"""Results files: :class:`AtomicLineWriter` appends JSONL rows crash-safely, the readers
read them back (JSONL, or Parquet written at the end of a run), and
:func:`repair_jsonl_tail` cuts the torn last line a crash may have left.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Generator, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from ..._parquet import PARQUET_SUFFIX, iter_parquet_rows
from ...errors import InputError
from ._lines import StrPath, json_problem, json_type, open_binary

__all__ = ["AtomicLineWriter", "read_jsonl_rows", "read_result_rows", "repair_jsonl_tail"]

_TAIL_CHUNK = 1024 * 1024


def _parse_result_line(raw: bytes) -> dict[str, Any] | str:
    """Parse one results line into a dict, or return what is wrong with it."""
    try:
        obj = json.loads(raw.rstrip(b"\r\n").decode("utf-8"))
    except UnicodeDecodeError as exc:
        return f"invalid UTF-8 at byte {exc.start}"
    except (ValueError, RecursionError) as exc:
        return f"malformed JSON: {json_problem(exc)}"
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {json_type(obj)}"
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
    with open_binary(path, label) as fh:
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


def read_result_rows(path: StrPath) -> Iterator[tuple[int, dict[str, Any]]]:
    """Read a results file as ``(line_or_row_number, row)`` pairs: JSONL or Parquet.

    JSONL as :func:`read_jsonl_rows` reads it; ``.parquet`` row by row (numbers 1-based).

    Raises:
        InputError: file not found, a damaged line, or a file that is not Parquet.
    """
    p = Path(path)
    if p.suffix.lower() != PARQUET_SUFFIX:
        return read_jsonl_rows(p)
    if not p.is_file():
        raise InputError("file not found", source=str(p))
    return iter_parquet_rows(p)


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
        step = min(_TAIL_CHUNK, pos)
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
