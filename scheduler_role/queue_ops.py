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
from scheduler_role.end_conditions import (
    Judgement,
    Outcome,
    ResultView,
    agreement_digest,
    judge,
)
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
from scheduler_role.queue_types import TaskStatus
from scheduler_role.task import TaskSpec
from scheduler_role.trust import Conduct, Policy
from scheduler_role.worker_records import (
    load_record,
    note,
    start_failed,
    start_succeeded,
)


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


def mark_running(
    conn: sqlite3.Connection, leases: list[LeaseKey], wall: float, worker: str | None = None
) -> None:
    """``worker``'s VMs for ``leases`` started: a sick run of its, if any, is over."""
    if worker is not None and leases:
        start_succeeded(conn, worker)
    for lease in leases:
        conn.execute(
            "UPDATE replicas SET state = ?, since = ? WHERE state = ? AND attempts = ?"
            " AND idx = ? AND task_seq = (SELECT seq FROM tasks WHERE task_id = ?)",
            (ReplicaState.RUNNING.value, wall, ReplicaState.LEASED.value, lease.attempt,
             lease.replica, lease.task_id),
        )  # fmt: skip


def note_lease(
    conn: sqlite3.Connection, seq: int, idx: int, attempt: int, worker: str, network: str
) -> None:
    """Remember who holds attempt ``attempt`` of replica ``idx``: its result may still count
    after the lease lapsed (:func:`record_result`)."""
    conn.execute(
        "INSERT OR REPLACE INTO lease_history (task_seq, idx, attempt, worker, network, outcome)"
        " VALUES (?, ?, ?, ?, ?, NULL)",
        (seq, idx, attempt, worker, network),
    )


def _lease_ended(conn: sqlite3.Connection, seq: int, key: LeaseKey, outcome: str) -> None:
    conn.execute(
        "UPDATE lease_history SET outcome = ? WHERE task_seq = ? AND idx = ? AND attempt = ?",
        (outcome, seq, key.replica, key.attempt),
    )


