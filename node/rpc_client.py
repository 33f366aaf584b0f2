"""Local RPC clients: :class:`AsyncClient` (trio) and :class:`Client` (blocking, for scripts).

Both take a data dir (the socket is ``<data>/rpc.sock``) or the socket's own path. A call that the
node answers with an error raises :class:`RpcError` with the node's code; a missing or dead node
raises :class:`NodeNotRunningError`; a connection that breaks raises :class:`StreamBrokenError`;
a call that outlives its ``timeout`` raises :class:`DeadlineError` and is cancelled on the node.
"""

from __future__ import annotations

import contextlib
import enum
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import trio

from node import rpc
from node.errors import (
    DeadlineError,
    PeerUnreachableError,
    RemoteProtocolError,
    RpcError,
    StreamBrokenError,
)

SOCKET_NAME = "rpc.sock"
RECEIVE_SIZE = 64 * 1024
STREAM_BUFFER = 256  # notifications held per streaming call before the connection waits


class NodeNotRunningError(PeerUnreachableError):
    """No node is listening on the socket."""


@dataclass(frozen=True, slots=True)
class Result:
    """The last item of a :meth:`AsyncClient.stream`: the call's result."""

    value: Any


def socket_path(target: str | os.PathLike[str]) -> Path:
    """``<target>/rpc.sock`` when ``target`` is a directory, else ``target`` itself."""
    path = Path(target)
    return path / SOCKET_NAME if path.is_dir() else path


def _not_running(path: Path, why: str) -> NodeNotRunningError:
    return NodeNotRunningError(f"no vmlend node is running with data dir {path.parent} ({why})")


def _connect_error(path: Path, e: OSError) -> Exception:
    if isinstance(e, FileNotFoundError):
        return _not_running(path, f"no socket at {path}")
    if isinstance(e, ConnectionRefusedError):
        return _not_running(path, f"stale socket at {path}: nothing answers")
    if isinstance(e, PermissionError):
        return PeerUnreachableError(f"not allowed to use the node's socket {path}: {e}")
    return PeerUnreachableError(f"cannot connect to {path}: {e}")


def _result(response: rpc.Response) -> Any:
    if response.error is None:
        return response.result
    raise _rpc_error(response.error)


def _rpc_error(error: object) -> RpcError:
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        return RpcError(error["code"], str(error.get("message", "")))
    return RpcError("error", repr(error))  # a server that is not ours


def _closing_error(event: rpc.Response | rpc.Notification) -> RpcError | None:
    if not isinstance(event, rpc.Notification) or event.msgid is not None or not event.params:
        return None
    if event.method == rpc.CLOSING_METHOD:
        return _rpc_error(event.params[0])
    return None


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
            raise _connect_error(path, e) from None
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
                        return _result(event)
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
                elif (closing := _closing_error(event)) is not None:
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
        return Result(_result(event))


class _Default(enum.Enum):
    TIMEOUT = enum.auto()


class Client:
    """A blocking client for scripts: ``Client(data_dir).call("node.info")``. No trio needed.

    One call at a time; the connection opens on first use and reopens after it breaks.
    ``timeout`` bounds a whole :meth:`call`, and each wait for the next item of a :meth:`stream`.
    """

    def __init__(
        self,
        target: str | os.PathLike[str],
        *,
        timeout: float | None = 30.0,
        limits: rpc.RpcLimits = rpc.DEFAULT_LIMITS,
    ) -> None:
        self.path = socket_path(target)
        self.timeout = timeout
        self._limits = limits
        self._sock: socket.socket | None = None
        self._proto = rpc.ClientConnection(limits)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def call(
        self, method: str, *params: Any, timeout: float | _Default | None = _Default.TIMEOUT
    ) -> Any:
        """Call ``method``; ``timeout`` (seconds, None for none) defaults to the client's."""
        limit = self.timeout if isinstance(timeout, _Default) else timeout
        deadline = None if limit is None else time.monotonic() + limit
        for item in self._run(method, params, lambda: deadline):
            if isinstance(item, Result):
                return item.value
        raise AssertionError("unreachable: a call always ends with its result or an error")

    def stream(self, method: str, *params: Any) -> Iterator[rpc.Notification | Result]:
        timeout = self.timeout
        return self._run(
            method, params, lambda: None if timeout is None else time.monotonic() + timeout
        )

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(os.fspath(self.path))
            except OSError as e:
                sock.close()
                raise _connect_error(self.path, e) from None
            self._sock = sock
            self._proto = rpc.ClientConnection(self._limits)
        return self._sock

    def _run(
        self, method: str, params: Sequence[Any], deadline: Callable[[], float | None]
    ) -> Iterator[rpc.Notification | Result]:
        sock = self._connect()
        msgid, data = self._proto.send_request(method, params)
        done = False
        try:
            self._sendall(sock, data)
            while True:
                event = self._next_event(sock, deadline(), method)
                if isinstance(event, rpc.Response) and event.msgid == msgid:
                    done = True
                    yield Result(_result(event))
                    return
                if isinstance(event, rpc.Notification) and event.msgid == msgid:
                    yield event
        finally:
            if not done and self._sock is not None:
                # Timed out, or the caller stopped iterating: stop the work on the node too.
                with contextlib.suppress(OSError):
                    sock.settimeout(1)
                    sock.sendall(self._proto.abandon(msgid))

    def _sendall(self, sock: socket.socket, data: bytes) -> None:
        try:
            sock.settimeout(self.timeout)
            sock.sendall(data)
        except OSError as e:
            self.close()
            raise StreamBrokenError(f"connection to {self.path} broke: {e}") from e

    def _next_event(
        self, sock: socket.socket, deadline: float | None, method: str
    ) -> rpc.Response | rpc.Notification:
        while True:
            try:
                event = self._proto.next_event()
            except RemoteProtocolError as e:
                self.close()
                raise StreamBrokenError(f"the node broke the protocol: {e}") from e
            if event is not None:
                if (closing := _closing_error(event)) is not None:
                    self.close()
                    raise closing
                return event
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise DeadlineError(f"{method}: no answer within the timeout")
            try:
                sock.settimeout(remaining)
                data = sock.recv(RECEIVE_SIZE)
            except TimeoutError:
                raise DeadlineError(f"{method}: no answer within the timeout") from None
            except OSError as e:
                self.close()
                raise StreamBrokenError(f"connection to {self.path} broke: {e}") from e
            if not data:
                self.close()
                raise StreamBrokenError(f"the node closed the connection {self.path}")
            self._proto.receive_data(data)
