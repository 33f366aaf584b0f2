"""The direct data channel: chunk bytes on plain TCP beside libp2p, for peers authorised there.

Why: libp2p streams (Noise + yamux in Python) carry ~60-80 MB/s here; loopback TCP carries
GB/s. Chunks verify themselves by hash, so public bytes need no channel security; what must not
leak is *who may read*: a token's grant names the chunks its peer may read, and for a private
blob carries a key (handed over the Noise-encrypted libp2p stream) that every answer is
encrypted with (ChaCha20-Poly1305).

Both ends keep the bytes off the event loop: the provider serves each connection from a thread
of its own (``sendfile`` from the chunk files), and the fetcher reads each connection in a
thread that splices answers into spool files and hashes them there (see DataConnection).

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
import fcntl
import logging
import os
import secrets
import socket
import struct
import termios
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from catalog import splice
from catalog.chunk_store import Spool
from catalog.chunking import (
    ID_SIZE,
    MAX_CHUNK_SIZE,
    ChunkId,
    HashedChunk,
    SpooledChunk,
    hash_chunk,
)
from catalog.errors import CatalogError, MissingChunkError, SpoolWriteError
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
SOCKET_BUFFER = 4 << 20
KEY_SIZE = 32
TAG_SIZE = 16
POLL_INTERVAL = 0.1  # seconds a connection's thread blocks on its socket before checking for cancel
HAND_OVER_BATCH = 4  # answers a reader thread may hold before waking trio (see _hand_over)
_TIMEO = struct.pack("ll", 0, int(POLL_INTERVAL * 1_000_000))

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
    ) -> None:
        self.tokens = TokenBook()
        self._read_chunk = read_chunk
        self._open_chunk = open_chunk
        self._host = host
        self._port = port
        self._token_timeout = token_timeout
        self._slots = trio.CapacityLimiter(max_connections)
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
        with trio.move_on_after(self._token_timeout):
            token = await _receive_token(stream)
        grant = None if token is None else self.tokens.redeem(token, trio.current_time())
        if grant is None:
            self.refused += 1
            log.info("data channel: connection without a valid token refused")
            return
        self.served += 1
        sock = _blocking(stream)
        try:
            served = _ServedConnection(sock, grant, self._read_chunk, self._open_chunk)
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


def _blocking(stream: trio.SocketStream) -> socket.socket:
    """Take the socket out of trio: blocking, with send and receive timeouts of POLL_INTERVAL,
    so that a thread blocked on it notices a cancel."""
    sock = socket.socket(fileno=stream.socket.detach())
    try:
        sock.setblocking(True)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEO)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEO)
    except BaseException:
        sock.close()
        raise
    return sock


class _ServedConnection:
    """A provider's side of one authorised connection, run in a worker thread until the peer
    is done, goes away or breaks the protocol, or trio cancels it."""

    def __init__(
        self,
        sock: socket.socket,
        grant: Grant,
        read_chunk: ReadChunk,
        open_chunk: OpenChunk | None,
    ) -> None:
        self._sock = sock
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
            while len(pending) < _REQUEST.size:
                more = self._receive_some()
                if not more:
                    return  # the peer is done (or went away mid-request)
                pending += more
            whole = len(pending) - len(pending) % _REQUEST.size
            requests, pending = pending[:whole], pending[whole:]
            for op, chunk_id in _REQUEST.iter_unpack(requests):
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
            self._send_all(_HEADER.pack(STATUS_NOT_FOUND, chunk_id, 0))
            return
        if file is not None:
            self._send_file(chunk_id, file)
            return
        if self._cipher is not None:
            data = self._cipher.encrypt(_nonce(self._sent), data, chunk_id)
            self._sent += 1
        self._send_all(_HEADER.pack(STATUS_OK, chunk_id, len(data)) + data)

    def _send_file(self, chunk_id: ChunkId, file: ChunkFile) -> None:
        """The header, then the file by ``sendfile``: the kernel moves the file's cached pages
        to the socket, with no copy into Python and back (the fetcher verifies every chunk, so
        the provider need not read it)."""
        try:
            # MSG_MORE: the header leaves with the file's first bytes, not in a segment alone.
            self._send_all(_HEADER.pack(STATUS_OK, chunk_id, file.size), socket.MSG_MORE)
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
        while view:
            try:
                view = view[self._sock.send(view, flags) :]
            except BlockingIOError:  # SO_SNDTIMEO: the peer is not reading for now
                trio.from_thread.check_cancelled()

    def _receive_some(self) -> bytes:
        """What has arrived (at least one byte), or b"" when the peer is done or gone."""
        while True:
            try:
                return self._sock.recv(RECV_SIZE)
            except BlockingIOError:  # SO_RCVTIMEO: nothing for a while
                trio.from_thread.check_cancelled()
            except (ConnectionResetError, ConnectionAbortedError):
                return b""


# ------------------------------------------------------------------------------------ client


@dataclass
class _Waiter:
    chunk_id: ChunkId
    done: trio.Event = field(default_factory=trio.Event)
    answer: HashedChunk | SpooledChunk | None = None
    error: Exception | None = None
    abandoned: bool = False


_Arrived = tuple[ChunkId, HashedChunk | SpooledChunk | None, int]  # chunk, answer, length


def _discard(answer: HashedChunk | SpooledChunk | None) -> None:
    """Drop an answer nobody will take (a spooled file included)."""
    if isinstance(answer, SpooledChunk):
        answer.discard()


class DataConnection:
    """A client connection: pipelined ``get`` calls, answered in order.

    The answers are read by a worker thread on a blocking socket, and the event loop only
    matches them to requests (measured here: receiving and hashing on the event loop kept it
    busy the whole transfer, at about a third of the channel's rate). With a spool and no key,
    the thread moves each answer from the socket into a spool file with ``splice`` and hashes
    it there (:mod:`catalog.splice`); otherwise it receives each answer whole (one ``recv`` with
    MSG_WAITALL), decrypts it if the grant has a key, hashes it, and writes it to the spool if
    there is one. The bytes never pass through the event loop.

    A broken or misbehaving connection fails every outstanding and later ``get`` with the same
    error (StreamBrokenError or RemoteProtocolError); open a new one to try again.
    """

    def __init__(
        self, sock: socket.socket, peer: str, key: bytes | None = None, spool: Spool | None = None
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
        self._arrived: list[_Arrived] = []  # answers the reader thread handed over
        self._arrived_lock = threading.Lock()
        self._wake_pending = False
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
        spool: Spool | None = None,
    ) -> DataConnection:
        """Connect and present ``token``. With ``spool`` (a chunk store's
        :attr:`~catalog.chunk_store.ChunkStore.spool`), each answer is written there by
        the reader thread and given as a :class:`SpooledChunk` with the digest of its bytes
        (right or wrong: whoever takes it adopts or deletes the file)."""
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as e:
            raise StreamBrokenError(f"data channel to {peer} at {host}:{port}: {e}") from e
        stream.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, SOCKET_BUFFER)
        sock = _blocking(stream)
        conn = cls(sock, peer, key, spool)
        try:
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
        request = _REQUEST.pack(OP_GET, chunk_id)
        sent = 0
        if not self._send_lock.locked():  # the usual case: the socket takes it all at once
            sent = self._send_some(request)
        if sent == len(request):
            self._queue.append(waiter)  # no await since the send: nobody came in between
        else:
            if sent:  # the rest must follow before anyone else's: the lock is free (no await)
                self._send_lock.acquire_nowait()
            else:
                await self._send_lock.acquire()
            try:
                self._queue.append(waiter)
                with trio.CancelScope(shield=True):  # never half a request on the wire
                    await self._send(request[sent:])
            finally:
                self._send_lock.release()
        try:
            await waiter.done.wait()
        except BaseException:
            if waiter.done.is_set():  # answered as the cancel came in: nobody will take it
                _discard(waiter.answer)
            else:  # the waiter stays queued (answers come in order); its answer is dropped
                waiter.abandoned = True
            raise
        if waiter.error is not None:
            raise waiter.error
        return waiter.answer

    def _send_some(self, data: bytes) -> int:
        """Send what the socket takes now, without waiting; how much that was."""
        try:
            return self._sock.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return 0
        except OSError as e:
            error = StreamBrokenError(f"data channel to {self.peer}: {e}")
            self._fail(error)
            raise error from e

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

        Answers are handed to trio without waiting for it to take them, so the thread goes
        straight on to the next one instead of waiting for a round trip between the threads
        per chunk (context switches were ~13 % of the fetcher's CPU under perf here). At most
        the requests in flight can be waiting to be taken."""
        splicer = None
        if self._spool is not None and self._cipher is None and splice.AVAILABLE:
            splicer = splice.Splicer()
        try:
            while self._error is None:
                trio.from_thread.check_cancelled()
                header = self._receive(_HEADER.size, first=True)
                if header is None:
                    raise StreamBrokenError(f"data channel: {self.peer} closed the connection")
                status, raw_id, length = _HEADER.unpack(header)
                if status not in (STATUS_OK, STATUS_NOT_FOUND):
                    raise RemoteProtocolError(f"data channel: {self.peer} sent status {status}")
                if length > self._max_length or (status == STATUS_NOT_FOUND and length):
                    raise RemoteProtocolError(
                        f"data channel: {self.peer} announced {length} bytes"
                        f" (limit {self._max_length})"
                    )
                chunk_id = ChunkId(raw_id)
                answer: HashedChunk | SpooledChunk | None = None
                if status == STATUS_OK and splicer is not None:
                    answer = self._splice_answer(splicer, chunk_id, length)
                elif status == STATUS_OK:
                    data = self._receive(length) or b""
                    if self._cipher is not None and length:
                        data = self._decrypt(data, chunk_id)
                    answer = self._spooled(chunk_id, data)
                self._hand_over(token, (chunk_id, answer, length))
        finally:
            self._hand_over(token, None)  # nothing is left undelivered
            if splicer is not None:
                splicer.close()

    def _hand_over(self, token: trio.lowlevel.TrioToken, arrived: _Arrived | None) -> None:
        """Reader thread: queue an answer for trio (None: only deliver what is queued).

        Trio is woken for a batch, not for each answer: each wake-up is a syscall, and the
        woken event loop then competes with this thread for a core and the GIL (measured here:
        the reader thread spent ~13 % of its time in the wake-up and ~20 % waiting for a core).
        It is woken at once when the next answer is not all here yet (so an answer never waits
        on a slow peer), and otherwise every HAND_OVER_BATCH answers (so requests keep flowing:
        the transfer asks for more as answers are delivered)."""
        hold = arrived is not None and self._next_answer_here()
        with self._arrived_lock:
            if arrived is not None:
                self._arrived.append(arrived)
            if self._wake_pending or not self._arrived:
                return
            if hold and len(self._arrived) < HAND_OVER_BATCH:
                return
            self._wake_pending = True
        token.run_sync_soon(self._take_arrived)

    def _next_answer_here(self) -> bool:
        """Reader thread: whether the whole next answer is already in the socket's buffer."""
        try:
            header = self._sock.recv(_HEADER.size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            if len(header) < _HEADER.size:
                return False
            waiting = struct.unpack("i", fcntl.ioctl(self._sock, termios.FIONREAD, b"\0" * 4))[0]
        except OSError:  # nothing there (EAGAIN), or the connection is failing: deliver now
            return False
        return bool(waiting >= _HEADER.size + _HEADER.unpack(header)[2])

    def _take_arrived(self) -> None:
        """In trio (a run_sync_soon callback: must not raise): deliver what has arrived."""
        with self._arrived_lock:
            arrived, self._arrived = self._arrived, []
            self._wake_pending = False
        for chunk_id, answer, length in arrived:
            self._deliver(chunk_id, answer, length)

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

    def _splice_answer(
        self, splicer: splice.Splicer, chunk_id: ChunkId, length: int
    ) -> HashedChunk | SpooledChunk:
        """Reader thread: move an answer's bytes from the socket straight into a spool file
        and hash them there. Whatever they hash to, the file is the answer: the plan rejects
        wrong bytes (blaming their sender) and the transfer deletes their file. If the spool
        cannot be written, the answer is received into memory (the store then reports the
        disk's error)."""
        assert self._spool is not None
        try:
            path, fd = self._spool.open(chunk_id)
        except OSError:
            data = self._receive(length) or b""
            return HashedChunk(data, hash_chunk(data))
        kept = False
        try:
            splicer.move(self._sock.fileno(), fd, length, trio.from_thread.check_cancelled)
            # No early writeback here (unlike Spool.write): the store's writers fsync each
            # batch within ~20 ms from their own threads, and submitting I/O from this one
            # (a virtio doorbell per file on this VM) slowed the transfer by ~4 % (A/B here).
            answer = SpooledChunk(path, length, splice.hash_file(fd, length))
            kept = True
            return answer
        except SpoolWriteError as e:
            data = e.salvaged + (self._receive(e.remaining) or b"")
            return HashedChunk(data, hash_chunk(data))
        finally:
            os.close(fd)
            if not kept:
                path.unlink(missing_ok=True)

    def _spooled(self, chunk_id: ChunkId, data: bytes) -> HashedChunk | SpooledChunk:
        """Reader thread: hash received bytes and, with a spool, write them to a file there;
        a spool that cannot be written leaves them in memory (the store then reports the
        disk's error)."""
        digest = hash_chunk(data)
        if self._spool is None:
            return HashedChunk(data, digest)
        try:
            path = self._spool.write(chunk_id, data)
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