def find_candidate(
    conn: sqlite3.Connection,
    worker: str,
    network: str,
    offer: Offer,
    wall: float,
    *,
    avoid_failed: bool = True,
) -> tuple[int, int, TaskSpec] | None:
    """The first queued replica (held images first, then submission order) that fits ``offer``,
    of a task that neither ``worker`` nor another worker on its ``network`` holds or reported
    for, that its network is not barred from, that allows ``worker``, whose deadline has not
    passed; with ``avoid_failed``, of a task no lease of ``worker``'s failed to start (its retry
    goes to another worker: pass False when no other worker is asking)."""
    room = offer.room
    # Driven by the open tasks (a partial index, in submission order), so a lease costs the same
    # with ten thousand tasks already leased as with none.
    prefilter = (
        "t.state = 'active' AND t.open = 1 AND r.state = 'queued' AND t.vcpus <= ?"
        " AND t.memory_mib <= ? AND t.disk_mib <= ? AND t.network <= ?"
        " AND (t.deadline IS NULL OR t.deadline > ?)"
        " AND NOT EXISTS (SELECT 1 FROM replicas o WHERE o.task_seq = r.task_seq"
        "  AND (o.worker = ? OR o.network = ?))"
        " AND NOT EXISTS (SELECT 1 FROM results s WHERE s.task_seq = r.task_seq"
        "  AND (s.worker = ? OR COALESCE(s.network, 'peer:' || s.worker) = ?))"
        " AND NOT EXISTS (SELECT 1 FROM strikes k WHERE k.task_seq = r.task_seq AND k.network = ?)"
    )
    network_ok = int(room.network is NetworkMode.PROXY)
    params: tuple[object, ...] = (room.vcpus, room.memory_mib, room.disk_mib, network_ok, wall,
                                  worker, network, worker, network, network)  # fmt: skip
    if avoid_failed:
        prefilter += (
            " AND NOT EXISTS (SELECT 1 FROM lease_history h WHERE h.task_seq = r.task_seq"
            "  AND h.worker = ? AND h.outcome = 'start_failed')"
        )
        params = (*params, worker)
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
                if spec.workers and worker not in spec.workers:
                    continue
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
        ResultView(idx, worker, digest, network or "", bool(trusted))
        for idx, worker, digest, network, trusted in conn.execute(
            "SELECT idx, worker, digest, network, trusted FROM results WHERE task_seq = ?"
            " ORDER BY arrival",
            (seq,),
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
    if judgement.add:
        conn.executemany(
            "INSERT INTO replicas (task_seq, idx, state) VALUES (?, ?, ?)",
            [(seq, len(replicas) + i, ReplicaState.QUEUED.value) for i in range(judgement.add)],
        )
        conn.execute("UPDATE tasks SET open = 1 WHERE seq = ?", (seq,))
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
        if judgement.outcome is Outcome.SUCCEEDED:
            # Only a decided task says who was right: each worker's record learns it once.
            for worker in judgement.agreeing:
                note(conn, worker, Conduct.AGREED, wall)
            for worker in judgement.dissenters:
                note(conn, worker, Conduct.DISAGREED, wall)
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
    policy: Policy,
) -> tuple[ResultStatus, list[StopNotice]]:
    """Store ``report`` if ``worker`` holds its lease now, or held it and it lapsed while the
    task is still live (:func:`late_lease`), then judge (once per replica, worker).

    A lapsed lease's result whose replica nobody leased since reports that replica; one that
    comes after the replica was leased again is kept as a *late* result: either counts towards
    the quorum like any other (one vote per worker and network, :mod:`end_conditions`). The
    result keeps the network its lease was taken from and whether ``worker`` was trusted (by its
    record, or by the task's own allow-list) when it reported."""
    lease = report.lease
    found = conn.execute("SELECT seq FROM tasks WHERE task_id = ?", (lease.task_id,)).fetchone()
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
    late = False
    if holds(replica, worker, lease.attempt):
        network = replica_network(conn, seq, lease.replica)
    else:
        lapsed = late_lease(conn, seq, worker, lease)
        if lapsed is None:
            return ResultStatus.STALE, []
        network = lapsed
        # Nobody leased it since: this is the replica's result. Else it counts beside it.
        late = not (replica.state is ReplicaState.QUEUED and replica.attempts == lease.attempt)
    spec = schema.spec_from_row(
        conn.execute(f"SELECT {schema.TASK_COLUMNS} FROM tasks WHERE seq = ?", (seq,)).fetchone()
    )
    trusted = worker in spec.workers or policy.trusted(load_record(conn, worker))
    if not late:
        schema.save_replica(conn, seq, replica_step(replica, ReplicaEvent.REPORT), None)
    _lease_ended(conn, seq, lease, "reported")
    start_succeeded(conn, worker)
    conn.execute(
        "INSERT INTO results (task_seq, idx, worker, attempt, exit_code, stdout_digest,"
        " stderr_digest, stdout_blob, stderr_blob, archive_blob, signature, digest,"
        " received_at, network, trusted, late)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (seq, lease.replica, worker, lease.attempt, report.exit_code,
         report.stdout_digest, report.stderr_digest, report.stdout_blob,
         report.stderr_blob, report.archive_blob, report.signature, agreement_digest(report),
         wall, network, int(trusted), int(late)),
    )  # fmt: skip
    return ResultStatus.RECORDED, judge_and_apply(conn, seq, wall, held_for)


def late_lease(conn: sqlite3.Connection, seq: int, worker: str, lease: LeaseKey) -> str | None:
    """The network ``worker`` held ``lease`` from, if it held it and the lease lapsed (expired,
    or said lost) while task ``seq`` is still live, and it neither holds another replica of the
    task nor reported for one (a worker is one witness per task); None otherwise. A lease that
    failed to start has no result, and nobody else's lease is ``worker``'s to report."""
    row = conn.execute(
        "SELECT h.network FROM lease_history h JOIN tasks t ON t.seq = h.task_seq"
        " WHERE h.task_seq = ? AND h.idx = ? AND h.attempt = ? AND h.worker = ?"
        " AND h.outcome IN ('expired', 'lost') AND t.state = ?"
        " AND NOT EXISTS (SELECT 1 FROM replicas o WHERE o.task_seq = h.task_seq"
        "  AND o.worker = h.worker)"
        " AND NOT EXISTS (SELECT 1 FROM results s WHERE s.task_seq = h.task_seq"
        "  AND s.worker = h.worker)",
        (seq, lease.replica, lease.attempt, worker, TaskState.ACTIVE.value),
    ).fetchone()
    if row is None:
        return None
    network: str | None = row[0]
    return network if network is not None else f"peer:{worker}"


