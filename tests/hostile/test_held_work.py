"""Issue 16 over the real dispatch protocol: a work request held at the scheduler holds up nothing
else on its stream, is answered the moment a task arrives, and a worker cannot make the scheduler
hold more than one request of its, nor keep one held past its stream."""

from __future__ import annotations

import trio

from catalog.dispatch import (
    MAX_WORK_HOLD,
    Heartbeat,
    HeartbeatAck,
    LeaseGrant,
    NoWork,
    WorkRequest,
    decode_reply,
    encode_request,
)
from scheduler_role.lifecycle import ReplicaState
from tests.hostile.conftest import Node, Scheduler
from tests.hostile.test_results import dispatch_stream
from tests.scheduler.conftest import offer, spec


async def test_a_held_request_lets_heartbeats_through_and_is_granted_when_a_task_arrives(
    scheduler_and_peers: tuple[Scheduler, Node, Node],
) -> None:
    scheduler, worker, _ = scheduler_and_peers
    async with await dispatch_stream(worker, scheduler) as stream:
        await stream.send(encode_request(1, WorkRequest(offer=offer(), wait=MAX_WORK_HOLD)))
        with trio.fail_after(5):  # answered while request 1 waits
            await stream.send(encode_request(2, Heartbeat(leases=(), running=())))
            assert decode_reply(await stream.receive()) == (2, HeartbeatAck(stop=()))
        await scheduler.service.queue.submit(spec("t"))
        with trio.fail_after(2):  # at once, not at the end of the hold
            reply = decode_reply(await stream.receive())
        assert isinstance(reply, tuple)
        request_id, grant = reply
        assert request_id == 1
        assert isinstance(grant, LeaseGrant)
        assert grant.lease.task_id == "t"


async def test_a_second_request_while_one_is_held_is_answered_at_once_on_any_stream(
    scheduler_and_peers: tuple[Scheduler, Node, Node],
) -> None:
    scheduler, worker, _ = scheduler_and_peers
    async with await dispatch_stream(worker, scheduler) as stream:
        for request_id in (1, 2, 3):
            wait = WorkRequest(offer=offer(), wait=MAX_WORK_HOLD)
            await stream.send(encode_request(request_id, wait))
        with trio.fail_after(5):
            answered = [decode_reply(await stream.receive()) for _ in (2, 3)]
        assert [a[0] for a in answered if isinstance(a, tuple)] == [2, 3]
        assert all(isinstance(a[1], NoWork) for a in answered if isinstance(a, tuple))
        # Nor on another stream: one held request per worker, however many streams it opens.
        async with await dispatch_stream(worker, scheduler) as other:
            await other.send(encode_request(1, WorkRequest(offer=offer(), wait=MAX_WORK_HOLD)))
            with trio.fail_after(5):
                reply = decode_reply(await other.receive())
            assert isinstance(reply, tuple)
            assert isinstance(reply[1], NoWork)


async def test_a_request_held_on_a_closed_stream_takes_no_lease(
    scheduler_and_peers: tuple[Scheduler, Node, Node],
) -> None:
    scheduler, worker, _ = scheduler_and_peers
    async with await dispatch_stream(worker, scheduler) as stream:
        await stream.send(encode_request(1, WorkRequest(offer=offer(), wait=MAX_WORK_HOLD)))
        await stream.send(encode_request(2, Heartbeat(leases=(), running=())))
        with trio.fail_after(5):
            await stream.receive()  # the heartbeat's ack: the request is held by now
    gone = {worker.p2p.peer_id}
    with trio.fail_after(5):  # the scheduler's own state: no event to wait on from outside
        while gone & (scheduler.service.connected_workers | scheduler.service.held_requests):  # noqa: ASYNC110
            await trio.sleep(0.05)
    # No request of its is held any more, so none can take the task that arrives now.
    await scheduler.service.queue.submit(spec("t"))
    status = await scheduler.service.queue.status("t")
    assert [r.state for r in status.replicas] == [ReplicaState.QUEUED]
