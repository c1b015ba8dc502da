"""Parquet query files (through pyarrow): one row a query, read a batch at a time.

The file's schema plays the header's part (the query and id columns must be in it);
``QueryRow.line`` is the 1-based row number. Values keep their Arrow types in
``QueryRow.record``; the query must be text and the id text or an integer.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path

from ..._parquet import iter_parquet_rows, parquet_columns
from ...errors import InputError
from .rows import QueryRow, ReadOptions

__all__ = ["read_parquet_queries"]


def read_parquet_queries(
    path: Path, label: str, options: ReadOptions
) -> Generator[QueryRow, None, None]:
    """Yield the rows of a Parquet file; its schema fixes the query and id columns."""
    schema = options.schema(
        parquet_columns(path), noun="column", where="in the Parquet schema", source=label, line=1
    )
    index = 0
    for number, record in iter_parquet_rows(path):
        yield schema.row(index, number, record, None)
        index += 1
    if index == 0:
        raise InputError("file is empty (no rows)", source=label, line=1)
