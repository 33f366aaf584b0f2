"""Issue 15 on the real queue: a worker whose leases fail before their VM starts is sidelined with a
growing rest and its retries go elsewhere, without spending the task's attempts; a finished
result whose lease lapsed still counts (once, by its holder only)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio

from catalog.dispatch import Heartbeat, LeaseGrant, LeaseKey, NoWork, ResultStatus
from scheduler_role.lifecycle import START_FAILURE_FACTOR, ReplicaState, TaskState
from scheduler_role.queue import Queue
from scheduler_role.trust import SIDELINE_MAX, sideline_for
from tests.scheduler.conftest import offer, report, spec


async def grant(queue: Queue, worker: str) -> LeaseGrant:
    got = await queue.lease(worker, offer())
    assert isinstance(got, LeaseGrant), got
    return got


async def run(queue: Queue, worker: str, lease: LeaseKey) -> None:
    """``worker``'s heartbeat saying the VM of ``lease`` started."""
    ack = await queue.heartbeat(worker, Heartbeat(leases=(lease,), running=(lease,)))
    assert ack.stop == ()


def test_the_rest_grows_and_is_capped() -> None:
    assert [sideline_for(n) for n in range(1, 5)] == [5.0, 10.0, 20.0, 40.0]
    assert sideline_for(1000) == SIDELINE_MAX


async def test_a_lease_that_failed_to_start_spends_no_attempt_and_goes_elsewhere(
    queue: Queue,
    autojump_clock: trio.testing.MockClock,
) -> None:
    await queue.submit(spec("a", max_attempts=1))
    await queue.submit(spec("b", max_attempts=1))
    sick = await grant(queue, "sick")
    assert sick.lease == LeaseKey("a", 0, 1)
    await queue.lost("sick", [sick.lease])  # it never said the VM ran: it could not start it
    status = await queue.status("a")
    assert status.state is TaskState.ACTIVE  # one attempt allowed, none spent
    assert status.replicas[0].state is ReplicaState.QUEUED
    assert status.replicas[0].start_failures == 1
    refused = await queue.lease("sick", offer())
    assert isinstance(refused, NoWork)
    assert "sidelined" in refused.reason
    assert refused.retry_after == pytest.approx(5.0)
    healthy = await grant(queue, "healthy")
    assert healthy.lease == LeaseKey("a", 0, 2)
    await trio.sleep(5.1)
    # Rested, the sick worker may work again, but not on the task it failed while another
    # worker is asking: it gets b.
    assert (await grant(queue, "sick")).lease.task_id == "b"
    await run(queue, "healthy", healthy.lease)
    ack, _ = await queue.report("healthy", report(healthy.lease))
    assert ack.status is ResultStatus.RECORDED
    assert (await queue.status("a")).state is TaskState.SUCCEEDED


async def test_the_rest_doubles_in_a_row_and_a_started_vm_forgives(
    queue: Queue, autojump_clock: trio.testing.MockClock
) -> None:
    await queue.submit(spec("a", max_attempts=3))
    rests = []
    for _ in range(3):
        g = await grant(queue, "w")  # alone: its own failed task comes back to it
        await queue.lost("w", [g.lease])
        refused = await queue.lease("w", offer())
        assert isinstance(refused, NoWork)
        rests.append(refused.retry_after)
        await trio.sleep(refused.retry_after + 0.1)
    assert rests == pytest.approx([5.0, 10.0, 20.0], abs=0.5)
    g = await grant(queue, "w")
    await run(queue, "w", g.lease)  # its VM started: the run of failures is over
    await queue.lost("w", [g.lease])  # a loss after the start spends an attempt, no rest
    assert isinstance(await queue.lease("w", offer()), LeaseGrant)
    status = await queue.status("a")
    assert status.replicas[0].start_failures == 3
    assert status.replicas[0].attempts == 5


async def test_start_failures_are_bounded_on_their_own(
    queue: Queue, autojump_clock: trio.testing.MockClock
) -> None:
    await queue.submit(spec("a", max_attempts=2))
    for n in range(START_FAILURE_FACTOR * 2):
        g = await grant(queue, f"w{n}")  # fresh workers: none is sidelined
        await queue.lost(f"w{n}", [g.lease])
    status = await queue.status("a")
    assert status.state is TaskState.FAILED
    assert "4 leases failed to start" in status.reason


async def test_an_expired_lease_finished_late_counts_when_not_leased_again(
    queue: Queue, autojump_clock: trio.testing.MockClock
) -> None:
    await queue.submit(spec("a"))
    g = await grant(queue, "w1")
    await run(queue, "w1", g.lease)
    await trio.sleep(queue.lease_timeout + 1)
    await queue.tick()  # lapsed (the worker was cut off): queued again
    assert (await queue.status("a")).replicas[0].state is ReplicaState.QUEUED
    assert await queue.may_report("w1", g.lease)
    assert not await queue.may_report("w2", g.lease)  # not w2's lease
    ack, _ = await queue.report("w1", report(g.lease))
    assert ack.status is ResultStatus.RECORDED
    status = await queue.status("a")
    assert status.state is TaskState.SUCCEEDED
    assert status.replicas[0].state is ReplicaState.REPORTED
    assert isinstance(await queue.lease("w2", offer()), NoWork)  # nothing runs twice


async def test_a_late_result_after_a_re_lease_counts_and_stops_the_new_holder(
    queue: Queue, autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    await queue.submit(spec("a"))
    first = await grant(queue, "w1")
    await run(queue, "w1", first.lease)
    await trio.sleep(queue.lease_timeout + 1)
    await queue.tick()
    second = await grant(queue, "w2")
    ack, stops = await queue.report("w1", report(first.lease))
    assert ack.status is ResultStatus.RECORDED
    assert [(s.worker, s.lease) for s in stops] == [("w2", second.lease)]
    assert (await queue.status("a")).state is TaskState.SUCCEEDED
    ack, _ = await queue.report("w2", report(second.lease))
    assert ack.status is ResultStatus.STALE  # stopped: the task is over
    db = sqlite3.connect(tmp_path / "scheduler.db")
    try:
        assert db.execute("SELECT worker, late FROM results").fetchall() == [("w1", 1)]
    finally:
        db.close()


async def test_no_late_result_for_a_stranger_a_start_failure_or_a_finished_task(
    queue: Queue,
    autojump_clock: trio.testing.MockClock,
) -> None:
    await queue.submit(spec("a", replicas=2, quorum=2))
    g1, g2 = await grant(queue, "w1"), await grant(queue, "w2")
    # A lease lost before its VM ran has no result to give.
    await queue.lost("w1", [g1.lease])
    ack, _ = await queue.report("w1", report(g1.lease))
    assert ack.status is ResultStatus.STALE
    # Another worker cannot report a lapsed lease it never held.
    await run(queue, "w2", g2.lease)
    await queue.lost("w2", [g2.lease])
    ack, _ = await queue.report("w3", report(g2.lease))
    assert ack.status is ResultStatus.STALE
    # A worker holding another replica of the task is one witness: its lapsed lease's result
    # does not count beside it.
    again = await grant(queue, "w2")
    assert again.lease.task_id == "a"
    assert not await queue.may_report("w2", g2.lease)
    ack, _ = await queue.report("w2", report(g2.lease))
    assert ack.status is ResultStatus.STALE
    await queue.cancel("a")
    ack, _ = await queue.report("w2", report(again.lease))
    assert ack.status is ResultStatus.STALE
