"""SQLite persistence: a decision cache for LLM answers and checkpoints for resumable runs.

Two stores, one file format (they may share a file; each uses its own tables):

- :class:`DecisionCache` maps :func:`decision_key` (normalized query, candidate ids, model,
  prompt version) to a :class:`CachedDecision`, so a repeated query or a rerun never pays
  for the same LLM decision twice.
- :class:`RunStore` checkpoints a batch run row by row: a run killed half-way (even with
  SIGKILL) and restarted with the same command skips every row whose ``record`` returned.

Threading model (one for both classes): every store owns a
``ThreadPoolExecutor(max_workers=1)``, and its SQLite connection is created, used and
closed only on that one worker thread. Sync methods submit to the worker and wait; the
async twins (``aget``, ``arecord``, ...) await the same submission, so the event loop never
blocks on disk I/O. We prefer this to ``check_same_thread=False`` plus a lock because the
connection then never crosses threads at all (no lock to forget, no lock held across an
``await``), calls run in submission order (an ``aput`` followed by an ``aget`` sees the
write), and every method is safe to call from any thread. The price is one thread hop per
call (tens of microseconds), small next to a commit.

Durability: the database runs in WAL mode with ``synchronous=NORMAL`` and every write
method commits before it returns. A commit in WAL mode has been written (``write(2)``) to
the ``-wal`` file, i.e. handed to the operating system, when ``sqlite3`` returns, so it
survives the process dying in any way (SIGKILL, OOM kill, a crash). ``NORMAL`` skips only
the ``fsync`` per commit, so an OS crash or power loss can lose the last few commits (the
database stays consistent); that is the trade we want: thousands of records per second
instead of tens.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, ParamSpec, TypeVar

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from .errors import InputError, NemLLMError
from .models import Usage

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "SCHEMA_VERSION",
    "CachedDecision",
    "DecisionCache",
    "DoneIndexes",
    "RowOrder",
    "RunStore",
    "StoreError",
    "decision_key",
]

#: Version of the table layout written by this module (stored in ``schema_version``).
SCHEMA_VERSION = 1

#: Seconds a call waits for another connection's write lock before giving up.
DEFAULT_TIMEOUT_S = 10.0

RowOrder = Literal["input", "completion"]

# rows fetched per worker call by RunStore.iter_rows
_PAGE_SIZE = 2000
_MAX_INDEX = 2**63 - 1
_MEMORY = ":memory:"

_P = ParamSpec("_P")
_T = TypeVar("_T")
_S = TypeVar("_S", bound="_SQLiteStore")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS decisions (
        key TEXT PRIMARY KEY,
        entity_id TEXT,
        confidence REAL,
        reason TEXT NOT NULL,
        usage TEXT NOT NULL,
        model TEXT NOT NULL,
        created_at REAL NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS runs (
        run_id INTEGER PRIMARY KEY,
        run_key TEXT NOT NULL UNIQUE,
        meta TEXT NOT NULL,
        created_at REAL NOT NULL,
        completed_at REAL
    )""",
    # seq aliases the rowid: it grows with every insert (nothing is ever deleted), so it is
    # the completion order; (run_id, idx) is unique and gives the input order.
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


class StoreError(NemLLMError):
    """A store could not be opened, read or written; the message names the file.

    Args:
        message: What went wrong, including the path.
        path: The database file (``":memory:"`` for an in-memory store).
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


def decision_key(
    normalized_query: str, candidate_ids: Sequence[str], model: str, prompt_version: str
) -> str:
    """Return the cache key of one LLM decision: a sha256 hex digest of its inputs.

    The parts are encoded as one JSON list ``[query, [ids...], model, prompt_version]``, so
    no two different inputs share an encoding. Candidate order matters as given (the prompt
    lists candidates in that order). Anything else that changes the prompt (entity names,
    descriptions, the template) must be reflected in ``prompt_version`` by the caller.

    Example:
        >>> decision_key("usa", ["US", "UM"], "gpt-4o-mini", "v1")[:12]
        '697d28410abf'
    """
    if not isinstance(normalized_query, str):
        raise InputError(
            f"must be a str, got {type(normalized_query).__name__}", source="normalized_query"
        )
    if isinstance(candidate_ids, (str, bytes)) or not isinstance(candidate_ids, Sequence):
        raise InputError(
            f"must be a sequence of str ids, got {type(candidate_ids).__name__}",
            source="candidate_ids",
        )
    ids = list(candidate_ids)
    for i, cid in enumerate(ids):
        if not isinstance(cid, str):
            raise InputError(
                f"must be a str, got {type(cid).__name__}", source=f"candidate_ids[{i}]"
            )
    for name, value in (("model", model), ("prompt_version", prompt_version)):
        if not isinstance(value, str):
            raise InputError(f"must be a str, got {type(value).__name__}", source=name)
    # ensure_ascii keeps the encoding total (lone surrogates become escapes, not errors)
    payload = json.dumps([normalized_query, ids, model, prompt_version], separators=(",", ":"))
    return hashlib.sha256(payload.encode("ascii")).hexdigest()


class CachedDecision(BaseModel):
    """One LLM decision as the cache keeps it.

    ``entity_id`` is the chosen catalog id, or ``None`` when the model answered "none"
    (novel). ``usage`` is what the decision cost when it was first made; a cache hit costs
    nothing.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    entity_id: str | None
    confidence: float | None = None
    reason: str = ""
    usage: Usage = Field(default_factory=Usage)
    model: str
    created_at: float = Field(default_factory=time.time)


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


