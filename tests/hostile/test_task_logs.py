"""Task logs on ``/vmlend/tasklogs/1.0.0``: only the worker holding a lease speaks for it."""

from __future__ import annotations

import trio

from catalog.dispatch import (
    LOGS,
    LOGS_PROTOCOL_ID,
    LOGS_WIRE_LIMITS,
    PROTOCOL_ID,
    WIRE_LIMITS,
    LeaseGrant,
    LeaseKey,
    LogChunk,
    WorkRequest,
    decode_reply,
    encode_request,
)
from tests.hostile.conftest import Node, Scheduler
from tests.scheduler.conftest import offer, spec


async def send_logs(peer: Node, scheduler: Scheduler, chunks: list[LogChunk]) -> None:
    async with await peer.p2p.open_stream(
        scheduler.p2p.peer_id, LOGS_PROTOCOL_ID, limits=LOGS_WIRE_LIMITS
    ) as stream:
        for chunk in chunks:
            await stream.send(LOGS.encode(chunk))
        await stream.send_end()


async def lease_one(worker: Node, scheduler: Scheduler) -> LeaseGrant:
    async with await worker.p2p.open_stream(
        scheduler.p2p.peer_id, PROTOCOL_ID, limits=WIRE_LIMITS
    ) as stream:
        await stream.send(encode_request(1, WorkRequest(offer=offer())))
        reply = decode_reply(await stream.receive())
        assert isinstance(reply, tuple), reply
        grant = reply[1]
        assert isinstance(grant, LeaseGrant)
        return grant


async def test_log_frames_count_only_from_the_holder_of_the_lease(
    scheduler_and_peer: tuple[Scheduler, Node],
) -> None:
    scheduler, worker = scheduler_and_peer
    await scheduler.service.queue.submit(spec("t"))  # an image is ready: it can be leased
    grant = await lease_one(worker, scheduler)
    held = grant.lease
    forged_later = LeaseKey(held.task_id, held.replica, held.attempt + 1000)
    other_task = LeaseKey("someone-else", 0, 1)
    changed = scheduler.service.log_buffer("t").changed
    await send_logs(
        worker,
        scheduler,
        [
            LogChunk(lease=forged_later, stream="stdout", data=b"forged: a later attempt\n"),
            LogChunk(lease=other_task, stream="stdout", data=b"forged: not my task\n"),
            LogChunk(lease=held, stream="stdout", data=b"honest\n"),
        ],
    )
    with trio.fail_after(10):  # frames arrive in order: the honest one last
        await changed.wait()
    assert scheduler.service.log_buffer("t").chunks == [("stdout", b"honest\n")]
    assert "someone-else" not in scheduler.service.logs
