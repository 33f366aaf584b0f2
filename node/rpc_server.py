"""The local RPC server: thin trio glue around :class:`node.rpc.ServerConnection`.

Access control: the socket file is created mode 0600 and owned by the node's user, so the file
mode is what keeps other users out (anyone who can open the socket can call every method). As a
second fence, each connection's SO_PEERCRED uid must be ours or root; anyone else is told
``permission_denied`` and disconnected.

One node per data dir: ``<socket>.lock`` is flock()ed for the server's lifetime, and a socket file
that exists at start is removed only when nothing answers on it (a crashed node's leftover).

Per connection: requests run concurrently, at most ``limits.max_in_flight`` at a time (more get a
``busy`` error); a malformed request is answered with an error when its msgid can be recovered,
otherwise the connection is closed; when the client goes away (its end of input counts: a
client that half-closes loses its answers) its unfinished handlers are cancelled. Nothing a
client does stops the server.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import trio

from node import rpc
from node.errors import LocalProtocolError, RpcError, VmlendError

log = logging.getLogger("vmlend.node.rpc")

Handler = Callable[[list[Any]], Awaitable[Any]]
# send_notification(method, params): sends a notification tied to the current request.
SendNotification = Callable[[str, Sequence[Any]], Awaitable[None]]
StreamHandler = Callable[[list[Any], SendNotification], Awaitable[Any]]

MAX_UNIX_PATH = 107  # sun_path is 108 bytes including the terminating NUL
RECEIVE_SIZE = 64 * 1024
PERMISSION_DENIED = "permission_denied"
TOO_MANY_CONNECTIONS = "too_many_connections"
_ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


class RpcServerError(VmlendError):
    """The RPC server cannot start (bad path, socket file in the way, permissions)."""


class NodeAlreadyRunningError(RpcServerError):
    """Another live node already serves this socket."""


def peer_uid(sock: trio.socket.SocketType) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class RpcServer:
    """Serve ``methods`` (and streaming ``streams``) on the Unix socket at ``path``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        methods: Mapping[str, Handler],
        *,
        streams: Mapping[str, StreamHandler] | None = None,
        limits: rpc.RpcLimits = rpc.DEFAULT_LIMITS,
        max_connections: int = 64,
    ) -> None:
        self.path = Path(path)
        self.methods = dict(methods)
        self.streams = dict(streams or {})
        if overlap := self.methods.keys() & self.streams.keys():
            raise ValueError(f"methods registered both plain and streaming: {sorted(overlap)}")
        self.limits = limits
        self.max_connections = max_connections
        self.connections = 0
        self._allowed_uids = {os.getuid(), 0}

    async def run(self, *, task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled; ``started(path)`` once clients can connect."""
        with self._claim() as sock:
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
            async with listener, trio.open_nursery() as nursery:
                log.info("local RPC listening on %s", self.path)
                task_status.started(self.path)
                while True:
                    try:
                        stream = await listener.accept()
                    except OSError as e:
                        if e.errno not in _ACCEPT_RETRY_ERRNOS:
                            raise
                        # Out of descriptors: wait for connections to close instead of spinning.
                        log.warning("local RPC accept failed (%s); retrying", e)
                        await trio.sleep(0.1)
                        continue
                    nursery.start_soon(self._serve, stream)

    @contextlib.contextmanager
    def _claim(self) -> Iterator[socket.socket]:
        """Lock the path, clear a stale socket, bind 0600, listen; undo it all on exit."""
        raw = os.fsencode(self.path)
        if len(raw) > MAX_UNIX_PATH:
            raise RpcServerError(
                f"socket path {self.path} is {len(raw)} bytes; Unix sockets allow {MAX_UNIX_PATH}"
            )
        lock_fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise NodeAlreadyRunningError(
                    f"another vmlend node is already running on {self.path}"
                ) from None
            self._remove_stale()
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                self._bind_private(sock)
                try:
                    sock.listen(128)
                    yield sock
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
        finally:
            os.close(lock_fd)  # releases the flock; the lock file stays (unlinking it races)

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise RpcServerError(f"{self.path} exists and is not a socket; not removing it")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.setblocking(False)
            try:
                probe.connect(os.fspath(self.path))
            except ConnectionRefusedError:
                log.info("removing stale socket %s (nothing answers on it)", self.path)
                self.path.unlink()
                return
            except BlockingIOError:
                pass  # a listener whose backlog is full: alive
        raise NodeAlreadyRunningError(
            f"another vmlend node is already running on {self.path} (it answers connections)"
        )

    def _bind_private(self, sock: socket.socket) -> None:
        # The umask makes the file 0600 from its first instant. It is process-wide, so keep the
        # window synchronous (no await), then check the result rather than trust it.
        old = os.umask(0o177)
        try:
            sock.bind(os.fspath(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        st = os.lstat(self.path)
        if stat.S_IMODE(st.st_mode) != 0o600 or st.st_uid != os.getuid():
            self.path.unlink()
            raise RpcServerError(f"{self.path} could not be made private (mode 0600, our uid)")

    async def _serve(self, stream: trio.SocketStream) -> None:
        async with stream:
            uid = peer_uid(stream.socket)
            if uid not in self._allowed_uids:
                log.warning("local RPC: refused a connection from uid %d", uid)
                await _refuse(stream, PERMISSION_DENIED, f"uid {uid} may not use this node")
                return
            if self.connections >= self.max_connections:
                log.warning("local RPC: refused a connection (%d open)", self.connections)
                await _refuse(stream, TOO_MANY_CONNECTIONS, f"limit {self.max_connections}")
                return
            self.connections += 1
            try:
                await _Connection(self, stream).run()
            finally:
                self.connections -= 1

    async def dispatch(self, request: rpc.Request, send: SendNotification) -> tuple[Any, Any]:
        """Run one request's handler; return (error object or None, result)."""
        handler = self.methods.get(request.method)
        stream_handler = self.streams.get(request.method)
        try:
            if handler is not None:
                return None, await handler(request.params)
            if stream_handler is not None:
                return None, await stream_handler(request.params, send)
        except RpcError as e:
            return rpc.error_object(e.code, e.message), None
        except Exception as e:
            # The one place a handler's failure becomes an answer: the client learns what went
            # wrong, the log keeps the traceback, and the server keeps serving.
            log.exception("local RPC handler for %r failed", request.method)
            return rpc.error_object(rpc.INTERNAL, f"{type(e).__name__}: {e}"), None
        return rpc.error_object(rpc.METHOD_NOT_FOUND, f"no method {request.method!r}"), None


async def _refuse(stream: trio.SocketStream, code: str, message: str) -> None:
    data = rpc.ServerConnection().send_notification(
        rpc.CLOSING_METHOD, [rpc.error_object(code, message)]
    )
    # Closing a Unix socket with unread input resets it, and the reset can overtake our reason.
    # So: say why, half-close, and let the client close first (briefly, a bounded amount).
    with trio.move_on_after(1), contextlib.suppress(trio.BrokenResourceError):
        await stream.send_all(data)
        await stream.send_eof()
        for _ in range(16):
            if not await stream.receive_some(RECEIVE_SIZE):
                break


class _Connection:
    def __init__(self, server: RpcServer, stream: trio.SocketStream) -> None:
        self.server = server
        self.stream = stream
        self.proto = rpc.ServerConnection(server.limits)
        self.scopes: dict[int, trio.CancelScope] = {}
        self.ignored: set[str] = set()  # what was ignored on this connection, said once each
        # Handlers hand their bytes to one writer task: a handler cancelled mid-send (by
        # rpc.cancel) then never leaves half a message on the wire; a channel send is atomic.
        self.outbox, self.outbox_receive = trio.open_memory_channel[bytes](0)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_loop, nursery.cancel_scope)
            await self._read_loop(nursery)
            # The client is gone or out of sync: nobody will read its answers.
            nursery.cancel_scope.cancel()

    async def _write_loop(self, connection: trio.CancelScope) -> None:
        async with self.outbox_receive:
            async for data in self.outbox_receive:
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    # The client went away; stop its handlers rather than let them run for nobody.
                    connection.cancel()
                    return

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                event = self.proto.next_event()
            except rpc.UnusableNotificationError as e:
                self._ignore("an unusable notification", str(e))
                continue
            except rpc.RejectedMessageError as e:
                if e.msgid is None:
                    log.warning("local RPC: closing a connection: %s", e)
                    return
                log.info("local RPC: rejected request %d: %s", e.msgid, e)
                await self._send(self.proto.send_rejection(e))
                continue
            except rpc.StreamCorruptError as e:
                log.warning("local RPC: closing a connection: %s", e)
                return
            if event is None:
                try:
                    data = await self.stream.receive_some(RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not data:
                    return
                self.proto.receive_data(data)
            elif isinstance(event, rpc.Request):
                scope = self.scopes[event.msgid] = trio.CancelScope()
                nursery.start_soon(self._handle, event, scope)
            elif event.method == rpc.CANCEL_METHOD:
                self._cancel(event.params)
            else:
                self._ignore(f"notification {event.method[:80]!r}", "not one this node knows")

    def _ignore(self, what: str, why: str) -> None:
        """Said once per connection and kind: a client may send such things all the time."""
        if what in self.ignored or len(self.ignored) >= 64:
            return
        self.ignored.add(what)
        log.info("local RPC: ignoring %s (%s)", what, why)

    def _cancel(self, params: list[Any]) -> None:
        msgid = params[0] if params else None
        if isinstance(msgid, int) and (scope := self.scopes.get(msgid)) is not None:
            scope.cancel()

    async def _handle(self, request: rpc.Request, scope: trio.CancelScope) -> None:
        async def send_notification(method: str, params: Sequence[Any]) -> None:
            await self._send(self.proto.send_stream_notification(request.msgid, method, params))

        error: Any = rpc.error_object(rpc.CANCELLED, "cancelled by the client")
        result: Any = None
        try:
            with scope:
                error, result = await self.server.dispatch(request, send_notification)
            try:
                data = self.proto.send_response(request.msgid, error, result)
            except LocalProtocolError as e:
                log.error("local RPC: %r returned an unsendable result: %s", request.method, e)
                error = rpc.error_object(rpc.INTERNAL, f"result cannot be sent: {e}")
                data = self.proto.send_response(request.msgid, error, None)
            await self._send(data)
        finally:
            del self.scopes[request.msgid]

    async def _send(self, data: bytes) -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # the writer is gone: so is the client
            await self.outbox.send(data)
