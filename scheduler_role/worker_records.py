"""Each worker's record at this scheduler (the ``workers`` table), read and written inside the
queue's transactions. What the record means and how it is used: :mod:`scheduler_role.trust`."""

from __future__ import annotations

import sqlite3

from scheduler_role.trust import Conduct, WorkerRecord

_FIELDS = "agreed, disagreed, lost, expired, streak"


def load_record(conn: sqlite3.Connection, worker: str) -> WorkerRecord:
    row = conn.execute(f"SELECT {_FIELDS} FROM workers WHERE peer_id = ?", (worker,)).fetchone()
    return WorkerRecord() if row is None else WorkerRecord(*row)


def note(conn: sqlite3.Connection, worker: str, conduct: Conduct, wall: float) -> WorkerRecord:
    """Add ``conduct`` to ``worker``'s record; return the new record."""
    record = load_record(conn, worker).after(conduct)
    conn.execute(
        f"INSERT INTO workers (peer_id, {_FIELDS}, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (peer_id) DO UPDATE SET agreed = excluded.agreed,"
        " disagreed = excluded.disagreed, lost = excluded.lost, expired = excluded.expired,"
        " streak = excluded.streak, updated_at = excluded.updated_at",
        (worker, record.agreed, record.disagreed, record.lost, record.expired, record.streak,
         wall),
    )  # fmt: skip
    return record


def seen_at(conn: sqlite3.Connection, worker: str, network: str, wall: float) -> None:
    """Remember the network ``worker`` was last seen leasing from (for operators)."""
    conn.execute(
        "INSERT INTO workers (peer_id, network, updated_at) VALUES (?, ?, ?)"
        " ON CONFLICT (peer_id) DO UPDATE SET network = excluded.network",
        (worker, network, wall),
    )


def all_records(conn: sqlite3.Connection) -> dict[str, tuple[WorkerRecord, str | None]]:
    rows = conn.execute(f"SELECT peer_id, {_FIELDS}, network FROM workers ORDER BY peer_id")
    return {r[0]: (WorkerRecord(*r[1:6]), r[6]) for r in rows}
