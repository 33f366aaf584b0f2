"""Workers and a scheduler speaking the dispatch protocol through real wire frames (no sockets)."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest

from catalog.dispatch import (
    WIRE_LIMITS,
    Answer,
    Heartbeat,
    LeaseGrant,
    LeaseKey,
    Lost,
    NoWork,
    Request,
    ResultAck,
    ResultStatus,
    Stop,
    WorkRequest,
    decode_reply,
    decode_request,
    encode_answer,
    encode_request,
    encode_stop,
)
from node.errors import RemoteProtocolError
from node.identity import Identity
from node.wire import FrameDecoder, encode_frame
from scheduler_role.dispatch import check_report, handle, stop_messages
from scheduler_role.lifecycle import TaskState
from scheduler_role.queue import Queue, StopNotice
from tests.scheduler.conftest import offer, report, spec


def framed(raw: dict[str, Any]) -> dict[str, Any]:
    decoder = FrameDecoder(WIRE_LIMITS)
    decoder.feed(encode_frame(raw, WIRE_LIMITS))
    out = decoder.next_message()
    assert out is not None
    return out


def through_the_wire(stop: Stop) -> Stop:
    received = decode_reply(framed(encode_stop(stop)))
    assert isinstance(received, Stop)
    return received


class SimWorker:
    def __init__(self, name: str, queue: Queue, *, lies: bool = False) -> None:
        self.name, self.queue, self.lies = name, queue, lies
        self.identity = Identity.generate()
        self.stopped: list[LeaseKey] = []
        self._ids = itertools.count()

    async def ask(self, message: Request) -> tuple[Answer, list[StopNotice]]:
        """One request through frames both ways, answered under its own ID."""
        request_id, received = decode_request(framed(encode_request(next(self._ids), message)))
        answer, stops = await handle(
            self.queue, self.name, received, public_key=self.identity.public_bytes
        )
        reply = decode_reply(framed(encode_answer(request_id, answer)))
        assert reply == (request_id, answer)
        return answer, stops

    async def pull(self) -> LeaseGrant | None:
        answer, _ = await self.ask(WorkRequest(offer=offer()))
        return answer if isinstance(answer, LeaseGrant) else None

    async def finish(self, grant: LeaseGrant) -> tuple[Answer, list[StopNotice]]:
        unsigned = report(grant.lease, stdout="wrong" if self.lies else "42")
        signed = dataclasses.replace(
            unsigned, signature=self.identity.sign(unsigned.signed_bytes())
        )
        return await self.ask(signed)


async def test_quorum_with_a_lying_worker_over_the_protocol(queue: Queue) -> None:
    await queue.submit(spec("job", replicas=3, quorum=2))
    liar, a, b = (SimWorker(n, queue, lies=n == "liar") for n in ("liar", "a", "b"))
    grants = {w.name: await w.pull() for w in (liar, a, b)}
    assert all(grants.values())
    for w in (liar, a):
        grant = grants[w.name]
        assert grant is not None
        ack, _ = await w.ask(Heartbeat(leases=(grant.lease,), running=(grant.lease,)))
        assert ack.TYPE == "heartbeat_ack"
    ack, stops = await liar.finish(grants["liar"])  # type: ignore[arg-type]
    assert isinstance(ack, ResultAck)
    assert ack.status is ResultStatus.RECORDED
    await a.finish(grants["a"])  # type: ignore[arg-type]
    assert (await queue.status("job")).state is TaskState.ACTIVE
    _, stops = await b.finish(grants["b"])  # type: ignore[arg-type]
    status = await queue.status("job")
    assert status.state is TaskState.SUCCEEDED
    assert status.dissenters == ("liar",)
    assert stops == []  # every replica had reported


async def test_bad_signature_and_wrong_direction_are_refused(queue: Queue) -> None:
    await queue.submit(spec("job"))
    w = SimWorker("w", queue)
    grant = await w.pull()
    assert grant is not None
    forged = report(grant.lease)  # signature of zeros
    with pytest.raises(RemoteProtocolError, match="signature"):
        await handle(queue, "w", forged, public_key=w.identity.public_bytes)
    with pytest.raises(RemoteProtocolError, match="unknown message type 'no_work'"):
        decode_request(encode_answer(1, NoWork(retry_after=1)))


async def test_a_result_the_caller_verified_is_not_checked_again(queue: Queue) -> None:
    await queue.submit(spec("job"))
    w = SimWorker("w", queue)
    grant = await w.pull()
    assert grant is not None
    unsigned = report(grant.lease)
    signed = dataclasses.replace(unsigned, signature=w.identity.sign(unsigned.signed_bytes()))
    check_report("w", signed, w.identity.public_bytes)
    with pytest.raises(RemoteProtocolError, match="signature"):
        check_report("w", unsigned, w.identity.public_bytes)
    # The service checks before fetching the blobs; handle then trusts it (the key is not used).
    ack, _ = await handle(queue, "w", signed, public_key=b"", verified=True)
    assert isinstance(ack, ResultAck)
    assert ack.status is ResultStatus.RECORDED


async def test_lost_leases_go_back_and_stops_are_grouped(queue: Queue) -> None:
    await queue.submit(spec("job", replicas=2, quorum=2, max_attempts=1))
    w1, w2 = SimWorker("w1", queue), SimWorker("w2", queue)
    g1, g2 = await w1.pull(), await w2.pull()
    assert g1 is not None
    assert g2 is not None
    # w1's VM ran, then w1 crashed; with one attempt per replica the quorum is gone, so w2
    # must stop too. (A lease lost before its VM ran spends no attempt: test_start_failures.)
    await w1.ask(Heartbeat(leases=(g1.lease,), running=(g1.lease,)))
    _, stops = await w1.ask(Lost(leases=(g1.lease,)))
    assert (await queue.status("job")).state is TaskState.FAILED
    to_push = stop_messages(stops)
    assert list(to_push) == ["w2"]
    assert to_push["w2"][0].leases == (g2.lease,)
    assert through_the_wire(to_push["w2"][0]) == to_push["w2"][0]
