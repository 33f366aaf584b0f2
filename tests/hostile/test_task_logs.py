"""Task logs on ``/vmlend/tasklogs/1.0.0``: only the worker holding a lease speaks for it."""

from __future__ import annotations

import contextlib
from dataclasses import replace

import trio

from catalog.dispatch import (
    LOGS,
    LOGS_PROTOCOL_ID,
    LOGS_WIRE_LIMITS,
    MAX_LOG_CHUNK,
    PROTOCOL_ID,
    WIRE_LIMITS,
    LeaseGrant,
    LeaseKey,
    LogChunk,
    WorkRequest,
    decode_reply,
    encode_request,
)
from catalog.owner_protocol import PROTOCOL_ID as TASKS_PROTOCOL_ID
from catalog.owner_protocol import REPLIES, REQUESTS, LogData, LogEnd, LogsRequest
from catalog.owner_protocol import WIRE_LIMITS as TASKS_WIRE_LIMITS
from node.errors import NetworkError
from scheduler_role.live_logs import CUT_NOTE, MAX_LEASE_LOG, MAX_LOG_BYTES, LogCursor
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
    pieces, _ = scheduler.service.log_buffer("t").read(LogCursor())
    assert pieces == [("stdout", b"honest\n")]
    assert "someone-else" not in scheduler.service.logs


async def _owner_reads_logs(owner: Node, scheduler: Scheduler, task_id: str) -> bytes:
    async with await owner.p2p.open_stream(
        scheduler.p2p.peer_id, TASKS_PROTOCOL_ID, limits=TASKS_WIRE_LIMITS
    ) as stream:
        await stream.send(REQUESTS.encode(LogsRequest(task_id=task_id, follow=False)))
        text = b""
        while not isinstance(frame := REPLIES.decode(await stream.receive()), LogEnd):
            assert isinstance(frame, LogData), frame
            text += frame.data
        return text


async def test_a_worker_streaming_past_the_live_budget_is_cut_counted_and_noted(
    scheduler_and_peers: tuple[Scheduler, Node, Node],
) -> None:
    """A worker that holds a lease floods its log stream: the scheduler takes at most the
    lease's budget, keeps at most its window, counts the rest, and the owner reads a note."""
    scheduler, worker, owner = scheduler_and_peers
    for task in ("t", "t2"):
        await scheduler.service.queue.submit(replace(spec(task), owner=owner.p2p.peer_id))
    flooded = (await lease_one(worker, scheduler)).lease
    other = (await lease_one(worker, scheduler)).lease
    assert flooded.task_id != other.task_id
    frames = 2 * MAX_LEASE_LOG // MAX_LOG_CHUNK
    flood = LogChunk(lease=flooded, stream="stdout", data=b"f" * MAX_LOG_CHUNK)
    done = LogChunk(lease=other, stream="stdout", data=b"after the flood\n")
    buffer = scheduler.service.log_buffer(flooded.task_id)
    changed = scheduler.service.log_buffer(other.task_id).changed
    await send_logs(worker, scheduler, [flood] * frames + [done])
    with trio.fail_after(60):  # frames arrive in order: the other task's last
        await changed.wait()
    assert buffer.accepted <= MAX_LEASE_LOG
    assert buffer.accepted + buffer.dropped == frames * MAX_LOG_CHUNK
    assert buffer.size <= MAX_LOG_BYTES
    pieces, _ = buffer.read(LogCursor(flooded))
    assert b"".join(d for s, d in pieces if s == "stderr").count(CUT_NOTE) == 1
    with trio.fail_after(60):
        shown = await _owner_reads_logs(owner, scheduler, flooded.task_id)
    assert CUT_NOTE in shown
    assert len(shown) <= MAX_LOG_BYTES + 4096


async def test_a_worker_that_goes_on_past_the_cut_has_its_log_stream_closed(
    scheduler_and_peer: tuple[Scheduler, Node],
) -> None:
    scheduler, worker = scheduler_and_peer
    for task in ("t", "t2"):
        await scheduler.service.queue.submit(spec(task))
    lease = (await lease_one(worker, scheduler)).lease
    other = (await lease_one(worker, scheduler)).lease
    flood = LogChunk(lease=lease, stream="stdout", data=b"f" * MAX_LOG_CHUNK)
    # Sent whole in a few seconds if the scheduler reads on; once it stops reading, the sender
    # is left waiting (py-libp2p's yamux does not fail a write blocked on a reset stream).
    completed = False
    with trio.move_on_after(30), contextlib.suppress(NetworkError):
        await send_logs(worker, scheduler, [flood] * (4 * MAX_LEASE_LOG // MAX_LOG_CHUNK))
        completed = True
    assert not completed
    buffer = scheduler.service.log_buffer(lease.task_id)
    assert buffer.dropped <= MAX_LEASE_LOG + MAX_LOG_CHUNK  # read no further than that
    # Its next stream is heard again (a stream, not the worker, was cut off).
    changed = scheduler.service.log_buffer(other.task_id).changed
    await send_logs(worker, scheduler, [LogChunk(lease=other, stream="stdout", data=b"ok\n")])
    with trio.fail_after(20):
        await changed.wait()
