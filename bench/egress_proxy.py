"""Throughput through the egress proxy (uncapped) vs direct TCP to the same loopback server, in the
same run; plus one capped transfer to show the cap holds, and the cost of opening a connection
(through the proxy it is judged, the host's own addresses read again, each time). Prints JSON.

    .venv/bin/python bench/egress_proxy.py [--mib 64] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial

import trio

from worker_role.egress_proxy import EgressProxy, host_addresses

MIB = 1024 * 1024
BLOCK = b"\0" * (256 * 1024)


async def bulk_server(size: int, stream: trio.SocketStream) -> None:
    try:
        for offset in range(0, size, len(BLOCK)):
            await stream.send_all(BLOCK[: size - offset])
    except trio.BrokenResourceError:
        pass


async def fetch(port: int, connect_to: int | None) -> int:
    """Read to EOF from 127.0.0.1:port, through a CONNECT if ``connect_to`` is given."""
    received = 0
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        if connect_to is not None:
            await stream.send_all(f"CONNECT 127.0.0.1:{connect_to} HTTP/1.1\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                data = await stream.receive_some(65536)
                if not data:
                    raise RuntimeError(f"proxy closed before answering: {head!r}")
                head += data
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"proxy refused: {head!r}")
            received = len(head.partition(b"\r\n\r\n")[2])
        while data := await stream.receive_some(1024 * 1024):
            received += len(data)
    return received


async def timed(port: int, connect_to: int | None, size: int) -> float:
    start = trio.current_time()
    got = await fetch(port, connect_to)
    elapsed = trio.current_time() - start
    if got != size:
        raise RuntimeError(f"received {got} bytes, expected {size}")
    return elapsed


async def setup_ms(port: int, connect_to: int | None, count: int) -> float:
    """Median milliseconds to open a connection and read the tiny server's one byte."""
    times = []
    for _ in range(count):
        start = trio.current_time()
        if await fetch(port, connect_to) != 1:
            raise RuntimeError("the tiny server sent other than one byte")
        times.append(trio.current_time() - start)
    return round(statistics.median(times) * 1e3, 3)


def host_addresses_us(count: int = 1000) -> float:
    start = time.perf_counter()
    for _ in range(count):
        host_addresses()
    return round((time.perf_counter() - start) / count * 1e6, 1)


async def bench(size: int, runs: int, capped_size: int, cap: int) -> dict[str, object]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, partial(bulk_server, size), 0, host="127.0.0.1")
        )
        server = listeners[0].socket.getsockname()[1]
        capped_listeners = await nursery.start(
            partial(trio.serve_tcp, partial(bulk_server, capped_size), 0, host="127.0.0.1")
        )
        capped_server = capped_listeners[0].socket.getsockname()[1]
        tiny_listeners = await nursery.start(
            partial(trio.serve_tcp, partial(bulk_server, 1), 0, host="127.0.0.1")
        )
        tiny_server = tiny_listeners[0].socket.getsockname()[1]
        allow = [f"127.0.0.1:{port}" for port in (server, capped_server, tiny_server)]
        # Loopback is internal: the lender must name these addresses, as it does here.
        uncapped = EgressProxy(allow, 0, lender=allow)
        proxy_port = await nursery.start(uncapped.run)
        capped = EgressProxy(allow, cap, lender=allow)
        capped_port = await nursery.start(capped.run)

        direct, proxied = [], []
        for _ in range(runs):  # interleaved, so drift in machine load hits both alike
            direct.append(await timed(server, None, size))
            proxied.append(await timed(proxy_port, server, size))
        capped_time = await timed(capped_port, capped_server, capped_size)
        direct_setup = await setup_ms(tiny_server, None, 50)
        proxied_setup = await setup_ms(proxy_port, tiny_server, 50)
        nursery.cancel_scope.cancel()

    direct_mbps = size / statistics.median(direct) / 1e6
    proxied_mbps = size / statistics.median(proxied) / 1e6
    return {
        "bench": "egress_proxy",
        "cpus": os.cpu_count(),
        "bytes_per_run": size,
        "runs": runs,
        "direct_tcp_MBps_median": round(direct_mbps, 1),
        "proxy_uncapped_MBps_median": round(proxied_mbps, 1),
        "proxy_vs_direct": round(proxied_mbps / direct_mbps, 3),
        "connection_ms_median": {"direct": direct_setup, "proxied": proxied_setup},
        "host_addresses_us": host_addresses_us(),
        "capped": {
            "cap_Bps": cap,
            "bytes": capped_size,
            "seconds": round(capped_time, 3),
            "measured_Bps": round(capped_size / capped_time),
            "measured_vs_cap": round(capped_size / capped_time / cap, 3),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=64, help="MiB per uncapped transfer")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--capped-mib", type=int, default=2)
    parser.add_argument("--cap-kib", type=int, default=512, help="cap in KiB/s")
    args = parser.parse_args(argv)
    result = trio.run(bench, args.mib * MIB, args.runs, args.capped_mib * MIB, args.cap_kib * 1024)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
