"""The direct data channel: chunk bytes on plain TCP beside libp2p, for peers authorised there.

Why: libp2p streams (Noise + yamux in Python) carry ~60 MB/s here; loopback TCP carries GB/s.
Chunks verify themselves by hash, so the bulk bytes need no channel security; what must not leak
is *who may read* (private blobs are a later concern, see the module's TODO in blob_service).

Authorisation: a peer asks over its authenticated libp2p stream (``TICKET_PROTOCOL``) and gets
a one-time 32-byte token bound to its peer ID; it opens a TCP connection, sends the token first,
and only then may ask for chunks. A token is consumed on first use and expires after
``TOKEN_TTL`` seconds; a connection with a wrong token is closed unanswered.

Wire, after the token (all integers big-endian)::

    request  = op:u8 (1 = get) | chunk_id:32
    response = status:u8 (0 = ok, 1 = not found) | chunk_id:32 | length:u32 | data[length]

Responses come in request order (requests may be pipelined). The reader checks each header
against the request at the head of the queue and refuses lengths over ``MAX_CHUNK_SIZE``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from catalog.chunk_store import write_temp
from catalog.chunking import (
    ID_SIZE,
    MAX_CHUNK_SIZE,
    ChunkId,
    HashedChunk,
    SpooledChunk,
    hash_chunk,
)
from catalog.errors import CatalogError, MissingChunkError
from node.errors import RemoteProtocolError, StreamBrokenError

log = logging.getLogger("vmlend.catalog.channel")

TICKET_PROTOCOL = "/vmlend/chunk-channel/1.0.0"
TOKEN_SIZE = 32
TOKEN_TTL = 60.0
MAX_TOKENS_PER_PEER = 16
OP_GET = 1
STATUS_OK, STATUS_NOT_FOUND = 0, 1
_REQUEST = struct.Struct(f">B{ID_SIZE}s")
_HEADER = struct.Struct(f">B{ID_SIZE}sI")
RECV_SIZE = 1 << 20
READ_AHEAD = 4
SOCKET_BUFFER = 4 << 20
KEY_SIZE = 32
TAG_SIZE = 16
POLL_INTERVAL = 0.1  # seconds a client's reader thread waits in recv before checking for cancel
_RCVTIMEO = struct.pack("ll", 0, int(POLL_INTERVAL * 1_000_000))

ReadChunk = Callable[[ChunkId], Awaitable[bytes]]
OpenChunk = Callable[[ChunkId], Awaitable["ChunkFile"]]
SMALL = 65536  # answers up to this size go out in one send with their header


@dataclass(frozen=True, slots=True)
class ChunkFile:
    """An open, read-only chunk file to send with ``sendfile``; the sender closes ``fd``."""

    fd: int
    size: int


@dataclass(slots=True)
class _Answer:
    header: bytes
    data: bytes = b""
    file: ChunkFile | None = None

    def close(self) -> None:
        if self.file is not None:
            os.close(self.file.fd)
            self.file = None


# ------------------------------------------------------------------------------------ tokens


@dataclass(frozen=True, slots=True)
class Grant:
    """What a token allows: ``peer`` may read the chunks in ``scope`` (all if None); with a
    ``key``, every chunk is sent encrypted (ChaCha20-Poly1305, nonce = answer number)."""

    peer: str
    scope: frozenset[ChunkId] | None = None
    key: bytes | None = None


@dataclass
class TokenBook:
    """One-time tokens, each bound to a grant and an expiry. Sans-IO: time is passed in."""

    ttl: float = TOKEN_TTL
    per_peer: int = MAX_TOKENS_PER_PEER
    _tokens: dict[bytes, tuple[Grant, float]] = field(default_factory=dict)

    def issue(
        self,
        peer_id: str,
        now: float,
        *,
        scope: frozenset[ChunkId] | None = None,
        key: bytes | None = None,
    ) -> bytes:
        self._expire(now)
        mine = [t for t, (g, _) in self._tokens.items() if g.peer == peer_id]
        for old in mine[: max(0, len(mine) - self.per_peer + 1)]:
            del self._tokens[old]  # a peer holds at most per_peer live tokens
        token = secrets.token_bytes(TOKEN_SIZE)
        self._tokens[token] = (Grant(peer_id, scope, key), now + self.ttl)
        return token

    def redeem(self, token: bytes, now: float) -> Grant | None:
        """The grant the token was issued with, once; None if unknown, used or expired."""
        self._expire(now)
        entry = self._tokens.pop(token, None)
        return entry[0] if entry is not None else None

    def _expire(self, now: float) -> None:
        for token in [t for t, (_, expiry) in self._tokens.items() if expiry <= now]:
            del self._tokens[token]


def _nonce(number: int) -> bytes:
    return number.to_bytes(12, "big")


# ------------------------------------------------------------------------------------ server


class DataServer:
    """Serve chunks on TCP to connections presenting a token from :attr:`tokens`."""

    def __init__(
        self,
        read_chunk: ReadChunk,
        *,
        open_chunk: OpenChunk | None = None,
        host: str,
        port: int = 0,
        token_timeout: float = 10.0,
        max_connections: int = 64,
    ) -> None:
        self.tokens = TokenBook()
        self._read_chunk = read_chunk
        self._open_chunk = open_chunk
        self._host = host
        self._port = port
        self._token_timeout = token_timeout
        self._slots = trio.CapacityLimiter(max_connections)
        self.port = 0
        self.refused = 0

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
                self._slots.acquire_nowait()
            except trio.WouldBlock:
                self.refused += 1
                return
            try:
                await self._serve_authorised(stream)
            except* (
                StreamBrokenError,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
                OSError,  # the socket, or the disk under a chunk being read
            ) as group:
                log.debug("data channel connection ended: %s", group.exceptions[0])
            finally:
                self._slots.release()

    async def _serve_authorised(self, stream: trio.SocketStream) -> None:
        reader = _Reader(stream)
        with trio.move_on_after(self._token_timeout):
            token = await reader.read_exactly(TOKEN_SIZE)
        grant = None if token is None else self.tokens.redeem(bytes(token), trio.current_time())
        if grant is None:
            self.refused += 1
            log.info("data channel: connection without a valid token refused")
            return
        peer = grant.peer
        cipher = ChaCha20Poly1305(grant.key) if grant.key is not None else None
        sent = 0
        # Read ahead: the next chunks come off the disk while this one is being sent. Answers
        # stay in request order.
        answers, outbox = trio.open_memory_channel[_Answer](READ_AHEAD)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_answers, stream, outbox, nursery.cancel_scope)
            async with answers:
                while (raw := await _read_request(reader, peer)) is not None:
                    op, chunk_id = _REQUEST.unpack(raw)
                    if op != OP_GET:
                        log.info("data channel: %s sent unknown op %d; closing", peer, op)
                        nursery.cancel_scope.cancel()
                        return
                    try:
                        if grant.scope is not None and chunk_id not in grant.scope:
                            raise MissingChunkError(chunk_id.hex())  # not for this token
                        if cipher is None and self._open_chunk is not None:
                            file = await self._open_chunk(ChunkId(chunk_id))
                            header = _HEADER.pack(STATUS_OK, chunk_id, file.size)
                            answer = _Answer(header, file=file)
                        else:
                            data = await self._read_chunk(ChunkId(chunk_id))
                            if cipher is not None:
                                data = cipher.encrypt(_nonce(sent), data, chunk_id)
                                sent += 1
                            answer = _Answer(_HEADER.pack(STATUS_OK, chunk_id, len(data)), data)
                    except (CatalogError, OSError) as e:  # missing, corrupt, disk failure
                        log.debug("data channel: %s asked for %s: %s", peer, chunk_id.hex(), e)
                        answer = _Answer(_HEADER.pack(STATUS_NOT_FOUND, chunk_id, 0))
                    try:
                        await answers.send(answer)
                    except BaseException:
                        answer.close()
                        raise

    @staticmethod
    async def _send_answers(
        stream: trio.SocketStream,
        outbox: trio.MemoryReceiveChannel[_Answer],
        connection: trio.CancelScope,
    ) -> None:
        async with outbox:
            try:
                async for answer in outbox:
                    try:
                        await _send_answer(stream, answer)
                    finally:
                        answer.close()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                log.debug("data channel: the peer went away: %s", e)
                connection.cancel()
            finally:
                while True:  # answers read ahead but never sent still hold open files
                    try:
                        outbox.receive_nowait().close()
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break


async def _send_answer(stream: trio.SocketStream, answer: _Answer) -> None:
    data, file = answer.data, answer.file
    if file is None:
        if len(data) < SMALL:
            await stream.send_all(answer.header + data)
        else:
            await stream.send_all(answer.header)
            await stream.send_all(data)
        return
    await stream.send_all(answer.header)
    # sendfile: the kernel moves the file's cached pages to the socket, with no copy into
    # Python and back (the fetcher verifies every chunk, so the provider need not read it).
    sock = stream.socket
    offset = 0
    while offset < file.size:
        await sock.wait_writable()
        try:
            count = os.sendfile(sock.fileno(), file.fd, offset, file.size - offset)
        except BlockingIOError:
            continue
        if count == 0:  # the file is shorter than it was when opened: cut the answer short
            raise StreamBrokenError(f"chunk file ended after {offset} of {file.size} bytes")
        offset += count


async def _read_request(reader: _Reader, peer: str) -> bytearray | None:
    """The next request, or None when the peer is done or went away."""
    try:
        return await reader.read_exactly(_REQUEST.size)
    except StreamBrokenError as e:
        log.debug("data channel: %s: %s", peer, e)
        return None


# ------------------------------------------------------------------------------------ client


class _Reader:
    """Exact-size reads from a socket stream into fresh buffers (no per-segment copies)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._sock = stream.socket
        self._stream = stream

    async def read_exactly(self, n: int) -> bytearray | None:
        """``n`` bytes; None on a clean EOF before the first byte; StreamBrokenError mid-way."""
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                count = await self._sock.recv_into(view[got:], min(n - got, RECV_SIZE))
            except (OSError, trio.ClosedResourceError, trio.BrokenResourceError) as e:
                raise StreamBrokenError(f"data channel: {e}") from e
            if count == 0:
                if got == 0:
                    return None
                raise StreamBrokenError(f"data channel: EOF after {got} of {n} bytes")
            got += count
        return buf


