"""Local RPC clients: :class:`AsyncClient` (trio) and :class:`Client` (blocking, for scripts).

Both take a data dir (the socket is ``<data>/rpc.sock``) or the socket's own path. A call that the
node answers with an error raises :class:`RpcError` with the node's code; a missing or dead node
raises :class:`NodeNotRunningError`; a connection that breaks raises :class:`StreamBrokenError`;
a call that outlives its ``timeout`` raises :class:`DeadlineError` and is cancelled on the node.
:class:`Client` lives in :mod:`node.rpc_blocking_client`, which does not import trio; it is
re-exported here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import trio

from node import rpc
from node.errors import DeadlineError, RemoteProtocolError, StreamBrokenError
from node.rpc_blocking_client import (
    RECEIVE_SIZE,
    SOCKET_NAME,
    Client,
    NodeNotRunningError,
    Result,
    closing_error,
    connect_error,
    response_value,
    socket_path,
)

__all__ = [
    "SOCKET_NAME",
    "AsyncClient",
    "CallStream",
    "Client",
    "NodeNotRunningError",
    "Result",
    "socket_path",
]

STREAM_BUFFER = 256  # notifications held per streaming call before the connection waits


@contextlib.contextmanager
def _deadline(timeout: float | None, method: str) -> Iterator[None]:
    if timeout is None:
        yield
        return
    try:
        with trio.fail_after(timeout):
            yield
    except trio.TooSlowError:
        raise DeadlineError(f"{method}: no answer within {timeout} s") from None


class AsyncClient:
    """One connection to the node; calls on it may run concurrently from many tasks."""

    def __init__(self, stream: trio.SocketStream, path: Path, limits: rpc.RpcLimits) -> None:
        self.path = path
        self._stream = stream
        self._proto = rpc.ClientConnection(limits)
        # Callers hand their bytes to one writer task, so a caller cancelled mid-send never
        # leaves half a message on the wire (a channel send is atomic; a socket send is not).
        self._outbox, self._outbox_receive = trio.open_memory_channel[bytes](0)
        self._calls: dict[int, trio.MemorySendChannel[rpc.Response | rpc.Notification]] = {}
        self._failure: Exception | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls, target: str | os.PathLike[str], *, limits: rpc.RpcLimits = rpc.DEFAULT_LIMITS
    ) -> AsyncIterator[AsyncClient]:
        path = socket_path(target)
        try:
            stream = await trio.open_unix_socket(os.fspath(path))
        except OSError as e:
            raise connect_error(path, e) from None
        client = cls(stream, path, limits)
        try:
            async with stream, trio.open_nursery() as nursery:
                nursery.start_soon(client._read_loop)
                nursery.start_soon(client._write_loop)
                yield client
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The reader never raises, so a group holds the caller's own exception: unwrap it
            # so that `except RpcError` around `async with` works.
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise

    # A timeout argument (not only the caller's cancel scope) so that a call that runs out of
    # time raises DeadlineError and is cancelled on the node, like the blocking Client's.
    async def call(
        self,
        method: str,
        *params: Any,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Any:
        with _deadline(timeout, method):
            msgid, receive = await self._start(method, params)
            try:
                async for event in receive:
                    if isinstance(event, rpc.Response):
                        return response_value(event)
                raise self._broken()
            finally:
                await self._finish(msgid)

    def stream(self, method: str, *params: Any) -> CallStream:
        """Notifications sent by a streaming method, then its :class:`Result`.

        Use as ``async with c.stream(...) as s: async for item in s``, so that leaving early
        cancels the call on the node; plain ``async for item in c.stream(...)`` works when the
        loop always runs to the end.
        """
        return CallStream(self, method, params)

    async def _start(
        self, method: str, params: Sequence[Any]
    ) -> tuple[int, trio.MemoryReceiveChannel[rpc.Response | rpc.Notification]]:
        if self._failure is not None:
            raise self._broken()
        send, receive = trio.open_memory_channel[rpc.Response | rpc.Notification](STREAM_BUFFER)
        msgid, data = self._proto.send_request(method, params)
        self._calls[msgid] = send
        try:
            await self._outbox.send(data)
        except BaseException:
            self._calls.pop(msgid, None)
            self._proto.forget(msgid)  # never sent, so nothing to cancel on the node
            if self._failure is not None:
                raise self._broken() from None
            raise
        return msgid, receive

    async def _finish(self, msgid: int) -> None:
        """Forget a call; if it is still running on the node, cancel it there."""
        send = self._calls.pop(msgid, None)
        if send is None or self._failure is not None:
            return
        send.close()  # frees the reader if it is blocked handing this call a notification
        data = self._proto.abandon(msgid)
        with (
            trio.CancelScope(shield=True),
            trio.move_on_after(1),
            contextlib.suppress(trio.BrokenResourceError),
        ):
            await self._outbox.send(data)

    async def _write_loop(self) -> None:
        async with self._outbox_receive:
            async for data in self._outbox_receive:
                try:
                    await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                    self._fail(StreamBrokenError(f"connection to {self.path} broke: {e}"))
                    return

    def _broken(self) -> Exception:
        return self._failure or StreamBrokenError(f"connection to {self.path} closed")

    def _fail(self, failure: Exception) -> None:
        if self._failure is None:
            self._failure = failure
        for send in self._calls.values():
            send.close()  # each waiting call sees the end of its channel, then self._failure

    async def _read_loop(self) -> None:
        try:
            while True:
                event = self._proto.next_event()
                if event is None:
                    data = await self._stream.receive_some(RECEIVE_SIZE)
                    if not data:
                        self._fail(StreamBrokenError(f"the node closed the connection {self.path}"))
                        return
                    self._proto.receive_data(data)
                elif (closing := closing_error(event)) is not None:
                    self._fail(closing)
                    return
                elif (key := event.msgid) is not None and (send := self._calls.get(key)):
                    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await send.send(event)
                    if isinstance(event, rpc.Response):
                        self._calls.pop(key, None)
                        send.close()
        except RemoteProtocolError as e:
            self._fail(StreamBrokenError(f"the node broke the protocol: {e}"))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self._fail(StreamBrokenError(f"connection to {self.path} broke: {e}"))


class CallStream:
    """One streaming call (see :meth:`AsyncClient.stream`)."""

    def __init__(self, client: AsyncClient, method: str, params: Sequence[Any]) -> None:
        self._client = client
        self._method = method
        self._params = params
        self._receive: trio.MemoryReceiveChannel[rpc.Response | rpc.Notification] | None = None
        self._msgid = -1
        self._done = False

    async def __aenter__(self) -> CallStream:
        await self._open()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _open(self) -> trio.MemoryReceiveChannel[rpc.Response | rpc.Notification]:
        if self._receive is None:
            self._msgid, self._receive = await self._client._start(self._method, self._params)
        return self._receive

    async def aclose(self) -> None:
        if self._receive is not None and not self._done:
            self._done = True
            await self._client._finish(self._msgid)

    def __aiter__(self) -> CallStream:
        return self

    async def __anext__(self) -> rpc.Notification | Result:
        if self._done:
            raise StopAsyncIteration
        receive = await self._open()
        try:
            event = await receive.receive()
        except trio.EndOfChannel:
            self._done = True
            raise self._client._broken() from None
        if isinstance(event, rpc.Notification):
            return event
        self._done = True
        await self._client._finish(self._msgid)
        return Result(response_value(event))
