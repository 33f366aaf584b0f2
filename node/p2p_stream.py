"""One libp2p stream as a typed message stream with deadlines and an explicit end.

Frames are :mod:`node.wire` frames. A sender that is done sends one ``{"type": "vmlend.end"}``
frame before closing; only that is a clean end (``trio.EndOfChannel``). Any other end, such as
the bare EOF that py-libp2p reports when the peer process is killed, or a reset, is a
:class:`StreamBrokenError`. Every send and receive runs under the stream's ``deadline`` (a frozen
peer never blocks us for longer), and every frame is held to the wire limits.

libp2p exceptions are translated into :mod:`node.errors` here and nowhere else.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, Protocol

import trio
from libp2p.exceptions import BaseLibp2pError

from node.errors import (
    DeadlineError,
    LocalProtocolError,
    NetworkError,
    RemoteProtocolError,
    StreamBrokenError,
)
from node.wire import DEFAULT_LIMITS, FrameDecoder, Message, WireLimits, encode_frame

logger = logging.getLogger("vmlend.node.p2p")

END_TYPE = "vmlend.end"
READ_CHUNK = 64 * 1024

# Everything py-libp2p (and the sockets under it) raise when a stream or a connection fails.
LIBP2P_IO_ERRORS: tuple[type[BaseException], ...] = (
    BaseLibp2pError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    OSError,
    EOFError,
)


class RawStream(Protocol):
    """The four operations we use of a libp2p ``INetStream``."""

    async def read(self, n: int | None = None) -> bytes: ...
    async def write(self, data: bytes) -> None: ...
    async def close(self) -> None: ...
    async def reset(self) -> None: ...


@contextmanager
def stream_errors(what: str) -> Iterator[None]:
    """Translate libp2p/socket failures during ``what`` into :class:`StreamBrokenError`."""
    try:
        yield
    except LIBP2P_IO_ERRORS as e:
        raise StreamBrokenError(f"{what}: {type(e).__name__}: {e}") from e


class MessageStream:
    """A bidirectional stream of message maps to one peer over one protocol.

    ``deadline`` (seconds, ``math.inf`` for none) bounds each :meth:`send` and :meth:`receive`;
    set it per stream (a long-lived control stream with its own heartbeats may raise it).
    """

    def __init__(
        self,
        raw: RawStream,
        *,
        peer_id: str,
        protocol_id: str,
        deadline: float,
        limits: WireLimits = DEFAULT_LIMITS,
    ) -> None:
        self.peer_id = peer_id
        self.protocol_id = protocol_id
        self.deadline = deadline
        self._raw = raw
        self._limits = limits
        self._decoder = FrameDecoder(limits)
        self._send_lock = trio.Lock()
        self._ended_remote = False
        self._ended_local = False
        self._closed = False
        self._broken: NetworkError | RemoteProtocolError | None = None

    def __repr__(self) -> str:
        return f"<MessageStream {self.protocol_id} peer={self.peer_id}>"

    def remote_address(self) -> tuple[str, int] | None:
        """The (ip, port) this stream's connection comes from, as this end observes it (not what
        the peer claims); None when the transport does not say. A relayed connection's is the
        relay's."""
        get = getattr(self._raw, "get_remote_address", None)
        if get is None:
            return None
        try:
            address = get()
        except LIBP2P_IO_ERRORS:
            return None
        if not (isinstance(address, tuple) and len(address) >= 2 and isinstance(address[0], str)):
            return None
        return address[0], int(address[1])

    @contextmanager
    def _deadline(self, what: str) -> Iterator[None]:
        if math.isinf(self.deadline):
            yield
            return
        try:
            with trio.fail_after(self.deadline):
                yield
        except trio.TooSlowError as e:
            raise DeadlineError(
                f"{what} on {self.protocol_id} with {self.peer_id}: "
                f"no progress within {self.deadline:g}s"
            ) from e

    def _fail(self, error: NetworkError | RemoteProtocolError) -> NoReturn:
        self._broken = error
        raise error

    async def send(self, msg: Message) -> None:
        """Send one message. Raises LocalProtocolError (bad message), StreamBrokenError or
        DeadlineError; after a network error the stream is broken and should be reset."""
        if msg.get("type") == END_TYPE:
            raise LocalProtocolError(f"message type {END_TYPE!r} is reserved")
        await self._send_frame(encode_frame(msg, self._limits))

    async def _send_frame(self, frame: bytes) -> None:
        if self._closed or self._ended_local:
            raise trio.ClosedResourceError("this stream was closed for sending")
        if self._broken is not None:
            raise self._broken
        async with self._send_lock:
            try:
                with self._deadline("send"), stream_errors(f"send to {self.peer_id}"):
                    await self._raw.write(frame)
            except (DeadlineError, StreamBrokenError) as e:
                self._fail(e)

    async def receive(self) -> Message:
        """The next message. Raises ``trio.EndOfChannel`` after the peer's explicit end,
        StreamBrokenError (reset, or EOF without the end frame: e.g. a killed peer),
        DeadlineError (no whole message within ``deadline``) or RemoteProtocolError."""
        if self._broken is not None:
            raise self._broken
        if self._ended_remote:
            raise trio.EndOfChannel
        try:
            with self._deadline("receive"):
                while True:
                    msg = self._decoder.next_message()
                    if msg is not None:
                        break
                    with stream_errors(f"receive from {self.peer_id}"):
                        data = await self._raw.read(READ_CHUNK)
                    if not data:
                        raise StreamBrokenError(
                            f"{self.peer_id} ended the stream without an end frame "
                            f"({self._decoder.buffered} bytes of a partial frame buffered)"
                        )
                    self._decoder.feed(data)
        except (DeadlineError, StreamBrokenError, RemoteProtocolError) as e:
            self._fail(e)
        if msg["type"] == END_TYPE:
            self._ended_remote = True
            raise trio.EndOfChannel
        return msg

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        while True:
            try:
                yield await self.receive()
            except trio.EndOfChannel:
                return

    async def send_end(self) -> None:
        """Tell the peer we will send nothing more (we may still receive)."""
        if self._ended_local or self._closed:
            return
        await self._send_frame(encode_frame({"type": END_TYPE}, self._limits))
        self._ended_local = True

    async def aclose(self) -> None:
        """Send our end frame if not sent yet, then close. A broken stream is reset instead."""
        if self._closed:
            return
        try:
            if self._broken is None:
                await self.send_end()
        except (NetworkError, trio.ClosedResourceError):
            pass  # the stream is broken; reset it below
        finally:
            self._closed = True
            with trio.CancelScope(shield=True), trio.move_on_after(1.0):
                try:
                    if self._broken is None:
                        await self._raw.close()
                    else:
                        await self._raw.reset()
                except LIBP2P_IO_ERRORS as e:
                    logger.debug("closing %r: %s", self, e)

    async def reset(self) -> None:
        """Abort the stream; the peer sees a StreamBrokenError, not a clean end."""
        self._closed = True
        self._broken = self._broken or StreamBrokenError("stream was reset locally")
        with trio.CancelScope(shield=True), trio.move_on_after(1.0):
            try:
                await self._raw.reset()
            except LIBP2P_IO_ERRORS as e:
                logger.debug("resetting %r: %s", self, e)

    async def __aenter__(self) -> MessageStream:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        if exc_info[0] is None:
            await self.aclose()
        else:
            await self.reset()
