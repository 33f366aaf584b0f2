"""The fetcher's end of the direct data channel (the protocol is in :mod:`catalog.data_channel`):
a connection that pipelines requests and has a thread of its own read the answers."""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import struct
import termios
import threading
from collections import deque
from dataclasses import dataclass, field

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from catalog import splice
from catalog.chunk_files import Spool
from catalog.chunking import MAX_CHUNK_SIZE, ChunkId, HashedChunk, SpooledChunk, hash_chunk
from catalog.data_channel import (
    HEADER,
    OP_GET,
    REQUEST,
    SOCKET_BUFFER,
    STATUS_NOT_FOUND,
    STATUS_OK,
    TAG_SIZE,
    blocking_socket,
    nonce,
)
from catalog.errors import SpoolWriteError
from node.errors import RemoteProtocolError, StreamBrokenError

# A provider's channel that does not answer a connection within this is taken as unreachable
# from here (behind a NAT, a firewall dropping it): a SYN to nowhere would otherwise be retried
# for two minutes. A reachable one answers within a round trip.
CONNECT_TIMEOUT = 3.0
HAND_OVER_BATCH = 4  # answers a reader thread may hold before waking trio (see _hand_over)


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
            with trio.fail_after(CONNECT_TIMEOUT):
                stream = await trio.open_tcp_stream(host, port)
        except OSError as e:
            raise StreamBrokenError(f"data channel to {peer} at {host}:{port}: {e}") from e
        except trio.TooSlowError:
            raise StreamBrokenError(
                f"data channel to {peer} at {host}:{port}: no answer within {CONNECT_TIMEOUT:g}s"
            ) from None
        stream.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, SOCKET_BUFFER)
        sock = blocking_socket(stream)
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
        request = REQUEST.pack(OP_GET, chunk_id)
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
                header = self._receive(HEADER.size, first=True)
                if header is None:
                    raise StreamBrokenError(f"data channel: {self.peer} closed the connection")
                status, raw_id, length = HEADER.unpack(header)
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
            header = self._sock.recv(HEADER.size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            if len(header) < HEADER.size:
                return False
            waiting = struct.unpack("i", fcntl.ioctl(self._sock, termios.FIONREAD, b"\0" * 4))[0]
        except OSError:  # nothing there (EAGAIN), or the connection is failing: deliver now
            return False
        return bool(waiting >= HEADER.size + HEADER.unpack(header)[2])

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
            # batch within ~20 ms from their own threads, and I/O submitted from this reader
            # thread (a virtio doorbell per file) costs the transfer ~4 %.
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
            plain = self._cipher.decrypt(nonce(self._received), data, chunk_id)
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


__all__ = ["DataConnection"]
