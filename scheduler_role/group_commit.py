"""Group commit: many small writes from many trio tasks in one sqlite transaction.

A lease is a tiny write, but each transaction waits for an fsync (WAL, ``synchronous=FULL``), so
one transaction per lease caps a scheduler at the disk's fsync rate (a few hundred per second
here). Writes queue up while the previous transaction is on disk and then go together: one
``BEGIN IMMEDIATE`` ... ``COMMIT``, each write in its own SAVEPOINT so that one write's refusal
(an unknown task, an invalid transition) rolls back only that write. Nobody hears back before the
COMMIT, so nothing acknowledged is lost in a crash.

Each write may carry an ``after`` callback, run in the trio thread right after the commit and
before anyone else's write: that is where in-memory state (lease deadlines) follows the database.
It runs even if the writer was cancelled while waiting, so memory and disk never disagree; a
cancelled writer simply never hears its result (a lease granted to nobody expires in due course).
``on_commit``, if given, runs in the trio thread after every batch's callbacks.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import trio

from node.errors import StoreError, VmlendError
from node.store import Database

T = TypeVar("T")


@dataclass(eq=False)
class _Write(Generic[T]):
    fn: Callable[[sqlite3.Connection], T]
    after: Callable[[T], None] | None
    done: trio.Event = field(default_factory=trio.Event)
    result: T | None = None
    error: BaseException | None = None


class GroupCommit:
    def __init__(
        self,
        db: Database,
        *,
        max_batch: int = 256,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        self._db = db
        self._on_commit = on_commit
        self._max_batch = max_batch
        self._send, self._receive = trio.open_memory_channel[_Write[Any]](math.inf)
        self._closed = False
        self.batches = 0
        self.writes = 0

    async def write(
        self, fn: Callable[[sqlite3.Connection], T], after: Callable[[T], None] | None = None
    ) -> T:
        """Run ``fn(conn)`` in the next group transaction (in the database thread); return its
        result once committed. A :class:`VmlendError` it raises is re-raised here, alone."""
        if self._closed:
            raise StoreError(f"database {self._db.path} is closed")
        write: _Write[T] = _Write(fn, after)
        self._send.send_nowait(write)
        await write.done.wait()
        if write.error is not None:
            raise write.error
        return write.result  # type: ignore[return-value]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The service: commit what is queued, batch after batch, until cancelled."""
        task_status.started()
        try:
            async for first in self._receive:
                batch = [first]
                while len(batch) < self._max_batch:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except trio.WouldBlock:
                        break
                # Shielded: a batch on its way to disk is always delivered, never half-reported.
                with trio.CancelScope(shield=True):
                    await self._commit(batch)
        finally:
            self._closed = True
            self._send.close()
            error = StoreError(f"database {self._db.path} is closed")
            while True:
                try:
                    waiting = self._receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                waiting.error = error
                waiting.done.set()

    async def _commit(self, batch: list[_Write[Any]]) -> None:
        def op(conn: sqlite3.Connection) -> list[tuple[bool, Any]]:
            outcomes: list[tuple[bool, Any]] = []
            for write in batch:
                conn.execute("SAVEPOINT write")
                try:
                    outcomes.append((True, write.fn(conn)))
                except VmlendError as e:
                    conn.execute("ROLLBACK TO write")
                    outcomes.append((False, e))
                conn.execute("RELEASE write")
            return outcomes

        try:
            outcomes = await self._db.transaction(op)
        except StoreError as e:  # the whole transaction failed: every write in it did
            outcomes = [(False, e)] * len(batch)
        self.batches += 1
        self.writes += len(batch)
        for write, (ok, value) in zip(batch, outcomes, strict=True):
            try:
                if ok:
                    write.result = value
                    if write.after is not None:
                        write.after(value)
                else:
                    write.error = value
            finally:  # a bug in one callback must not leave the others waiting forever
                write.done.set()
        if self._on_commit is not None:
            self._on_commit()
