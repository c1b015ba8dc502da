"""The Batch API engine's state: the run checkpoint plus request lines and batches.

Everything the engine (``jobs.batch_api``) must find again after a crash lives here, in
the job's ``run.sqlite``: every request line ever built (its body, its row's plan, the batch
it went into, whether it is finished) and every batch (its file id, batch id, status), and
per run what was planned and spent. Each method is one transaction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .._llm.adjudication import estimate_tokens
from .._llm.batch_api import request_line
from .._sqlite import immediate
from ..models import Usage
from .checkpoint import RunStore

__all__ = ["BatchApiStore", "Line"]


@dataclass
class Line:
    """A request line and what the row has been through (stored as JSON in ``plan``)."""

    custom_id: str
    index: int
    round: int
    body: dict[str, Any]
    plan: dict[str, Any]


class BatchApiStore(RunStore):
    """The run checkpoint plus the Batch API state: request lines and submitted batches.

    ``batch_lines`` holds every request line ever built (its body, its row's plan, the
    batch it went into); ``batches`` every batch (its file id, batch id and status).
    """

    TABLES: ClassVar[tuple[str, ...]] = (
        *RunStore.TABLES,
        """CREATE TABLE IF NOT EXISTS batch_lines (
            custom_id TEXT PRIMARY KEY,
            run_id INTEGER NOT NULL,
            idx INTEGER NOT NULL,
            round INTEGER NOT NULL,
            body TEXT NOT NULL,
            plan TEXT NOT NULL,
            est_tokens INTEGER NOT NULL,
            batch_seq INTEGER,
            done INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX IF NOT EXISTS batch_lines_by_batch ON batch_lines (run_id, batch_seq)",
        """CREATE TABLE IF NOT EXISTS batches (
            seq INTEGER PRIMARY KEY,
            run_id INTEGER NOT NULL,
            state TEXT NOT NULL,
            input_file_id TEXT,
            batch_id TEXT,
            status TEXT,
            created_at REAL NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS batch_runs (
            run_id INTEGER PRIMARY KEY,
            planned INTEGER NOT NULL DEFAULT 0,
            spent_tokens INTEGER NOT NULL DEFAULT 0,
            spent_usd REAL NOT NULL DEFAULT 0
        )""",
    )

    # -- plan --------------------------------------------------------------------------

    async def planned_async(self, run_key: str) -> bool:
        """Whether every row has been routed (the plan phase finished)."""
        return await self._acall(self._planned, run_key)

    def _planned(self, run_key: str) -> bool:
        row = (
            self._connection()
            .execute("SELECT planned FROM batch_runs WHERE run_id = ?", (self._run_id(run_key),))
            .fetchone()
        )
        return bool(row and row[0])

    async def mark_planned_async(self, run_key: str) -> None:
        await self._acall(self._mark_planned, run_key)

    def _mark_planned(self, run_key: str) -> None:
        self._connection().execute(
            "INSERT INTO batch_runs (run_id, planned) VALUES (?, 1)"
            " ON CONFLICT (run_id) DO UPDATE SET planned = 1",
            (self._run_id(run_key),),
        )

    async def line_indexes_async(self, run_key: str) -> set[int]:
        """Rows that already have a request line."""
        return await self._acall(self._line_indexes, run_key)

    def _line_indexes(self, run_key: str) -> set[int]:
        cur = self._connection().execute(
            "SELECT DISTINCT idx FROM batch_lines WHERE run_id = ?", (self._run_id(run_key),)
        )
        return {int(i) for (i,) in cur}

    async def add_plan_async(
        self, run_key: str, finals: list[tuple[int, str]], lines: list[Line]
    ) -> None:
        """Record final rows and new request lines in one transaction."""
        await self._acall(self._add_plan, run_key, finals, lines, [], None)

    def _add_plan(
        self,
        run_key: str,
        finals: list[tuple[int, str]],
        lines: list[Line],
        done: list[str],
        processed: tuple[int, str, Usage] | None,
    ) -> None:
        conn = self._connection()
        run_id = self._run_id(run_key)
        with immediate(conn):
            conn.executemany(
                "INSERT INTO run_rows (run_id, idx, row) VALUES (?, ?, ?)"
                " ON CONFLICT (run_id, idx) DO NOTHING",
                ((run_id, index, row) for index, row in finals),
            )
            conn.executemany(
                "INSERT INTO batch_lines (custom_id, run_id, idx, round, body, plan, est_tokens)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (custom_id) DO NOTHING",
                (
                    (
                        line.custom_id,
                        run_id,
                        line.index,
                        line.round,
                        json.dumps(line.body, ensure_ascii=False),
                        json.dumps(line.plan, ensure_ascii=False),
                        estimate_tokens(line.body["messages"]),
                    )
                    for line in lines
                ),
            )
            conn.executemany(
                "UPDATE batch_lines SET done = 1 WHERE custom_id = ?", ((c,) for c in done)
            )
            if processed is not None:
                seq, status, usage = processed
                conn.execute(
                    "UPDATE batches SET state = 'processed', status = ? WHERE seq = ?",
                    (status, seq),
                )
                conn.execute(
                    "INSERT INTO batch_runs (run_id, spent_tokens, spent_usd) VALUES (?, ?, ?)"
                    " ON CONFLICT (run_id) DO UPDATE SET spent_tokens = spent_tokens + ?,"
                    " spent_usd = spent_usd + ?",
                    (
                        run_id,
                        usage.total_tokens,
                        usage.cost_usd,
                        usage.total_tokens,
                        usage.cost_usd,
                    ),
                )

    # -- submit ------------------------------------------------------------------------

    async def unassigned_async(self, run_key: str) -> list[tuple[str, int, str, int]]:
        """Lines not yet in a batch: (custom_id, row, line JSON text, estimated tokens)."""
        return await self._acall(self._unassigned, run_key)

    def _unassigned(self, run_key: str) -> list[tuple[str, int, str, int]]:
        cur = self._connection().execute(
            "SELECT custom_id, idx, body, est_tokens FROM batch_lines"
            " WHERE run_id = ? AND batch_seq IS NULL AND done = 0 ORDER BY round, idx",
            (self._run_id(run_key),),
        )
        return [(str(c), int(i), request_line(str(c), json.loads(b)), int(t)) for c, i, b, t in cur]

    async def in_flight_async(self, run_key: str) -> tuple[int, Usage]:
        """Estimated tokens of lines in open batches, and the usage spent so far."""
        return await self._acall(self._in_flight, run_key)

    def _in_flight(self, run_key: str) -> tuple[int, Usage]:
        conn = self._connection()
        run_id = self._run_id(run_key)
        est = conn.execute(
            "SELECT coalesce(sum(est_tokens), 0) FROM batch_lines"
            " WHERE run_id = ? AND batch_seq IS NOT NULL AND done = 0",
            (run_id,),
        ).fetchone()[0]
        row = conn.execute(
            "SELECT spent_tokens, spent_usd FROM batch_runs WHERE run_id = ?", (run_id,)
        ).fetchone()
        spent = Usage(total_tokens=int(row[0]), cost_usd=float(row[1])) if row else Usage()
        return int(est), spent

    async def new_batch_async(self, run_key: str, custom_ids: list[str], now: float) -> int:
        """Create a batch row and assign ``custom_ids`` to it; returns its sequence number."""
        return await self._acall(self._new_batch, run_key, custom_ids, now)

    def _new_batch(self, run_key: str, custom_ids: list[str], now: float) -> int:
        conn = self._connection()
        run_id = self._run_id(run_key)
        with immediate(conn):
            cur = conn.execute(
                "INSERT INTO batches (run_id, state, created_at) VALUES (?, 'new', ?)",
                (run_id, now),
            )
            seq = cur.lastrowid
            assert seq is not None
            conn.executemany(
                "UPDATE batch_lines SET batch_seq = ? WHERE custom_id = ?",
                ((seq, c) for c in custom_ids),
            )
        return int(seq)

    async def set_batch_async(self, seq: int, **fields: str | None) -> None:
        """Update a batch row's ``state``, ``input_file_id``, ``batch_id`` or ``status``."""
        await self._acall(self._set_batch, seq, fields)

    def _set_batch(self, seq: int, fields: Mapping[str, str | None]) -> None:
        allowed = {"state", "input_file_id", "batch_id", "status"}
        if not set(fields) <= allowed:
            raise ValueError(f"unknown batch fields {sorted(set(fields) - allowed)}")
        sets = ", ".join(f"{name} = ?" for name in fields)
        self._connection().execute(
            f"UPDATE batches SET {sets} WHERE seq = ?", (*fields.values(), seq)
        )

    async def open_batches_async(self, run_key: str) -> list[dict[str, Any]]:
        """Batches not yet processed, oldest first."""
        return await self._acall(self._open_batches, run_key)

    def _open_batches(self, run_key: str) -> list[dict[str, Any]]:
        cur = self._connection().execute(
            "SELECT seq, state, input_file_id, batch_id, status FROM batches"
            " WHERE run_id = ? AND state != 'processed' ORDER BY seq",
            (self._run_id(run_key),),
        )
        keys = ("seq", "state", "input_file_id", "batch_id", "status")
        return [dict(zip(keys, row, strict=True)) for row in cur]

    async def batch_lines_async(self, seq: int) -> list[Line]:
        """The request lines of one batch."""
        return await self._acall(self._batch_lines, seq)

    def _batch_lines(self, seq: int) -> list[Line]:
        cur = self._connection().execute(
            "SELECT custom_id, idx, round, body, plan FROM batch_lines"
            " WHERE batch_seq = ? ORDER BY idx",
            (seq,),
        )
        return [Line(str(c), int(i), int(r), json.loads(b), json.loads(p)) for c, i, r, b, p in cur]

    async def process_async(
        self,
        run_key: str,
        seq: int,
        status: str,
        finals: list[tuple[int, str]],
        follow_ups: list[Line],
        done: list[str],
        usage: Usage,
    ) -> None:
        """Record a finished batch: final rows, follow-up lines, lines done, batch processed."""
        await self._acall(self._add_plan, run_key, finals, follow_ups, done, (seq, status, usage))

    async def batch_lines_by_ids_async(self, custom_ids: list[str]) -> list[Line]:
        """The request lines with these ``custom_id`` values."""
        return await self._acall(self._lines_by_ids, custom_ids)

    def _lines_by_ids(self, custom_ids: list[str]) -> list[Line]:
        conn = self._connection()
        out: list[Line] = []
        for start in range(0, len(custom_ids), 500):
            part = custom_ids[start : start + 500]
            marks = ",".join("?" * len(part))
            cur = conn.execute(
                "SELECT custom_id, idx, round, body, plan FROM batch_lines"
                f" WHERE custom_id IN ({marks})",
                part,
            )
            out.extend(
                Line(str(c), int(i), int(r), json.loads(b), json.loads(p)) for c, i, r, b, p in cur
            )
        return out

    async def add_done_async(
        self, run_key: str, finals: list[tuple[int, str]], done: list[str]
    ) -> None:
        """Record final rows and mark their lines done, in one transaction."""
        await self._acall(self._add_plan, run_key, finals, [], done, None)

    async def count_async(self, run_key: str) -> int:
        """Async :meth:`count`."""
        return await self._acall(self._count, run_key)

    async def batch_count_async(self, run_key: str) -> int:
        """How many batches this run created (rows in ``batches``)."""
        return await self._acall(self._batch_count, run_key)

    def _batch_count(self, run_key: str) -> int:
        return int(
            self._connection()
            .execute("SELECT count(*) FROM batches WHERE run_id = ?", (self._run_id(run_key),))
            .fetchone()[0]
        )
