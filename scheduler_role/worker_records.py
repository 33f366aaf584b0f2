"""Each worker's record at this scheduler (the ``workers`` table), read and written inside the
queue's transactions. What the record means and how it is used: :mod:`scheduler_role.trust`."""

from __future__ import annotations

import sqlite3

from scheduler_role.trust import Conduct, WorkerRecord, sideline_for

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


def start_failed(conn: sqlite3.Connection, worker: str, wall: float) -> float:
    """A lease of ``worker`` failed before its VM started: sideline it (a longer rest for each
    failure in a row); return the wall time it is sidelined until."""
    row = conn.execute("SELECT start_failures FROM workers WHERE peer_id = ?", (worker,)).fetchone()
    failures = (row[0] if row is not None else 0) + 1
    until = wall + sideline_for(failures)
    conn.execute(
        "INSERT INTO workers (peer_id, start_failures, sidelined_until, updated_at)"
        " VALUES (?, ?, ?, ?) ON CONFLICT (peer_id) DO UPDATE SET"
        " start_failures = excluded.start_failures, sidelined_until = excluded.sidelined_until,"
        " updated_at = excluded.updated_at",
        (worker, failures, until, wall),
    )
    return until


def start_succeeded(conn: sqlite3.Connection, worker: str) -> None:
    """A VM of ``worker`` started (or it reported a result): its run of failures is over."""
    conn.execute(
        "UPDATE workers SET start_failures = 0, sidelined_until = NULL"
        " WHERE peer_id = ? AND (start_failures > 0 OR sidelined_until IS NOT NULL)",
        (worker,),
    )


def sidelined(conn: sqlite3.Connection, worker: str, wall: float) -> tuple[int, float] | None:
    """(failures in a row, seconds left) while ``worker`` is sidelined at ``wall``, else None."""
    row = conn.execute(
        "SELECT start_failures, sidelined_until FROM workers WHERE peer_id = ?", (worker,)
    ).fetchone()
    if row is None or row[1] is None or row[1] <= wall:
        return None
    return row[0], row[1] - wall


def all_sidelined(conn: sqlite3.Connection, wall: float) -> dict[str, float]:
    """Seconds left for every worker sidelined at ``wall`` (for operators and ``explain``)."""
    rows = conn.execute(
        "SELECT peer_id, sidelined_until FROM workers WHERE sidelined_until > ?", (wall,)
    )
    return {peer: until - wall for peer, until in rows}
