"""The provider's end of the direct data channel (the protocol is in :mod:`catalog.data_channel`):
serve chunks to connections that present a token, each from a thread of its own."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from catalog.chunking import ChunkId
from catalog.data_channel import (
    HEADER,
    OP_GET,
    REQUEST,
    SOCKET_BUFFER,
    STATUS_NOT_FOUND,
    STATUS_OK,
    TOKEN_SIZE,
    Grant,
    TokenBook,
    blocking_socket,
    nonce,
)
from catalog.errors import CatalogError, MissingChunkError
from node.errors import StreamBrokenError

log = logging.getLogger("vmlend.catalog.channel")

RECV_SIZE = 1 << 20

ReadChunk = Callable[[ChunkId], Awaitable[bytes]]  # the chunk's bytes, verified
OpenChunk = Callable[[ChunkId], "ChunkFile"]  # blocking: called in a connection's thread


@dataclass(frozen=True, slots=True)
class ChunkFile:
    """An open, read-only chunk file to send with ``sendfile``; the sender calls ``close``
    (``os.close`` of ``fd`` unless the opener says otherwise)."""

    fd: int
    size: int
    closer: Callable[[int], None] = os.close

    def close(self) -> None:
        self.closer(self.fd)


class DataServer:
    """Serve chunks on TCP to connections presenting a token from :attr:`tokens`.

    Once a connection has shown its token (checked in trio, under ``token_timeout``), it is
    served by a worker thread of its own on a blocking socket: read the pipelined requests,
    open each chunk's file (``open_chunk``, blocking) and ``sendfile`` it, or, for a grant with
    a key, read the chunk (``read_chunk``, in trio) and send it encrypted. Measured here, the
    same loop on the event loop spent more of the provider's CPU on trio's scheduling and a
    thread hop per file open than on sending the bytes.
    """

    def __init__(
        self,
        read_chunk: ReadChunk,
        *,
        open_chunk: OpenChunk | None = None,
        host: str,
        port: int = 0,
        token_timeout: float = 10.0,
        max_connections: int = 64,
        max_unauthorised: int = 16,
        max_unauthorised_per_ip: int = 4,
        idle_timeout: float = 60.0,
    ) -> None:
        self.tokens = TokenBook()
        self._read_chunk = read_chunk
        self._open_chunk = open_chunk
        self._host = host
        self._port = port
        self._token_timeout = token_timeout
        self._idle_timeout = idle_timeout
        # A connection holds a slot of the served pool only once its token is good; until then
        # it waits in a small pool of its own, of which one address can take only a few, so
        # strangers who never show a token cannot keep the fetchers who hold one out.
        self._slots = trio.CapacityLimiter(max_connections)
        self._unauthorised = trio.CapacityLimiter(max_unauthorised)
        self._unauthorised_per_ip = max_unauthorised_per_ip
        self._unauthorised_by_ip: dict[str, int] = {}
        self.port = 0
        self.refused = 0  # connections turned away (no valid token, or too many)
        self.served = 0  # connections that showed a valid token

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self._port, host=self._host)
        self.port = listeners[0].socket.getsockname()[1]
        log.info("chunk data channel on %s:%d", self._host, self.port)
        async with trio.open_nursery() as nursery:
            task_status.started(self.port)
            await trio.serve_listeners(self._serve, listeners, handler_nursery=nursery)

    async def _serve(self, stream: trio.SocketStream) -> None:
        stream.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_SNDBUF, SOCKET_BUFFER)
        async with stream:
            try:
                grant = await self._authorise(stream)
                if grant is None:
                    return
                try:
                    self._slots.acquire_nowait()
                except trio.WouldBlock:
                    self.refused += 1
                    return
                try:
                    await self._serve_authorised(stream, grant)
                finally:
                    self._slots.release()
            except* (
                StreamBrokenError,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                OSError,  # the socket, or the disk under a chunk being read
            ) as group:
                log.debug("data channel connection ended: %s", group.exceptions[0])

    async def _authorise(self, stream: trio.SocketStream) -> Grant | None:
        """The grant of the token the connection shows within ``token_timeout``, or None."""
        ip = str(stream.socket.getpeername()[0])
        if self._unauthorised_by_ip.get(ip, 0) >= self._unauthorised_per_ip:
            self.refused += 1
            return None
        try:
            self._unauthorised.acquire_nowait()
        except trio.WouldBlock:
            self.refused += 1
            return None
        self._unauthorised_by_ip[ip] = self._unauthorised_by_ip.get(ip, 0) + 1
        token: bytes | None = None  # still None if the timeout passes first
        try:
            with trio.move_on_after(self._token_timeout):
                token = await _receive_token(stream)
        finally:
            self._unauthorised.release()
            if (left := self._unauthorised_by_ip[ip] - 1) > 0:
                self._unauthorised_by_ip[ip] = left
            else:
                del self._unauthorised_by_ip[ip]
        grant = None if token is None else self.tokens.redeem(token, trio.current_time())
        if grant is None:
            self.refused += 1
            log.info("data channel: connection from %s without a valid token refused", ip)
        return grant

    async def _serve_authorised(self, stream: trio.SocketStream, grant: Grant) -> None:
        self.served += 1
        sock = blocking_socket(stream)
        try:
            served = _ServedConnection(
                sock, grant, self._read_chunk, self._open_chunk, idle_timeout=self._idle_timeout
            )
            await trio.to_thread.run_sync(served.run, limiter=trio.CapacityLimiter(1))
        finally:
            sock.close()  # only now: the thread has returned


async def _receive_token(stream: trio.SocketStream) -> bytes | None:
    """The TOKEN_SIZE bytes a connection starts with (read no further: requests follow), or
    None if it ends first."""
    token = b""
    while len(token) < TOKEN_SIZE:
        try:
            more = await stream.receive_some(TOKEN_SIZE - len(token))
        except trio.BrokenResourceError:
            return None
        if not more:
            return None
        token += more
    return token


class _ServedConnection:
    """A provider's side of one authorised connection, run in a worker thread until the peer
    is done, goes away or breaks the protocol, or trio cancels it."""

    def __init__(
        self,
        sock: socket.socket,
        grant: Grant,
        read_chunk: ReadChunk,
        open_chunk: OpenChunk | None,
        *,
        idle_timeout: float,
    ) -> None:
        self._sock = sock
        self._idle_timeout = idle_timeout
        self._grant = grant
        self._read_chunk = read_chunk
        # With a key, every answer is read and encrypted here: no sendfile.
        self._open_chunk = open_chunk if grant.key is None else None
        self._cipher = ChaCha20Poly1305(grant.key) if grant.key is not None else None
        self._sent = 0  # answers encrypted so far: the next nonce

    def run(self) -> None:
        pending = b""
        while True:
            # Requests are pipelined: take every whole one that has arrived.
            while len(pending) < REQUEST.size:
                more = self._receive_some()
                if not more:
                    return  # the peer is done (or went away mid-request)
                pending += more
            whole = len(pending) - len(pending) % REQUEST.size
            requests, pending = pending[:whole], pending[whole:]
            for op, chunk_id in REQUEST.iter_unpack(requests):
                if op != OP_GET:
                    log.info("data channel: %s sent unknown op %d; closing", self._grant.peer, op)
                    return
                trio.from_thread.check_cancelled()  # a busy connection never times out
                self._answer(ChunkId(chunk_id))

    def _answer(self, chunk_id: ChunkId) -> None:
        file: ChunkFile | None = None
        try:
            if self._grant.scope is not None and chunk_id not in self._grant.scope:
                raise MissingChunkError(chunk_id.hex())  # not for this token
            if self._open_chunk is not None:
                file = self._open_chunk(chunk_id)
            else:
                data = trio.from_thread.run(self._read_chunk, chunk_id)
        except (CatalogError, OSError) as e:  # missing, corrupt, disk failure
            log.debug("data channel: %s asked for %s: %s", self._grant.peer, chunk_id.hex(), e)
            self._send_all(HEADER.pack(STATUS_NOT_FOUND, chunk_id, 0))
            return
        if file is not None:
            self._send_file(chunk_id, file)
            return
        if self._cipher is not None:
            data = self._cipher.encrypt(nonce(self._sent), data, chunk_id)
            self._sent += 1
        self._send_all(HEADER.pack(STATUS_OK, chunk_id, len(data)) + data)

    def _send_file(self, chunk_id: ChunkId, file: ChunkFile) -> None:
        """The header, then the file by ``sendfile``: the kernel moves the file's cached pages
        to the socket, with no copy into Python and back (the fetcher verifies every chunk, so
        the provider need not read it)."""
        try:
            # MSG_MORE: the header leaves with the file's first bytes, not in a segment alone.
            self._send_all(HEADER.pack(STATUS_OK, chunk_id, file.size), socket.MSG_MORE)
            offset = 0
            while offset < file.size:
                try:
                    count = os.sendfile(self._sock.fileno(), file.fd, offset, file.size - offset)
                except BlockingIOError:  # SO_SNDTIMEO: the peer is not reading for now
                    trio.from_thread.check_cancelled()
                    continue
                if count == 0:  # the file is shorter than it was when opened: cut it short
                    raise StreamBrokenError(f"chunk file ended after {offset} of {file.size} bytes")
                offset += count
        finally:
            file.close()

    def _send_all(self, data: bytes, flags: int = 0) -> None:
        view = memoryview(data)
        idle = _IdleClock(self._idle_timeout)
        while view:
            try:
                view = view[self._sock.send(view, flags) :]
                idle.reset()
            except BlockingIOError:  # SO_SNDTIMEO: the peer is not reading for now
                trio.from_thread.check_cancelled()
                idle.check("reading what it asked for")

    def _receive_some(self) -> bytes:
        """What has arrived (at least one byte), or b"" when the peer is done or gone."""
        idle = _IdleClock(self._idle_timeout)
        while True:
            try:
                return self._sock.recv(RECV_SIZE)
            except BlockingIOError:  # SO_RCVTIMEO: nothing for a while
                trio.from_thread.check_cancelled()
                idle.check("asking")
            except (ConnectionResetError, ConnectionAbortedError):
                return b""


class _IdleClock:
    """How long a connection's thread has waited on its peer; past ``timeout``, the connection
    is ended (its slot is freed for others). Monotonic time: this runs in a worker thread."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self.reset()

    def reset(self) -> None:
        self._since = time.monotonic()

    def check(self, doing: str) -> None:
        if time.monotonic() - self._since > self._timeout:
            raise StreamBrokenError(f"the peer stopped {doing} for {self._timeout:g}s")


__all__ = ["ChunkFile", "DataServer"]
