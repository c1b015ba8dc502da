"""DataFrames in, DataFrames out: ``Matcher.match_frame_async`` for pandas, polars and pyarrow.

The queries are read from one column; the result columns (``entity_id``, ``entity_name``,
``status``, ``score``, ``decided_by``, ``reason``, ``cost``) are added to a new frame of
the same kind, row for row. Results stream through ``match_stream_async`` and are written
into flat column buffers as they arrive, so no ``MatchResult`` (and no ``Candidate``) is
kept per row unless ``candidates=True`` asks for a ``candidates`` column.

``where_columns`` filters each row's candidates on entity attributes taken from the row
(``["country"]``: the frame's ``country`` column against the entities' ``country``
attribute; a mapping ``{"attribute": "frame_column"}`` when the names differ: attribute
to column, the direction of every such mapping in nem_llm). Rows are grouped by their
filter values and each group is one stream; a null value means no filter on that
attribute for that row.

Example:
    >>> from nem_llm.integrations.frames import match_frame          # doctest: +SKIP
    >>> df = pd.DataFrame({"name": ["USA", "Deutschland"]})           # doctest: +SKIP
    >>> match_frame(matcher, df)[["name", "entity_id", "status"]]     # doctest: +SKIP
              name entity_id   status
    0          USA        US  matched
    1  Deutschland        DE  matched
"""

from __future__ import annotations

import asyncio
import math
import sys
from collections.abc import Hashable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError
from ..models import MatchResult

if TYPE_CHECKING:
    from ..matcher import Matcher

__all__ = ["RESULT_COLUMNS", "FrameKind", "frame_kind", "match_frame", "match_frame_async"]

RESULT_COLUMNS = ("entity_id", "entity_name", "status", "score", "decided_by", "reason", "cost")
FrameKind = Literal["pandas", "polars", "arrow"]

#: groups of rows (distinct ``where`` values) matched at once
_GROUPS_AT_ONCE = 4


def frame_kind(frame: object) -> FrameKind:
    """Say whether ``frame`` is a pandas or polars DataFrame or a pyarrow Table.

    Raises:
        ConfigError: for anything else.
    """
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(frame, pd.DataFrame):
        return "pandas"
    pl = sys.modules.get("polars")
    if pl is not None and isinstance(frame, pl.DataFrame):
        return "polars"
    pa = sys.modules.get("pyarrow")
    if pa is not None and isinstance(frame, pa.Table):
        return "arrow"
    raise ConfigError(
        "match_frame takes a pandas or polars DataFrame or a pyarrow Table, got "
        f"{type(frame).__module__}.{type(frame).__name__}"
    )


def _columns(frame: Any, kind: FrameKind) -> list[str]:
    if kind == "pandas":
        return [str(c) for c in frame.columns]
    return list(frame.column_names if kind == "arrow" else frame.columns)


def _values(frame: Any, kind: FrameKind, column: str) -> list[Any]:
    if kind == "pandas":
        values: list[Any] = frame[column].tolist()
        # pandas hands missing values back as float NaN: make them None like the others
        return [None if isinstance(v, float) and math.isnan(v) else v for v in values]
    if kind == "polars":
        return list(frame.get_column(column).to_list())
    return list(frame.column(column).to_pylist())


