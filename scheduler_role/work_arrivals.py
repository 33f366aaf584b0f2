"""When work may have arrived: the signal that wakes work requests held at the scheduler.

A worker's work request that finds nothing waits at the scheduler (``Queue.lease`` with a hold)
rather than asking again every second. It must wake the moment a replica could be leased, by any
path: a task's image is ready, a lease expires or fails and its replica is queued again, an
agreement needs one more replica. Rather than trusting every such path to remember to say so, the
database says it: temporary triggers on the queue's connection call :data:`FUNCTION` whenever a
replica becomes queued or a task becomes active, and the flag it sets is turned into a trio event
after the transaction commits (:meth:`WorkArrivals.after_commit`, run by the group commit).

Leasing itself never fires a trigger (it moves a replica out of ``queued``), so held requests that
retry and find nothing do not wake each other.
"""

from __future__ import annotations

import sqlite3

import trio

FUNCTION = "vmlend_work_arrived"

TRIGGERS = (
    f"""CREATE TEMP TRIGGER IF NOT EXISTS work_replica_queued AFTER UPDATE OF state ON replicas
    WHEN NEW.state = 'queued' AND OLD.state IS NOT 'queued' BEGIN SELECT {FUNCTION}(); END""",
    f"""CREATE TEMP TRIGGER IF NOT EXISTS work_replica_added AFTER INSERT ON replicas
    WHEN NEW.state = 'queued' BEGIN SELECT {FUNCTION}(); END""",
    f"""CREATE TEMP TRIGGER IF NOT EXISTS work_task_active AFTER UPDATE OF state ON tasks
    WHEN NEW.state = 'active' AND OLD.state IS NOT 'active' BEGIN SELECT {FUNCTION}(); END""",
    f"""CREATE TEMP TRIGGER IF NOT EXISTS work_task_added AFTER INSERT ON tasks
    WHEN NEW.state = 'active' BEGIN SELECT {FUNCTION}(); END""",
)


class WorkArrivals:
    """Install with :meth:`install` on the queue's connection (in its thread); wait on
    :attr:`event` taken *before* looking for work, so an arrival meanwhile is not missed."""

    def __init__(self) -> None:
        self._flag = False  # set in the database thread, read in the trio thread
        self.event = trio.Event()
        self.arrivals = 0

    def install(self, conn: sqlite3.Connection) -> None:
        conn.create_function(FUNCTION, 0, self._arrived)
        for sql in TRIGGERS:
            conn.execute(sql)

    def _arrived(self) -> None:
        self._flag = True

    def after_commit(self) -> None:
        """After a transaction: wake the held requests if it queued work (a rolled-back write
        may wake them for nothing; they look, find nothing and wait again)."""
        if self._flag:
            self._flag = False
            self.arrivals += 1
            self.event.set()
            self.event = trio.Event()