@dataclass
class _Waiter:
    chunk_id: ChunkId
    done: trio.Event = field(default_factory=trio.Event)
    answer: HashedChunk | SpooledChunk | None = None
    error: Exception | None = None
    abandoned: bool = False


def _discard(answer: HashedChunk | SpooledChunk | None) -> None:
    """Drop an answer nobody will take (a spooled file included)."""
    if isinstance(answer, SpooledChunk):
        answer.discard()


class DataConnection:
    """A client connection: pipelined ``get`` calls, answered in order.

    The answers are read by a worker thread on a blocking socket: it receives each chunk whole
    (one ``recv`` with MSG_WAITALL into a fresh, unzeroed buffer), decrypts it if the grant has a
    key, and hashes it, all with the GIL released, and hands the result to trio. The event loop
    then only matches answers to requests (measured here: receiving and hashing on the event
    loop kept it busy the whole transfer, at about a third of the channel's rate).

    A broken or misbehaving connection fails every outstanding and later ``get`` with the same
    error (StreamBrokenError or RemoteProtocolError); open a new one to try again.
    """

    def __init__(
        self, sock: socket.socket, peer: str, key: bytes | None = None, spool: Path | None = None
    ) -> None:
        self.peer = peer
        self._sock = sock
        self._spool = spool
        self._cipher = ChaCha20Poly1305(key) if key is not None else None
        self._max_length = MAX_CHUNK_SIZE + (TAG_SIZE if key is not None else 0)
        self._received = 0  # answers decrypted so far: the next nonce (reader thread only)
        self._queue: deque[_Waiter] = deque()
        self._send_lock = trio.Lock()
        self._error: Exception | None = None
        self._thread = trio.CapacityLimiter(1)  # its own: never waits for the shared pool
        self.bytes_received = 0

    @classmethod
    async def open(
        cls,
        nursery: trio.Nursery,
        host: str,
        port: int,
        token: bytes,
        peer: str,
        *,
        key: bytes | None = None,
        spool: Path | None = None,
    ) -> DataConnection:
        """Connect and present ``token``. With ``spool`` (a chunk store's
        :attr:`~catalog.chunk_store.ChunkStore.spool_dir`), each chunk whose bytes hash to the
        ID it was sent under is written there by the reader thread and answered as a
        :class:`SpooledChunk`: the bytes never leave that thread."""
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as e:
            raise StreamBrokenError(f"data channel to {peer} at {host}:{port}: {e}") from e
        sock = socket.socket(fileno=stream.socket.detach())
        conn = cls(sock, peer, key, spool)
        try:
            sock.setblocking(True)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            # A blocked recv returns every POLL_INTERVAL, so the thread notices a cancel.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _RCVTIMEO)
            await conn._send(token)
        except BaseException:
            sock.close()
            raise
        nursery.start_soon(conn._read_loop)
        return conn

    async def get(self, chunk_id: ChunkId) -> bytes | None:
        """The chunk's bytes as the peer sent them (the caller verifies), None if not found."""
        answer = await self.get_hashed(chunk_id)
        if isinstance(answer, SpooledChunk):  # a spooling connection: read it back
            data = await trio.to_thread.run_sync(answer.path.read_bytes)
            _discard(answer)
            return data
        return None if answer is None else answer.data

    async def get_hashed(self, chunk_id: ChunkId) -> HashedChunk | SpooledChunk | None:
        """The chunk's bytes (or, with a spool, its file) and their blake3 (computed here),
        None if not found."""
        if self._error is not None:
            raise self._error
        waiter = _Waiter(chunk_id)
        async with self._send_lock:
            self._queue.append(waiter)
            with trio.CancelScope(shield=True):  # never half a request on the wire
                await self._send(_REQUEST.pack(OP_GET, chunk_id))
        try:
            await waiter.done.wait()
        finally:
            # Cancelled: the waiter stays queued (answers come in order); its answer is dropped.
            waiter.abandoned = not waiter.done.is_set()
        if waiter.error is not None:
            raise waiter.error
        return waiter.answer

    async def _send(self, data: bytes) -> None:
        # Non-blocking sends on the blocking socket (MSG_DONTWAIT), waiting in trio when full.
        view = memoryview(data)
        try:
            while view:
                try:
                    view = view[self._sock.send(view, socket.MSG_DONTWAIT) :]
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self._sock)
        except OSError as e:
            error = StreamBrokenError(f"data channel to {self.peer}: {e}")
            self._fail(error)
            raise error from e

    async def _read_loop(self) -> None:
        try:
            token = trio.lowlevel.current_trio_token()
            await trio.to_thread.run_sync(self._read_answers, token, limiter=self._thread)
        except (StreamBrokenError, RemoteProtocolError) as e:
            self._fail(e)
        finally:
            self._fail(StreamBrokenError(f"data channel to {self.peer} closed"))
            self._sock.close()  # only now: the reader thread has returned

    def _read_answers(self, token: trio.lowlevel.TrioToken) -> None:
        """Reader thread: receive, decrypt and hash answers until the connection ends.

        Answers are handed to trio without waiting for it to take them (``run_sync_soon`` keeps
        their order), so the thread goes straight on to the next one instead of waiting for a
        round trip between the threads per chunk (context switches were ~13 % of the fetcher's
        CPU under perf here). At most the requests in flight can be waiting to be taken."""
        while self._error is None:
            trio.from_thread.check_cancelled()
            header = self._receive(_HEADER.size, first=True)
            if header is None:
                raise StreamBrokenError(f"data channel: {self.peer} closed the connection")
            status, chunk_id, length = _HEADER.unpack(header)
            if status not in (STATUS_OK, STATUS_NOT_FOUND):
                raise RemoteProtocolError(f"data channel: {self.peer} sent status {status}")
            if length > self._max_length or (status == STATUS_NOT_FOUND and length):
                raise RemoteProtocolError(
                    f"data channel: {self.peer} announced {length} bytes (limit {self._max_length})"
                )
            answer = None
            if status == STATUS_OK:
                data = self._receive(length) or b""
                if self._cipher is not None and length:
                    data = self._decrypt(data, ChunkId(chunk_id))
                answer = self._spooled(ChunkId(chunk_id), data, hash_chunk(data))
            token.run_sync_soon(self._deliver, ChunkId(chunk_id), answer, length)

    def _receive(self, n: int, *, first: bool = False) -> bytes | None:
        """Reader thread: ``n`` bytes; None on a clean EOF before an answer (``first``)."""
        pieces: list[bytes] = []
        got = 0
        while got < n:
            try:
                piece = self._sock.recv(n - got, socket.MSG_WAITALL)
            except BlockingIOError:  # SO_RCVTIMEO: nothing for a while
                trio.from_thread.check_cancelled()
                continue
            except OSError as e:
                raise StreamBrokenError(f"data channel: {e}") from e
            if not piece:
                if first and got == 0:
                    return None
                raise StreamBrokenError(f"data channel: EOF after {got} of {n} bytes")
            pieces.append(piece)
            got += len(piece)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _spooled(
        self, chunk_id: ChunkId, data: bytes, digest: ChunkId
    ) -> HashedChunk | SpooledChunk:
        """Reader thread: write a good chunk to the spool; wrong bytes (for the plan to blame
        their sender) and a spool that cannot be written (the store then reports the disk
        error) stay in memory."""
        if self._spool is None or digest != chunk_id:
            return HashedChunk(data, digest)
        try:
            path = write_temp(self._spool, chunk_id, data)
        except OSError:
            return HashedChunk(data, digest)
        return SpooledChunk(path, len(data), digest)

    def _deliver(
        self, chunk_id: ChunkId, answer: HashedChunk | SpooledChunk | None, length: int
    ) -> None:
        """In trio (a run_sync_soon callback: must not raise): hand an answer to the request at
        the head of the queue, or end the connection if the peer broke the protocol."""
        if self._error is not None or not self._queue or chunk_id != self._queue[0].chunk_id:
            _discard(answer)
            if self._error is None:
                what = "an unasked answer" if not self._queue else "answers out of order"
                self._abort(RemoteProtocolError(f"data channel: {self.peer} sent {what}"))
            return  # else failed meanwhile (closed locally, say): the reader is stopping
        waiter = self._queue.popleft()
        if waiter.abandoned:
            _discard(answer)
            return
        self.bytes_received += length
        waiter.answer = answer
        waiter.done.set()

    def _decrypt(self, data: bytes, chunk_id: ChunkId) -> bytes:
        assert self._cipher is not None
        try:
            plain = self._cipher.decrypt(_nonce(self._received), data, chunk_id)
        except InvalidTag:
            raise RemoteProtocolError(
                f"data channel: {self.peer} sent an answer that fails authentication"
            ) from None
        self._received += 1
        return plain

    def _fail(self, error: Exception) -> None:
        if self._error is None:
            self._error = error
        while self._queue:
            waiter = self._queue.popleft()
            waiter.error = self._error
            waiter.done.set()

    def _abort(self, error: Exception) -> None:
        """Fail what is outstanding and end the reader thread (the read loop closes the socket)."""
        self._fail(error)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the reader's recv with EOF

    async def aclose(self) -> None:
        self._abort(StreamBrokenError(f"data channel to {self.peer} closed locally"))


__all__ = [
    "TICKET_PROTOCOL",
    "DataConnection",
    "DataServer",
    "TokenBook",
]
