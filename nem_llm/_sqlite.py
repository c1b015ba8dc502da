"""SQLite plumbing shared by the decision cache (``llm.cache``) and run checkpoints
(``jobs.checkpoint``): one file format, one threading model, one error type.

Stores may share a file; each creates only its own tables next to ``schema_version``.

Threading model: every store owns a ``ThreadPoolExecutor(max_workers=1)``, and its SQLite
connection is created, used and closed only on that one worker thread. Sync methods submit
to the worker and wait; the async twins (``get_async``, ``record_async``, ...) await the same
submission, so the event loop never blocks on disk I/O. We prefer this to
``check_same_thread=False`` plus a lock because the connection then never crosses threads
at all (no lock to forget, no lock held across an ``await``), calls run in submission order
(a ``put_async`` followed by a ``get_async`` sees the write), and every method is safe to call from
any thread. The price is one thread hop per call (tens of microseconds), small next to a
commit.

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
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import ClassVar, ParamSpec, TypeVar

from .errors import InputError, NemLLMError

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "SCHEMA_VERSION",
    "SQLiteStore",
    "StoreError",
    "check_key",
    "immediate",
]

#: Version of the table layout written by this module (stored in ``schema_version``).
SCHEMA_VERSION = 1

#: Seconds a call waits for another connection's write lock before giving up.
DEFAULT_TIMEOUT_S = 10.0
MEMORY = ":memory:"

_P = ParamSpec("_P")
_T = TypeVar("_T")
_S = TypeVar("_S", bound="SQLiteStore")

_VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"


class StoreError(NemLLMError):
    """A store could not be opened, read or written; the message names the file.

    Args:
        message: What went wrong, including the path.
        path: The database file (``":memory:"`` for an in-memory store).
    """

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """Run a block in one write transaction (taken up front, so it waits for the lock)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


class SQLiteStore:
    """Shared plumbing: open/validate the file, own the connection on one worker thread.

    Subclasses list their ``CREATE ... IF NOT EXISTS`` statements in ``TABLES``.
    """

    TABLES: ClassVar[tuple[str, ...]] = ()

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT_S):
        target = os.fspath(path)
        if not isinstance(target, str):
            raise InputError("must be a str path or os.PathLike[str]", source="path")
        self._path = target if target == MEMORY else str(Path(target).expanduser())
        self._timeout = float(timeout)
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._close_lock = threading.Lock()
        if target != MEMORY:
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

        Calls already submitted (pending ``put_async``/``record_async``) finish first. Idempotent.
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
        # and commits before execute() returns; multi-statement writes use immediate().
        conn = sqlite3.connect(self._path, timeout=self._timeout, isolation_level=None)
        try:
            mode = str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]).lower()
            if self._path != MEMORY and mode != "wal":
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
        with immediate(conn):
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
            for statement in (_VERSION_TABLE, *self.TABLES):
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


def check_key(key: object, name: str = "key") -> str:
    if not isinstance(key, str) or not key:
        raise InputError(f"must be a non-empty str, got {key!r}", source=name)
    return key
