"""Parquet through pyarrow (the ``frames`` extra): rows in, in batches, and rows out.

Shared by the catalog loader, the query readers and the result writers; pyarrow is
imported only when a ``.parquet`` file is used, and its absence is one clear error that
names the extra.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import ConfigError, InputError

__all__ = [
    "PARQUET_SUFFIX",
    "iter_parquet_rows",
    "parquet_columns",
    "parquet_row_count",
    "require_pyarrow",
    "write_parquet_rows",
]

PARQUET_SUFFIX = ".parquet"
_BATCH_ROWS = 4096
_WRITE_CHUNK = 10_000


def require_pyarrow(what: str = "reading or writing .parquet files") -> Any:
    """Import ``pyarrow.parquet``, or raise a ConfigError naming the extra that brings it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(
            f"{what} needs pyarrow: pip install 'nem_llm[frames]' (or pip install pyarrow)"
        ) from None
    return pq


def _open(path: Path, error: type[InputError]) -> Any:
    pq = require_pyarrow()
    import pyarrow as pa

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise error(f"not a readable Parquet file ({exc})", source=str(path)) from None


def parquet_columns(path: Path, error: type[InputError] = InputError) -> list[str]:
    """The column names of a Parquet file."""
    return [str(name) for name in _open(path, error).schema_arrow.names]


def parquet_row_count(path: Path, error: type[InputError] = InputError) -> int:
    """The number of rows of a Parquet file (from its footer: no data is read)."""
    return int(_open(path, error).metadata.num_rows)


def iter_parquet_rows(
    path: Path, error: type[InputError] = InputError
) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(row_number, row)`` pairs (1-based), reading one batch of rows at a time.

    Raises:
        ConfigError: pyarrow is not installed.
        error: the file is not Parquet, or a batch cannot be read (names the first row
            of the batch).
    """
    import pyarrow as pa

    pf = _open(path, error)
    number = 0
    batches = pf.iter_batches(batch_size=_BATCH_ROWS)
    while True:
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as exc:
            raise error(
                f"unreadable Parquet data ({exc})", source=str(path), line=number + 1
            ) from None
        if batch is None:
            return
        for row in batch.to_pylist():
            number += 1
            yield number, row


def _no_empty_objects(value: Any) -> Any:
    """``value`` with every empty object made null: Parquet cannot store a struct of no
    fields, and an empty object says no more than a null."""
    if isinstance(value, dict):
        if not value:
            return None
        return {k: _no_empty_objects(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_empty_objects(v) for v in value]
    return value


def write_parquet_rows(
    path: str | os.PathLike[str], rows: Callable[[], Iterable[dict[str, Any]]]
) -> int:
    """Write dict rows to a Parquet file (temp file, fsync, atomic rename); return the count.

    ``rows`` is called twice: the first pass finds one schema that fits every row (a
    column null in some rows and text in others is text), the second writes the rows in
    chunks of 10,000, so memory stays bounded by a chunk. Nested values (lists, objects)
    become Arrow lists and structs; an empty object becomes null.
    """
    pq = require_pyarrow("writing .parquet results")
    import pyarrow as pa

    schemas = [pa.Table.from_pylist(chunk).schema for chunk in _chunks(rows())]
    out = Path(path)
    tmp = out.with_name(out.name + ".tmp")
    count = 0
    if not schemas:
        pq.write_table(pa.table({}), tmp)
    else:
        schema = pa.unify_schemas(schemas, promote_options="permissive")
        with pq.ParquetWriter(tmp, schema) as writer:
            for chunk in _chunks(rows()):
                writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
                count += len(chunk)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    return count


def _chunks(rows: Iterable[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(_no_empty_objects(row))
        if len(chunk) >= _WRITE_CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
