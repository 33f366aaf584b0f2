"""The worker's end of one ``/vmlend/dispatch/1.0.0`` control stream, and how often it heartbeats.

The worker speaks first and its requests take turns: each is answered before the next is sent.
The scheduler may also push a :class:`Stop` at any time; those go to a callback instead of
answering a request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NoReturn

import trio

from catalog.dispatch import LeaseKey, Message, Stop, decode_message, to_dict
from node.errors import StreamBrokenError
from node.p2p_stream import MessageStream

REQUEST_TIMEOUT = 30.0
HEARTBEAT_FLOOR = 1.0

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
    """One control stream to a scheduler: requests take turns; pushed Stops go to ``on_stop``.

    Whoever sees the stream fail calls :meth:`fail`; :meth:`wait_failed` then raises it in the
    task that serves this scheduler, which tears the stream down.
    """

    def __init__(self, stream: MessageStream) -> None:
        self.stream = stream
        self._lock = trio.Lock()
        self._send, self._answers = trio.open_memory_channel[Message](1)
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
        async with self._send:
            async for raw in self.stream:
                message = decode_message(raw)
                if isinstance(message, Stop):
                    on_stop(message.leases, message.reason)
                else:
                    await self._send.send(message)
        self.fail(StreamBrokenError("the scheduler closed the stream"))

    async def request(self, message: Message) -> Message:
        async with self._lock:
            with trio.fail_after(REQUEST_TIMEOUT):
                await self.stream.send(to_dict(message))
                try:
                    return await self._answers.receive()
                except trio.EndOfChannel:
                    raise StreamBrokenError("the scheduler closed the stream") from None