def may_report(conn: sqlite3.Connection, worker: str, lease: LeaseKey) -> bool:
    """Whether a result from ``worker`` for ``lease`` would be counted (fetch its blobs then)."""
    found = conn.execute("SELECT seq FROM tasks WHERE task_id = ?", (lease.task_id,)).fetchone()
    if found is None:
        return False
    return late_lease(conn, found[0], worker, lease) is not None


def replica_network(conn: sqlite3.Connection, seq: int, idx: int) -> str | None:
    row = conn.execute(
        "SELECT network FROM replicas WHERE task_seq = ? AND idx = ?", (seq, idx)
    ).fetchone()
    return None if row is None else row[0]


def expire_leases(
    conn: sqlite3.Connection,
    tasks: set[str],
    workers: dict[LeaseKey, str],
    conduct: tuple[Conduct, str],
    wall: float,
    held_for: dict[tuple[str, int], float],
    policy: Policy,
) -> list[StopNotice]:
    """Expire each lease in ``workers`` still held by that worker (re-queue or give up), then
    judge every task in ``tasks``. ``conduct`` is what the worker did (lost or let expire) and
    why; it goes on the worker's record, and the network of an untrusted worker is barred from
    that task (so identities on one network cannot take turns until its attempts run out).

    A lease whose VM had not started spends a start failure, not one of the task's attempts;
    one the worker itself gave up before its VM started also sidelines that worker
    (:func:`worker_records.start_failed`), so the retry goes to another."""
    leases = list(workers)
    what, reason = conduct
    stops: list[StopNotice] = []
    for task_id in sorted(tasks):
        seq, spec, _, _, _ = load_task(conn, task_id)
        replicas = schema.load_replicas(conn, seq)
        for key in (k for k in leases if k.task_id == task_id):
            replica = replicas[key.replica]
            worker = workers[key]
            if holds(replica, worker, key.attempt):
                network = replica_network(conn, seq, key.replica)
                if network is not None and not policy.trusted(load_record(conn, worker)):
                    conn.execute(
                        "INSERT OR IGNORE INTO strikes (task_seq, network) VALUES (?, ?)",
                        (seq, network),
                    )
                note(conn, worker, what, wall)
                started = replica.state is ReplicaState.RUNNING
                why = reason
                outcome = "lost" if what is Conduct.LOST else "expired"
                if not started and what is Conduct.LOST:
                    start_failed(conn, worker, wall)
                    why, outcome = "the worker could not start it", "start_failed"
                after = expire(
                    replica, max_attempts=spec.limits.max_attempts, reason=why, started=started
                )
                schema.save_replica(conn, seq, after, None)
                _lease_ended(conn, seq, key, outcome)
        stops += judge_and_apply(conn, seq, wall, held_for)
    return stops


def load_status(conn: sqlite3.Connection, task_id: str) -> TaskStatus:
    """The task's whole status (UnknownTaskError for an ID it does not have)."""
    seq, spec, state, verdict, reason = load_task(conn, task_id)
    agreed = conn.execute("SELECT agreed FROM tasks WHERE seq = ?", (seq,)).fetchone()[0]
    dissenters: tuple[str, ...] = ()
    if agreed is not None:
        rows = conn.execute(
            "SELECT DISTINCT worker FROM results WHERE task_seq = ? AND digest != ?"
            " ORDER BY worker",
            (seq, agreed),
        ).fetchall()
        dissenters = tuple(r[0] for r in rows)
    replicas = tuple(schema.load_replicas(conn, seq))
    reported = conn.execute(
        "SELECT worker FROM results WHERE task_seq = ? ORDER BY arrival", (seq,)
    ).fetchall()
    times = conn.execute(
        "SELECT submitted_at, finished_at, (SELECT MIN(since) FROM replicas"
        " WHERE task_seq = ? AND state = 'running') FROM tasks WHERE seq = ?",
        (seq, seq),
    ).fetchone()
    return TaskStatus(
        spec, state, verdict, reason, replicas, agreed, dissenters,
        tuple(r[0] for r in reported), submitted_at=times[0], finished_at=times[1],
        running_since=times[2],
    )  # fmt: skip
