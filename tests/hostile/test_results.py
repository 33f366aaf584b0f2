"""Hostile workers reporting results to a real scheduler over the real dispatch protocol."""

from __future__ import annotations

import blake3
import pytest
import trio

from catalog.blob import BlobId
from catalog.dispatch import (
    PROTOCOL_ID,
    WIRE_LIMITS,
    LeaseGrant,
    LeaseKey,
    ResultAck,
    ResultReport,
    ResultStatus,
    WorkRequest,
    decode_reply,
    encode_request,
    signed_result_bytes,
)
from node.errors import StreamBrokenError
from node.p2p_stream import MessageStream
from tests.hostile.conftest import Node, Scheduler
from tests.scheduler.conftest import offer, spec


async def report_of(
    worker: Node, lease: LeaseKey, stdout: bytes, *, signed_stdout: bytes | None = None
) -> ResultReport:
    """A report signed by ``worker`` whose stdout blob holds ``stdout`` (stored with it) and whose
    signed digest is of ``signed_stdout`` (the same bytes unless the worker lies)."""
    blobs = [await worker.blobs.blobs.add_bytes(data) for data in (stdout, b"")]
    for blob in blobs:
        worker.blobs.announce(blob)
    signed = blake3.blake3(stdout if signed_stdout is None else signed_stdout).digest()
    fields = (lease, 0, signed, blake3.blake3(b"").digest(), bytes(blobs[0]), bytes(blobs[1]))
    return ResultReport(
        lease=lease,
        exit_code=0,
        stdout_digest=signed,
        stderr_digest=fields[3],
        stdout_blob=fields[4],
        stderr_blob=fields[5],
        archive_blob=None,
        signature=worker.p2p.identity.sign(signed_result_bytes(*fields, None)),
    )


async def dispatch_stream(worker: Node, scheduler: Scheduler) -> MessageStream:
    return await worker.p2p.open_stream(scheduler.p2p.peer_id, PROTOCOL_ID, limits=WIRE_LIMITS)


async def take_lease(stream: MessageStream) -> LeaseGrant:
    await stream.send(encode_request(1, WorkRequest(offer=offer())))
    reply = decode_reply(await stream.receive())
    assert isinstance(reply, tuple), reply
    assert isinstance(reply[1], LeaseGrant), reply
    return reply[1]


async def test_a_report_for_a_lease_the_worker_does_not_hold_fetches_nothing(
    scheduler_and_peers: tuple[Scheduler, Node, Node],
) -> None:
    scheduler, holder, stranger = scheduler_and_peers
    await scheduler.service.queue.submit(spec("t"))
    async with await dispatch_stream(holder, scheduler) as held:
        grant = await take_lease(held)
        # The stranger signs a report for the holder's lease, naming a blob nobody has: were it
        # fetched first, the answer would wait for the whole fetch budget.
        forged = await report_of(stranger, grant.lease, b"the stranger's answer\n")
        await stranger.blobs.blobs.rm(BlobId(forged.stdout_blob))
        async with await dispatch_stream(stranger, scheduler) as stream:
            with trio.fail_after(5):
                await stream.send(encode_request(7, forged))
                reply = decode_reply(await stream.receive())
        assert reply == (7, ResultAck(lease=grant.lease, status=ResultStatus.STALE))
        assert (await scheduler.service.queue.results("t")) == []


async def test_a_result_whose_stdout_is_not_what_was_signed_does_not_count(
    scheduler_and_peer: tuple[Scheduler, Node],
) -> None:
    scheduler, worker = scheduler_and_peer
    await scheduler.service.queue.submit(spec("t"))
    async with await dispatch_stream(worker, scheduler) as stream:
        grant = await take_lease(stream)
        # Agreement compares the signed digest; the owner would receive the blob's bytes.
        lying = await report_of(
            worker, grant.lease, b"what the owner gets\n", signed_stdout=b"42\n"
        )
        await stream.send(encode_request(2, lying))
        with trio.fail_after(20), pytest.raises(StreamBrokenError):
            await stream.receive()
    assert (await scheduler.service.queue.results("t")) == []


async def test_an_honest_report_counts(scheduler_and_peer: tuple[Scheduler, Node]) -> None:
    scheduler, worker = scheduler_and_peer
    await scheduler.service.queue.submit(spec("t"))
    async with await dispatch_stream(worker, scheduler) as stream:
        grant = await take_lease(stream)
        await stream.send(encode_request(2, await report_of(worker, grant.lease, b"42\n")))
        with trio.fail_after(20):
            reply = decode_reply(await stream.receive())
    assert reply == (2, ResultAck(lease=grant.lease, status=ResultStatus.RECORDED))
    assert len(await scheduler.service.queue.results("t")) == 1
