"""A stranger who connects to a node's chunk data channel and says nothing until the token
timeout passes: the connection is refused and the server (and with it the node) serves on. Before
the fix, the token the timed-out read never returned was read unbound (UnboundLocalError), which
escaped the server's handler nursery and ended the whole node; the repertoire e2e test
(test_repertoire_e2e.py) saw it kill a real scheduler and a real owner."""

from __future__ import annotations

from pathlib import Path

import trio

from catalog.blob import BlobStore
from catalog.blob_service import BlobService, data_host_for
from catalog.chunk_store import ChunkStore
from catalog.data_channel import TICKET_PROTOCOL
from catalog.data_channel_server import DataServer
from node.identity import Identity
from node.p2p import P2PNode
from tests.catalog.test_data_channel import CHUNK, CHUNK_ID, connect, open_chunk, read_chunk


async def test_a_connection_silent_past_the_token_timeout_is_refused_and_the_server_serves_on() -> (
    None
):
    async with trio.open_nursery() as nursery:
        srv = DataServer(read_chunk, open_chunk=open_chunk, host="127.0.0.1", token_timeout=0.2)
        await nursery.start(srv.run)
        silent = await trio.open_tcp_stream("127.0.0.1", srv.port)
        half = await trio.open_tcp_stream("127.0.0.1", srv.port)
        await half.send_all(b"\x01" * 7)  # part of a token, then nothing
        with trio.fail_after(10):  # closed by the server once its token timeout passed
            assert await silent.receive_some(10) == b""
            assert await half.receive_some(10) == b""
        assert srv.refused == 2
        conn = await connect(nursery, srv, srv.tokens.issue("me", trio.current_time()))
        assert await conn.get(CHUNK_ID) == bytearray(CHUNK)
        await conn.aclose()
        nursery.cancel_scope.cancel()


async def test_a_ticket_stream_ended_without_a_request_is_the_peers_error(tmp_path: Path) -> None:
    """Found by bench/fuzz.py: the end frame alone made the ticket handler raise EndOfChannel,
    logged as an internal error (a bug) rather than as the peer's mistake."""
    async with (
        ChunkStore.open(tmp_path / "chunks") as store,
        trio.open_nursery() as nursery,
    ):
        server = P2PNode(Identity.generate(), listen=["/ip4/127.0.0.1/tcp/0"])
        await nursery.start(server.run)
        blobs = BlobService(server, BlobStore(store), data_host=data_host_for(server.addrs))
        await nursery.start(blobs.run)
        peer = P2PNode(Identity.generate(), listen=["/ip4/127.0.0.1/tcp/0"])
        await nursery.start(peer.run)
        await peer.connect(server.addrs[0])
        stream = await peer.open_stream(server.peer_id, TICKET_PROTOCOL)
        await stream.send_end()
        with trio.fail_after(10):
            while server.statistics()["peer_errors"] == 0:  # noqa: ASYNC110
                await trio.sleep(0.05)
        assert server.statistics()["handler_errors"] == 0
        nursery.cancel_scope.cancel()