@dataclass
class _Buffers:
    """Flat result columns, filled by row as results arrive."""

    n: int
    with_candidates: bool
    entity_id: list[str | None] = field(init=False)
    entity_name: list[str | None] = field(init=False)
    status: list[str | None] = field(init=False)
    decided_by: list[str | None] = field(init=False)
    reason: list[str | None] = field(init=False)
    score: npt.NDArray[np.float64] = field(init=False)
    cost: npt.NDArray[np.float64] = field(init=False)
    candidates: list[list[dict[str, Any]] | None] | None = field(init=False)

    def __post_init__(self) -> None:
        n = self.n
        self.entity_id, self.entity_name = [None] * n, [None] * n
        self.status, self.decided_by, self.reason = [None] * n, [None] * n, [None] * n
        self.score = np.full(n, np.nan)
        self.cost = np.zeros(n)
        self.candidates = [None] * n if self.with_candidates else None

    def put(self, row: int, r: MatchResult) -> None:
        self.entity_id[row] = r.entity_id
        self.entity_name[row] = r.entity_name
        self.status[row] = r.status
        self.decided_by[row] = r.decided_by
        self.reason[row] = r.error if r.status == "error" and r.error else r.reason
        if r.score is not None:
            self.score[row] = r.score
        self.cost[row] = r.usage.cost_usd
        if self.candidates is not None:
            self.candidates[row] = [
                {"entity_id": c.entity_id, "name": c.name, "score": c.score} for c in r.candidates
            ]


def _where_spec(where_columns: Sequence[str] | Mapping[str, str] | None) -> dict[str, str]:
    if where_columns is None:
        return {}
    if isinstance(where_columns, str):
        raise ConfigError("where_columns must be a list of column names (or a mapping), not a str")
    if isinstance(where_columns, Mapping):  # attribute -> column
        return {str(column): str(attribute) for attribute, column in where_columns.items()}
    return {str(c): str(c) for c in where_columns}


def _groups(
    frame: Any, kind: FrameKind, spec: dict[str, str], n: int
) -> dict[tuple[Hashable, ...], list[int]]:
    """Rows grouped by their ``where`` values (one group of every row without a spec)."""
    if not spec:
        return {(): list(range(n))}
    columns = [_values(frame, kind, c) for c in spec]
    groups: dict[tuple[Hashable, ...], list[int]] = {}
    for row, key in enumerate(zip(*columns, strict=True)):
        try:
            groups.setdefault(key, []).append(row)
        except TypeError:
            raise ConfigError(
                f"where_columns: row {row} holds an unhashable value {key!r}"
            ) from None
    return groups


async def match_frame_async(
    matcher: Matcher,
    frame: Any,
    *,
    column: str = "name",
    where_columns: Sequence[str] | Mapping[str, str] | None = None,
    top_k: int | None = None,
    threshold: float | None = None,
    batch_size: int = 64,
    candidates: bool = False,
    prefix: str = "",
    fields: Sequence[str] | Mapping[str, str] | None = None,
) -> Any:
    """Match every row's ``column`` and return a new frame of the same kind with results.

    Args:
        matcher: a fitted Matcher.
        frame: a pandas or polars DataFrame, or a pyarrow Table (not modified).
        column: the column holding the queries (null or empty values become ``error`` rows).
        where_columns: columns whose values filter each row's candidates on entity
            attributes: a list of names (the same in frame and catalog), or a mapping
            ``{attribute: column}``.
        top_k, threshold: this call's candidates and accept threshold (default: the
            matcher's).
        batch_size: queries in flight through embedding at once.
        candidates: also add a ``candidates`` column (a list of
            ``{entity_id, name, score}``).
        prefix: put before every added column's name (e.g. ``"match_"``).
        fields: the rows are records: these columns are their fields (a list of names,
            the same in frame and catalog, or a mapping ``{attribute: column}``), compared
            field by field by the matcher's field model (fit it with a workload of
            records: ``matcher.fit(workload=...)``).

    Raises:
        ConfigError: not a frame, a missing column, an added column that already exists,
            or an option this Matcher does not take.
    """
    kind = frame_kind(frame)
    present = _columns(frame, kind)
    spec = _where_spec(where_columns)
    for name in (column, *spec):
        if name not in present:
            hint = " (where_columns maps attribute -> column)" if name in spec else ""
            raise ConfigError(f"column {name!r} is not in the frame (columns: {present}){hint}")
    added = [prefix + c for c in (*RESULT_COLUMNS, *(("candidates",) if candidates else ()))]
    clash = [c for c in added if c in present]
    if clash:
        raise ConfigError(
            f"the frame already has column(s) {clash}: pass prefix= (e.g. prefix='match_')"
        )
    queries: list[Any] = _values(frame, kind, column)
    record = {attr: col for col, attr in _where_spec(fields).items()}
    for col in record.values():
        if col not in present:
            raise ConfigError(f"fields: column {col!r} is not in the frame (columns: {present})")
    if record:
        columns = {attr: _values(frame, kind, col) for attr, col in record.items()}
        queries = [
            {"query": q, "attributes": {a: v[i] for a, v in columns.items() if not _null(v[i])}}
            for i, q in enumerate(queries)
        ]
    n = len(queries)
    buffers = _Buffers(n, candidates)
    groups = _groups(frame, kind, spec, n)
    gate = asyncio.Semaphore(_GROUPS_AT_ONCE)

    async def run(key: tuple[Hashable, ...], rows: list[int]) -> None:
        where = {attr: value for attr, value in zip(spec.values(), key, strict=True)}
        where = {a: v for a, v in where.items() if v is not None}
        whole = len(rows) == n  # one group of every row: result index == row
        async with gate:
            stream = matcher.match_stream_async(
                (queries[r] for r in rows) if not whole else queries,
                strategy="as_completed",
                batch_size=batch_size,
                top_k=top_k,
                threshold=threshold,
                where=where or None,
            )
            async with aclosing(stream):
                async for result in stream:
                    buffers.put(result.index if whole else rows[result.index], result)

    if len(groups) == 1:
        [(key, rows)] = groups.items()
        await run(key, rows)
    else:
        async with asyncio.TaskGroup() as tg:
            for key, rows in groups.items():
                tg.create_task(run(key, rows))
    return _assemble(frame, kind, buffers, prefix)


