"""node.rpc_server and node.rpc_client over real Unix sockets, the server in the test's nursery."""

from __future__ import annotations

import logging
import os
import socket
import stat
import subprocess
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from node import rpc
from node.errors import DeadlineError, RpcError, StreamBrokenError
from node.rpc_client import AsyncClient, Client, NodeNotRunningError, Result
from node.rpc_server import (
    NodeAlreadyRunningError,
    RpcServer,
    RpcServerError,
    SendNotification,
)


class Node:
    """The handlers under test, with hooks the tests wait on instead of sleeping."""

    def __init__(self) -> None:
        self.gate = trio.Event()
        self.started = trio.Event()
        self.cancelled = trio.Event()
        self.waiting = 0
        self.all_waiting = trio.Event()
        self.expect_waiting = 0

    async def echo(self, params: list[Any]) -> Any:
        return params

    async def add(self, params: list[Any]) -> Any:
        if len(params) != 2 or not all(isinstance(p, int) for p in params):
            raise RpcError(rpc.INVALID_PARAMS, "add takes two integers")
        return params[0] + params[1]

    async def boom(self, params: list[Any]) -> Any:
        raise ValueError("kaboom")

    async def huge(self, params: list[Any]) -> Any:
        return "x" * 5000

    async def wait(self, params: list[Any]) -> Any:
        self.waiting += 1
        if self.waiting == self.expect_waiting:
            self.all_waiting.set()
        await self.gate.wait()
        return params

    async def hang(self, params: list[Any]) -> Any:
        self.started.set()
        try:
            await trio.sleep_forever()
        finally:
            self.cancelled.set()

    async def count(self, params: list[Any], send: SendNotification) -> Any:
        for i in range(params[0]):
            await send("tick", [i])
        return "done"

    async def follow(self, params: list[Any], send: SendNotification) -> Any:
        await send("line", ["first"])
        return await self.hang(params)

    async def flood(self, params: list[Any], send: SendNotification) -> Any:
        for i in range(2000):
            await send("chunk", [i, "z" * 1000])
        return "flooded"

    def methods(self) -> dict[str, Any]:
        return {m: getattr(self, m) for m in ("echo", "add", "boom", "huge", "wait", "hang")}


LIMITS = rpc.RpcLimits(max_message_size=4096, max_in_flight=8)


@asynccontextmanager
async def serving(path: Path, node: Node | None = None, **kw: Any) -> AsyncIterator[RpcServer]:
    node = node or Node()
    kw.setdefault("limits", LIMITS)
    server = RpcServer(
        path,
        node.methods(),
        streams={"count": node.count, "follow": node.follow, "flood": node.flood},
        **kw,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run)
        yield server
        nursery.cancel_scope.cancel()


def _plain(item: rpc.Notification | Result) -> Any:
    return (item.method, item.params) if isinstance(item, rpc.Notification) else item


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "rpc.sock"


async def raw_exchange(path: Path, data: bytes) -> list[Any]:
    """Send raw bytes, read until the server closes or answers one message."""
    stream = await trio.open_unix_socket(os.fspath(path))
    async with stream:
        await stream.send_all(data)
        unpacker = msgpack.Unpacker(raw=False)
        while chunk := await stream.receive_some(65536):
            unpacker.feed(chunk)
            if out := list(unpacker):
                return out
    return []


async def test_calls_from_both_clients(sock_path: Path) -> None:
    async with serving(sock_path), AsyncClient.connect(sock_path.parent) as c:
        assert await c.call("echo", 1, "two", [3]) == [1, "two", [3]]
        assert await c.call("add", 2, 3) == 5
        sync = await trio.to_thread.run_sync(lambda: Client(sock_path.parent).call("add", 4, 5))
        assert sync == 9


