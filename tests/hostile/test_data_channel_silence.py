"""A stranger who connects to a node's chunk data channel and says nothing until the token
timeout passes: the connection is refused and the server (and with it the node) serves on. Before
the fix, the token the timed-out read never returned was read unbound (UnboundLocalError), which
escaped the server's handler nursery and ended the whole node; the repertoire e2e test
(test_repertoire_e2e.py) saw it kill a real scheduler and a real owner."""

from __future__ import annotations

import trio

from catalog.data_channel_server import DataServer
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
