"""Issue 16: a work request that finds nothing waits at the scheduler and is answered the moment
work that fits arrives, by whichever path it arrives (a real queue on a real sqlite file).

Time is virtual, but it jumps only after 0.5 s of real idleness (:func:`clock`): with the default
autojump, the clock leaps to the next deadline (the hold's end) whenever trio waits on the
database's thread, and every request would seem to have waited its whole hold."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import trio
from trio.testing import MockClock

from catalog.dispatch import Heartbeat, LeaseGrant, LeaseKey, NoWork
from scheduler_role.lifecycle import ReplicaState
from scheduler_role.queue import NOTHING_FITS, Queue
from tests.scheduler.conftest import image, offer, spec

HOLD = 10.0


@pytest.fixture
def clock() -> MockClock:
    return MockClock(autojump_threshold=0.5)


@dataclass(frozen=True)
class Asked:
    answer: LeaseGrant | NoWork
    waited: float  # seconds the request was held


async def held(queue: Queue, worker: str, answers: dict[str, Asked]) -> None:
    started = trio.current_time()
    answer = await queue.lease(worker, offer(), hold=HOLD)
    answers[worker] = Asked(answer, trio.current_time() - started)


async def test_with_nothing_queued_the_request_is_held_for_its_hold_then_answered_no_work(
    queue: Queue, clock: MockClock
) -> None:
    answers: dict[str, Asked] = {}
    await held(queue, "w1", answers)
    assert isinstance(answers["w1"].answer, NoWork)
    assert answers["w1"].answer.reason == NOTHING_FITS
    assert answers["w1"].waited >= HOLD


async def test_a_task_submitted_while_a_request_is_held_is_granted_at_once(
    queue: Queue, clock: MockClock
) -> None:
    answers: dict[str, Asked] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(held, queue, "w1", answers)
        await trio.sleep(3.0)
        await queue.submit(spec("a"))
    grant = answers["w1"].answer
    assert isinstance(grant, LeaseGrant)
    assert grant.lease == LeaseKey("a", 0, 1)
    assert 3.0 <= answers["w1"].waited < 3.5


async def test_a_task_whose_image_becomes_ready_wakes_the_held_request(
    queue: Queue, clock: MockClock
) -> None:
    await queue.submit(spec("a", image_id=None))
    await queue.begin_assembly("a")
    answers: dict[str, Asked] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(held, queue, "w1", answers)
        await trio.sleep(2.0)
        await queue.image_ready("a", image(7))
    assert isinstance(answers["w1"].answer, LeaseGrant)
    assert answers["w1"].waited < 2.5


async def test_a_replica_requeued_by_an_expired_lease_wakes_the_held_request(
    queue: Queue, clock: MockClock
) -> None:
    await queue.submit(spec("a"))
    first = await queue.lease("w1", offer())
    assert isinstance(first, LeaseGrant)
    answers: dict[str, Asked] = {}
    await trio.sleep(queue.lease_timeout - HOLD / 2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(held, queue, "w2", answers)
        await trio.sleep(HOLD / 2 + 0.5)
        started = trio.current_time()
        await queue.tick()  # the lease lapsed: its replica is queued again
    grant = answers["w2"].answer
    assert isinstance(grant, LeaseGrant)
    assert grant.lease == LeaseKey("a", 0, 2)
    assert trio.current_time() - started < 0.5


async def test_a_lost_lease_requeues_its_replica_for_a_held_worker(
    queue: Queue, clock: MockClock
) -> None:
    await queue.submit(spec("a", replicas=1, quorum=1, max_attempts=3))
    first = await queue.lease("w1", offer())
    assert isinstance(first, LeaseGrant)
    answers: dict[str, Asked] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(held, queue, "w2", answers)
        await trio.sleep(1.0)
        await queue.lost("w1", [first.lease])
    assert isinstance(answers["w2"].answer, LeaseGrant)
    assert answers["w2"].waited < 1.5


async def test_one_task_for_two_held_workers_goes_to_one_and_the_other_keeps_waiting(
    queue: Queue, clock: MockClock
) -> None:
    answers: dict[str, Asked] = {}
    async with trio.open_nursery() as nursery:
        nursery.start_soon(held, queue, "w1", answers)
        nursery.start_soon(held, queue, "w2", answers)
        await trio.sleep(1.0)
        commits = queue.statistics()["commits"]
        await queue.submit(spec("a"))
    grants = [answers[w].answer for w in ("w1", "w2") if isinstance(answers[w].answer, LeaseGrant)]
    assert len(grants) == 1
    loser = "w2" if isinstance(answers["w1"].answer, LeaseGrant) else "w1"
    assert answers[loser].waited >= HOLD  # woken, found nothing, held on to the end
    # The loser's look found nothing and woke nobody: no storm of lookups.
    assert queue.statistics()["commits"] - commits <= 4


async def test_a_sidelined_worker_is_answered_at_once_even_when_it_would_wait(
    queue: Queue, clock: MockClock
) -> None:
    await queue.submit(spec("a", max_attempts=9))
    grant = await queue.lease("w1", offer())
    assert isinstance(grant, LeaseGrant)
    await queue.lost("w1", [grant.lease])  # it never said the VM ran: it failed to start it
    started = trio.current_time()
    answer = await queue.lease("w1", offer(), hold=HOLD)
    assert isinstance(answer, NoWork)
    assert "sidelined" in answer.reason
    assert trio.current_time() - started < 1.0


async def test_work_arriving_for_an_unheld_worker_costs_nothing(queue: Queue) -> None:
    await queue.submit(spec("a"))
    assert queue.arrivals.arrivals == 1
    grant = await queue.lease("w1", offer())
    assert isinstance(grant, LeaseGrant)
    await queue.heartbeat("w1", Heartbeat(leases=(grant.lease,), running=(grant.lease,)))
    assert queue.arrivals.arrivals == 1  # leasing and heartbeats queue nothing


async def test_a_held_worker_no_longer_heard_from_gets_no_lease_when_work_arrives(
    queue: Queue, clock: MockClock
) -> None:
    there = True
    answers: dict[str, LeaseGrant | NoWork] = {}

    async def ask() -> None:
        answers["w1"] = await queue.lease("w1", offer(), hold=HOLD, present=lambda: there)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        await trio.sleep(1.0)
        there = False  # frozen or cut off: its heartbeats stopped
        await queue.submit(spec("a"))
    assert isinstance(answers["w1"], NoWork)
    status = await queue.status("a")
    assert [r.state for r in status.replicas] == [ReplicaState.QUEUED]