@contextmanager
def _immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """Run a block in one write transaction (taken up front, so it waits for the lock)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


class _SQLiteStore:
    """Shared plumbing: open/validate the file, own the connection on one worker thread."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT_S):
        target = os.fspath(path)
        if not isinstance(target, str):
            raise InputError("must be a str path or os.PathLike[str]", source="path")
        self._path = target if target == _MEMORY else str(Path(target).expanduser())
        self._timeout = float(timeout)
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._close_lock = threading.Lock()
        if target != _MEMORY:
            _check_location(Path(self._path))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nem_llm.store")
        try:
            self._executor.submit(self._guarded, self._open).result()
        except BaseException:
            self._executor.shutdown(wait=True)
            self._closed = True
            raise

    # -- lifecycle -------------------------------------------------------------------

    @property
    def path(self) -> str:
        """The database file (``":memory:"`` for an in-memory store)."""
        return self._path

    def close(self) -> None:
        """Close the connection and stop the worker thread; later calls raise StoreError.

        Calls already submitted (pending ``aput``/``arecord``) finish first. Idempotent.
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._executor.submit(self._close_connection).result()
        finally:
            self._executor.shutdown(wait=True)

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"{type(self).__name__}({self._path!r}, {state})"

    # -- running work on the connection's thread -------------------------------------

    def _submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> Future[_T]:
        if self._closed:
            raise StoreError(f"{type(self).__name__} for {self._path} is closed", path=self._path)
        try:
            return self._executor.submit(self._guarded, fn, *args, **kwargs)
        except RuntimeError as exc:  # shut down between the check and the submit
            raise StoreError(
                f"{type(self).__name__} for {self._path} is closed", path=self._path
            ) from exc

    def _call(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        return self._submit(fn, *args, **kwargs).result()

    async def _acall(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        # If the awaiting task is cancelled before the worker starts the call, the call is
        # dropped; once started it runs to completion (a write may or may not have landed).
        return await asyncio.wrap_future(self._submit(fn, *args, **kwargs))

    def _guarded(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run ``fn`` on the worker thread, turning sqlite3 errors into StoreError."""
        try:
            return fn(*args, **kwargs)
        except sqlite3.Error as exc:
            raise self._translate(exc) from exc

    def _translate(self, exc: sqlite3.Error) -> StoreError:
        text = str(exc)
        code = getattr(exc, "sqlite_errorname", "")
        if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text or "busy" in text:
            return StoreError(
                f"database is locked: {self._path} is being written by another process or "
                f"connection (gave up after {self._timeout:g}s); wait for it to finish or "
                "use another file",
                path=self._path,
            )
        if code == "SQLITE_NOTADB" or "not a database" in text or "malformed" in text:
            return StoreError(
                f"{self._path} is not a SQLite database (or is corrupt): {text}", path=self._path
            )
        if code == "SQLITE_CANTOPEN" or "unable to open" in text:
            return StoreError(f"cannot open {self._path}: {text}", path=self._path)
        return StoreError(f"{self._path}: {text}", path=self._path)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:  # pragma: no cover - guarded by _closed
            raise StoreError(f"{type(self).__name__} for {self._path} is closed", path=self._path)
        return self._conn

    # -- worker-thread bodies ----------------------------------------------------------

    def _open(self) -> None:
        # isolation_level=None: autocommit, so a single statement is its own transaction
        # and commits before execute() returns; multi-statement writes use _immediate().
        conn = sqlite3.connect(self._path, timeout=self._timeout, isolation_level=None)
        try:
            mode = str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower()
            if self._path != _MEMORY and mode != "wal":
                raise StoreError(
                    f"{self._path}: could not switch to WAL journal mode (got {mode!r}); "
                    "is the file on a network file system?",
                    path=self._path,
                )
            conn.execute("PRAGMA synchronous=NORMAL")
            self._init_schema(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        with _immediate(conn):
            tables = {
                str(name)
                for (name,) in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                    " AND name NOT LIKE 'sqlite_%'"
                )
            }
            version: int | None = None
            if "schema_version" in tables:
                version = conn.execute("SELECT max(version) FROM schema_version").fetchone()[0]
            elif tables:
                shown = ", ".join(sorted(tables)[:5])
                raise StoreError(
                    f"{self._path} is a SQLite database but not a nem_llm store "
                    f"(it has tables {shown}); refusing to modify it",
                    path=self._path,
                )
            if version is not None and version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self._path} was written by a newer nem_llm (schema version {version}; "
                    f"this version reads up to {SCHEMA_VERSION}); upgrade nem_llm",
                    path=self._path,
                )
            for statement in _SCHEMA:
                conn.execute(statement)
            if version is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _check_location(path: Path) -> None:
    """Raise StoreError early for a path SQLite would reject with a vague message."""
    parent = path.parent
    if not parent.is_dir():
        raise StoreError(
            f"cannot open store {path}: directory {parent} does not exist", path=str(path)
        )
    if path.is_dir():
        raise StoreError(f"cannot open store {path}: it is a directory", path=str(path))


