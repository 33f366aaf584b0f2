"""node.store: migrations, transactions, concurrency, cancellation, and a real SIGKILL mid-write."""

from __future__ import annotations

import functools
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from node.errors import StoreError
from node.store import Database
from tests.store_helpers import crash_writer

HELPER = Path(crash_writer.__file__)
SCHEMA = ["CREATE TABLE rows (txn INTEGER NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (txn, seq));"]
ROWS_PER_TXN = 5


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    async with Database.open(tmp_path / "state.db", SCHEMA) as database:
        yield database


def insert_txn(conn: sqlite3.Connection, txn: int, rows: int = ROWS_PER_TXN) -> int:
    conn.executemany("INSERT INTO rows VALUES (?, ?)", [(txn, seq) for seq in range(rows)])
    return txn


async def rows_per_txn(db: Database) -> dict[int, int]:
    return dict(await db.fetchall("SELECT txn, COUNT(*) FROM rows GROUP BY txn"))


async def assert_all_or_nothing(db: Database, rows: int = ROWS_PER_TXN) -> dict[int, int]:
    counts = await rows_per_txn(db)
    assert {txn: n for txn, n in counts.items() if n != rows} == {}
    return counts


# --- opening and migrations ---------------------------------------------------------------------

LOG_MIGRATIONS = [
    "CREATE TABLE log (step INTEGER); INSERT INTO log VALUES (1);",
    "INSERT INTO log VALUES (2);\nCREATE TABLE second (x);",
    "INSERT INTO log VALUES (3)",  # the last statement may lack its ';'
]


def user_version(path: Path) -> int:
    # Plain sqlite3, not Database.open: opening with fewer migrations is (rightly) refused.
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


async def test_wal_and_full_sync(db: Database) -> None:
    assert await db.fetchone("PRAGMA journal_mode") == ("wal",)
    assert await db.fetchone("PRAGMA synchronous") == (2,)  # FULL
    assert await db.fetchone("PRAGMA foreign_keys") == (1,)


