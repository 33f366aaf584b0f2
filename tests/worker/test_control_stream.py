"""The worker's control stream against a scripted scheduler: answers are matched by request ID.

The scheduler's end is driven by hand (real frames over an in-memory stream), so it can answer
out of order, twice, late or under an ID the worker never used.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from catalog.dispatch import (
    PROTOCOL_ID,
    WIRE_LIMITS,
    Answer,
    Heartbeat,
    HeartbeatAck,
    LeaseKey,
    NoWork,
    Request,
    Stop,
    WorkRequest,
    decode_request,
    encode_answer,
    encode_stop,
)
from node.errors import RemoteProtocolError, StreamBrokenError
from node.p2p_stream import MessageStream
from tests.scheduler.conftest import offer
from tests.worker.fake_scheduler import lease, stream_pair
from worker_role.control_stream import MAX_ABANDONED, REQUEST_TIMEOUT, ControlStream


@dataclass
class Rig:
    control: ControlStream
    scheduler: MessageStream
    nursery: trio.Nursery
    stops: list[tuple[tuple[LeaseKey, ...], str]] = field(default_factory=list)
    read_error: BaseException | None = None

    async def receive(self) -> tuple[int, Request]:
        return decode_request(await self.scheduler.receive())

    async def answer(self, request_id: int, answer: Answer) -> None:
        await self.scheduler.send(encode_answer(request_id, answer))

    def ask(self, request: Request) -> trio.MemoryReceiveChannel[Answer | BaseException]:
        """Start ``request``; its answer (or what it raised) arrives on the returned channel."""
        send, receive = trio.open_memory_channel[Answer | BaseException](1)

        async def run() -> None:
            try:
                result: Answer | BaseException = await self.control.request(request)
            except (StreamBrokenError, trio.TooSlowError) as e:
                result = e
            send.send_nowait(result)

        self.nursery.start_soon(run)
        return receive

    async def _read(self) -> None:
        try:
            await self.control.read(lambda leases, reason: self.stops.append((leases, reason)))
        except RemoteProtocolError as e:
            self.read_error = e


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    worker_end, scheduler_end = stream_pair("worker", "sched", PROTOCOL_ID, WIRE_LIMITS)
    worker_end.deadline = math.inf  # as the agent has it: reads wait for pushes
    async with trio.open_nursery() as nursery:
        rig = Rig(ControlStream(worker_end), scheduler_end, nursery)
        nursery.start_soon(rig._read)
        yield rig
        nursery.cancel_scope.cancel()


HEARTBEAT = Heartbeat(leases=(lease(1),))
WORK = WorkRequest(offer=offer())


async def test_answers_out_of_order_and_a_pushed_stop_between_them_each_find_their_request(
    rig: Rig,
) -> None:
    work = rig.ask(WORK)
    work_id, _ = await rig.receive()
    heartbeat = rig.ask(HEARTBEAT)
    heartbeat_id, _ = await rig.receive()
    assert work_id != heartbeat_id

    await rig.answer(heartbeat_id, HeartbeatAck(stop=(lease(1),)))
    await rig.scheduler.send(encode_stop(Stop(leases=(lease(2),), reason="over")))
    await rig.answer(work_id, NoWork(retry_after=3.0))
    assert await heartbeat.receive() == HeartbeatAck(stop=(lease(1),))
    assert await work.receive() == NoWork(retry_after=3.0)
    assert rig.stops == [((lease(2),), "over")]
    assert not rig.control.broken


async def test_an_answer_under_an_id_never_sent_is_the_schedulers_protocol_error(
    rig: Rig,
) -> None:
    work = rig.ask(WORK)
    work_id, _ = await rig.receive()
    await rig.answer(work_id + 1, NoWork(retry_after=1.0))
    assert isinstance(await work.receive(), StreamBrokenError)
    assert isinstance(rig.read_error, RemoteProtocolError)
    assert "not waiting" in str(rig.read_error)
    with pytest.raises(StreamBrokenError):  # nothing more goes out on a stream read no longer
        await rig.control.request(HEARTBEAT)


async def test_a_second_answer_to_one_request_is_a_protocol_error(rig: Rig) -> None:
    work = rig.ask(WORK)
    work_id, _ = await rig.receive()
    await rig.answer(work_id, NoWork(retry_after=1.0))
    assert await work.receive() == NoWork(retry_after=1.0)
    await rig.answer(work_id, NoWork(retry_after=1.0))
    await trio.testing.wait_all_tasks_blocked()
    assert isinstance(rig.read_error, RemoteProtocolError)


async def test_a_late_answer_to_a_request_given_up_is_dropped_not_taken_for_the_next(
    rig: Rig, autojump_clock: MockClock
) -> None:
    timed_out = rig.ask(WORK)
    late_id, _ = await rig.receive()
    assert isinstance(await timed_out.receive(), trio.TooSlowError)
    assert trio.current_time() == REQUEST_TIMEOUT

    heartbeat = rig.ask(HEARTBEAT)
    heartbeat_id, _ = await rig.receive()
    await rig.answer(late_id, NoWork(retry_after=1.0))  # the late one first
    await rig.answer(heartbeat_id, HeartbeatAck())
    assert await heartbeat.receive() == HeartbeatAck()
    assert rig.read_error is None
    assert not rig.control.broken


async def test_a_scheduler_that_leaves_requests_unanswered_fails_the_stream(
    rig: Rig, autojump_clock: MockClock
) -> None:
    for _ in range(MAX_ABANDONED + 1):
        waiting = rig.ask(HEARTBEAT)
        await rig.receive()
        assert isinstance(await waiting.receive(), trio.TooSlowError)
    assert rig.control.broken
    with pytest.raises(RemoteProtocolError, match="unanswered"):
        await rig.control.wait_failed()
