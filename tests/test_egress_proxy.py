"""The egress proxy against real loopback servers; the rate cap in virtual time and, as a lower
bound only, in real time."""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

import pytest
import trio
import trio.testing

from worker_role.egress_proxy import EgressProxy, pipe
from worker_role.token_bucket import TokenBucket

KIB = 1024
MIB = 1024 * KIB


@dataclass
class Upstream:
    """A loopback server that records every connection it gets."""

    port: int
    received: list[bytes] = field(default_factory=list)


async def start_server(nursery: trio.Nursery, mode: str, size: int = 0) -> Upstream:
    upstream = Upstream(port=0)

    async def handle(stream: trio.SocketStream) -> None:
        upstream.received.append(b"")
        index = len(upstream.received) - 1
        try:
            if mode == "echo":
                while data := await stream.receive_some(64 * KIB):
                    upstream.received[index] += data
                    await stream.send_all(data)
            elif mode == "http":
                while b"\r\n\r\n" not in upstream.received[index]:
                    data = await stream.receive_some(64 * KIB)
                    if not data:
                        return
                    upstream.received[index] += data
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
                )
            elif mode == "bulk":
                block = b"x" * (64 * KIB)
                for offset in range(0, size, len(block)):
                    await stream.send_all(block[: size - offset])
        except trio.BrokenResourceError:
            pass

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    upstream.port = listeners[0].socket.getsockname()[1]
    return upstream


async def start_proxy(
    nursery: trio.Nursery,
    allow: Sequence[str],
    rate_bps: int = 0,
    *,
    lender: Sequence[str] | None = None,
    **options: object,
) -> tuple[EgressProxy, int]:
    """A proxy for a task asking ``allow`` from a lender allowing ``lender`` (default: the same)."""
    lender = allow if lender is None else lender
    proxy = EgressProxy(allow, rate_bps, lender=lender, **options)  # type: ignore[arg-type]
    port: int = await nursery.start(proxy.run)
    return proxy, port


async def read_head(stream: trio.SocketStream) -> tuple[bytes, bytes]:
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(64 * KIB)
        assert data, f"connection closed before a response head: {buffer!r}"
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    return head, rest


async def read_to_eof(stream: trio.SocketStream, already: bytes = b"") -> bytes:
    buffer = already
    while data := await stream.receive_some(64 * KIB):
        buffer += data
    return buffer


async def ask(port: int, head: bytes) -> tuple[bytes, bytes]:
    """Send one request head to the proxy; the response head and the body up to EOF."""
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(head)
        response, rest = await read_head(stream)
        return response, await read_to_eof(stream, rest)


async def test_connect_tunnel_end_to_end(nursery: trio.Nursery) -> None:
    echo = await start_server(nursery, "echo")
    proxy, port = await start_proxy(nursery, [f"127.0.0.1:{echo.port}"])
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\n\r\nearly".encode())
        head, rest = await read_head(stream)
        assert head == b"HTTP/1.1 200 Connection established"
        await stream.send_all(b"-ping")
        got = rest
        while len(got) < len(b"early-ping"):
            got += await stream.receive_some(KIB)
        assert got == b"early-ping"
        await stream.send_eof()
        assert await read_to_eof(stream) == b""
    assert echo.received == [b"early-ping"]
    stats = proxy.statistics()
    assert (stats.bytes_up, stats.bytes_down, stats.connections) == (10, 10, 1)
    assert (stats.refused, stats.rejected, stats.failed) == (0, 0, 0)


async def test_plain_get_is_forwarded(nursery: trio.Nursery) -> None:
    http = await start_server(nursery, "http")
    proxy, port = await start_proxy(nursery, ["127.0.0.1"])
    head, body = await ask(
        port,
        f"GET http://127.0.0.1:{http.port}/path?q=1 HTTP/1.1\r\n"
        "Proxy-Connection: keep-alive\r\nAccept: */*\r\n\r\n".encode(),
    )
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert body == b"hello"
    assert http.received == [
        f"GET /path?q=1 HTTP/1.1\r\nHost: 127.0.0.1:{http.port}\r\nAccept: */*\r\n"
        "Connection: close\r\n\r\n".encode()
    ]
    stats = proxy.statistics()
    assert stats.bytes_up == len(http.received[0])
    assert stats.bytes_down == len(head) + 4 + len(body)