def match_frame(matcher: Matcher, frame: Any, **options: Any) -> Any:
    """Sync twin of :func:`match_frame_async` (the same keyword options)."""
    return matcher.run_sync(match_frame_async(matcher, frame, **options))


def _null(value: Any) -> bool:
    """A missing cell: None, NaN or an empty string."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _assemble(frame: Any, kind: FrameKind, b: _Buffers, prefix: str) -> Any:
    strings = {
        "entity_id": b.entity_id,
        "entity_name": b.entity_name,
        "status": b.status,
        "decided_by": b.decided_by,
        "reason": b.reason,
    }
    missing = np.isnan(b.score)
    if kind == "pandas":
        import pandas as pd

        data: dict[str, Any] = {**strings, "score": b.score, "cost": b.cost}
        ordered = {prefix + c: data[c] for c in RESULT_COLUMNS}
        if b.candidates is not None:
            # a Series of lists (a plain list of equal-length lists would become 2-D)
            ordered[prefix + "candidates"] = pd.Series(
                b.candidates, index=frame.index, dtype=object
            )
        return frame.assign(**ordered)
    if kind == "polars":
        import polars as pl

        series = {k: pl.Series(prefix + k, v, dtype=pl.String) for k, v in strings.items()}
        series["score"] = pl.Series(prefix + "score", b.score).fill_nan(None)
        series["cost"] = pl.Series(prefix + "cost", b.cost)
        out = [series[c] for c in RESULT_COLUMNS]
        if b.candidates is not None:
            out.append(pl.Series(prefix + "candidates", b.candidates))
        return frame.with_columns(out)
    import pyarrow as pa

    arrays = {k: pa.array(v, type=pa.string()) for k, v in strings.items()}
    arrays["score"] = pa.array(b.score, mask=missing)
    arrays["cost"] = pa.array(b.cost)
    table = frame
    for c in RESULT_COLUMNS:
        table = table.append_column(prefix + c, arrays[c])
    if b.candidates is not None:
        table = table.append_column(prefix + "candidates", pa.array(b.candidates))
    return table
