"""A child process for the store crash test: writes multi-row transactions until it is killed.

Usage: ``python crash_writer.py DB ROWS_PER_TXN HOLD_AT``. Transaction ``t`` (1, 2, ...) inserts
``ROWS_PER_TXN`` rows ``(t, 0..ROWS_PER_TXN-1)`` through ``node.store``; after it commits the child
prints ``committed t``. Halfway through transaction ``HOLD_AT`` (0 = never) it prints
``inside t <wal bytes> <wal bytes at last commit>`` and blocks, still inside the transaction,
until it is killed. Its page cache is kept tiny and automatic checkpoints are off, so the rows of
an open transaction spill into the WAL file before COMMIT: the kill leaves uncommitted frames on
disk, which is the case recovery must get right.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import sys
from pathlib import Path

import trio

from node.store import Database

MIGRATIONS = [
    """
    CREATE TABLE rows (
        txn INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        payload BLOB NOT NULL,
        PRIMARY KEY (txn, seq)
    );
    """
]
PAYLOAD_BYTES = 4096


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def write(
    conn: sqlite3.Connection, *, txn: int, rows: int, hold_at: int, wal: Path, wal_at_commit: int
) -> None:
    for seq in range(rows):
        conn.execute("INSERT INTO rows VALUES (?, ?, randomblob(?))", (txn, seq, PAYLOAD_BYTES))
        if txn == hold_at and seq == rows // 2:
            say(f"inside {txn} {wal.stat().st_size} {wal_at_commit}")
            sys.stdin.readline()  # never answered: we wait here, mid-transaction, to be killed
            os._exit(3)  # stdin closed and no kill came: fail loudly, and never commit


def setup(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA cache_size = 4")  # pages: dirty pages spill to the WAL before COMMIT
    conn.execute("PRAGMA wal_autocheckpoint = 0")  # so the WAL only ever grows


async def main(path: Path, rows: int, hold_at: int) -> None:
    wal = trio.Path(f"{path}-wal")
    async with Database.open(path, MIGRATIONS) as db:
        await db.transaction(setup)
        wal_at_commit = (await wal.stat()).st_size
        txn = 0
        while True:
            txn += 1
            await db.transaction(
                functools.partial(
                    write,
                    txn=txn,
                    rows=rows,
                    hold_at=hold_at,
                    wal=Path(wal),
                    wal_at_commit=wal_at_commit,
                )
            )
            wal_at_commit = (await wal.stat()).st_size
            say(f"committed {txn}")


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