async def test_refused_destination_gets_403_and_reaches_nothing(nursery: trio.Nursery) -> None:
    echo = await start_server(nursery, "echo")
    proxy, port = await start_proxy(nursery, [f"127.0.0.1:{echo.port + 1}", "example.org:443"])
    head, body = await ask(port, f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\n\r\n".encode())
    assert head.startswith(b"HTTP/1.1 403 Forbidden")
    assert body == f"127.0.0.1:{echo.port} is not in the task's allow-list\n".encode()
    head, _ = await ask(port, f"GET http://localhost:{echo.port}/ HTTP/1.1\r\n\r\n".encode())
    assert head.startswith(b"HTTP/1.1 403")
    assert echo.received == []
    assert proxy.statistics().refused == 2


async def test_name_resolving_to_loopback_is_refused(nursery: trio.Nursery) -> None:
    echo = await start_server(nursery, "echo")
    # Allowed by name, but the name points at the worker itself.
    _, port = await start_proxy(nursery, [f"localhost:{echo.port}"], lender=["*"])
    head, body = await ask(port, f"CONNECT localhost:{echo.port} HTTP/1.1\r\n\r\n".encode())
    assert head.startswith(b"HTTP/1.1 403")
    assert b"localhost resolves to 127.0.0.1, an internal address" in body
    assert echo.received == []
    # A lender that names the host exactly has said it may resolve inside.
    http = await start_server(nursery, "http")
    _, named = await start_proxy(nursery, [f"localhost:{http.port}"])
    head, body = await ask(named, f"GET http://localhost:{http.port}/ HTTP/1.1\r\n\r\n".encode())
    assert (head[:12], body) == (b"HTTP/1.1 200", b"hello")


async def test_name_resolving_to_a_named_address_is_allowed(nursery: trio.Nursery) -> None:
    echo = await start_server(nursery, "echo")
    lookups: list[tuple[str, int]] = []

    async def resolver(host: str, port: int) -> list[str]:
        lookups.append((host, port))
        return ["127.0.0.1"]

    allow = [f"svc.test:{echo.port}", "other.test"]
    lender = ["*", f"127.0.0.1:{echo.port}"]
    _, port = await start_proxy(nursery, allow, lender=lender, resolver=resolver)
    head, _ = await ask(port, f"CONNECT other.test:{echo.port + 1} HTTP/1.1\r\n\r\n".encode())
    assert head.startswith(b"HTTP/1.1 403")  # the address is named only for echo's port
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(f"CONNECT svc.test:{echo.port} HTTP/1.1\r\n\r\n".encode())
        head, _ = await read_head(stream)
        assert head.startswith(b"HTTP/1.1 200")
    assert lookups == [("other.test", echo.port + 1), ("svc.test", echo.port)]


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET /not-absolute HTTP/1.1\r\n\r\n",
        b"CONNECT nohostport HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # TLS straight at the proxy
    ],
)
async def test_malformed_request_gets_400_and_proxy_keeps_running(
    nursery: trio.Nursery, request_head: bytes
) -> None:
    http = await start_server(nursery, "http")
    proxy, port = await start_proxy(nursery, [f"127.0.0.1:{http.port}"])
    head, body = await ask(port, request_head)
    assert head.startswith(b"HTTP/1.1 400 Bad Request")
    assert body
    head, body = await ask(port, f"GET http://127.0.0.1:{http.port}/ HTTP/1.1\r\n\r\n".encode())
    assert body == b"hello"
    assert proxy.statistics().rejected == 1


async def test_oversized_head_gets_431(nursery: trio.Nursery) -> None:
    proxy, port = await start_proxy(nursery, ["*"], max_head_bytes=1024)
    head, _ = await ask(port, b"GET http://example.org/ HTTP/1.1\r\nX: " + b"a" * 8000)
    assert head.startswith(b"HTTP/1.1 431")
    assert proxy.statistics().rejected == 1


async def test_stalled_head_gets_408(nursery: trio.Nursery) -> None:
    _, port = await start_proxy(nursery, ["*"], head_timeout=0.2)
    head, _ = await ask(port, b"GET http://example.org/ HTTP/1.1\r\n")
    assert head.startswith(b"HTTP/1.1 408")


async def test_unreachable_upstream_gets_502(nursery: trio.Nursery) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]  # nothing listens once it is closed
    proxy, port = await start_proxy(nursery, [f"127.0.0.1:{dead}"])
    head, body = await ask(port, f"CONNECT 127.0.0.1:{dead} HTTP/1.1\r\n\r\n".encode())
    assert head.startswith(b"HTTP/1.1 502")
    assert b"cannot connect" in body
    assert proxy.statistics().failed == 1


