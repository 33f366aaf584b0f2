"""The scheduler side of the worker agent's tests: fake schedulers behind a fake p2p node.

:class:`FakeNetwork` is the agent's :class:`SchedulerNetwork`. A stream it opens is a real
:class:`MessageStream` over an in-memory byte pipe, so what crosses it is real frames under the
protocol's wire limits; a :class:`FakeScheduler` serves the other end with the typed dispatch
messages, answering each request at once (or after a delay, out of order, or under another
request's ID, when a test asks), and records what it received and when (virtual time).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import trio
import trio.testing

from catalog.caps import Caps
from catalog.dispatch import (
    LOGS,
    LOGS_PROTOCOL_ID,
    PROTOCOL_ID,
    Answer,
    Heartbeat,
    HeartbeatAck,
    LeaseGrant,
    LeaseKey,
    LogChunk,
    Lost,
    Message,
    NoWork,
    Request,
    ResultAck,
    ResultReport,
    ResultStatus,
    Stop,
    WorkRequest,
    decode_request,
    encode_answer,
    encode_stop,
    verify_report,
)
from node.dht_records import Record
from node.errors import NetworkError, PeerUnreachableError
from node.p2p_stream import MessageStream
from node.wire import DEFAULT_LIMITS, WireLimits
from tests.worker.fake_backend import Changes

STREAM_DEADLINE = 30.0
M = TypeVar("M", bound=Message)


class _Pipe:
    """One end of an in-memory byte stream, as the four calls of a libp2p stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream

    async def read(self, n: int | None = None) -> bytes:
        return bytes(await self._stream.receive_some(n))

    async def write(self, data: bytes) -> None:
        await self._stream.send_all(data)

    async def close(self) -> None:
        await self._stream.aclose()

    async def reset(self) -> None:
        await self._stream.aclose()


def stream_pair(
    worker: str, scheduler: str, protocol_id: str, limits: WireLimits
) -> tuple[MessageStream, MessageStream]:
    """(the worker's end, the scheduler's end) of one stream."""
    ours, theirs = trio.testing.memory_stream_pair()
    return (
        MessageStream(
            _Pipe(ours), peer_id=scheduler, protocol_id=protocol_id,
            deadline=STREAM_DEADLINE, limits=limits,
        ),
        MessageStream(
            _Pipe(theirs), peer_id=worker, protocol_id=protocol_id,
            deadline=math.inf, limits=limits,
        ),
    )  # fmt: skip


def lease(n: int, *, replica: int = 0, attempt: int = 1) -> LeaseKey:
    return LeaseKey(f"task{n}", replica, attempt)


def grant(
    key: LeaseKey,
    *,
    caps: Caps | None = None,
    lease_timeout: float = 30.0,
    max_runtime: float = 600.0,
) -> LeaseGrant:
    image_id = hashlib.blake2b(key.task_id.encode(), digest_size=32).digest()
    return LeaseGrant(
        lease=key, image_id=image_id, caps=caps or Caps(memory_mib=256),
        lease_timeout=lease_timeout, max_runtime=max_runtime,
    )  # fmt: skip


@dataclass(frozen=True)
class Received:
    at: float
    message: Message


