"""Random operation sequences against the real queue (sqlite on disk, restarts included).

Whatever the order of leases, heartbeats, results, losses, expiries, cancels and restarts: a replica
is held by at most one worker and only its latest lease is honoured, no worker holds two replicas
of one task, a result is stored once, and a finished task never changes.
"""

from __future__ import annotations

import sqlite3
import tempfile
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from catalog.dispatch import Heartbeat, LeaseGrant, LeaseKey, ResultStatus
from scheduler_role.lifecycle import FINISHED_TASK_STATES, TaskState
from scheduler_role.queue import Queue
from scheduler_role.trust import LAB
from tests.scheduler.conftest import VirtualClock, offer, report, spec

WORKERS = ["w0", "w1", "w2", "w3"]
op = st.one_of(
    st.tuples(st.just("lease"), st.sampled_from(WORKERS)),
    st.tuples(st.just("heartbeat"), st.sampled_from(WORKERS)),
    st.tuples(st.just("report"), st.sampled_from(WORKERS), st.booleans()),
    st.tuples(st.just("lost"), st.sampled_from(WORKERS)),
    st.tuples(st.just("wait"), st.sampled_from([5.0, 20.0, 40.0])),
    st.tuples(st.just("cancel"), st.integers(0, 2)),
    st.tuples(st.just("restart")),
    # A confused or lying worker speaks for another's lease.
    st.tuples(st.just("steal"), st.sampled_from(WORKERS), st.sampled_from(WORKERS)),
)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(st.lists(op, min_size=15, max_size=40))
def test_random_operations_keep_the_invariants(ops: list[tuple[object, ...]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        trio.run(run_ops, Path(tmp) / "scheduler.db", ops,
                 clock=trio.testing.MockClock(autojump_threshold=0))  # fmt: skip


async def run_ops(path: Path, ops: list[tuple[object, ...]]) -> None:
    held: dict[str, list[LeaseKey]] = {w: [] for w in WORKERS}  # what each worker thinks it has
    finished: dict[str, tuple[object, ...]] = {}
    async with AsyncExitStack() as stack:
        q = await stack.enter_async_context(
            Queue.open(path, clock=VirtualClock(), policy=LAB, lease_timeout=30)
        )
        for n, shape in enumerate([(1, 1), (3, 2), (2, 2)]):
            await q.submit(spec(f"t{n}", replicas=shape[0], quorum=shape[1], max_attempts=2))
        for kind, *args in ops:
            if kind == "lease":
                worker = str(args[0])
                got = await q.lease(worker, offer())
                if isinstance(got, LeaseGrant):
                    held[worker].append(got.lease)
            elif kind == "heartbeat":
                worker = str(args[0])
                ack = await q.heartbeat(worker, Heartbeat(leases=tuple(held[worker])))
                held[worker] = [k for k in held[worker] if k not in ack.stop]
            elif kind == "report" and held[str(args[0])]:
                worker = str(args[0])
                lease = held[worker].pop(0)
                await checked_report(q, path, worker, lease, "ok" if args[1] else worker)
            elif kind == "steal" and held[str(args[1])]:
                thief, lease = str(args[0]), held[str(args[1])][0]
                if thief != args[1]:
                    ack = await q.heartbeat(thief, Heartbeat(leases=(lease,)))
                    assert ack.stop == (lease,)
                    await checked_report(q, path, thief, lease, "stolen")
            elif kind == "lost":
                worker = str(args[0])
                await q.lost(worker, held[worker])
                held[worker] = []
            elif kind == "wait":
                await trio.sleep(float(args[0]))  # type: ignore[arg-type]
                await q.tick()
            elif kind == "cancel":
                await q.cancel(f"t{args[0]}")
            elif kind == "restart":
                await stack.aclose()
                q = await stack.enter_async_context(
                    Queue.open(path, clock=VirtualClock(), policy=LAB, lease_timeout=30)
                )
            await check(q, path, held, finished)


def holder(path: Path, lease: LeaseKey) -> tuple[str, int] | None:
    db = sqlite3.connect(path)
    try:
        row = db.execute(
            "SELECT r.worker, r.attempts FROM replicas r JOIN tasks t ON t.seq = r.task_seq"
            " WHERE t.task_id = ? AND r.idx = ? AND r.state IN ('leased', 'running')",
            (lease.task_id, lease.replica),
        ).fetchone()
    finally:
        db.close()
    return None if row is None else (row[0], row[1])


def lapsed(path: Path, worker: str, lease: LeaseKey) -> bool:
    """``worker`` held ``lease``, it lapsed, its task is live, and the worker neither holds nor
    reported another replica of it: its late result counts (issue 15: no finished work lost)."""
    db = sqlite3.connect(path)
    try:
        row = db.execute(
            "SELECT 1 FROM lease_history h JOIN tasks t ON t.seq = h.task_seq"
            " WHERE t.task_id = ? AND h.idx = ? AND h.attempt = ? AND h.worker = ?"
            " AND h.outcome IN ('expired', 'lost') AND t.state = 'active'"
            " AND NOT EXISTS (SELECT 1 FROM results s WHERE s.task_seq = t.seq"
            "  AND s.worker = h.worker)"
            " AND NOT EXISTS (SELECT 1 FROM replicas o WHERE o.task_seq = t.seq"
            "  AND o.worker = h.worker)",
            (lease.task_id, lease.replica, lease.attempt, worker),
        ).fetchone()
    finally:
        db.close()
    return row is not None


async def checked_report(q: Queue, path: Path, worker: str, lease: LeaseKey, out: str) -> None:
    before = holder(path, lease)
    late = lapsed(path, worker, lease)
    ack, _ = await q.report(worker, report(lease, stdout=out))
    recorded = ack.status is ResultStatus.RECORDED
    counts = before == (worker, lease.attempt) or late
    assert recorded == counts, "a result from a non-holder counted"


async def check(
    q: Queue, path: Path, held: dict[str, list[LeaseKey]], finished: dict[str, tuple[object, ...]]
) -> None:
    db = sqlite3.connect(path)
    try:
        rows = db.execute(
            "SELECT t.task_id, r.idx, r.worker, r.attempts FROM replicas r"
            " JOIN tasks t ON t.seq = r.task_seq WHERE r.state IN ('leased', 'running')"
        ).fetchall()
        assert all(worker is not None for _, _, worker, _ in rows)
        pairs = [(task, worker) for task, _, worker, _ in rows]
        assert len(pairs) == len(set(pairs)), "a worker holds two replicas of one task"
        results = db.execute("SELECT task_seq, idx, worker FROM results").fetchall()
        assert len(results) == len(set(results))
        per_task = db.execute("SELECT task_seq, worker FROM results").fetchall()
        assert len(per_task) == len(set(per_task)), "a worker reported twice for one task"
    finally:
        db.close()
    # Memory (lease deadlines) and disk agree on who holds what.
    assert q.held_by() == dict(Counter(worker for _, _, worker, _ in rows))
    # Only the holder of the latest lease of a replica is told to keep going.
    current = {(task, idx): (worker, attempts) for task, idx, worker, attempts in rows}
    for worker, leases in held.items():
        for lease in leases:
            owner = current.get((lease.task_id, lease.replica))
            ack = await q.heartbeat(worker, Heartbeat(leases=(lease,)))
            assert (ack.stop == ()) == (owner == (worker, lease.attempt))
    for n in range(3):
        status = await q.status(f"t{n}")
        if status.state in FINISHED_TASK_STATES:
            seen = (status.state, status.verdict, status.agreed, status.reason, status.reported)
            assert finished.setdefault(f"t{n}", seen) == seen, "a finished task changed"
        else:
            assert status.state is TaskState.ACTIVE
            assert f"t{n}" not in finished
