"""Measurements across a lab, made with real kernel sockets opened inside its namespaces.

No ``ping`` here: a UDP echo gives round trips and loss, a TCP stream gives goodput, a TCP
connect says whether one host reaches another and which source address the far side sees.
"""

from __future__ import annotations

import errno
import socket
import struct
from dataclasses import dataclass

import trio

from tests.netlab.netns import socket_in

PROBE = struct.Struct("!Id")  # sequence number, send time
BLOCK = 64 * 1024


@dataclass
class Echoes:
    sent: int
    rtts: list[float]  # seconds, one per probe answered

    @property
    def lost_fraction(self) -> float:
        return 1 - len(self.rtts) / self.sent


async def udp_echoes(
    src_netns: str, dst_netns: str, dst_ip: str, *, count: int, interval: float, wait: float = 2.0
) -> Echoes:
    """Send ``count`` UDP probes from ``src_netns`` to an echo in ``dst_netns`` every ``interval``
    s; collect answers until ``wait`` s after the last."""
    server = socket_in(dst_netns, socket.SOCK_DGRAM)
    client = socket_in(src_netns, socket.SOCK_DGRAM)
    with server, client:
        await server.bind((dst_ip, 0))
        port = server.getsockname()[1]
        rtts: dict[int, float] = {}

        async def echo() -> None:
            while True:
                data, addr = await server.recvfrom(2048)
                await server.sendto(data, addr)

        async def collect() -> None:
            while True:
                data = await client.recv(2048)
                seq, sent_at = PROBE.unpack(data[: PROBE.size])
                rtts.setdefault(seq, trio.current_time() - sent_at)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo)
            nursery.start_soon(collect)
            for seq in range(count):
                await client.sendto(PROBE.pack(seq, trio.current_time()), (dst_ip, port))
                await trio.sleep(interval)
            await trio.sleep(wait)
            nursery.cancel_scope.cancel()
    return Echoes(count, sorted(rtts.values()))


async def tcp_goodput(
    src_netns: str, dst_netns: str, dst_ip: str, *, warmup: float, seconds: float
) -> float:
    """Bytes per second received over one TCP stream from ``src_netns`` to ``dst_netns``,
    counted for ``seconds`` after ``warmup`` s of sending (so slow start is not counted)."""
    listener = socket_in(dst_netns)
    client = socket_in(src_netns)
    counted = 0
    with listener, client:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await listener.bind((dst_ip, 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        window = trio.Event()

        async def receive() -> None:
            nonlocal counted
            conn, _ = await listener.accept()
            with conn:
                while data := await conn.recv(BLOCK):
                    if window.is_set():
                        counted += len(data)

        async def send() -> None:
            await client.connect((dst_ip, port))
            block = b"\0" * BLOCK
            while True:
                await client.send(block)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            nursery.start_soon(send)
            await trio.sleep(warmup)
            window.set()
            start = trio.current_time()
            await trio.sleep(seconds)
            elapsed = trio.current_time() - start
            measured = counted
            nursery.cancel_scope.cancel()
    return measured / elapsed


async def seen_source(src_netns: str, dst_netns: str, dst_ip: str) -> str:
    """Connect from ``src_netns`` to a listener in ``dst_netns``; the address the listener saw."""
    listener = socket_in(dst_netns)
    client = socket_in(src_netns)
    with listener, client:
        await listener.bind((dst_ip, 0))
        listener.listen(1)
        await client.connect((dst_ip, listener.getsockname()[1]))
        conn, addr = await listener.accept()
        conn.close()
    return str(addr[0])


async def connect_outcome(src_netns: str, ip: str, port: int, *, give_up: float) -> str:
    """ "connected", "timeout" or the OS error's name, for a TCP connect from ``src_netns``."""
    client = socket_in(src_netns)
    with client:
        with trio.move_on_after(give_up):
            try:
                await client.connect((ip, port))
            except OSError as exc:
                return type(exc).__name__ if exc.errno is None else errno_name(exc.errno)
            return "connected"
        return "timeout"


def errno_name(number: int) -> str:
    return errno.errorcode.get(number, str(number))