class FakeScheduler:
    """Grants ``work`` in order, then answers ``NoWork(retry_after)``; acks every result that
    the worker's key verifies; asks in each heartbeat ack to stop the leases in ``stop_on_ack``.

    A request of a type in ``answer_delay`` is answered that many seconds later while the
    requests after it are answered at once; each answer goes under ``renumber(request_id)``.
    """

    def __init__(self, peer_id: str, worker_key: bytes, *, retry_after: float = 10.0) -> None:
        self.peer_id = peer_id
        self.work: list[LeaseGrant] = []
        self.retry_after = retry_after
        self.stop_on_ack: set[LeaseKey] = set()
        self.received: list[Received] = []
        self.logs: list[LogChunk] = []
        self.results: dict[LeaseKey, ResultReport] = {}
        self.streams: list[MessageStream] = []
        self.answer_delay: dict[type[Request], float] = {}
        self.renumber: Callable[[int], int] = lambda request_id: request_id
        self.changes = Changes()
        self._worker_key = worker_key

    def of_type(self, kind: type[M]) -> list[M]:
        return [r.message for r in self.received if isinstance(r.message, kind)]

    def times_of(self, kind: type[Message]) -> list[float]:
        return [r.at for r in self.received if isinstance(r.message, kind)]

    async def push_stop(self, leases: tuple[LeaseKey, ...], reason: str = "task over") -> None:
        await self.streams[-1].send(encode_stop(Stop(leases=leases, reason=reason)))

    async def serve(self, stream: MessageStream) -> None:
        if stream.protocol_id == LOGS_PROTOCOL_ID:
            await self._serve_logs(stream)
            return
        self.streams.append(stream)
        self.changes.changed()
        async with stream, trio.open_nursery() as nursery:
            try:
                async for raw in stream:
                    request_id, message = decode_request(raw)
                    self.received.append(Received(trio.current_time(), message))
                    answer = self._answer(message)
                    self.changes.changed()
                    delay = self.answer_delay.get(type(message))
                    if delay is None:
                        await self._send_answer(stream, request_id, answer)
                    else:
                        nursery.start_soon(self._answer_later, stream, delay, request_id, answer)
            except (NetworkError, trio.ClosedResourceError):
                pass  # the worker went away (stopped or restarted), or the test dropped it

    async def _send_answer(self, stream: MessageStream, request_id: int, answer: Answer) -> None:
        await stream.send(encode_answer(self.renumber(request_id), answer))

    async def _answer_later(
        self, stream: MessageStream, delay: float, request_id: int, answer: Answer
    ) -> None:
        await trio.sleep(delay)
        with contextlib.suppress(NetworkError, trio.ClosedResourceError):  # the worker went away
            await self._send_answer(stream, request_id, answer)

    async def _serve_logs(self, stream: MessageStream) -> None:
        async with stream:
            try:
                async for raw in stream:
                    self.logs.append(LOGS.decode(raw))
                    self.changes.changed()
            except NetworkError:
                pass  # the lease was stopped or its VM failed: the worker reset the stream

    def _answer(self, message: Request) -> Answer:
        if isinstance(message, WorkRequest):
            if self.work:
                return self.work.pop(0)
            return NoWork(retry_after=self.retry_after)
        if isinstance(message, Heartbeat):
            return HeartbeatAck(stop=tuple(k for k in message.leases if k in self.stop_on_ack))
        if isinstance(message, ResultReport):
            assert verify_report(message, self._worker_key), "a result the worker did not sign"
            self.results[message.lease] = message
            return ResultAck(lease=message.lease, status=ResultStatus.RECORDED)
        assert isinstance(message, Lost), f"a worker does not send {message.TYPE}"
        return HeartbeatAck(stop=())


class FakeNetwork:
    """The agent's p2p node: finds no scheduler records (the agent's config lists them) and
    reaches the schedulers in ``schedulers`` once ``reachable`` is set."""

    def __init__(self, nursery: trio.Nursery, worker: str = "worker") -> None:
        self.schedulers: dict[str, FakeScheduler] = {}
        self.reachable = trio.Event()
        self.reachable.set()
        self.dialling = 0
        self.changes = Changes()
        self._nursery = nursery
        self._worker = worker

    def add(self, scheduler: FakeScheduler) -> FakeScheduler:
        self.schedulers[scheduler.peer_id] = scheduler
        return scheduler

    async def find_records(self, kind: str, *, timeout: float) -> list[Record]:  # noqa: ASYNC109
        await trio.lowlevel.checkpoint()
        return []

    def is_connected(self, peer_id: str) -> bool:
        return peer_id in self.schedulers

    async def connect(self, addr: str) -> str:
        raise AssertionError("the schedulers are listed without addresses")

    async def open_stream(
        self, peer_id: str, protocol_id: str, *, limits: WireLimits | None = None
    ) -> MessageStream:
        if protocol_id == PROTOCOL_ID:
            self.dialling += 1
            self.changes.changed()
            await self.reachable.wait()
        scheduler = self.schedulers.get(peer_id)
        if scheduler is None:
            raise PeerUnreachableError(f"no scheduler {peer_id}")
        ours, theirs = stream_pair(self._worker, peer_id, protocol_id, limits or DEFAULT_LIMITS)
        self._nursery.start_soon(scheduler.serve, theirs)
        return ours