class DecisionCache(_SQLiteStore):
    """Persistent map from :func:`decision_key` to :class:`CachedDecision`.

    Args:
        path: Database file (created if missing; its directory must exist), or
            ``":memory:"`` for a private in-memory cache (tests).
        timeout: Seconds to wait for another writer's lock before raising StoreError.

    Every method is thread-safe; ``aget``/``aput`` run on the store's worker thread and
    never block the event loop. ``put`` overwrites an existing entry (latest wins).

    Example:
        >>> with DecisionCache(":memory:") as cache:
        ...     key = decision_key("usa", ["US", "UM"], "gpt-4o-mini", "v1")
        ...     cache.put(key, CachedDecision(entity_id="US", model="gpt-4o-mini"))
        ...     cache.get(key).entity_id
        'US'
    """

    def get(self, key: str) -> CachedDecision | None:
        """Return the decision stored under ``key``, or None on a miss."""
        return self._call(self._get, _check_key(key))

    def put(self, key: str, decision: CachedDecision) -> None:
        """Store ``decision`` under ``key`` (replacing any previous one); durable on return."""
        self._call(self._put, _check_key(key), _check_decision(decision))

    async def aget(self, key: str) -> CachedDecision | None:
        """Async :meth:`get`: runs on the store's worker thread."""
        return await self._acall(self._get, _check_key(key))

    async def aput(self, key: str, decision: CachedDecision) -> None:
        """Async :meth:`put`: runs on the store's worker thread; durable once awaited."""
        await self._acall(self._put, _check_key(key), _check_decision(decision))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._call(self._get, key) is not None

    def __len__(self) -> int:
        return self._call(self._len)

    # worker-thread bodies

    def _get(self, key: str) -> CachedDecision | None:
        row = (
            self._connection()
            .execute(
                "SELECT entity_id, confidence, reason, usage, model, created_at"
                " FROM decisions WHERE key = ?",
                (key,),
            )
            .fetchone()
        )
        if row is None:
            return None
        entity_id, confidence, reason, usage, model, created_at = row
        try:
            return CachedDecision(
                entity_id=entity_id,
                confidence=confidence,
                reason=reason,
                usage=Usage.model_validate_json(usage),
                model=model,
                created_at=created_at,
            )
        except ValueError as exc:  # pydantic.ValidationError is a ValueError
            raise StoreError(
                f"{self._path}: cached decision {key!r} is unreadable: {exc}", path=self._path
            ) from exc

    def _put(self, key: str, decision: CachedDecision) -> None:
        self._connection().execute(
            "INSERT OR REPLACE INTO decisions"
            " (key, entity_id, confidence, reason, usage, model, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                key,
                decision.entity_id,
                decision.confidence,
                decision.reason,
                decision.usage.model_dump_json(),
                decision.model,
                decision.created_at,
            ),
        )

    def _len(self) -> int:
        return int(self._connection().execute("SELECT count(*) FROM decisions").fetchone()[0])


