"""The persistent task queue: submit, lease, heartbeat, report, expire, cancel — on sqlite.

Every change is one ``BEGIN IMMEDIATE`` transaction on the scheduler's own database, so two
workers can never be granted the same replica (the UPDATE that leases it checks it is still queued,
and transactions are serialised), and nothing acknowledged is lost on a crash. The decisions are
the sans-IO parts': :mod:`lifecycle` says which moves are legal, :mod:`end_conditions` judges the
task after every change; this module loads rows, applies them, and writes rows back.

Time: lease deadlines and runtimes are monotonic (``clock.monotonic()``, trio's clock by default)
and live in memory, because a heartbeat must not cost a disk write. What must survive a restart is
wall-clock and in the database (lease start, task deadline). After a restart every held lease gets
a full ``lease_timeout`` to be heartbeated again: the workers did nothing wrong while we were down.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import trio

from catalog.dispatch import (
    Heartbeat,
    HeartbeatAck,
    LeaseGrant,
    LeaseKey,
    NoWork,
    Offer,
    ResultAck,
    ResultReport,
    ResultStatus,
)
from node.store import Database
from scheduler_role import queue_ops as ops
from scheduler_role import schema
from scheduler_role.end_conditions import Outcome
from scheduler_role.errors import InvalidTaskError, TaskConflictError, UnknownTaskError
from scheduler_role.group_commit import GroupCommit
from scheduler_role.held_leases import HeldLeases
from scheduler_role.lifecycle import (
    FINISHED_TASK_STATES,
    HOLDING,
    ReplicaEvent,
    ReplicaState,
    TaskEvent,
    TaskState,
    replica_step,
    task_step,
)
from scheduler_role.queue_ops import StopNotice
from scheduler_role.queue_types import (
    Clock,
    HeldLease,
    SeenOffer,
    StoredResult,
    TaskStatus,
    TrioClock,
    tables_with,
)
from scheduler_role.task import TaskSpec
from scheduler_role.trust import Conduct, Policy, WorkerRecord
from scheduler_role.work_arrivals import WorkArrivals
from scheduler_role.worker_records import (
    all_records,
    all_sidelined,
    load_record,
    seen_at,
    sidelined,
)

__all__ = ["Clock", "Queue", "SeenOffer", "StopNotice", "StoredResult", "TaskStatus", "TrioClock"]

# Events that race with a task's end (an owner's cancel, a deadline, an assembly running in the
# background): arriving after the verdict, they are moot rather than invalid.
_MOOT_ONCE_FINISHED = frozenset(
    {TaskEvent.CANCEL, TaskEvent.ASSEMBLE, TaskEvent.IMAGE_READY, TaskEvent.ASSEMBLY_FAILED}
)
# The scheduler's own background events for a task the retention sweep already forgot (one
# cancelled while its image was being assembled): moot too.
_MOOT_ONCE_FORGOTTEN = frozenset(
    {TaskEvent.ASSEMBLE, TaskEvent.IMAGE_READY, TaskEvent.ASSEMBLY_FAILED}
)


NOTHING_FITS = "no queued task fits this offer"


class Queue:
    """One scheduler's queue. Open with :meth:`open`; every method may be called from any task."""

    def __init__(
        self,
        db: Database,
        clock: Clock,
        *,
        lease_timeout: float,
        retry_after: float,
        max_leases_per_worker: int,
        policy: Policy,
    ) -> None:
        self._db = db
        self.policy = policy
        self.arrivals = WorkArrivals()
        self._commits = GroupCommit(db, on_commit=self.arrivals.after_commit)
        self._clock = clock
        self.lease_timeout = lease_timeout
        self.retry_after = retry_after
        self.max_leases_per_worker = max_leases_per_worker
        self._held = HeldLeases()
        self.offers: dict[str, SeenOffer] = {}
        """The last offer each worker sent (for :mod:`explain`); pruned by :meth:`tick`."""

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        path: Path,
        *,
        clock: Clock | None = None,
        lease_timeout: float = 30.0,
        retry_after: float = 5.0,
        max_leases_per_worker: int = 64,
        policy: Policy | None = None,
    ) -> AsyncIterator[Queue]:
        """Open (creating) the queue in ``path`` (``<data>/scheduler.db``), placing and judging
        by ``policy`` (the default: distinct networks and earned trust, see
        :mod:`scheduler_role.trust`)."""
        async with Database.open(path, schema.MIGRATIONS) as db, trio.open_nursery() as nursery:
            queue = cls(
                db,
                clock or TrioClock(),
                lease_timeout=lease_timeout,
                retry_after=retry_after,
                max_leases_per_worker=max_leases_per_worker,
                policy=policy or Policy(),
            )
            await db.transaction(queue.arrivals.install)
            await queue._restore()
            await nursery.start(queue._commits.run)
            try:
                yield queue
            finally:
                nursery.cancel_scope.cancel()

    async def _restore(self) -> None:
        rows = await self._db.fetchall(
            "SELECT t.task_id, r.idx, r.attempts, r.worker, r.since, t.max_runtime, r.state"
            " FROM replicas r JOIN tasks t ON t.seq = r.task_seq WHERE r.state IN (?, ?)",
            tuple(s.value for s in HOLDING),
        )
        now, wall = self._clock.monotonic(), self._clock.wall()
        for task_id, idx, attempts, worker, since, max_runtime, state in rows:
            ran = max(0.0, wall - (since if since is not None else wall))
            running = state == ReplicaState.RUNNING.value
            held = HeldLease(worker, now + self.lease_timeout, now - ran, max_runtime, running)
            self._held.hold(LeaseKey(task_id, idx, attempts), held)

    # --- owner side ------------------------------------------------------------------------------

    async def submit(self, spec: TaskSpec) -> bool:
        """Accept ``spec``; True if new, False if this exact task was already accepted.

        :class:`TaskConflictError` if the ID is taken by a different task. The scheduler's
        ``min_quorum`` raises the task's quorum (and replicas) first.
        """
        spec = self.policy.apply(spec)
        wall = self._clock.wall()

        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                f"SELECT {schema.TASK_COLUMNS} FROM tasks WHERE task_id = ?", (spec.task_id,)
            ).fetchone()
            if row is not None:
                stored = schema.spec_from_row(row)
                if spec.image_id is None:  # the image may have been assembled since
                    stored = replace(stored, image_id=None)
                if stored != spec:
                    raise TaskConflictError(spec.task_id)
                return False
            state = TaskState.SUBMITTED
            if spec.image_id is not None:
                state = task_step(state, TaskEvent.IMAGE_READY)
            values = schema.spec_values(spec) | {"state": state.value, "submitted_at": wall}
            cursor = conn.execute(
                f"INSERT INTO tasks ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                tuple(values.values()),
            )
            conn.executemany(
                "INSERT INTO replicas (task_seq, idx, state) VALUES (?, ?, ?)",
                [(cursor.lastrowid, i, ReplicaState.QUEUED.value) for i in range(spec.replicas)],
            )
            return True

        return await self._commits.write(op)

    async def begin_assembly(self, task_id: str) -> None:
        """Mark the task assembling (a task that ended meanwhile stays as it is)."""
        await self._task_event(task_id, TaskEvent.ASSEMBLE)

    async def image_ready(self, task_id: str, image_id: bytes) -> None:
        await self._task_event(task_id, TaskEvent.IMAGE_READY, image_id=image_id)

    async def assembly_failed(self, task_id: str, reason: str) -> None:
        await self._task_event(task_id, TaskEvent.ASSEMBLY_FAILED, reason=reason)

    async def cancel(self, task_id: str) -> list[StopNotice]:
        """Cancel a live task; a finished one is left as it is (cancel is idempotent)."""
        return await self._task_event(task_id, TaskEvent.CANCEL, reason="cancelled by owner")

    async def collect(self, task_id: str) -> None:
        """The owner has the outcome: mark the finished task done."""
        await self._task_event(task_id, TaskEvent.COLLECT)

    async def _task_event(
        self, task_id: str, event: TaskEvent, *, image_id: bytes | None = None, reason: str = ""
    ) -> list[StopNotice]:
        wall = self._clock.wall()
        held_for = self._held_for()

        def op(conn: sqlite3.Connection) -> list[StopNotice]:
            try:
                seq, _, state, _, _ = ops.load_task(conn, task_id)
            except UnknownTaskError:
                if event in _MOOT_ONCE_FORGOTTEN:
                    return []
                raise
            if event in _MOOT_ONCE_FINISHED and state in FINISHED_TASK_STATES:
                return []  # a cancel or an assembly that ends after its task did changes nothing
            new = task_step(state, event)
            if image_id is not None:
                if len(image_id) != 32:
                    raise InvalidTaskError("image_id must be 32 bytes")
                conn.execute("UPDATE tasks SET image_id = ? WHERE seq = ?", (image_id.hex(), seq))
            verdict = {TaskState.FAILED: Outcome.FAILED, TaskState.CANCELLED: Outcome.CANCELLED}
            conn.execute(
                "UPDATE tasks SET state = ?, verdict = COALESCE(?, verdict),"
                " reason = CASE WHEN ? = '' THEN reason ELSE ? END,"
                " finished_at = CASE WHEN ? THEN ? ELSE finished_at END WHERE seq = ?",
                (new.value, verdict[new].value if new in verdict else None, reason, reason,
                 new in verdict, wall, seq),
            )  # fmt: skip
            return ops.judge_and_apply(conn, seq, wall, held_for)

        return await self._commits.write(op, self._held.release_stopped)

    async def status(self, task_id: str) -> TaskStatus:
        return await self._db.transaction(lambda conn: ops.load_status(conn, task_id))

    async def results(self, task_id: str) -> list[StoredResult]:
        """Every accepted result of the task, in arrival order."""

        def op(conn: sqlite3.Connection) -> list[StoredResult]:
            seq = ops.load_task(conn, task_id)[0]
            rows = conn.execute(
                "SELECT idx, worker, attempt, exit_code, stdout_digest, stderr_digest,"
                " stdout_blob, stderr_blob, archive_blob, signature, digest"
                " FROM results WHERE task_seq = ? ORDER BY arrival",
                (seq,),
            ).fetchall()
            return [StoredResult(*row) for row in rows]

        return await self._db.transaction(op)

    async def waiting(self) -> list[TaskStatus]:
        """Live tasks with a replica still queued (for :mod:`explain`), oldest first."""
        rows = await self._db.fetchall(
            "SELECT t.task_id FROM tasks t WHERE t.state IN ('submitted', 'assembling', 'active')"
            " AND EXISTS (SELECT 1 FROM replicas r WHERE r.task_seq = t.seq AND r.state = 'queued')"
            " ORDER BY t.seq"
        )
        return [await self.status(task_id) for (task_id,) in rows]

    # --- worker side -----------------------------------------------------------------------------

    async def lease(
        self,
        worker: str,
        offer: Offer,
        *,
        network: str | None = None,
        hold: float = 0.0,
        present: Callable[[], bool] = lambda: True,
    ) -> LeaseGrant | NoWork:
        """Lease one queued replica that fits ``offer`` to ``worker``, preferring held images.

        ``network``: where the scheduler saw ``worker`` connect from
        (:meth:`trust.Policy.network_of`; None: the worker is a network of its own). Neither a
        worker nor its network ever gets two replicas of one task, nor a replica of a task it has
        reported for: each replica must be an independent witness for the quorum. A worker that
        has not earned trust holds at most ``policy.untrusted_max_leases`` leases.

        With nothing that fits, wait up to ``hold`` seconds for work to arrive
        (:mod:`work_arrivals`) and look again each time it may have, while ``present()`` says the
        worker is still there to take a lease (a frozen or cut-off worker would sit on it until
        it expired); a worker refused for what it is (sidelined, at its limit) is answered at once.
        """
        deadline = trio.current_time() + hold
        while True:
            arrived = self.arrivals.event  # before looking: an arrival meanwhile is not missed
            answer = await self._lease_once(worker, offer, network)
            if answer is not None:
                return answer
            if trio.current_time() >= deadline:
                return NoWork(retry_after=self.retry_after, reason=NOTHING_FITS)
            with trio.move_on_at(deadline):
                await arrived.wait()
            if not present():
                return NoWork(retry_after=self.retry_after, reason="not heard from lately")

    async def _lease_once(
        self, worker: str, offer: Offer, network: str | None
    ) -> LeaseGrant | NoWork | None:
        where = network if network is not None else f"peer:{worker}"
        now = self._clock.monotonic()
        self.offers[worker] = SeenOffer(offer, now)
        wall = self._clock.wall()
        held = self._held.count(worker)
        if held >= self.max_leases_per_worker:
            # The offer is the worker's word; this bounds what one worker can hoard by lying.
            return NoWork(retry_after=self.retry_after, reason=f"already holds {held} leases")

        # A task a worker failed to start goes to another, unless nobody else is asking.
        others = any(w != worker for w in self.offers)

        def op(conn: sqlite3.Connection) -> LeaseGrant | NoWork | None:
            if (resting := sidelined(conn, worker, wall)) is not None:
                failures, left = resting
                reason = f"sidelined for {left:.0f} s: {failures} leases in a row failed to start"
                return NoWork(retry_after=max(self.retry_after, left), reason=reason)
            limit = self.policy.max_leases(load_record(conn, worker), self.max_leases_per_worker)
            if held >= limit:
                reason = f"holds {held} leases, as many as a worker not yet trusted may"
                return NoWork(retry_after=self.retry_after, reason=reason)
            found = ops.find_candidate(conn, worker, where, offer, wall, avoid_failed=others)
            if found is None:
                return None
            seq, idx, spec = found
            replicas = schema.load_replicas(conn, seq)
            leased = replica_step(replicas[idx], ReplicaEvent.LEASE, worker=worker)
            schema.save_replica(conn, seq, leased, wall)
            conn.execute(
                "UPDATE replicas SET network = ? WHERE task_seq = ? AND idx = ?", (where, seq, idx)
            )
            seen_at(conn, worker, where, wall)
            ops.note_lease(conn, seq, idx, leased.attempts, worker, where)
            assert spec.image_id is not None  # only active tasks are candidates
            return LeaseGrant(
                lease=LeaseKey(spec.task_id, idx, leased.attempts),
                image_id=spec.image_id,
                caps=spec.caps,
                lease_timeout=self.lease_timeout,
                max_runtime=spec.limits.max_runtime,
            )

        def after(grant: LeaseGrant | NoWork | None) -> None:
            if isinstance(grant, LeaseGrant):
                deadline = now + self.lease_timeout
                self._held.hold(grant.lease, HeldLease(worker, deadline, now, grant.max_runtime))

        return await self._commits.write(op, after)

    async def heartbeat(self, worker: str, beat: Heartbeat) -> HeartbeatAck:
        """Extend the worker's valid leases; tell it to stop every lease that is not its own."""
        now = self._clock.monotonic()
        stop: list[LeaseKey] = []
        started: list[LeaseKey] = []
        running = set(beat.running)
        fetched = beat.fetched or (0,) * len(beat.leases)
        for lease, got in zip(beat.leases, fetched, strict=True):
            held = self._held.get(lease)
            if held is None or held.worker != worker:
                stop.append(lease)
                continue
            held.deadline = now + self.lease_timeout
            held.fetched = got
            if lease in running and not held.running:
                held.running = True
                held.since = now  # max runtime counts from the VM's start once it has one
                started.append(lease)
        if started:
            wall = self._clock.wall()
            await self._commits.write(lambda conn: ops.mark_running(conn, started, wall, worker))
        return HeartbeatAck(stop=tuple(stop))

    async def report(self, worker: str, report: ResultReport) -> tuple[ResultAck, list[StopNotice]]:
        """Record a result once per (task, replica, worker); judge the task.

        The signature must have been checked by the caller (the glue knows the worker's key).
        """
        lease = report.lease
        wall = self._clock.wall()
        held_for = self._held_for()

        def op(conn: sqlite3.Connection) -> tuple[ResultStatus, list[StopNotice]]:
            return ops.record_result(conn, worker, report, wall, held_for, self.policy)

        def after(outcome: tuple[ResultStatus, list[StopNotice]]) -> None:
            if outcome[0] is ResultStatus.RECORDED:
                self._held.release(lease)
            self._held.release_stopped(outcome[1])

        status, stops = await self._commits.write(op, after)
        return ResultAck(lease=lease, status=status), stops

    async def lost(self, worker: str, leases: Iterable[LeaseKey]) -> list[StopNotice]:
        """The worker lost these leases (crashed): expire them now instead of at their deadline."""
        mine = [k for k in leases if (h := self._held.get(k)) is not None and h.worker == worker]
        return await self._expire(mine, (Conduct.LOST, "worker lost the lease"))

    async def serve_ticks(
        self,
        send_stops: Callable[[list[StopNotice]], Awaitable[None]],
        *,
        interval: float = 1.0,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Service: :meth:`tick` every ``interval`` seconds, handing non-empty notices to
        ``send_stops`` (the glue pushes :class:`messages.Stop`); runs until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(interval)
            stops = await self.tick()
            if stops:
                await send_stops(stops)

    async def tick(self) -> list[StopNotice]:
        """Expire lapsed leases, time out long runs, fail tasks past their deadline.

        Call it every second or so; returns the notices to send.
        """
        now, wall = self._clock.monotonic(), self._clock.wall()
        due = [k for k, h in self._held.items() if h.deadline <= now]
        stale = now - 4 * self.lease_timeout
        self.offers = {w: o for w, o in self.offers.items() if o.at >= stale}
        held_for = self._held_for()
        long_runs = {
            k.task_id
            for k, h in self._held.items()
            if held_for[(k.task_id, k.replica)] >= h.max_runtime
        }
        rows = await self._db.fetchall(
            "SELECT task_id FROM tasks WHERE state IN ('submitted', 'assembling', 'active')"
            " AND deadline IS NOT NULL AND deadline <= ?",
            (wall,),
        )
        overdue = {r[0] for r in rows} | long_runs
        return await self._expire(
            due, (Conduct.EXPIRED, "no heartbeat before the lease expired"), overdue
        )

    async def _expire(
        self,
        leases: list[LeaseKey],
        conduct: tuple[Conduct, str],
        also_judge: Iterable[str] = (),
    ) -> list[StopNotice]:
        # A lease may have been reported or stopped while the caller awaited: skip those.
        workers = {k: h.worker for k in leases if (h := self._held.get(k)) is not None}
        leases = list(workers)
        tasks = set(also_judge) | {k.task_id for k in leases}
        if not tasks:
            return []
        wall = self._clock.wall()
        held_for = self._held_for()

        def op(conn: sqlite3.Connection) -> list[StopNotice]:
            return ops.expire_leases(conn, tasks, workers, conduct, wall, held_for, self.policy)

        def after(stops: list[StopNotice]) -> None:
            for key in leases:
                self._held.release(key)
            self._held.release_stopped(stops)

        return await self._commits.write(op, after)

    # --- retention (scheduler_role.retention) -----------------------------------------------------

    @property
    def clock(self) -> Clock:
        return self._clock

    async def finished_before(self, wall: float, *, limit: int) -> list[str]:
        """Up to ``limit`` finished tasks that ended at or before ``wall`` (Unix seconds),
        the longest finished first."""
        states = tuple(s.value for s in FINISHED_TASK_STATES)
        rows = await self._db.fetchall(
            f"SELECT task_id FROM tasks WHERE state IN ({', '.join('?' * len(states))})"
            " AND COALESCE(finished_at, submitted_at) <= ?"
            " ORDER BY COALESCE(finished_at, submitted_at), seq LIMIT ?",
            (*states, wall, limit),
        )
        return [row[0] for row in rows]

    async def result_blob_users(
        self, blobs: Iterable[bytes], *, besides: str
    ) -> dict[bytes, tuple[str, str]]:
        """For each of ``blobs`` a result of another task than ``besides`` still names: that
        task's ID and owner (one identical output is one blob, shared by every task with it)."""
        wanted = list(dict.fromkeys(bytes(b) for b in blobs))
        if not wanted:
            return {}
        marks = ", ".join("?" * len(wanted))
        rows = await self._db.fetchall(
            "SELECT r.stdout_blob, r.stderr_blob, r.archive_blob, t.task_id, t.owner"
            " FROM results r JOIN tasks t ON t.seq = r.task_seq WHERE t.task_id != ?"
            f" AND (r.stdout_blob IN ({marks}) OR r.stderr_blob IN ({marks})"
            f" OR r.archive_blob IN ({marks}))",
            (besides, *wanted, *wanted, *wanted),
        )
        users: dict[bytes, tuple[str, str]] = {}
        for *named, task_id, owner in rows:
            for blob in named:
                if blob is not None and bytes(blob) in wanted:
                    users.setdefault(bytes(blob), (task_id, owner))
        return users

    async def forget(self, task_id: str) -> None:
        """Mark the finished task collected, then delete it and every row about it (its
        replicas, results, strikes...): from now on it is unknown here. UnknownTaskError if it
        is not here, InvalidTransition if it has not finished."""

        def op(conn: sqlite3.Connection) -> None:
            seq, _, state, _, _ = ops.load_task(conn, task_id)
            task_step(state, TaskEvent.COLLECT)  # only a finished task may be forgotten
            for table in tables_with(conn, "task_seq"):
                conn.execute(f"DELETE FROM {table} WHERE task_seq = ?", (seq,))
            conn.execute("DELETE FROM tasks WHERE seq = ?", (seq,))

        def after(_: None) -> None:
            for lease in [k for k in self._held if k.task_id == task_id]:
                self._held.release(lease)

        await self._commits.write(op, after)

    # --- introspection ---------------------------------------------------------------------------

    async def may_report(self, worker: str, lease: LeaseKey) -> bool:
        """Whether a result from ``worker`` for ``lease`` would be counted: it holds the lease,
        or held it and the lease lapsed while the task is live (the caller fetches its blobs)."""
        if self.holder(lease) == worker:
            return True
        return await self._db.transaction(lambda conn: ops.may_report(conn, worker, lease))

    def holder(self, lease: LeaseKey) -> str | None:
        """The worker holding ``lease`` now (None: nobody; lapsed, re-leased or never granted)."""
        held = self._held.get(lease)
        return None if held is None else held.worker

    async def workers(self) -> dict[str, tuple[WorkerRecord, str | None]]:
        """Every worker's record here, and the network it last leased from."""
        return await self._db.transaction(all_records)

    async def record_of(self, worker: str) -> WorkerRecord:
        return await self._db.transaction(lambda conn: load_record(conn, worker))

    async def sidelined(self) -> dict[str, float]:
        """Seconds left for each worker sidelined now (for :mod:`explain`)."""
        wall = self._clock.wall()
        return await self._db.transaction(lambda conn: all_sidelined(conn, wall))

    def fetched(self, task_id: str) -> dict[int, int]:
        """Bytes of its image fetched, by replica, for the leases of ``task_id`` held now."""
        return {
            key.replica: held.fetched
            for key, held in self._held.items()
            if key.task_id == task_id and held.fetched
        }

    def held_by(self) -> dict[str, int]:
        """Leases held per worker right now (for :mod:`explain`)."""
        return self._held.per_worker()

    def statistics(self) -> dict[str, int]:
        return {
            "held_leases": len(self._held),
            "workers_seen": len(self.offers),
            "commits": self._commits.batches,
            "writes": self._commits.writes,
        }

    def _held_for(self) -> dict[tuple[str, int], float]:
        """Seconds each held replica has run, as max runtime counts them.

        The worker stops its VM at max runtime itself; the scheduler steps in one lease timeout
        later, so a result sent at the limit is not lost to heartbeat latency.
        """
        now = self._clock.monotonic()
        return {
            (k.task_id, k.replica): max(0.0, now - h.since - self.lease_timeout)
            for k, h in self._held.items()
        }
