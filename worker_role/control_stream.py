"""The worker's end of one ``/vmlend/dispatch/2.0.0`` control stream, and how often it heartbeats.

The worker speaks first. Each request is numbered and the scheduler's answer carries the same
number, so answers are matched to requests by ID and several requests may be out at once. The
scheduler may also push a :class:`Stop` at any time; those go to a callback instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NoReturn

import trio

from catalog.dispatch import (
    MAX_REQUEST_ID,
    Answer,
    LeaseKey,
    Request,
    Stop,
    decode_reply,
    encode_request,
)
from node.errors import RemoteProtocolError, StreamBrokenError
from node.p2p_stream import MessageStream

REQUEST_TIMEOUT = 30.0
HEARTBEAT_FLOOR = 1.0
# Requests given up on (timed out or cancelled) whose answers may still come, and are dropped.
# A scheduler that leaves more than this unanswered is not serving us: the stream is failed.
MAX_ABANDONED = 64

OnStop = Callable[[tuple[LeaseKey, ...], str], None]


def heartbeat_interval(lease_timeouts: Iterable[float]) -> float | None:
    """Seconds between heartbeats to a scheduler for held leases with these ``lease_timeout``s
    (``None`` when none are held: there is nothing to heartbeat).

    A third of the shortest: the scheduler expires a lease that goes ``lease_timeout`` without
    a heartbeat, so two more heartbeats fall within every timeout and one that is late or fails
    (a stream being replaced) still leaves one to arrive in time. Never under
    ``HEARTBEAT_FLOOR``: the timeout is the scheduler's word, and a tiny one must not make us
    heartbeat in a tight loop (the scheduler looks for lapsed leases about once a second anyway).
    """
    shortest = min(lease_timeouts, default=None)
    if shortest is None:
        return None
    return max(HEARTBEAT_FLOOR, shortest / 3)


class ControlStream:
    """One control stream to a scheduler: answers matched to requests by ID; pushed Stops go to
    ``on_stop``.

    Whoever sees the stream fail calls :meth:`fail`; :meth:`wait_failed` then raises it in the
    task that serves this scheduler, which tears the stream down. :meth:`read` raises
    :class:`RemoteProtocolError` for an answer to no request of ours.
    """

    def __init__(self, stream: MessageStream) -> None:
        self.stream = stream
        self._next_id = 0
        self._pending: dict[int, trio.MemorySendChannel[Answer]] = {}
        self._abandoned: set[int] = set()
        self._reading_done = False
        self._error: BaseException | None = None
        self._failed = trio.Event()

    @property
    def broken(self) -> bool:
        return self._error is not None

    def fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._failed.set()

    async def wait_failed(self) -> NoReturn:
        await self._failed.wait()
        assert self._error is not None
        raise self._error

    async def read(self, on_stop: OnStop) -> None:
        try:
            async for raw in self.stream:
                reply = decode_reply(raw)
                if isinstance(reply, Stop):
                    on_stop(reply.leases, reply.reason)
                else:
                    self._answered(*reply)
        finally:
            self._reading_done = True
            for waiting in self._pending.values():
                waiting.close()  # its request raises StreamBrokenError
        self.fail(StreamBrokenError("the scheduler closed the stream"))

    def _answered(self, request_id: int, answer: Answer) -> None:
        waiting = self._pending.pop(request_id, None)
        if waiting is not None:
            waiting.send_nowait(answer)  # room for one, and only this answer is sent on it
        elif request_id in self._abandoned:
            self._abandoned.discard(request_id)
        else:
            raise RemoteProtocolError(
                f"{self.stream.peer_id} answered request {request_id}, which is not waiting"
            )

    def _new_id(self) -> int:
        while True:
            request_id = self._next_id
            self._next_id = 0 if request_id == MAX_REQUEST_ID else request_id + 1
            if request_id not in self._pending and request_id not in self._abandoned:
                return request_id

    async def request(self, message: Request) -> Answer:
        """Send ``message`` and wait for its answer (at most ``REQUEST_TIMEOUT``)."""
        if self._reading_done:
            raise StreamBrokenError("the scheduler closed the stream")
        request_id = self._new_id()
        send, receive = trio.open_memory_channel[Answer](1)
        self._pending[request_id] = send
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                await self.stream.send(encode_request(request_id, message))
                return await receive.receive()
        except trio.EndOfChannel:
            raise StreamBrokenError("the scheduler closed the stream") from None
        finally:
            if self._pending.pop(request_id, None) is not None and not self._reading_done:
                self._give_up(request_id)

    def _give_up(self, request_id: int) -> None:
        self._abandoned.add(request_id)
        if len(self._abandoned) > MAX_ABANDONED:
            self.fail(
                RemoteProtocolError(
                    f"{self.stream.peer_id} left {len(self._abandoned)} requests unanswered"
                )
            )