async def test_connection_limit_answers_503(nursery: trio.Nursery) -> None:
    echo = await start_server(nursery, "echo")
    proxy, port = await start_proxy(nursery, [f"127.0.0.1:{echo.port}"], max_connections=1)
    async with await trio.open_tcp_stream("127.0.0.1", port) as first:
        await first.send_all(f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\n\r\n".encode())
        await read_head(first)  # the tunnel is open: the one slot is taken
        head, _ = await ask(port, f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\n\r\n".encode())
        assert head.startswith(b"HTTP/1.1 503")
    assert proxy.statistics().connections == 2


async def test_client_reset_mid_tunnel_does_not_stop_the_proxy(nursery: trio.Nursery) -> None:
    bulk = await start_server(nursery, "bulk", size=8 * MIB)
    http = await start_server(nursery, "http")
    proxy, port = await start_proxy(nursery, [f"127.0.0.1:{bulk.port}", f"127.0.0.1:{http.port}"])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(f"CONNECT 127.0.0.1:{bulk.port} HTTP/1.1\r\n\r\n".encode())
    await read_head(stream)
    await stream.receive_some(KIB)
    # SO_LINGER 0: close sends a RST while the proxy is still writing to us.
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()
    _, body = await ask(port, f"GET http://127.0.0.1:{http.port}/ HTTP/1.1\r\n\r\n".encode())
    assert body == b"hello"
    assert proxy.statistics().connections == 2


async def test_shared_bucket_caps_concurrent_pipes(autojump_clock: trio.testing.MockClock) -> None:
    """Two connections, both directions, one bucket: together they move at the rate, no faster
    (and, in virtual time, no slower)."""
    rate, burst, size = 256 * KIB, 32 * KIB, 1 * MIB
    bucket = TokenBucket(rate, burst, now=trio.current_time())
    moved: list[int] = []

    async def one_direction() -> None:
        source_send, source_recv = trio.testing.memory_stream_one_way_pair()
        sink_send, sink_recv = trio.testing.memory_stream_one_way_pair()

        async def produce() -> None:
            for _ in range(size // (64 * KIB)):
                await source_send.send_all(b"x" * (64 * KIB))
            await source_send.aclose()

        async def copy() -> None:
            await pipe(source_recv, sink_send, bucket=bucket, chunk=16 * KIB, count=moved.append)
            await sink_send.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            nursery.start_soon(copy)
            received = 0
            while data := await sink_recv.receive_some(64 * KIB):
                received += len(data)
        assert received == size

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(4):  # two connections, each with an up and a down direction
            nursery.start_soon(one_direction)
    elapsed = trio.current_time() - start
    assert sum(moved) == 4 * size
    assert elapsed == pytest.approx((4 * size - burst) / rate, rel=0.01)


async def test_real_transfer_is_not_faster_than_the_cap(nursery: trio.Nursery) -> None:
    """Lower bound only: a loaded machine may be slower than the cap, never faster."""
    size, rate = 1 * MIB, 512 * KIB
    bulk = await start_server(nursery, "bulk", size=size)
    proxy, port = await start_proxy(nursery, [f"127.0.0.1:{bulk.port}"], rate_bps=rate)
    start = trio.current_time()
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(f"CONNECT 127.0.0.1:{bulk.port} HTTP/1.1\r\n\r\n".encode())
        _, rest = await read_head(stream)
        body = await read_to_eof(stream, rest)
    elapsed = trio.current_time() - start
    assert len(body) == size
    burst = rate / 8  # the proxy's burst: an idle bucket starts full
    assert elapsed >= (size - burst) / rate * 0.98
    assert proxy.statistics().bytes_down == size


async def test_hostile_clients_do_not_stop_the_proxy(nursery: trio.Nursery) -> None:
    http = await start_server(nursery, "http")
    proxy, port = await start_proxy(nursery, [f"127.0.0.1:{http.port}"])
    hostile = [
        b"",  # connects and leaves
        b"GET http://127.0.0.1",  # leaves in the middle of a head
        b"\x00" * 5000 + b"\r\n\r\n",  # binary junk
        b"CONNECT 127.0.0.1:1:2 HTTP/1.1\r\n\r\n",
    ]
    for payload in hostile:
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            if payload:
                await stream.send_all(payload)
            await stream.send_eof()
            await read_to_eof(stream)
    _, body = await ask(port, f"GET http://127.0.0.1:{http.port}/ HTTP/1.1\r\n\r\n".encode())
    assert body == b"hello"
    stats = proxy.statistics()
    assert (stats.connections, stats.rejected, stats.active) == (5, 3, 0)
    assert len(http.received) == 1


async def test_cancelling_the_proxy_ends_open_tunnels() -> None:
    async with trio.open_nursery() as servers:
        echo = await start_server(servers, "echo")
        async with trio.open_nursery() as nursery:
            proxy, port = await start_proxy(nursery, [f"127.0.0.1:{echo.port}"])
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\n\r\n".encode())
            await read_head(stream)
            assert proxy.statistics().active == 1
            nursery.cancel_scope.cancel()
        async with stream:
            assert await read_to_eof(stream) == b""
        servers.cancel_scope.cancel()
