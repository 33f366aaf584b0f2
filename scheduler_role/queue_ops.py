"""The queue's work inside one sqlite transaction (runs in the database thread: no trio here).

Each function takes the open connection of a ``BEGIN IMMEDIATE`` transaction, reads rows, applies
the lifecycle tables and the judge, and writes the rows back; :mod:`scheduler_role.queue` is the
async facade that calls them.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from catalog.caps import NetworkMode
from catalog.dispatch import LeaseKey, Offer, ResultReport, ResultStatus
from scheduler_role import schema
from scheduler_role.end_conditions import Judgement, Outcome, ResultView, judge
from scheduler_role.errors import UnknownTaskError
from scheduler_role.lifecycle import (
    HOLDING,
    LIVE_TASK_STATES,
    Replica,
    ReplicaEvent,
    ReplicaState,
    TaskEvent,
    TaskState,
    expire,
    replica_step,
    task_step,
)
from scheduler_role.matching import offer_fits
from scheduler_role.task import TaskSpec


@dataclass(frozen=True, slots=True)
class StopNotice:
    """Tell ``worker`` to stop ``lease`` (send :class:`messages.Stop`)."""

    worker: str
    lease: LeaseKey
    reason: str


def holds(replica: Replica, worker: str, attempt: int) -> bool:
    return replica.state in HOLDING and replica.worker == worker and replica.attempts == attempt


def load_task(
    conn: sqlite3.Connection, task_id: str
) -> tuple[int, TaskSpec, TaskState, Outcome | None, str]:
    row = conn.execute(
        f"SELECT {schema.TASK_COLUMNS} FROM tasks WHERE task_id = ?", (task_id,)
    ).fetchone()
    if row is None:
        raise UnknownTaskError(task_id)
    verdict = Outcome(row[11]) if row[11] is not None else None
    return row[0], schema.spec_from_row(row), TaskState(row[10]), verdict, row[12]


def mark_running(conn: sqlite3.Connection, leases: list[LeaseKey], wall: float) -> None:
    for lease in leases:
        conn.execute(
            "UPDATE replicas SET state = ?, since = ? WHERE state = ? AND attempts = ?"
            " AND idx = ? AND task_seq = (SELECT seq FROM tasks WHERE task_id = ?)",
            (ReplicaState.RUNNING.value, wall, ReplicaState.LEASED.value, lease.attempt,
             lease.replica, lease.task_id),
        )  # fmt: skip


def find_candidate(
    conn: sqlite3.Connection, worker: str, offer: Offer, wall: float
) -> tuple[int, int, TaskSpec] | None:
    """The first queued replica (held images first, then submission order) that fits ``offer``,
    of a task ``worker`` has no replica or result of, whose deadline has not passed."""
    room = offer.room
    # Driven by the open tasks (a partial index, in submission order), so a lease costs the same
    # with ten thousand tasks already leased as with none.
    prefilter = (
        "t.state = 'active' AND t.open = 1 AND r.state = 'queued' AND t.vcpus <= ?"
        " AND t.memory_mib <= ? AND t.disk_mib <= ? AND t.network <= ?"
        " AND (t.deadline IS NULL OR t.deadline > ?)"
        " AND NOT EXISTS (SELECT 1 FROM replicas o WHERE o.task_seq = r.task_seq AND o.worker = ?)"
        " AND NOT EXISTS (SELECT 1 FROM results s WHERE s.task_seq = r.task_seq AND s.worker = ?)"
    )
    network_ok = int(room.network is NetworkMode.PROXY)
    params = (room.vcpus, room.memory_mib, room.disk_mib, network_ok, wall, worker, worker)
    images = sorted(i.hex() for i in offer.images)
    queries: list[tuple[str, tuple[object, ...]]] = []
    if images:
        marks = ", ".join("?" * len(images))
        queries.append((f" AND t.image_id IN ({marks})", tuple(images)))
    queries.append(("", ()))
    for extra, extra_params in queries:
        # Stepped lazily and closed at the first fit: usually the first row, so a lease reads one
        # candidate rather than a page of them.
        cursor = conn.execute(
            f"{_CANDIDATES} WHERE {prefilter}{extra} ORDER BY t.seq, r.idx",
            (*params, *extra_params),
        )
        try:
            for row in cursor:
                spec = schema.spec_from_row(row)
                if offer_fits(offer, spec.caps):
                    return row[0], row[-1], spec
        finally:
            cursor.close()
    return None


_CANDIDATES = (
    f"SELECT {', '.join('t.' + c.strip() for c in schema.TASK_COLUMNS.split(','))}, r.idx"
    " FROM tasks t CROSS JOIN replicas r ON r.task_seq = t.seq"
)


def judge_and_apply(
    conn: sqlite3.Connection, seq: int, wall: float, held_for: dict[tuple[str, int], float]
) -> list[StopNotice]:
    """Judge task ``seq`` and write the verdict, time-outs and stops; return the notices."""
    row = conn.execute(f"SELECT {schema.TASK_COLUMNS} FROM tasks WHERE seq = ?", (seq,)).fetchone()
    spec, state = schema.spec_from_row(row), TaskState(row[10])
    verdict = Outcome(row[11]) if row[11] is not None else Outcome.FAILED
    replicas = schema.load_replicas(conn, seq)
    results = [
        ResultView(idx, worker, digest)
        for idx, worker, digest in conn.execute(
            "SELECT idx, worker, digest FROM results WHERE task_seq = ? ORDER BY arrival", (seq,)
        )
    ]
    mine = {idx: t for (task_id, idx), t in held_for.items() if task_id == spec.task_id}
    verdict_now = judge(
        spec=spec, state=state, replicas=replicas, results=results, held_for=mine,
        now_wall=wall, reason=row[12], verdict=verdict,
    )  # fmt: skip
    return _apply(conn, seq, spec, state, replicas, verdict_now, wall)


def _apply(
    conn: sqlite3.Connection,
    seq: int,
    spec: TaskSpec,
    state: TaskState,
    replicas: list[Replica],
    judgement: Judgement,
    wall: float,
) -> list[StopNotice]:
    stops: list[StopNotice] = []
    for idx in judgement.time_out:
        replica = replicas[idx]
        lease = LeaseKey(spec.task_id, idx, replica.attempts)
        assert replica.worker is not None
        stops.append(StopNotice(replica.worker, lease, "max runtime exceeded"))
        replicas[idx] = replica_step(replica, ReplicaEvent.TIME_OUT, reason="max runtime exceeded")
        schema.save_replica(conn, seq, replicas[idx], None)
    if not judgement.over:
        return stops
    why = judgement.reason or judgement.outcome.value
    for idx in judgement.stop:
        replica = replicas[idx]
        if replica.state in HOLDING:
            assert replica.worker is not None
            lease = LeaseKey(spec.task_id, idx, replica.attempts)
            stops.append(StopNotice(replica.worker, lease, f"task over: {why}"))
        schema.save_replica(conn, seq, replica_step(replica, ReplicaEvent.STOP), None)
    if state in LIVE_TASK_STATES:
        event = TaskEvent.SUCCEED if judgement.outcome is Outcome.SUCCEEDED else TaskEvent.FAIL
        conn.execute(
            "UPDATE tasks SET state = ?, verdict = ?, reason = ?, agreed = ?, finished_at = ?"
            " WHERE seq = ?",
            (task_step(state, event).value, judgement.outcome.value, judgement.reason,
             judgement.agreed, wall, seq),
        )  # fmt: skip
    return stops


def record_result(
    conn: sqlite3.Connection,
    worker: str,
    report: ResultReport,
    wall: float,
    held_for: dict[tuple[str, int], float],
) -> tuple[ResultStatus, list[StopNotice]]:
    """Store ``report`` if ``worker`` holds its lease now, then judge (once per replica, worker)."""
    lease = report.lease
    row = conn.execute("SELECT seq FROM tasks WHERE task_id = ?", (lease.task_id,))
    found = row.fetchone()
    if found is None:
        return ResultStatus.STALE, []
    seq = found[0]
    duplicate = conn.execute(
        "SELECT 1 FROM results WHERE task_seq = ? AND idx = ? AND worker = ?",
        (seq, lease.replica, worker),
    ).fetchone()
    if duplicate is not None:
        return ResultStatus.DUPLICATE, []
    replicas = schema.load_replicas(conn, seq)
    if lease.replica >= len(replicas):
        return ResultStatus.STALE, []
    replica = replicas[lease.replica]
    if not holds(replica, worker, lease.attempt):
        return ResultStatus.STALE, []
    schema.save_replica(conn, seq, replica_step(replica, ReplicaEvent.REPORT), None)
    conn.execute(
        "INSERT INTO results (task_seq, idx, worker, attempt, exit_code, stdout_digest,"
        " stderr_digest, stdout_blob, stderr_blob, archive_blob, signature, digest,"
        " received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (seq, lease.replica, worker, lease.attempt, report.exit_code,
         report.stdout_digest, report.stderr_digest, report.stdout_blob,
         report.stderr_blob, report.archive_blob, report.signature, report.digest, wall),
    )  # fmt: skip
    return ResultStatus.RECORDED, judge_and_apply(conn, seq, wall, held_for)


def expire_leases(
    conn: sqlite3.Connection,
    tasks: set[str],
    workers: dict[LeaseKey, str],
    reason: str,
    wall: float,
    held_for: dict[tuple[str, int], float],
) -> list[StopNotice]:
    """Expire each lease in ``workers`` still held by that worker (re-queue or give up), then
    judge every task in ``tasks``."""
    leases = list(workers)
    stops: list[StopNotice] = []
    for task_id in sorted(tasks):
        seq, spec, _, _, _ = load_task(conn, task_id)
        replicas = schema.load_replicas(conn, seq)
        for key in (k for k in leases if k.task_id == task_id):
            replica = replicas[key.replica]
            if holds(replica, workers[key], key.attempt):
                after = expire(replica, max_attempts=spec.limits.max_attempts, reason=reason)
                schema.save_replica(conn, seq, after, None)
        stops += judge_and_apply(conn, seq, wall, held_for)
    return stops
