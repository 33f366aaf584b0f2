"""The direct data channel against rogue peers on real loopback sockets (both directions)."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from catalog.chunk_files import Spool
from catalog.chunking import MAX_CHUNK_SIZE, ChunkId, SpooledChunk, hash_chunk
from catalog.data_channel import TokenBook
from catalog.data_channel_client import DataConnection
from catalog.data_channel_server import ChunkFile, DataServer
from catalog.errors import MissingChunkError
from node.errors import RemoteProtocolError, StreamBrokenError

CHUNK = b"x" * 100_000
CHUNK_ID = hash_chunk(CHUNK)
HEADER = struct.Struct(">B32sI")


def test_tokens_are_one_time_bound_and_expire() -> None:
    book = TokenBook(ttl=10.0, per_peer=2)
    token = book.issue("peer-a", now=0.0)
    grant = book.redeem(token, now=1.0)
    assert grant is not None
    assert grant.peer == "peer-a"
    assert book.redeem(token, now=1.0) is None  # used
    late = book.issue("peer-a", now=0.0)
    assert book.redeem(late, now=10.0) is None  # expired
    assert book.redeem(b"\x00" * 32, now=0.0) is None
    first, second, third = (book.issue("peer-b", now=0.0) for _ in range(3))
    assert book.redeem(first, now=0.0) is None  # at most per_peer live tokens per peer
    assert book.redeem(third, now=0.0) is not None
    assert book.redeem(second, now=0.0) is not None


async def read_chunk(chunk_id: ChunkId) -> bytes:
    if chunk_id == CHUNK_ID:
        return CHUNK
    raise MissingChunkError(chunk_id.hex())


def file_of(data: bytes) -> ChunkFile:
    fd = os.memfd_create("chunk", os.MFD_CLOEXEC)
    os.write(fd, data)
    return ChunkFile(fd, len(data))


def open_chunk(chunk_id: ChunkId) -> ChunkFile:
    if chunk_id == CHUNK_ID:
        return file_of(CHUNK)
    raise MissingChunkError(chunk_id.hex())


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
async def server() -> AsyncIterator[DataServer]:
    """Public chunks go out by sendfile (``open_chunk``), encrypted ones through ``read_chunk``."""
    async with trio.open_nursery() as nursery:
        srv = DataServer(read_chunk, open_chunk=open_chunk, host="127.0.0.1", token_timeout=1.0)
        await nursery.start(srv.run)
        yield srv
        nursery.cancel_scope.cancel()


async def connect(nursery: trio.Nursery, srv: DataServer, token: bytes) -> DataConnection:
    return await DataConnection.open(nursery, "127.0.0.1", srv.port, token, "provider")


async def test_server_serves_holders_of_a_token_only(server: DataServer) -> None:
    async with trio.open_nursery() as nursery:
        stranger = await connect(nursery, server, b"\x01" * 32)
        with pytest.raises(StreamBrokenError):
            await stranger.get(CHUNK_ID)
        # A token for a peer works once; its chunks and not-founds come back in order.
        conn = await connect(nursery, server, server.tokens.issue("me", trio.current_time()))
        assert await conn.get(CHUNK_ID) == bytearray(CHUNK)
        assert await conn.get(ChunkId(bytes(32))) is None
        async with trio.open_nursery() as gets:
            for _ in range(5):
                gets.start_soon(conn.get, CHUNK_ID)
        assert conn.bytes_received == 6 * len(CHUNK)
        await conn.aclose()
        assert server.refused == 1
        nursery.cancel_scope.cancel()


async def test_server_survives_garbage(server: DataServer) -> None:
    for garbage in (b"", b"short", server.tokens.issue("me", 0.0) + b"\x07" + bytes(32)):
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        async with stream:
            with contextlib.suppress(trio.BrokenResourceError):  # it may have closed already
                await stream.send_all(garbage)
                await stream.send_eof()
            with trio.fail_after(5):
                try:
                    answer = await stream.receive_some(100)
                except trio.BrokenResourceError:
                    answer = b""  # reset: it closed with our garbage unread
                assert answer == b""  # closed on us, unanswered
    async with trio.open_nursery() as nursery:
        conn = await connect(nursery, server, server.tokens.issue("me", trio.current_time()))
        assert await conn.get(CHUNK_ID) == bytearray(CHUNK)
        nursery.cancel_scope.cancel()


Rogue = Callable[[trio.SocketStream], Awaitable[None]]


async def against(
    rogue: Rogue,
    timeout: float = 5.0,  # noqa: ASYNC109
    spool: Spool | None = None,
) -> bytes | None:
    """One ``get`` against a rogue server that runs ``rogue`` after reading token + request."""

    async def handle(stream: trio.SocketStream) -> None:
        got = b""
        while len(got) < 32 + 33:
            data = await stream.receive_some(65)
            if not data:
                return
            got += data
        await rogue(stream)

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        conn = await DataConnection.open(
            nursery, "127.0.0.1", port, bytes(32), "rogue", spool=spool
        )
        try:
            with trio.fail_after(timeout):
                result = await conn.get(CHUNK_ID)
        except (RemoteProtocolError, StreamBrokenError, trio.TooSlowError) as e:
            error: Exception = e
        else:
            return result
        finally:
            nursery.cancel_scope.cancel()
    raise error


async def test_oversized_answer_is_a_protocol_error() -> None:
    async def rogue(stream: trio.SocketStream) -> None:
        await stream.send_all(HEADER.pack(0, CHUNK_ID, MAX_CHUNK_SIZE + 1))
        await trio.sleep_forever()

    with pytest.raises(RemoteProtocolError, match="limit"):
        await against(rogue)


async def test_answer_for_another_chunk_is_a_protocol_error() -> None:
    async def rogue(stream: trio.SocketStream) -> None:
        await stream.send_all(HEADER.pack(0, bytes(32), 10) + bytes(10))
        await trio.sleep_forever()

    with pytest.raises(RemoteProtocolError, match="order"):
        await against(rogue)


async def test_truncated_chunk_then_close_is_a_broken_stream() -> None:
    async def rogue(stream: trio.SocketStream) -> None:
        await stream.send_all(HEADER.pack(0, CHUNK_ID, len(CHUNK)) + CHUNK[:1000])

    with pytest.raises(StreamBrokenError, match="EOF after"):
        await against(rogue)


async def test_silence_mid_chunk_is_left_to_the_callers_deadline() -> None:
    async def rogue(stream: trio.SocketStream) -> None:
        await stream.send_all(HEADER.pack(0, CHUNK_ID, len(CHUNK)) + CHUNK[:1000])
        await trio.sleep_forever()

    with pytest.raises(trio.TooSlowError):
        await against(rogue, timeout=0.3)


async def test_wrong_bytes_of_the_right_size_are_returned_for_the_plan_to_reject() -> None:
    async def rogue(stream: trio.SocketStream) -> None:
        await stream.send_all(HEADER.pack(0, CHUNK_ID, len(CHUNK)) + bytes(len(CHUNK)))
        await trio.sleep_forever()

    data = await against(rogue)
    assert data is not None
    assert hash_chunk(data) != CHUNK_ID


async def test_grant_scope_and_encryption(server: DataServer) -> None:
    key = bytes(range(32))
    async with trio.open_nursery() as nursery:
        now = trio.current_time()
        scoped = server.tokens.issue("me", now, scope=frozenset({CHUNK_ID}), key=key)
        conn = await DataConnection.open(
            nursery, "127.0.0.1", server.port, scoped, "provider", key=key
        )
        assert await conn.get(CHUNK_ID) == bytearray(CHUNK)
        assert await conn.get(CHUNK_ID) == bytearray(CHUNK)  # next nonce
        assert conn.bytes_received == 2 * (len(CHUNK) + 16)
        outside = server.tokens.issue("me", now, scope=frozenset())
        conn = await DataConnection.open(nursery, "127.0.0.1", server.port, outside, "provider")
        assert await conn.get(CHUNK_ID) is None  # not in the token's scope
        wrong = server.tokens.issue("me", now, key=key)
        conn = await DataConnection.open(
            nursery, "127.0.0.1", server.port, wrong, "provider", key=bytes(32)
        )
        with pytest.raises(RemoteProtocolError, match="authentication"):
            await conn.get(CHUNK_ID)
        nursery.cancel_scope.cancel()
    # On the wire: ciphertext, not the chunk.
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    async with stream:
        token = server.tokens.issue("me", trio.current_time(), key=key)
        await stream.send_all(token + b"\x01" + CHUNK_ID)
        wire = b""
        with trio.fail_after(5):
            while len(wire) < HEADER.size + len(CHUNK) + 16:
                wire += await stream.receive_some(1 << 20)
        assert CHUNK[:1000] not in wire


async def test_a_disk_error_is_answered_not_found() -> None:
    async def failing_read(chunk_id: ChunkId) -> bytes:
        if chunk_id == CHUNK_ID:
            raise OSError(5, "Input/output error")
        return await read_chunk(chunk_id)

    async with trio.open_nursery() as nursery:
        srv = DataServer(failing_read, host="127.0.0.1")
        await nursery.start(srv.run)
        conn = await connect(nursery, srv, srv.tokens.issue("me", trio.current_time()))
        assert await conn.get(CHUNK_ID) is None  # the fetcher asks another provider
        assert await conn.get(ChunkId(bytes(32))) is None  # and the connection still works
        nursery.cancel_scope.cancel()


async def test_sendfile_answers_close_every_file() -> None:
    before = open_fds()
    async with trio.open_nursery() as nursery:
        srv = DataServer(read_chunk, open_chunk=open_chunk, host="127.0.0.1")
        await nursery.start(srv.run)
        conn = await connect(nursery, srv, srv.tokens.issue("me", trio.current_time()))
        async with trio.open_nursery() as gets:
            for _ in range(20):
                gets.start_soon(conn.get, CHUNK_ID)
        assert conn.bytes_received == 20 * len(CHUNK)
        await conn.aclose()
        # A fetcher that asks for many chunks and vanishes without reading the answers.
        stream = await trio.open_tcp_stream("127.0.0.1", srv.port)
        await stream.send_all(srv.tokens.issue("me", trio.current_time()))
        await stream.send_all((b"\x01" + CHUNK_ID) * 50)
        await stream.aclose()
        again = await connect(nursery, srv, srv.tokens.issue("me", trio.current_time()))
        assert await again.get(CHUNK_ID) == bytearray(CHUNK)  # the server carries on
        await again.aclose()
        nursery.cancel_scope.cancel()
    # Every file opened for an answer, sent or only read ahead, is closed by now.
    assert open_fds() == before


async def test_a_chunk_file_shorter_than_opened_breaks_only_its_connection() -> None:
    def shrunk(chunk_id: ChunkId) -> ChunkFile:
        file = open_chunk(chunk_id)
        os.ftruncate(file.fd, 10)  # e.g. someone truncated it after it was opened
        return file

    async with trio.open_nursery() as nursery:
        srv = DataServer(read_chunk, open_chunk=shrunk, host="127.0.0.1")
        await nursery.start(srv.run)
        conn = await connect(nursery, srv, srv.tokens.issue("me", trio.current_time()))
        with pytest.raises(StreamBrokenError):
            await conn.get(CHUNK_ID)  # cut short: the fetcher drops this connection
        again = await connect(nursery, srv, srv.tokens.issue("me", trio.current_time()))
        assert await again.get(ChunkId(bytes(32))) is None  # the server still serves
        nursery.cancel_scope.cancel()


async def test_get_hashed_hashes_what_arrived(server: DataServer) -> None:
    async with trio.open_nursery() as nursery:
        conn = await connect(nursery, server, server.tokens.issue("me", trio.current_time()))
        answer = await conn.get_hashed(CHUNK_ID)
        assert answer is not None
        assert (answer.data, answer.digest) == (CHUNK, CHUNK_ID)
        key = bytes(range(32))
        token = server.tokens.issue("me", trio.current_time(), key=key)
        private = await DataConnection.open(
            nursery, "127.0.0.1", server.port, token, "provider", key=key
        )
        answer = await private.get_hashed(CHUNK_ID)
        assert answer is not None
        assert answer.digest == CHUNK_ID  # of the decrypted bytes
        nursery.cancel_scope.cancel()


async def test_aclose_fails_outstanding_gets_and_ends_the_reader() -> None:
    before = open_fds()
    asked = trio.Event()

    async def silent(stream: trio.SocketStream) -> None:
        got = b""
        while len(got) < 32 + 33:  # token and request
            got += await stream.receive_some(65)
        asked.set()
        await trio.sleep_forever()  # never answers

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        conn = await DataConnection.open(nursery, "127.0.0.1", port, bytes(32), "silent")
        outcome: list[BaseException] = []

        async def get() -> None:
            try:
                await conn.get(CHUNK_ID)
            except StreamBrokenError as e:
                outcome.append(e)

        async with trio.open_nursery() as gets:
            gets.start_soon(get)
            await asked.wait()
            await conn.aclose()
        [error] = outcome
        assert "closed locally" in str(error)
        with pytest.raises(StreamBrokenError):
            await conn.get(CHUNK_ID)
        nursery.cancel_scope.cancel()
    assert open_fds() == before  # the reader thread returned and the socket is closed


async def test_a_spooling_connection_writes_every_answer_to_a_file(
    server: DataServer, tmp_path: Path
) -> None:
    async with trio.open_nursery() as nursery:
        token = server.tokens.issue("me", trio.current_time())
        conn = await DataConnection.open(
            nursery, "127.0.0.1", server.port, token, "provider", spool=Spool(tmp_path)
        )
        answer = await conn.get_hashed(CHUNK_ID)
        assert isinstance(answer, SpooledChunk)
        assert (answer.size, answer.digest) == (len(CHUNK), CHUNK_ID)
        assert answer.path.parent == tmp_path
        assert answer.path.read_bytes() == CHUNK
        assert await conn.get_hashed(ChunkId(bytes(32))) is None
        assert await conn.get(CHUNK_ID) == CHUNK  # plain get reads a spooled answer back
        assert os.listdir(tmp_path) == [answer.path.name]  # ...and deletes its file
        nursery.cancel_scope.cancel()

    async def wrong(stream: trio.SocketStream) -> None:
        await stream.send_all(HEADER.pack(0, CHUNK_ID, len(CHUNK)) + b"y" * len(CHUNK))

    other = tmp_path / "other"
    other.mkdir()
    assert await against(wrong, spool=Spool(other)) == b"y" * len(CHUNK)  # for the plan to reject
    assert list(other.iterdir()) == []  # get read the spooled answer back and deleted it


async def test_an_answer_arriving_as_its_get_is_cancelled_is_deleted(tmp_path: Path) -> None:
    # The reader thread's hand-over and a cancel of the waiting get land in the same tick: the
    # get ends cancelled, and the spooled file nobody will take is deleted, not left behind.
    ours, theirs = socket.socketpair()
    with ours, theirs:
        conn = DataConnection(ours, "provider", spool=Spool(tmp_path))
        spooled = tmp_path / "answer"
        spooled.write_bytes(CHUNK)
        scope = trio.CancelScope()

        async def get() -> None:
            with scope:
                await conn.get_hashed(CHUNK_ID)
                pytest.fail("the get was not cancelled")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(get)
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()
            conn._deliver(CHUNK_ID, SpooledChunk(spooled, len(CHUNK), CHUNK_ID), len(CHUNK))
        assert scope.cancelled_caught
    assert not spooled.exists()


async def test_a_spool_that_cannot_be_written_leaves_the_answer_in_memory(
    server: DataServer, tmp_path: Path
) -> None:
    class Unwritable(Spool):
        def open(self, chunk_id: ChunkId) -> tuple[Path, int]:
            path = self.directory / chunk_id.hex()
            path.write_bytes(b"")
            return path, os.open(path, os.O_RDONLY)  # moving bytes in fails, like a full disk

    async with trio.open_nursery() as nursery:
        token = server.tokens.issue("me", trio.current_time())
        conn = await DataConnection.open(
            nursery, "127.0.0.1", server.port, token, "provider", spool=Unwritable(tmp_path)
        )
        for _ in range(2):  # the connection stays in step after a salvaged answer
            answer = await conn.get_hashed(CHUNK_ID)
            assert not isinstance(answer, SpooledChunk)
            assert answer is not None
            assert (answer.data, answer.digest) == (CHUNK, CHUNK_ID)
        assert os.listdir(tmp_path) == []  # the unwritable file was deleted
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("spooled", [False, True])
async def test_answers_held_for_a_batch_are_delivered_when_the_peer_goes_quiet(
    tmp_path: Path, spooled: bool
) -> None:
    # Two whole answers arrive back to back, then nothing: the reader thread may hold the first
    # while the second is already there, but must hand both over before it waits for a third.
    answered = trio.Event()

    async def handle(stream: trio.SocketStream) -> None:
        got = b""
        while len(got) < 32 + 3 * 33:
            got += await stream.receive_some(200)
        answer = HEADER.pack(0, CHUNK_ID, len(CHUNK)) + CHUNK
        await stream.send_all(answer + answer)
        answered.set()
        await trio.sleep_forever()

    results: list[bytes | None] = []
    both = trio.Event()
    third = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        spool = Spool(tmp_path) if spooled else None
        conn = await DataConnection.open(
            nursery, "127.0.0.1", port, bytes(32), "quiet", spool=spool
        )

        async def get() -> None:
            results.append(await conn.get(CHUNK_ID))
            if len(results) == 2:
                both.set()

        async def never_answered() -> None:
            with third:
                await conn.get(CHUNK_ID)

        async with trio.open_nursery() as gets:
            for request in (get, get, never_answered):  # sent in this order
                gets.start_soon(request)
                await trio.testing.wait_all_tasks_blocked()
            await answered.wait()
            with trio.fail_after(5):
                await both.wait()
            third.cancel()
        nursery.cancel_scope.cancel()
    assert results == [CHUNK, CHUNK]


async def _silent_socket(port: int, source: str) -> trio.SocketStream:
    """A connection from ``source`` (any 127/8 address is this host) that never says a word."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def test_strangers_without_a_token_cannot_keep_a_fetcher_out() -> None:
    async with trio.open_nursery() as nursery:
        srv = DataServer(
            read_chunk, open_chunk=open_chunk, host="127.0.0.1", token_timeout=30.0,
            max_connections=2, max_unauthorised=8, max_unauthorised_per_ip=3,
        )  # fmt: skip
        await nursery.start(srv.run)
        # One address opens far more silent connections than it may hold unauthorised...
        silent = [await _silent_socket(srv.port, "127.0.0.9") for _ in range(20)]
        await trio.testing.wait_all_tasks_blocked()
        # ...and a fetcher with a token, from elsewhere, is still served, twice over: the
        # served pool (2) was never taken by connections that showed no token.
        for _ in range(3):
            conn = await connect(nursery, srv, srv.tokens.issue("me", trio.current_time()))
            assert await conn.get(CHUNK_ID) == bytearray(CHUNK)
            await conn.aclose()
        assert srv.refused >= 17  # all but the 3 the address may hold
        for stream in silent:
            await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_an_authorised_connection_that_goes_quiet_is_closed() -> None:
    async with trio.open_nursery() as nursery:
        srv = DataServer(
            read_chunk, open_chunk=open_chunk, host="127.0.0.1", max_connections=1,
            idle_timeout=0.5,
        )  # fmt: skip
        await nursery.start(srv.run)
        quiet = await trio.open_tcp_stream("127.0.0.1", srv.port)
        await quiet.send_all(srv.tokens.issue("me", trio.current_time()))
        with trio.fail_after(10):  # closed once idle, so its one slot is free again
            assert await quiet.receive_some(10) == b""
        conn = await connect(nursery, srv, srv.tokens.issue("me", trio.current_time()))
        assert await conn.get(CHUNK_ID) == bytearray(CHUNK)
        nursery.cancel_scope.cancel()
