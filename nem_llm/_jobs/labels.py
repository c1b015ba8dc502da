"""Labelled queries, read one way for every command: eval, report --labels, review labels.

A labels file is a query file (JSONL, CSV, TSV or Parquet, read by
:func:`~nem_llm._jobs.io.read_queries`) whose rows also carry ``gold_id``: the catalog id
the query refers to, or nothing when it is not in the catalog. "Nothing" is JSON
``null``, an empty CSV cell or a Parquet null (an empty or blank string anywhere): never
the id ``""``. An integer id is its text (``7`` is ``"7"``). A row's own id, used to join
labels to results, is its ``qid`` or ``id`` column, if there is one.

Given the catalog's ids, every gold id that is not among them is reported once, with the
lines it is on (:meth:`Labels.warnings`): a typo in a label would otherwise count as a
wrong answer of the matcher.

Example:
    >>> labels = read_labels("labelled.csv", catalog_ids={"US", "DE"})  # doctest: +SKIP
    >>> labels.pairs()[:2]                                               # doctest: +SKIP
    [('USA', 'US'), ('Atlantis', None)]
"""

from __future__ import annotations

import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from .io import read_queries

__all__ = ["GOLD_COLUMN", "Label", "Labels", "read_labels"]

#: The column (field) holding the gold id.
GOLD_COLUMN = "gold_id"
_ROW_ID_COLUMNS = ("qid", "id")


@dataclass(frozen=True)
class Label:
    """One labelled query: where it is, its text, its gold id (None: not in the catalog)."""

    line: int
    query: str
    gold_id: str | None
    row_id: str | None = None
    #: a record query's fields (a JSONL row's ``"attributes"`` object), else ``None``
    attributes: dict[str, Any] | None = None

    def as_query(self) -> str | dict[str, Any]:
        """The query as the Matcher takes it: its text, or a record with its fields."""
        if self.attributes:
            return {"query": self.query, "attributes": self.attributes}
        return self.query


@dataclass
class Labels:
    """The labels of one file, and the gold ids the catalog does not have (id -> lines)."""

    source: str
    items: list[Label] = field(default_factory=list)
    unknown: dict[str, list[int]] = field(default_factory=dict)

    def pairs(self) -> list[tuple[str, str | None]]:
        """``(query, gold_id)`` pairs, the shape ``Matcher.fit(training_data=...)`` takes."""
        return [(label.query, label.gold_id) for label in self.items]

    def warnings(self) -> list[str]:
        """One line per gold id that is not in the catalog, naming it and its lines."""
        out = []
        for gold, lines in self.unknown.items():
            more = f" (and {len(lines) - 1} more rows)" if len(lines) > 1 else ""
            out.append(
                f"{self.source}:{lines[0]}: gold id {gold!r} is not in the catalog{more}: "
                "every answer to it counts as wrong"
            )
        return out


def _gold(value: Any, source: str, line: int) -> str | None:
    """A gold cell as an id, or None for "not in the catalog" (null, empty, blank)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InputError(
            f"{GOLD_COLUMN} must be text, an integer or empty/null, got {type(value).__name__}",
            source=source,
            line=line,
        )
    text = str(value).strip()
    return text or None


def read_labels(
    path: str | os.PathLike[str],
    *,
    catalog_ids: Collection[str] | None = None,
    limit: int | None = None,
) -> Labels:
    """Read a labels file: every row a query with its gold id (see the module doc).

    Args:
        path: JSONL, CSV, TSV or Parquet; the query column is found as
            :func:`~nem_llm._jobs.io.read_queries` finds it (``query``, ``text``, ...).
        catalog_ids: the catalog's ids; gold ids not among them go to ``Labels.unknown``.
        limit: read the first ``limit`` labelled rows only.

    Raises:
        InputError: naming the file and line: a row that cannot be read (an empty query,
            a bad line), a row without a ``gold_id`` field, a gold id that is not text or an
            integer, a file with no labelled rows.
    """
    source = str(Path(path))
    labels = Labels(source=source)
    known = set(catalog_ids) if catalog_ids is not None else None
    rows = read_queries(path)
    try:
        for row in rows:
            if limit is not None and len(labels.items) >= limit:
                break
            if row.error is not None or row.query is None or row.record is None:
                raise InputError(row.error or "unreadable row", source=source, line=row.line)
            if GOLD_COLUMN not in row.record:
                raise InputError(
                    f"no {GOLD_COLUMN!r} field (empty or null = not in the catalog)",
                    source=source,
                    line=row.line,
                )
            gold = _gold(row.record[GOLD_COLUMN], source, row.line)
            row_id = next(
                (
                    str(row.record[c])
                    for c in _ROW_ID_COLUMNS
                    if isinstance(row.record.get(c), str | int)
                    and not isinstance(row.record.get(c), bool)
                ),
                None,
            )
            given = row.record.get("attributes")
            attributes = dict(given) if isinstance(given, dict) and given else None
            labels.items.append(
                Label(row.line, row.query, gold, row_id=row_id, attributes=attributes)
            )
            if gold is not None and known is not None and gold not in known:
                labels.unknown.setdefault(gold, []).append(row.line)
    finally:
        rows.close()
    if not labels.items:
        raise InputError("no labelled queries", source=source)
    return labels
