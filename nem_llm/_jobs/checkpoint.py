"""Run checkpoints: a batch run killed half-way resumes where it stopped.

:class:`RunStore` checkpoints a batch run row by row: a run killed half-way (even with
SIGKILL) and restarted with the same command skips every row whose ``record`` returned.
A SQLite file in WAL mode (see ``nem_llm._sqlite`` for the threading model and
durability); it may share its file with the decision cache.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt

from .._sqlite import DEFAULT_TIMEOUT_S, SQLiteStore, StoreError, check_key, immediate
from ..errors import InputError

__all__ = ["DoneIndexes", "RowOrder", "RunStore"]

RowOrder = Literal["input", "completion"]

# rows fetched per worker call by RunStore.iter_rows
_PAGE_SIZE = 2000
_MAX_INDEX = 2**63 - 1


class DoneIndexes(AbstractSet[int]):
    """A read-only set of input indexes, stored compactly as a sorted ``int64`` numpy array.

    8 bytes per index (a Python ``set`` of ints costs about ten times that). When the
    indexes are dense (the usual case: most of ``0..n-1``) membership tests use a byte map
    of one byte per possible index and cost about as much as a ``set`` lookup; otherwise a
    binary search. It compares equal to a ``set`` with the same members, and :attr:`array`
    or :meth:`missing` give vectorized access.

    Example:
        >>> done = DoneIndexes([4, 0, 2])
        >>> 2 in done, 3 in done, done == {0, 2, 4}
        (True, False, True)
        >>> done.missing(6).tolist()
        [1, 3, 5]
    """

    __slots__ = ("_array", "_bytemap")

    def __init__(self, values: Iterable[int] | npt.NDArray[np.integer[Any]] = ()) -> None:
        if isinstance(values, np.ndarray):
            arr = values.astype(np.int64, copy=False).ravel()
        else:
            arr = np.fromiter((int(v) for v in values), dtype=np.int64)
        if len(arr) and int(arr.min()) < 0:
            raise InputError("indexes must be >= 0", source="DoneIndexes")
        self._set_array(np.unique(arr))

    @classmethod
    def _from_sorted_unique(cls, array: npt.NDArray[np.int64]) -> DoneIndexes:
        done = cls.__new__(cls)
        done._set_array(array)
        return done

    def _set_array(self, array: npt.NDArray[np.int64]) -> None:
        array.flags.writeable = False
        self._array = array
        # a byte per possible index, only when that costs at most ~2 bytes per member
        self._bytemap: bytes | None = None
        if len(array) and int(array[-1]) < 2 * len(array) + 65536:
            bytemap = np.zeros(int(array[-1]) + 1, dtype=np.uint8)
            bytemap[array] = 1
            self._bytemap = bytemap.tobytes()

    @property
    def array(self) -> npt.NDArray[np.int64]:
        """The indexes as a sorted, read-only ``int64`` array."""
        return self._array

    def missing(self, total: int) -> npt.NDArray[np.int64]:
        """Return the indexes in ``range(total)`` that are not in the set, sorted."""
        everything = np.arange(max(int(total), 0), dtype=np.int64)
        return np.setdiff1d(everything, self._array, assume_unique=True)

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, (int, np.integer)) or not 0 <= value <= _MAX_INDEX:
            return False
        if self._bytemap is not None:
            return bool(value < len(self._bytemap)) and self._bytemap[value] == 1
        pos = int(np.searchsorted(self._array, value))
        return pos < len(self._array) and bool(self._array[pos] == value)

    def __iter__(self) -> Iterator[int]:
        for start in range(0, len(self._array), 65536):
            yield from self._array[start : start + 65536].tolist()

    def __len__(self) -> int:
        return len(self._array)

    def __repr__(self) -> str:
        n = len(self._array)
        if n <= 8:
            return f"DoneIndexes({self._array.tolist()})"
        return f"DoneIndexes(<{n} indexes from {self._array[0]} to {self._array[-1]}>)"


class RunStore(SQLiteStore):
    """Checkpoints of resumable batch runs: one JSON row per input index, kept durably.

    Args:
        path: Database file (created if missing; its directory must exist), or
            ``":memory:"`` (tests).
        timeout: Seconds to wait for another writer's lock before raising StoreError.

    A run is named by ``run_key`` (the caller's hash of the command's inputs) and carries
    ``meta`` (the settings it was started with). Each ``record`` commits before it returns,
    so after a SIGKILL a reopened store holds every row whose ``record`` returned.
    Recording is idempotent per ``(run_key, index)``: the first row wins. Every method is
    thread-safe; the ``a*`` twins run on the store's worker thread.

    Example:
        >>> with RunStore(":memory:") as runs:
        ...     runs.open_run("k1", {"model": "gpt-4o-mini"})
        ...     runs.record("k1", 0, '{"query": "usa"}'), runs.record("k1", 0, "{}")
        (True, False)
    """

    TABLES: ClassVar[tuple[str, ...]] = (
        """CREATE TABLE IF NOT EXISTS runs (
            run_id INTEGER PRIMARY KEY,
            run_key TEXT NOT NULL UNIQUE,
            meta TEXT NOT NULL,
            created_at REAL NOT NULL,
            completed_at REAL
        )""",
        # seq aliases the rowid: it grows with every insert (rows are deleted only by
        # forget_rows, which leaves the rest in order), so it is the completion order;
        # (run_id, idx) is unique and gives the input order.
        """CREATE TABLE IF NOT EXISTS run_rows (
            seq INTEGER PRIMARY KEY,
            run_id INTEGER NOT NULL,
            idx INTEGER NOT NULL,
            row TEXT NOT NULL,
            UNIQUE (run_id, idx)
        )""",
        # completion order of one run without sorting (the planner would otherwise scan the
        # unique index and sort every page)
        "CREATE INDEX IF NOT EXISTS run_rows_by_seq ON run_rows (run_id, seq)",
    )

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT_S):
        self._run_ids: dict[str, int] = {}  # run_key -> run_id; touched on the worker only
        super().__init__(path, timeout=timeout)

    # -- runs --------------------------------------------------------------------------

    def open_run(self, run_key: str, meta: Mapping[str, Any]) -> None:
        """Create the run, or reuse it if it exists with equal ``meta``.

        Raises:
            StoreError: a run with this key exists and was started with different ``meta``
                (the message names the differing keys).
            InputError: ``meta`` is not a JSON-serializable mapping with str keys.
        """
        self._call(self._open_run, check_key(run_key, "run_key"), _canonical_meta(meta))

    async def open_run_async(self, run_key: str, meta: Mapping[str, Any]) -> None:
        """Async :meth:`open_run`."""
        await self._acall(self._open_run, check_key(run_key, "run_key"), _canonical_meta(meta))

    def has_run(self, run_key: str) -> bool:
        """Return True if a run with this key exists in the file."""
        return self._call(self._find_run, check_key(run_key, "run_key")) is not None

    def mark_complete(self, run_key: str) -> None:
        """Mark the run as finished (every input has its row)."""
        self._call(self._mark_complete, check_key(run_key, "run_key"))

    async def mark_complete_async(self, run_key: str) -> None:
        """Async :meth:`mark_complete`."""
        await self._acall(self._mark_complete, check_key(run_key, "run_key"))

    def is_complete(self, run_key: str) -> bool:
        """Return True if :meth:`mark_complete` was called for this run."""
        return self._call(self._is_complete, check_key(run_key, "run_key"))

    # -- rows --------------------------------------------------------------------------

    def record(self, run_key: str, index: int, row: str) -> bool:
        """Store the output ``row`` (JSON text) of input ``index``; durable on return.

        Returns:
            True if stored, False if this index already had a row (the new one is ignored).
        """
        return self._call(
            self._record, check_key(run_key, "run_key"), _check_index(index), _check_row(row)
        )

    async def record_async(self, run_key: str, index: int, row: str) -> bool:
        """Async :meth:`record`."""
        return await self._acall(
            self._record, check_key(run_key, "run_key"), _check_index(index), _check_row(row)
        )

    def record_many(self, run_key: str, items: Iterable[tuple[int, str]]) -> int:
        """Store many ``(index, row)`` pairs in one transaction; durable on return.

        All or nothing: on an error no pair is stored. Indexes that already have a row
        (including repeats inside ``items``: the first wins) are ignored.

        Returns:
            How many rows were newly stored.
        """
        return self._call(self._record_many, check_key(run_key, "run_key"), _check_items(items))

    async def record_many_async(self, run_key: str, items: Iterable[tuple[int, str]]) -> int:
        """Async :meth:`record_many` (``items`` is consumed on the calling thread)."""
        return await self._acall(
            self._record_many, check_key(run_key, "run_key"), _check_items(items)
        )

    def done_indexes(self, run_key: str) -> DoneIndexes:
        """Return the indexes that have a row, as a compact :class:`DoneIndexes` set.

        A sorted ``int64`` array inside (8 bytes per index; one million indexes load in a
        fraction of a second); use ``i in done``, ``len(done)``, ``done.missing(total)``.
        """
        return self._call(self._done_indexes, check_key(run_key, "run_key"))

    async def done_indexes_async(self, run_key: str) -> DoneIndexes:
        """Async :meth:`done_indexes`."""
        return await self._acall(self._done_indexes, check_key(run_key, "run_key"))

    def count(self, run_key: str) -> int:
        """Return how many indexes of the run have a row."""
        return self._call(self._count, check_key(run_key, "run_key"))

    def iter_rows(self, run_key: str, order: RowOrder = "input") -> Iterator[tuple[int, str]]:
        """Iterate ``(index, row)`` pairs by input index or by completion (insertion) order.

        Rows are read in pages, so memory stays flat for millions of rows and no read
        transaction is held between pages; rows recorded meanwhile may or may not appear.
        The run must exist (checked now, not at the first ``next``).
        """
        key = check_key(run_key, "run_key")
        if order not in ("input", "completion"):
            raise InputError(f"must be 'input' or 'completion', got {order!r}", source="order")
        run_id = self._call(self._run_id, key)
        return self._pages(run_id, order)

    def forget_rows(self, where: Callable[[str], bool]) -> int:
        """Delete every row (of every run) whose JSON text ``where`` accepts; all or nothing.

        The runs that lose rows are marked incomplete, so rerunning their command redoes
        exactly those rows (``nem-llm review import`` reopens the reviewed rows this way).

        Returns:
            How many rows were deleted.
        """
        return self._call(self._forget_rows, where)

    # -- worker-thread bodies ----------------------------------------------------------

    def _find_run(self, run_key: str) -> int | None:
        run_id = self._run_ids.get(run_key)
        if run_id is None:
            row = (
                self._connection()
                .execute("SELECT run_id FROM runs WHERE run_key = ?", (run_key,))
                .fetchone()
            )
            if row is None:
                return None
            run_id = self._run_ids[run_key] = int(row[0])
        return run_id

    def _run_id(self, run_key: str) -> int:
        run_id = self._find_run(run_key)
        if run_id is None:
            raise StoreError(
                f"no run {run_key!r} in {self._path}; call open_run first", path=self._path
            )
        return run_id

    def _open_run(self, run_key: str, meta_json: str) -> None:
        conn = self._connection()
        with immediate(conn):
            row = conn.execute(
                "SELECT run_id, meta FROM runs WHERE run_key = ?", (run_key,)
            ).fetchone()
            if row is None:
                cur = conn.execute(
                    "INSERT INTO runs (run_key, meta, created_at) VALUES (?, ?, ?)",
                    (run_key, meta_json, time.time()),
                )
                run_id = cur.lastrowid
                assert run_id is not None
            else:
                run_id, stored = int(row[0]), str(row[1])
                if json.loads(stored) != json.loads(meta_json):
                    raise StoreError(
                        f"run {run_key!r} in {self._path} was started with different settings "
                        f"({_meta_diff(json.loads(stored), json.loads(meta_json))}); rerun "
                        "with the original settings to resume, or use another checkpoint "
                        "file to start over",
                        path=self._path,
                    )
        self._run_ids[run_key] = run_id

    def _mark_complete(self, run_key: str) -> None:
        self._connection().execute(
            "UPDATE runs SET completed_at = ? WHERE run_id = ?",
            (time.time(), self._run_id(run_key)),
        )

    def _is_complete(self, run_key: str) -> bool:
        row = (
            self._connection()
            .execute("SELECT completed_at FROM runs WHERE run_id = ?", (self._run_id(run_key),))
            .fetchone()
        )
        return row is not None and row[0] is not None

    def _record(self, run_key: str, index: int, row: str) -> bool:
        cur = self._connection().execute(
            "INSERT INTO run_rows (run_id, idx, row) VALUES (?, ?, ?)"
            " ON CONFLICT (run_id, idx) DO NOTHING",
            (self._run_id(run_key), index, row),
        )
        return cur.rowcount == 1

    def _record_many(self, run_key: str, items: list[tuple[int, str]]) -> int:
        conn = self._connection()
        run_id = self._run_id(run_key)
        with immediate(conn):
            before = conn.total_changes
            conn.executemany(
                "INSERT INTO run_rows (run_id, idx, row) VALUES (?, ?, ?)"
                " ON CONFLICT (run_id, idx) DO NOTHING",
                ((run_id, index, row) for index, row in items),
            )
            return conn.total_changes - before

    def _forget_rows(self, where: Callable[[str], bool]) -> int:
        conn = self._connection()
        with immediate(conn):
            doomed = [
                (seq, run_id)
                for seq, run_id, row in conn.execute("SELECT seq, run_id, row FROM run_rows")
                if where(row)
            ]
            conn.executemany("DELETE FROM run_rows WHERE seq = ?", ((s,) for s, _ in doomed))
            conn.executemany(
                "UPDATE runs SET completed_at = NULL WHERE run_id = ?",
                ((r,) for r in {r for _, r in doomed}),
            )
        return len(doomed)

    def _done_indexes(self, run_key: str) -> DoneIndexes:
        conn = self._connection()
        run_id = self._run_id(run_key)
        # one read transaction so the count and the scan see the same snapshot
        conn.execute("BEGIN")
        try:
            n = int(
                conn.execute(
                    "SELECT count(*) FROM run_rows WHERE run_id = ?", (run_id,)
                ).fetchone()[0]
            )
            cur = conn.execute("SELECT idx FROM run_rows WHERE run_id = ? ORDER BY idx", (run_id,))
            array = np.fromiter(itertools.chain.from_iterable(cur), dtype=np.int64, count=n)
        finally:
            conn.execute("COMMIT")
        return DoneIndexes._from_sorted_unique(array)

    def _count(self, run_key: str) -> int:
        return int(
            self._connection()
            .execute("SELECT count(*) FROM run_rows WHERE run_id = ?", (self._run_id(run_key),))
            .fetchone()[0]
        )

    def _page(self, run_id: int, order: RowOrder, after: int) -> list[tuple[int, int, str]]:
        if order == "input":
            sql = (
                "SELECT idx, idx, row FROM run_rows WHERE run_id = ? AND idx > ?"
                " ORDER BY idx LIMIT ?"
            )
        else:
            sql = (
                "SELECT seq, idx, row FROM run_rows WHERE run_id = ? AND seq > ?"
                " ORDER BY seq LIMIT ?"
            )
        return self._connection().execute(sql, (run_id, after, _PAGE_SIZE)).fetchall()

    def _pages(self, run_id: int, order: RowOrder) -> Iterator[tuple[int, str]]:
        after = -1
        while True:
            page = self._call(self._page, run_id, order, after)
            for _, index, row in page:
                yield index, row
            if len(page) < _PAGE_SIZE:
                return
            after = page[-1][0]


def _check_index(index: object) -> int:
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise InputError(f"must be an int, got {type(index).__name__}", source="index")
    value = int(index)
    if not 0 <= value <= _MAX_INDEX:
        raise InputError(f"must be between 0 and 2**63-1, got {value}", source="index")
    return value


def _check_row(row: object) -> str:
    if not isinstance(row, str):
        raise InputError(f"must be a str (JSON text), got {type(row).__name__}", source="row")
    return row


def _check_items(items: Iterable[tuple[int, str]]) -> list[tuple[int, str]]:
    checked: list[tuple[int, str]] = []
    for n, item in enumerate(items):
        try:
            index, row = item
        except (TypeError, ValueError):
            raise InputError(
                f"must be an (index, row) pair, got {item!r:.80}", source=f"items[{n}]"
            ) from None
        checked.append((_check_index(index), _check_row(row)))
    return checked


def _canonical_meta(meta: object) -> str:
    if not isinstance(meta, Mapping):
        raise InputError(f"must be a mapping, got {type(meta).__name__}", source="meta")
    for key in meta:
        if not isinstance(key, str):
            raise InputError(f"keys must be str, got {key!r}", source="meta")
    try:
        return json.dumps(dict(meta), sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"must be JSON-serializable: {exc}", source="meta") from exc


def _meta_diff(stored: dict[str, Any], given: dict[str, Any]) -> str:
    missing = object()
    parts = []
    for key in sorted(set(stored) | set(given)):
        old, new = stored.get(key, missing), given.get(key, missing)
        if old != new:
            shown_old = "<absent>" if old is missing else f"{old!r:.60}"
            shown_new = "<absent>" if new is missing else f"{new!r:.60}"
            parts.append(f"{key}: stored {shown_old}, given {shown_new}")
    return "; ".join(parts[:5]) + ("; ..." if len(parts) > 5 else "")
