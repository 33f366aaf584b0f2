"""A small trio-native wrapper around sqlite in WAL mode.

aiosqlite is built on asyncio futures, so it cannot run under trio. Here each database has one
connection, and every operation on it runs in a worker thread under a capacity limiter of one, so
the connection is only ever used by one thread at a time (sqlite's own rule). Operations are not
abandoned on cancellation: a transaction that has started always commits or rolls back before the
caller sees ``Cancelled``, so the file is never left with a half-applied change.

Durability: WAL with ``synchronous=FULL``, so a transaction that returned is on disk, and nothing
acknowledged to a peer after a commit is lost in a crash.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import trio

from node.errors import StoreError

log = logging.getLogger("vmlend.node.store")

T = TypeVar("T")
Params = Sequence[Any] | dict[str, Any]


class Database:
    """One sqlite file. Open it with :meth:`open`; all methods are safe to call from any task."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self._limiter = trio.CapacityLimiter(1)
        self.path = path
        self._closed = False

    @classmethod
    @asynccontextmanager
    async def open(cls, path: Path, migrations: Sequence[str] = ()) -> AsyncIterator[Database]:
        """Open (creating if needed) and migrate ``path``; close it on exit.

        ``migrations[i]`` is the SQL script that takes the schema from version ``i`` to ``i + 1``;
        the current version lives in ``PRAGMA user_version``. A database newer than the code is
        refused rather than guessed at.
        """
        conn = await trio.to_thread.run_sync(_connect, path)
        db = cls(conn, path)
        try:
            steps = list(migrations)
            await db._run(lambda conn: _migrate(conn, steps, path.name))
            yield db
        finally:
            with trio.CancelScope(shield=True):
                await db.close()

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await trio.to_thread.run_sync(self._conn.close, limiter=self._limiter)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise StoreError(f"database {self.path} is closed")

        def call() -> T:
            try:
                return fn(self._conn)
            except sqlite3.Error as e:
                raise StoreError(f"{self.path}: {e}") from e

        return await trio.to_thread.run_sync(call, limiter=self._limiter)

    async def execute(self, sql: str, params: Params = ()) -> int:
        """Run one statement in its own transaction; return the number of rows changed."""

        def op(conn: sqlite3.Connection) -> int:
            with _transaction(conn):
                return conn.execute(sql, params).rowcount

        return await self._run(op)

    async def fetchall(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        return await self._run(lambda conn: conn.execute(sql, params).fetchall())

    async def fetchone(self, sql: str, params: Params = ()) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = await self._run(
            lambda conn: conn.execute(sql, params).fetchone()
        )
        return row

    async def transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` inside ``BEGIN IMMEDIATE`` ... ``COMMIT`` (rolled back if it raises).

        ``fn`` runs in the database's thread and must not touch trio.
        """

        def op(conn: sqlite3.Connection) -> T:
            with _transaction(conn):
                return fn(conn)

        return await self._run(op)


class _transaction:
    """BEGIN IMMEDIATE so writers queue up front instead of failing to upgrade a read lock."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error:
                # A failed COMMIT (a deferred foreign key, a full disk) leaves the transaction
                # open, and every later BEGIN would fail: roll back so the caller's error means
                # "nothing applied" and the connection stays usable.
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
        elif self._conn.in_transaction:
            # Some errors (INSERT OR ROLLBACK, RAISE(ROLLBACK), SQLITE_FULL) have rolled back
            # already; a second ROLLBACK would fail and hide the error that caused it.
            self._conn.execute("ROLLBACK")


def _connect(path: Path) -> sqlite3.Connection:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves; check_same_thread=False is safe
        # because the limiter serialises every use of the connection.
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    except sqlite3.Error as e:
        raise StoreError(f"cannot open database {path}: {e}") from e
    except OSError as e:
        raise StoreError(f"cannot open database {path}: {e.strerror}") from e
    try:
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise StoreError(f"{path}: could not enable WAL (journal_mode is {mode})")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
    except sqlite3.Error as e:
        conn.close()
        raise StoreError(f"cannot set up database {path}: {e}") from e
    except StoreError:
        conn.close()
        raise
    return conn


def _migrate(conn: sqlite3.Connection, migrations: list[str], name: str) -> None:
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(migrations):
        raise StoreError(
            f"database schema version {version} is newer than this vmlend knows "
            f"({len(migrations)}); refusing to touch it"
        )
    for number in range(version, len(migrations)):
        log.info("%s: applying migration %d of %d", name, number + 1, len(migrations))
        # executescript would COMMIT first; run the statements inside our own transaction so a
        # migration is all-or-nothing together with its version bump.
        with _transaction(conn):
            for statement in _split_sql(migrations[number]):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number + 1}")


def _split_sql(script: str) -> list[str]:
    # Split at every ';' that sqlite says ends a statement (not one inside a string, a comment or
    # a trigger body), so several statements on one line work too.
    statements: list[str] = []
    current = ""
    pieces = script.split(";")
    for piece in pieces[:-1]:
        current += piece + ";"
        if sqlite3.complete_statement(current):
            if current.strip(" \t\r\n;"):
                statements.append(current.strip())
            current = ""
    current += pieces[-1]
    if current.strip():
        # What follows the last ';': a trailing comment, a last statement without its ';', or
        # an unfinished one (an open string or trigger), which is refused.
        if not sqlite3.complete_statement(current + "\n;"):
            raise StoreError(f"incomplete SQL statement in migration: {current.strip()[:80]!r}")
        statements.append(current.strip())
    return statements
