"""What a query file's rows are: :class:`QueryRow`, and the column checks every format shares.

A row reports its first problem (``"empty query"``, ``"duplicate id 'q7' (first seen at line
3)"``, ...) in ``QueryRow.error``; the file's header (or first JSON object, or Parquet
schema) fixes which column holds the query and which the id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ...errors import InputError
from ._lines import EncodingErrors, is_clean, json_type

__all__ = ["QUERY_COLUMNS", "QueryRow", "ReadOptions", "Schema", "error_row", "resolve_schema"]

QUERY_COLUMNS: tuple[str, ...] = ("query", "text", "mention", "name")
"""Column (CSV, Parquet) or field (JSONL) names tried in order when no query column is given."""


@dataclass(frozen=True, kw_only=True)
class ReadOptions:
    """What every format's reader is told: columns, the length limit, UTF-8 handling.

    ``delimiter``: CSV only (``None``: found from the header line).
    """

    query_column: str | None = None
    id_column: str | None = None
    max_chars: int = 100_000
    encoding_errors: EncodingErrors = "row"
    delimiter: str | None = None

    def schema(self, fields: Sequence[str], *, noun: str, where: str, source: str, line: int,
               hint: str = "") -> Schema:  # fmt: skip
        """The query and id columns among ``fields`` (see :func:`resolve_schema`)."""
        return resolve_schema(
            fields,
            noun=noun,
            where=where,
            source=source,
            line=line,
            query_column=self.query_column,
            id_column=self.id_column,
            max_chars=self.max_chars,
            hint=hint,
        )


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


@dataclass
class Schema:
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
            return None, f"query is not a string (got {json_type(value)})"
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
            return None, f"id is not a string or integer (got {json_type(value)})"
        text = str(value)
        if not text.strip():
            return None, "empty id"
        if not is_clean(text):
            return None, "invalid UTF-8 in id"
        return text, ""


def error_row(index: int, line: int, error: str) -> QueryRow:
    """A row that could not be parsed at all: index id, no query, no record."""
    return QueryRow(index=index, line=line, id=str(index), query=None, error=error, record=None)


def resolve_schema(
    fields: Sequence[str],
    *,
    noun: str,
    where: str,
    source: str,
    line: int,
    query_column: str | None,
    id_column: str | None,
    max_chars: int,
    hint: str = "",
) -> Schema:
    """Pick the query and id columns among ``fields``, or raise the fatal InputError.

    ``noun`` and ``where`` word the message (``"column"``, ``"in header"``); ``hint`` is
    appended to it (the CSV reader's word about the delimiter).
    """
    found = ", ".join(fields) or "no fields"
    if query_column is None:
        query_column = next((c for c in QUERY_COLUMNS if c in fields), None)
        if query_column is None:
            raise InputError(
                f"no query {noun} {where} (looked for {', '.join(QUERY_COLUMNS)}; "
                f"found: {found}): name it with --query-column (query_column=){hint}",
                source=source,
                line=line,
            )
    elif query_column not in fields:
        raise InputError(
            f"no {noun} {query_column!r} {where} (found: {found}){hint}", source=source, line=line
        )
    if id_column is None:
        id_column = "id" if "id" in fields else None
    elif id_column not in fields:
        raise InputError(
            f"no id {noun} {id_column!r} {where} (found: {found}){hint}", source=source, line=line
        )
    return Schema(query_column=query_column, id_column=id_column, max_chars=max_chars)