async def test_socket_is_private_and_removed_on_exit(sock_path: Path) -> None:
    async with serving(sock_path):
        st = os.lstat(sock_path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.getuid()
    assert not await trio.Path(sock_path).exists()


async def test_concurrent_calls_on_one_connection(sock_path: Path) -> None:
    node = Node()
    node.expect_waiting = 8
    results: dict[int, Any] = {}
    async with serving(sock_path, node), AsyncClient.connect(sock_path) as c:

        async def one(i: int) -> None:
            results[i] = await c.call("wait", i)

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(one, i)
            await node.all_waiting.wait()  # all eight handlers run at once
            node.gate.set()
    assert results == {i: [i] for i in range(8)}


async def test_requests_beyond_in_flight_limit_are_busy(sock_path: Path) -> None:
    node = Node()
    node.expect_waiting = 1
    limits = rpc.RpcLimits(max_in_flight=1)
    async with serving(sock_path, node, limits=limits), AsyncClient.connect(sock_path) as c:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(c.call, "wait")
            await node.all_waiting.wait()
            with pytest.raises(RpcError) as info:
                await c.call("echo")
            assert info.value.code == rpc.BUSY
            node.gate.set()
        assert await c.call("echo", 1) == [1]


async def test_streaming_notifications_then_result(sock_path: Path) -> None:
    async with serving(sock_path), AsyncClient.connect(sock_path) as c:
        items = [_plain(item) async for item in c.stream("count", 3)]
        assert items == [("tick", [0]), ("tick", [1]), ("tick", [2]), Result("done")]
        # call() on a streaming method skips the notifications.
        assert await c.call("count", 2) == "done"
        sync = await trio.to_thread.run_sync(lambda: list(Client(sock_path).stream("count", 2)))
        assert [_plain(item) for item in sync] == [("tick", [0]), ("tick", [1]), Result("done")]


async def test_leaving_a_stream_early_cancels_it_on_the_node(sock_path: Path) -> None:
    node = Node()
    async with serving(sock_path, node), AsyncClient.connect(sock_path) as c:
        async with c.stream("follow") as s:
            async for item in s:
                assert _plain(item) == ("line", ["first"])
                break
        await node.cancelled.wait()
        assert await c.call("echo") == []


async def test_cancel_while_the_node_is_blocked_sending_keeps_the_connection(
    sock_path: Path,
) -> None:
    # 2 MB of notifications fill the socket; leaving cancels the handler mid-send. The next
    # call on the same connection must still parse, so no half message may be left behind.
    async with serving(sock_path), AsyncClient.connect(sock_path) as c:
        for _ in range(3):
            async with c.stream("flood") as s:
                async for item in s:
                    assert _plain(item) == ("chunk", [0, "z" * 1000])
                    break
            assert await c.call("echo", "after") == ["after"]


async def test_blocking_client_timeout_then_reuse(sock_path: Path) -> None:
    node = Node()
    async with serving(sock_path, node):
        client = Client(sock_path, timeout=0.2)

        def run() -> Any:
            with pytest.raises(DeadlineError):
                client.call("hang")
            first = client._sock
            try:
                return client.call("echo", 2, timeout=None), client._sock is first
            finally:
                client.close()

        assert await trio.to_thread.run_sync(run) == ([2], True)
        await node.cancelled.wait()


async def test_timeout_is_a_deadline_error_and_cancels_on_the_node(sock_path: Path) -> None:
    node = Node()
    async with serving(sock_path, node), AsyncClient.connect(sock_path) as c:
        with pytest.raises(DeadlineError):
            await c.call("hang", timeout=0.2)
        await node.cancelled.wait()
        assert await c.call("echo", 1) == [1]


async def test_errors_come_back_as_rpc_errors(sock_path: Path, caplog: Any) -> None:
    async with serving(sock_path), AsyncClient.connect(sock_path) as c:
        with pytest.raises(RpcError) as info:
            await c.call("nope")
        assert info.value.code == rpc.METHOD_NOT_FOUND
        with pytest.raises(RpcError) as info:
            await c.call("add", "x")
        assert (info.value.code, info.value.message) == (
            rpc.INVALID_PARAMS,
            "add takes two integers",
        )
        with (
            caplog.at_level(logging.ERROR, logger="vmlend.node.rpc"),
            pytest.raises(RpcError) as info,
        ):
            await c.call("boom")
        assert (info.value.code, info.value.message) == (rpc.INTERNAL, "ValueError: kaboom")
        assert any(r.exc_info and "boom" in r.getMessage() for r in caplog.records)
        with pytest.raises(RpcError) as info:
            await c.call("huge")  # larger than the connection's message limit
        assert info.value.code == rpc.INTERNAL
        assert await c.call("echo", "still here") == ["still here"]
        with pytest.raises(RpcError) as info:
            await trio.to_thread.run_sync(lambda: Client(sock_path).call("nope"))
        assert info.value.code == rpc.METHOD_NOT_FOUND


async def test_malformed_requests(sock_path: Path) -> None:
    async with serving(sock_path), AsyncClient.connect(sock_path) as c:
        # A msgid can be recovered: the answer is an error for it.
        reply = await raw_exchange(sock_path, msgpack.packb([0, 5, 7, []]))
        assert reply[0][:2] == [1, 5]
        assert reply[0][2]["code"] == rpc.INVALID_REQUEST
        # No msgid (or bytes that are not msgpack at all): the connection is closed.
        for garbage in (msgpack.packb([0, -1, "echo", []]), msgpack.packb("hi"), b"\xc1"):
            assert await raw_exchange(sock_path, garbage) == []
        # Oversized: closed once the limit is passed, without waiting for the rest.
        big = msgpack.packb([0, 1, "echo", ["x" * 10_000]])
        assert await raw_exchange(sock_path, big[:5000]) == []
        assert await c.call("echo", "alive") == ["alive"]


async def test_client_disconnect_mid_request_cancels_the_handler(sock_path: Path) -> None:
    node = Node()
    async with serving(sock_path, node) as server:
        stream = await trio.open_unix_socket(os.fspath(sock_path))
        await stream.send_all(msgpack.packb([0, 1, "hang", []]))
        await node.started.wait()
        await stream.aclose()
        await node.cancelled.wait()
        async with AsyncClient.connect(sock_path) as c:
            assert await c.call("echo") == []
            assert server.connections == 1


async def test_connection_limit(sock_path: Path) -> None:
    async with serving(sock_path, max_connections=1), AsyncClient.connect(sock_path) as first:
        assert await first.call("echo") == []
        with pytest.raises(RpcError) as info:
            async with AsyncClient.connect(sock_path) as second:
                await second.call("echo")
        assert info.value.code == "too_many_connections"
        with pytest.raises(RpcError):
            await trio.to_thread.run_sync(lambda: Client(sock_path).call("echo"))
        assert await first.call("echo", 1) == [1]


async def test_node_not_running(tmp_path: Path) -> None:
    with pytest.raises(NodeNotRunningError, match=f"data dir {tmp_path} \\(no socket at"):
        Client(tmp_path).call("node.info")
    with pytest.raises(NodeNotRunningError):
        async with AsyncClient.connect(tmp_path):
            pass
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(os.fspath(tmp_path / "rpc.sock"))
    stale.close()
    with pytest.raises(NodeNotRunningError, match="stale"):
        Client(tmp_path).call("node.info")


async def test_stale_socket_is_replaced(sock_path: Path) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(os.fspath(sock_path))
    stale.close()
    async with serving(sock_path), AsyncClient.connect(sock_path) as c:
        assert await c.call("echo") == []


async def test_second_server_is_refused(sock_path: Path) -> None:
    async with serving(sock_path), AsyncClient.connect(sock_path) as c:
        with pytest.raises(NodeAlreadyRunningError, match="already running"):
            await RpcServer(sock_path, {}).run()
        assert await c.call("echo") == []
    # A live listener that is not one of ours (no lock held) is not removed either.
    with socket.socket(socket.AF_UNIX) as other:
        other.bind(os.fspath(sock_path))
        other.listen()
        with pytest.raises(NodeAlreadyRunningError, match="answers"):
            await RpcServer(sock_path, {}).run()
        assert await trio.Path(sock_path).exists()


async def test_refuses_to_remove_a_file_that_is_not_a_socket(sock_path: Path) -> None:
    await trio.Path(sock_path).write_text("precious")
    with pytest.raises(RpcServerError, match="not a socket"):
        await RpcServer(sock_path, {}).run()
    assert await trio.Path(sock_path).read_text() == "precious"
    with pytest.raises(RpcServerError, match="bytes"):
        await RpcServer(sock_path.parent / ("x" * 120), {}).run()


async def test_server_survives_a_broken_stream_client(sock_path: Path) -> None:
    node = Node()
    async with serving(sock_path, node), AsyncClient.connect(sock_path) as c:
        # The client stops reading mid-stream and disconnects; the handler must end.
        stream = await trio.open_unix_socket(os.fspath(sock_path))
        await stream.send_all(msgpack.packb([0, 1, "follow", []]))
        await node.started.wait()
        await stream.aclose()
        await node.cancelled.wait()
        assert await c.call("echo") == []


async def test_a_connection_that_breaks_is_a_stream_broken_error(sock_path: Path) -> None:
    async def hang_up(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(100)

    listener = trio.socket.socket(socket.AF_UNIX)
    await listener.bind(os.fspath(sock_path))
    listener.listen()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, hang_up, [trio.SocketListener(listener)])
        async with AsyncClient.connect(sock_path) as c:
            with pytest.raises(StreamBrokenError, match="closed the connection"):
                await c.call("echo")
            with pytest.raises(StreamBrokenError):
                await c.call("echo")
        with pytest.raises(StreamBrokenError):
            await trio.to_thread.run_sync(lambda: Client(sock_path).call("echo"))
        nursery.cancel_scope.cancel()


def _connect_as_nobody(path: str) -> bytes:
    code = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_UNIX)\n"
        "s.connect(sys.argv[1])\n"
        "d=b''\n"
        "try:\n"
        "    s.sendall(bytes([0x94,0,1,0xa4])+b'echo'+bytes([0x90]))\n"
        "    while c:=s.recv(4096): d+=c\n"
        "except OSError: pass\n"
        "sys.stdout.buffer.write(d)\n"
    )
    done = subprocess.run(
        ["/usr/bin/python3", "-c", code, path],
        user=65534,
        capture_output=True,
        timeout=20,
        check=True,
    )
    return done.stdout


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
async def test_other_users_are_refused_by_peer_credentials() -> None:
    # Open the file mode on purpose, to show the second fence holds on its own.
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        os.chmod(d, 0o755)
        path = Path(d) / "rpc.sock"
        async with serving(path):
            os.chmod(path, 0o666)
            out = await trio.to_thread.run_sync(_connect_as_nobody, os.fspath(path))
        notification = msgpack.unpackb(out)
        assert notification[:2] == [2, rpc.CLOSING_METHOD]
        assert notification[2][0]["code"] == "permission_denied"


async def test_a_neovim_style_client_is_served_and_its_notifications_ignored_once(
    sock_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A generic msgpack-rpc client (pynvim's session) sends a notification with a bin method
    before its first request; the node closed the connection, so the request never came."""
    junk = [
        [2, b"nvim_subscribe", ["x"]],  # unknown, method as bin
        [2, b"nvim_subscribe", ["x"]],  # again: said once
        [2, "m", {"not": "an array"}],  # unusable: ignored, the connection kept
        [2, b"\xff\xfe", []],  # not UTF-8: unusable
    ]
    data = b"".join(msgpack.packb(m, use_bin_type=True) for m in junk)
    data += msgpack.packb([0, 9, b"add", [4, 5]], use_bin_type=True)
    with caplog.at_level(logging.INFO, logger="vmlend.node.rpc"):
        async with serving(sock_path):
            answer = await raw_exchange(sock_path, data)
    assert answer == [[rpc.RESPONSE, 9, None, 9]]
    ignored = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert len([m for m in ignored if "nvim_subscribe" in m]) == 1
    assert len(ignored) == 2  # the unknown one once, the unusable kind once