class RunStore(_SQLiteStore):
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
        self._call(self._open_run, _check_key(run_key, "run_key"), _canonical_meta(meta))

    async def aopen_run(self, run_key: str, meta: Mapping[str, Any]) -> None:
        """Async :meth:`open_run`."""
        await self._acall(self._open_run, _check_key(run_key, "run_key"), _canonical_meta(meta))

    def has_run(self, run_key: str) -> bool:
        """Return True if a run with this key exists in the file."""
        return self._call(self._find_run, _check_key(run_key, "run_key")) is not None

    def mark_complete(self, run_key: str) -> None:
        """Mark the run as finished (every input has its row)."""
        self._call(self._mark_complete, _check_key(run_key, "run_key"))

    async def amark_complete(self, run_key: str) -> None:
        """Async :meth:`mark_complete`."""
        await self._acall(self._mark_complete, _check_key(run_key, "run_key"))

    def is_complete(self, run_key: str) -> bool:
        """Return True if :meth:`mark_complete` was called for this run."""
        return self._call(self._is_complete, _check_key(run_key, "run_key"))

    # -- rows --------------------------------------------------------------------------

    def record(self, run_key: str, index: int, row: str) -> bool:
        """Store the output ``row`` (JSON text) of input ``index``; durable on return.

        Returns:
            True if stored, False if this index already had a row (the new one is ignored).
        """
        return self._call(
            self._record, _check_key(run_key, "run_key"), _check_index(index), _check_row(row)
        )

    async def arecord(self, run_key: str, index: int, row: str) -> bool:
        """Async :meth:`record`."""
        return await self._acall(
            self._record, _check_key(run_key, "run_key"), _check_index(index), _check_row(row)
        )

    def record_many(self, run_key: str, items: Iterable[tuple[int, str]]) -> int:
        """Store many ``(index, row)`` pairs in one transaction; durable on return.

        All or nothing: on an error no pair is stored. Indexes that already have a row
        (including repeats inside ``items``: the first wins) are ignored.

        Returns:
            How many rows were newly stored.
        """
        return self._call(self._record_many, _check_key(run_key, "run_key"), _check_items(items))

    async def arecord_many(self, run_key: str, items: Iterable[tuple[int, str]]) -> int:
        """Async :meth:`record_many` (``items`` is consumed on the calling thread)."""
        return await self._acall(
            self._record_many, _check_key(run_key, "run_key"), _check_items(items)
        )

    def done_indexes(self, run_key: str) -> DoneIndexes:
        """Return the indexes that have a row, as a compact :class:`DoneIndexes` set.

        A sorted ``int64`` array inside (8 bytes per index; one million indexes load in a
        fraction of a second); use ``i in done``, ``len(done)``, ``done.missing(total)``.
        """
        return self._call(self._done_indexes, _check_key(run_key, "run_key"))

    async def adone_indexes(self, run_key: str) -> DoneIndexes:
        """Async :meth:`done_indexes`."""
        return await self._acall(self._done_indexes, _check_key(run_key, "run_key"))

    def count(self, run_key: str) -> int:
        """Return how many indexes of the run have a row."""
        return self._call(self._count, _check_key(run_key, "run_key"))

    def iter_rows(self, run_key: str, order: RowOrder = "input") -> Iterator[tuple[int, str]]:
        """Iterate ``(index, row)`` pairs by input index or by completion (insertion) order.

        Rows are read in pages, so memory stays flat for millions of rows and no read
        transaction is held between pages; rows recorded meanwhile may or may not appear.
        The run must exist (checked now, not at the first ``next``).
        """
        key = _check_key(run_key, "run_key")
        if order not in ("input", "completion"):
            raise InputError(f"must be 'input' or 'completion', got {order!r}", source="order")
        run_id = self._call(self._run_id, key)
        return self._pages(run_id, order)

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
        with _immediate(conn):
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
        with _immediate(conn):
            before = conn.total_changes
            conn.executemany(
                "INSERT INTO run_rows (run_id, idx, row) VALUES (?, ?, ?)"
                " ON CONFLICT (run_id, idx) DO NOTHING",
                ((run_id, index, row) for index, row in items),
            )
            return conn.total_changes - before

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


# -- argument checks (run on the calling thread, so errors point at the caller) ------------


def _check_key(key: object, name: str = "key") -> str:
    if not isinstance(key, str) or not key:
        raise InputError(f"must be a non-empty str, got {key!r}", source=name)
    return key


def _check_decision(decision: object) -> CachedDecision:
    if not isinstance(decision, CachedDecision):
        raise InputError(
            f"must be a CachedDecision, got {type(decision).__name__}", source="decision"
        )
    return decision


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