async def test_migrations_run_in_order_and_once(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    async with Database.open(path, LOG_MIGRATIONS[:2]) as db:
        assert await db.fetchall("SELECT step FROM log ORDER BY rowid") == [(1,), (2,)]
    async with Database.open(path, LOG_MIGRATIONS[:2]) as db:
        assert await db.fetchall("SELECT step FROM log ORDER BY rowid") == [(1,), (2,)]
    async with Database.open(path, LOG_MIGRATIONS) as db:
        assert await db.fetchall("SELECT step FROM log ORDER BY rowid") == [(1,), (2,), (3,)]
    assert user_version(path) == 3


async def test_a_database_newer_than_the_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    async with Database.open(path, LOG_MIGRATIONS):
        pass
    with pytest.raises(StoreError, match="version 3 is newer than this vmlend knows \\(2\\)"):
        async with Database.open(path, LOG_MIGRATIONS[:2]):
            pytest.fail("a newer database must not open")
    assert user_version(path) == 3


async def test_a_failing_migration_is_all_or_nothing(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    broken = [LOG_MIGRATIONS[0], "CREATE TABLE second (x); INSERT INTO nowhere VALUES (1);"]
    with pytest.raises(StoreError, match="no such table: nowhere"):
        async with Database.open(path, broken):
            pytest.fail("a failed migration must not open")
    assert user_version(path) == 1
    async with Database.open(path, LOG_MIGRATIONS) as db:  # the fixed release goes on from 1
        assert await db.fetchall("SELECT step FROM log ORDER BY rowid") == [(1,), (2,), (3,)]


async def test_an_unfinished_migration_statement_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="incomplete SQL statement"):
        async with Database.open(tmp_path / "m.db", ["CREATE TABLE t (x TEXT DEFAULT 'oops);"]):
            pytest.fail("must not open")


async def test_semicolons_in_strings_comments_and_triggers_do_not_split(tmp_path: Path) -> None:
    migration = """
        CREATE TABLE t (x TEXT DEFAULT 'a;b'); -- a comment; with a semicolon
        CREATE TABLE audit (x TEXT);
        CREATE TRIGGER t_audit AFTER INSERT ON t BEGIN
            INSERT INTO audit VALUES (new.x); INSERT INTO audit VALUES ('twice');
        END;
        /* trailing; comment */
    """
    async with Database.open(tmp_path / "m.db", [migration]) as db:
        await db.execute("INSERT INTO t DEFAULT VALUES")
        assert await db.fetchall("SELECT x FROM audit ORDER BY rowid") == [("a;b",), ("twice",)]


async def test_a_closed_database_says_so(tmp_path: Path) -> None:
    async with Database.open(tmp_path / "c.db", SCHEMA) as db:
        pass
    with pytest.raises(StoreError, match="closed"):
        await db.fetchall("SELECT 1")


# --- transactions -------------------------------------------------------------------------------


async def test_execute_fetchone_fetchall(db: Database) -> None:
    assert await db.execute("INSERT INTO rows VALUES (?, ?)", (1, 0)) == 1
    assert await db.execute("INSERT INTO rows VALUES (:t, :s)", {"t": 1, "s": 1}) == 1
    assert await db.fetchone("SELECT COUNT(*) FROM rows") == (2,)
    assert await db.fetchone("SELECT * FROM rows WHERE txn = 99") is None
    assert await db.fetchall("SELECT seq FROM rows ORDER BY seq") == [(0,), (1,)]


async def test_transaction_commits_and_returns_the_value(db: Database) -> None:
    assert await db.transaction(functools.partial(insert_txn, txn=7)) == 7
    assert await rows_per_txn(db) == {7: ROWS_PER_TXN}


async def test_an_exception_in_the_transaction_rolls_it_back_and_propagates(db: Database) -> None:
    def fail_halfway(conn: sqlite3.Connection) -> None:
        insert_txn(conn, 1)
        raise ValueError("the caller's own error")

    with pytest.raises(ValueError, match="the caller's own error"):
        await db.transaction(fail_halfway)
    assert await rows_per_txn(db) == {}
    await db.transaction(functools.partial(insert_txn, txn=2))  # still usable
    assert await rows_per_txn(db) == {2: ROWS_PER_TXN}


async def test_an_sqlite_error_rolls_back_and_becomes_a_store_error(db: Database) -> None:
    def duplicate(conn: sqlite3.Connection) -> None:
        insert_txn(conn, 1)
        insert_txn(conn, 1)

    with pytest.raises(StoreError, match="UNIQUE constraint failed") as info:
        await db.transaction(duplicate)
    assert str(db.path) in str(info.value)
    assert isinstance(info.value.__cause__, sqlite3.IntegrityError)
    assert await rows_per_txn(db) == {}


async def test_an_error_that_sqlite_already_rolled_back_is_reported_as_itself(
    db: Database,
) -> None:
    # INSERT OR ROLLBACK ends the transaction inside sqlite; our ROLLBACK must not then fail
    # with "no transaction is active" and hide the constraint that was broken.
    def or_rollback(conn: sqlite3.Connection) -> None:
        insert_txn(conn, 1)
        conn.execute("INSERT OR ROLLBACK INTO rows VALUES (1, 0)")

    with pytest.raises(StoreError, match="UNIQUE constraint failed"):
        await db.transaction(or_rollback)
    assert await rows_per_txn(db) == {}
    await db.transaction(functools.partial(insert_txn, txn=2))
    assert await rows_per_txn(db) == {2: ROWS_PER_TXN}


async def test_a_failed_commit_rolls_back_and_the_database_stays_usable(tmp_path: Path) -> None:
    # A deferred foreign key is checked at COMMIT; the failed COMMIT used to leave the
    # transaction open, so every later BEGIN failed ("cannot start a transaction within ...").
    schema = [
        "CREATE TABLE parent (id INTEGER PRIMARY KEY);"
        "CREATE TABLE child (id INTEGER PRIMARY KEY,"
        " parent INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED);"
    ]
    async with Database.open(tmp_path / "fk.db", schema) as db:
        with pytest.raises(StoreError, match="FOREIGN KEY constraint failed"):
            await db.execute("INSERT INTO child VALUES (1, 99)")
        assert await db.fetchall("SELECT * FROM child") == []
        await db.execute("INSERT INTO parent VALUES (99)")
        await db.execute("INSERT INTO child VALUES (1, 99)")
        assert await db.fetchall("SELECT * FROM child") == [(1, 99)]


# --- concurrency and cancellation ---------------------------------------------------------------


async def test_many_tasks_writing_at_once_all_land(db: Database) -> None:
    tasks, per_task = 40, 10

    async def writer(first: int) -> None:
        for txn in range(first, first + per_task):
            await db.transaction(functools.partial(insert_txn, txn=txn))

    async def reader() -> None:
        for _ in range(per_task):
            await assert_all_or_nothing(db)  # readers never see half a transaction

    async with trio.open_nursery() as nursery:
        for task in range(tasks):
            nursery.start_soon(writer, task * per_task)
            nursery.start_soon(reader)
    counts = await assert_all_or_nothing(db)
    assert sorted(counts) == list(range(tasks * per_task))


async def test_cancel_while_the_transaction_runs_leaves_it_fully_applied(db: Database) -> None:
    entered, release = trio.Event(), threading.Event()
    token = trio.lowlevel.current_trio_token()
    returned: list[int] = []

    def slow(conn: sqlite3.Connection) -> int:
        insert_txn(conn, 1, rows=2)
        trio.from_thread.run_sync(entered.set, trio_token=token)
        release.wait(10)  # a safety bound, not a sleep: the test sets it right after cancelling
        conn.execute("INSERT INTO rows VALUES (1, 2)")
        return 1

    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def run() -> None:
            with scope:
                returned.append(await db.transaction(slow))
                await trio.lowlevel.checkpoint()  # where the pending cancel is delivered

        nursery.start_soon(run)
        await entered.wait()
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert scope.cancelled_caught
    assert returned == [1]
    assert await rows_per_txn(db) == {1: 3}


async def test_cancel_while_queued_behind_another_leaves_it_fully_absent(db: Database) -> None:
    entered, release = trio.Event(), threading.Event()
    token = trio.lowlevel.current_trio_token()
    ran: list[str] = []

    def first(conn: sqlite3.Connection) -> None:
        insert_txn(conn, 1)
        trio.from_thread.run_sync(entered.set, trio_token=token)
        release.wait(10)

    def second(conn: sqlite3.Connection) -> None:
        ran.append("second")
        insert_txn(conn, 2)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(db.transaction, first)
        await entered.wait()
        with trio.CancelScope() as scope:

            async def queue_second() -> None:
                await db.transaction(second)

            async with trio.open_nursery() as inner:
                inner.start_soon(queue_second)
                await trio.testing.wait_all_tasks_blocked()  # second waits for the connection
                scope.cancel()
        release.set()
    assert scope.cancelled_caught
    assert ran == []
    assert await rows_per_txn(db) == {1: ROWS_PER_TXN}


async def test_cancelling_writers_at_any_point_never_leaves_half_a_transaction(
    db: Database,
) -> None:
    returned: set[int] = set()

    async def writer(txn: int) -> None:
        returned.add(await db.transaction(functools.partial(insert_txn, txn=txn)))

    for checkpoints in range(40):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(writer, checkpoints * 4 + i)
                for _ in range(checkpoints):
                    await trio.lowlevel.checkpoint()
                scope.cancel()
    counts = await assert_all_or_nothing(db)
    assert returned <= set(counts)  # every call that returned is in, whatever else was cut


# --- a real crash -------------------------------------------------------------------------------


class LineReader:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def readline(self) -> str:
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                raise AssertionError(f"the writer closed stdout; partial line {self._buffer!r}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()


COMMITS = 12
CRASH_ROWS = 40


@pytest.mark.parametrize("held", [True, False], ids=["held-mid-transaction", "free-running"])
async def test_sigkill_mid_transaction_leaves_the_database_consistent(
    tmp_path: Path, held: bool
) -> None:
    """A child commits COMMITS transactions of CRASH_ROWS rows, reporting each; then SIGKILL.

    held: the child is stopped inside transaction COMMITS + 1 with some of its rows already in the
    WAL file (checked), the case recovery must get right. free-running: the kill lands wherever
    the child happens to be, most likely inside a transaction as that is where it spends its time.
    """
    path = tmp_path / "crash.db"
    hold_at = COMMITS + 1 if held else 0
    command = [sys.executable, str(HELPER), str(path), str(CRASH_ROWS), str(hold_at)]
    process = await trio.lowlevel.open_process(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    reported: list[int] = []
    try:
        assert process.stdout is not None
        reader = LineReader(process.stdout)
        with trio.fail_after(20):
            while len(reported) < COMMITS:
                line = await reader.readline()
                assert line == f"committed {len(reported) + 1}"
                reported.append(len(reported) + 1)
            if held:
                word, txn, wal_now, wal_at_commit = (await reader.readline()).split()
                assert (word, int(txn)) == ("inside", COMMITS + 1)
                assert int(wal_now) > int(wal_at_commit), "uncommitted rows should be in the WAL"
            process.kill()
            await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
    assert process.returncode == -signal.SIGKILL

    async with Database.open(path, crash_writer.MIGRATIONS) as db:
        assert await db.fetchall("PRAGMA integrity_check") == [("ok",)]
        counts = await assert_all_or_nothing(db, rows=CRASH_ROWS)
        assert sorted(counts) == list(range(1, max(counts) + 1))  # no gaps, no half-done txn
        assert set(reported) <= set(counts)  # every commit the child reported survived
        if held:
            assert max(counts) == COMMITS  # the held transaction left nothing behind
        distinct = await db.fetchone("SELECT COUNT(DISTINCT seq), MAX(seq) FROM rows")
        assert distinct == (CRASH_ROWS, CRASH_ROWS - 1)
