"""The queue on real sqlite files: leasing, matching, expiry in virtual time, results, restart."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from catalog.dispatch import Heartbeat, LeaseGrant, LeaseKey, NoWork, ResultStatus
from scheduler_role.end_conditions import Outcome
from scheduler_role.errors import InvalidTransition, TaskConflictError, UnknownTaskError
from scheduler_role.lifecycle import ReplicaState, TaskState
from scheduler_role.queue import Queue, StopNotice
from scheduler_role.trust import LAB
from tests.scheduler.conftest import VirtualClock, image, offer, report, spec


async def grant(queue: Queue, worker: str, **kw: object) -> LeaseGrant:
    got = await queue.lease(worker, offer(**kw))  # type: ignore[arg-type]
    assert isinstance(got, LeaseGrant), got
    return got


async def test_submit_is_idempotent_by_task_id(queue: Queue) -> None:
    assert await queue.submit(spec("a"))
    assert not await queue.submit(spec("a"))
    with pytest.raises(TaskConflictError):
        await queue.submit(spec("a", memory_mib=512))
    with pytest.raises(UnknownTaskError):
        await queue.status("nope")


async def test_one_task_round_trip(queue: Queue) -> None:
    await queue.submit(spec("a"))
    g = await grant(queue, "w1")
    assert g.lease == LeaseKey("a", 0, 1)
    assert g.image_id == image(0)
    assert isinstance(await queue.lease("w2", offer()), NoWork)
    ack, stops = await queue.report("w1", report(g.lease))
    assert ack.status is ResultStatus.RECORDED
    assert stops == []
    status = await queue.status("a")
    assert status.state is TaskState.SUCCEEDED
    assert status.verdict is Outcome.SUCCEEDED
    assert [r.worker for r in await queue.results("a")] == ["w1"]
    await queue.collect("a")
    assert (await queue.status("a")).state is TaskState.DONE
    with pytest.raises(InvalidTransition):
        await queue.collect("a")


async def test_matching_refuses_what_the_offer_cannot_hold(queue: Queue) -> None:
    await queue.submit(spec("big", memory_mib=8192))
    await queue.submit(spec("net", network=True))
    await queue.submit(spec("cpus", vcpus=4))
    assert isinstance(await queue.lease("w1", offer(memory_mib=4096)), NoWork)
    assert (await grant(queue, "w2", memory_mib=8192)).lease.task_id == "big"
    assert (await grant(queue, "w3", network=True)).lease.task_id == "net"
    assert (await grant(queue, "w4", vcpus=4)).lease.task_id == "cpus"


async def test_prefers_tasks_whose_image_the_worker_holds(queue: Queue) -> None:
    for n in range(5):
        await queue.submit(spec(f"t{n}", image_id=image(n)))
    assert (await grant(queue, "w1", images=(image(3),))).lease.task_id == "t3"
    assert (await grant(queue, "w2", images=(image(99),))).lease.task_id == "t0"  # FIFO
    assert (await grant(queue, "w3")).lease.task_id == "t1"


async def test_a_worker_never_gets_two_replicas_of_one_task(queue: Queue) -> None:
    await queue.submit(spec("a", replicas=3, quorum=2))
    g = await grant(queue, "w1")
    assert isinstance(await queue.lease("w1", offer()), NoWork)
    await queue.report("w1", report(g.lease))
    assert isinstance(await queue.lease("w1", offer()), NoWork)  # it reported already
    assert (await grant(queue, "w2")).lease.replica == 1


async def test_waits_for_the_image(queue: Queue) -> None:
    await queue.submit(spec("a", image_id=None))
    await queue.begin_assembly("a")
    assert isinstance(await queue.lease("w1", offer()), NoWork)
    await queue.image_ready("a", image(7))
    assert (await grant(queue, "w1")).image_id == image(7)
    assert not await queue.submit(spec("a", image_id=None))  # still the same task


async def test_assembly_failure_fails_the_task(queue: Queue) -> None:
    await queue.submit(spec("a", image_id=None))
    await queue.begin_assembly("a")
    await queue.assembly_failed("a", "package foo not found")
    status = await queue.status("a")
    assert status.state is TaskState.FAILED
    assert status.reason == "package foo not found"


async def test_expiry_requeues_then_fails_at_max_attempts(
    queue: Queue, autojump_clock: trio.testing.MockClock
) -> None:
    await queue.submit(spec("a", max_attempts=2))
    first = await grant(queue, "w1")
    await trio.sleep(queue.lease_timeout / 2)
    beat = Heartbeat(leases=(first.lease,), running=(first.lease,))  # its VM started
    assert (await queue.heartbeat("w1", beat)).stop == ()
    await trio.sleep(queue.lease_timeout / 2 + 1)
    assert await queue.tick() == []  # the heartbeat extended it
    await trio.sleep(queue.lease_timeout)
    await queue.tick()
    # Re-queued: another worker gets attempt 2; the first worker's lease is now stale.
    second = await grant(queue, "w2")
    assert second.lease == LeaseKey("a", 0, 2)
    assert (await queue.heartbeat("w1", beat)).stop == (first.lease,)
    beat = Heartbeat(leases=(second.lease,), running=(second.lease,))
    assert (await queue.heartbeat("w2", beat)).stop == ()
    await trio.sleep(queue.lease_timeout + 1)
    await queue.tick()
    status = await queue.status("a")
    assert status.state is TaskState.FAILED
    assert "gave up after 2 attempts" in status.reason


async def test_what_a_worker_fetched_for_a_lease_is_in_the_tasks_status(queue: Queue) -> None:
    await queue.submit(spec("a"))
    first = await grant(queue, "w1")
    assert queue.fetched("a") == {}
    await queue.heartbeat("w1", Heartbeat(leases=(first.lease,), fetched=(12 << 20,)))
    assert queue.fetched("a") == {0: 12 << 20}
    # Another worker's word about a lease it does not hold changes nothing.
    await queue.heartbeat("w2", Heartbeat(leases=(first.lease,), fetched=(99,)))
    assert queue.fetched("a") == {0: 12 << 20}


async def test_lost_leases_requeue_at_once(queue: Queue) -> None:
    await queue.submit(spec("a"))
    g = await grant(queue, "w1")
    assert await queue.lost("w2", [g.lease]) == []  # not w2's to lose
    assert isinstance(await queue.lease("w3", offer()), NoWork)
    await queue.lost("w1", [g.lease])
    assert (await grant(queue, "w3")).lease == LeaseKey("a", 0, 2)


async def test_results_are_recorded_once(queue: Queue) -> None:
    await queue.submit(spec("a", replicas=2, quorum=2))
    g = await grant(queue, "w1")
    assert (await queue.report("w1", report(g.lease)))[0].status is ResultStatus.RECORDED
    assert (await queue.report("w1", report(g.lease)))[0].status is ResultStatus.DUPLICATE
    assert (await queue.report("w2", report(g.lease)))[0].status is ResultStatus.STALE
    assert len(await queue.results("a")) == 1


async def test_quorum_with_a_wrong_worker(queue: Queue) -> None:
    await queue.submit(spec("a", replicas=3, quorum=2))
    grants = {w: await grant(queue, w) for w in ("honest1", "liar", "honest2")}
    await queue.report("liar", report(grants["liar"].lease, stdout="wrong"))
    await queue.report("honest1", report(grants["honest1"].lease))
    assert (await queue.status("a")).state is TaskState.ACTIVE
    await queue.report("honest2", report(grants["honest2"].lease))
    status = await queue.status("a")
    assert status.state is TaskState.SUCCEEDED
    assert status.dissenters == ("liar",)


async def test_quorum_reached_stops_the_remaining_replica(queue: Queue) -> None:
    await queue.submit(spec("a", replicas=3, quorum=2))
    g = [await grant(queue, w) for w in ("w1", "w2", "w3")]
    await queue.heartbeat("w3", Heartbeat(leases=(g[2].lease,), running=(g[2].lease,)))
    assert (await queue.status("a")).replicas[2].state is ReplicaState.RUNNING
    await queue.report("w1", report(g[0].lease))
    _, stops = await queue.report("w2", report(g[1].lease))
    assert [(s.worker, s.lease) for s in stops] == [("w3", g[2].lease)]
    assert (await queue.heartbeat("w3", Heartbeat(leases=(g[2].lease,)))).stop == (g[2].lease,)


async def test_cancel_stops_running_leases_and_is_idempotent(queue: Queue) -> None:
    await queue.submit(spec("a", replicas=2, quorum=1))
    g = await grant(queue, "w1")
    stops = await queue.cancel("a")
    assert [(s.worker, s.lease) for s in stops] == [("w1", g.lease)]
    assert await queue.cancel("a") == []
    status = await queue.status("a")
    assert status.state is TaskState.CANCELLED
    assert {r.state for r in status.replicas} == {ReplicaState.STOPPED}
    assert (await queue.report("w1", report(g.lease)))[0].status is ResultStatus.STALE
    assert isinstance(await queue.lease("w2", offer()), NoWork)


async def test_deadline_and_max_runtime(
    queue: Queue, autojump_clock: trio.testing.MockClock
) -> None:
    now = VirtualClock().wall()
    await queue.submit(spec("late", deadline=now + 200))
    await queue.submit(spec("slow", max_runtime=50))
    late, slow = await grant(queue, "w1"), await grant(queue, "w2")
    stopped_at = []
    for step in range(1, 8):  # heartbeats keep the leases alive; the limits still apply
        await trio.sleep(15)
        await queue.heartbeat("w1", Heartbeat(leases=(late.lease,)))
        # The VM starts at t=15: max runtime counts from there, plus one lease timeout of grace.
        await queue.heartbeat("w2", Heartbeat(leases=(slow.lease,), running=(slow.lease,)))
        stops = await queue.tick()
        stopped_at += [(15 * step, s.worker, s.reason) for s in stops]
    assert stopped_at == [(105, "w2", "max runtime exceeded")]  # 15 + 50 + 30 <= 105
    assert (await queue.status("slow")).state is TaskState.FAILED
    await trio.sleep(100)
    await queue.heartbeat("w1", Heartbeat(leases=(late.lease,)))
    stops = await queue.tick()
    assert [(s.worker, s.lease) for s in stops] == [("w1", late.lease)]
    assert (await queue.status("late")).reason == "deadline passed"


async def test_restart_keeps_tasks_leases_and_results(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    path = tmp_path / "scheduler.db"
    async with Queue.open(path, clock=VirtualClock(), policy=LAB) as q:
        await q.submit(spec("a", replicas=2, quorum=2))
        await q.submit(spec("b"))
        g1, g2 = await grant(q, "w1"), await grant(q, "w2")
        await q.report("w1", report(g1.lease))
    async with Queue.open(path, clock=VirtualClock(), policy=LAB) as q:
        assert not await q.submit(spec("a", replicas=2, quorum=2))
        # The held lease survived and gets a fresh timeout to be heartbeated again.
        assert (await q.heartbeat("w2", Heartbeat(leases=(g2.lease,)))).stop == ()
        assert (await q.report("w1", report(g1.lease)))[0].status is ResultStatus.DUPLICATE
        await q.report("w2", report(g2.lease))
        assert (await q.status("a")).state is TaskState.SUCCEEDED
        assert (await grant(q, "w3")).lease.task_id == "b"
    async with Queue.open(path, clock=VirtualClock(), policy=LAB) as q:
        assert len(await q.results("a")) == 2
        assert (await q.status("b")).replicas[0].state is ReplicaState.LEASED
        # w3 never heartbeats after the restart: its lease lapses like any other.
        await trio.sleep(q.lease_timeout + 1)
        await q.tick()
        assert (await q.status("b")).replicas[0].state is ReplicaState.QUEUED


async def test_serve_ticks_pushes_stop_notices(
    queue: Queue, autojump_clock: trio.testing.MockClock
) -> None:
    await queue.submit(spec("a", max_runtime=10))
    g = await grant(queue, "w1")
    pushed: list[StopNotice] = []
    sent = trio.Event()

    async def send(stops: list[StopNotice]) -> None:
        pushed.extend(stops)
        sent.set()

    async def heartbeats() -> None:
        while True:
            await trio.sleep(10)
            await queue.heartbeat("w1", Heartbeat(leases=(g.lease,)))

    async with trio.open_nursery() as nursery:
        await nursery.start(queue.serve_ticks, send)
        nursery.start_soon(heartbeats)
        await sent.wait()
        nursery.cancel_scope.cancel()
    assert [(s.worker, s.lease, s.reason) for s in pushed] == [
        ("w1", g.lease, "max runtime exceeded")
    ]
    assert trio.current_time() >= 10 + queue.lease_timeout  # max runtime plus the grace


async def test_concurrent_leasing_never_double_leases(tmp_path: Path) -> None:
    async with Queue.open(tmp_path / "scheduler.db", clock=VirtualClock(), policy=LAB) as q:
        for n in range(40):
            await q.submit(spec(f"t{n}", replicas=3, quorum=2))
        granted: list[tuple[str, LeaseKey]] = []

        async def worker(name: str) -> None:
            while isinstance(got := await q.lease(name, offer()), LeaseGrant):
                granted.append((name, got.lease))

        async with trio.open_nursery() as nursery:
            for w in range(30):
                nursery.start_soon(worker, f"w{w}")
    replicas = [(k.task_id, k.replica) for _, k in granted]
    assert len(replicas) == len(set(replicas)) == 120
    per_task = [(w, k.task_id) for w, k in granted]
    assert len(per_task) == len(set(per_task))  # no worker got two replicas of one task
    db = sqlite3.connect(tmp_path / "scheduler.db")
    rows = db.execute("SELECT state, COUNT(*) FROM replicas GROUP BY state").fetchall()
    assert rows == [("leased", 120)]


async def test_submit_refuses_a_different_task_under_a_used_id(queue: Queue) -> None:
    a = spec("a")
    await queue.submit(a)
    with pytest.raises(TaskConflictError):
        await queue.submit(replace(a, owner="someone-else"))


async def test_a_worker_cannot_hoard_leases(tmp_path: Path) -> None:
    async with Queue.open(
        tmp_path / "s.db", clock=VirtualClock(), policy=LAB, max_leases_per_worker=2
    ) as q:
        for n in range(3):
            await q.submit(spec(f"t{n}"))
        await grant(q, "w1")
        await grant(q, "w1")
        refused = await q.lease("w1", offer())
        assert isinstance(refused, NoWork)
        assert refused.reason == "already holds 2 leases"


async def test_no_lease_past_the_deadline_even_before_a_tick(
    queue: Queue, autojump_clock: trio.testing.MockClock
) -> None:
    await queue.submit(spec("a", deadline=VirtualClock().wall() + 10))
    await trio.sleep(11)
    assert isinstance(await queue.lease("w1", offer()), NoWork)
    await queue.tick()
    assert (await queue.status("a")).reason == "deadline passed"


@pytest.mark.parametrize("end", ["cancel", "deadline"])
@pytest.mark.parametrize("outcome", ["image_ready", "assembly_failed", "begin_assembly"])
async def test_an_assembly_that_ends_after_its_task_did_changes_nothing(
    queue: Queue, autojump_clock: trio.testing.MockClock, end: str, outcome: str
) -> None:
    # Assembly runs in the background; an owner's cancel or a deadline may end the task first.
    await queue.submit(spec("t", image_id=None, deadline=VirtualClock().wall() + 10))
    await queue.begin_assembly("t")
    if end == "cancel":
        await queue.cancel("t")
    else:
        await trio.sleep(11)
        await queue.tick()
    before = await queue.status("t")
    assert before.state in (TaskState.CANCELLED, TaskState.FAILED)
    if outcome == "image_ready":
        await queue.image_ready("t", image(1))
    elif outcome == "assembly_failed":
        await queue.assembly_failed("t", "too late")
    else:
        await queue.begin_assembly("t")
    after = await queue.status("t")
    assert (after.state, after.reason) == (before.state, before.reason)
