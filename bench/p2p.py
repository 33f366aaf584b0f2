"""The p2p adapter on loopback, with raw trio TCP as the baseline in the same run. Prints JSON.

- stream throughput: one MessageStream moving ``--mib`` MiB in 256 KiB messages vs one raw trio
  TCP connection moving the same bytes;
- round trip of one message on an open stream, and of a request on a new stream;
- connect time on loopback (py-libp2p's default adds 250 ms; the adapter removes it);
- DHT record lookup latency (get_record from every other node) at 10 and 30 nodes in one process.

    .venv/bin/python bench/p2p.py [--mib 64] [--round-trips 500] [--sizes 10,30]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from functools import partial
from typing import Any

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from node.identity import Identity
from node.p2p import P2PNode
from node.p2p_stream import MessageStream

MIB = 1024 * 1024
BLOCK = 256 * 1024
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
SINK = "/vmlend/bench-sink/1.0.0"
ECHO = "/vmlend/bench-echo/1.0.0"


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered) * 1000, 3),
        "p90_ms": round(ordered[int(len(ordered) * 0.9) - 1] * 1000, 3),
        "max_ms": round(ordered[-1] * 1000, 3),
        "n": len(ordered),
    }


async def raw_tcp_mb_s(size: int) -> float:
    done = trio.Event()
    received = 0

    async def sink(stream: trio.SocketStream) -> None:
        nonlocal received
        while data := await stream.receive_some(1024 * 1024):
            received += len(data)
        done.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, sink, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        block = b"\0" * BLOCK
        start = trio.current_time()
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            for _ in range(size // BLOCK):
                await stream.send_all(block)
        await done.wait()
        elapsed = trio.current_time() - start
        nursery.cancel_scope.cancel()
    assert received == size
    return size / elapsed / 1e6


async def p2p_bench(size: int, round_trips: int) -> dict[str, Any]:
    async def sink(stream: MessageStream) -> None:
        total = 0
        async for msg in stream:
            total += len(msg["blob"])
        await stream.send({"type": "total", "bytes": total})

    async def echo(stream: MessageStream) -> None:
        async for msg in stream:
            await stream.send(msg)

    async with trio.open_nursery() as nursery:
        a = P2PNode(Identity.generate(), listen=[LOOPBACK])
        b = P2PNode(Identity.generate(), listen=[LOOPBACK])
        await nursery.start(a.run)
        addrs = await nursery.start(b.run)
        b.set_handler(SINK, sink)
        b.set_handler(ECHO, echo)
        connects = []
        start = trio.current_time()
        await a.connect(addrs[0])
        connects.append(trio.current_time() - start)

        blob = b"\0" * BLOCK
        stream = await a.open_stream(b.peer_id, SINK)
        start = trio.current_time()
        for _ in range(size // BLOCK):
            await stream.send({"type": "chunk", "blob": blob})
        await stream.send_end()
        reply = await stream.receive()
        elapsed = trio.current_time() - start
        await stream.aclose()
        assert reply["bytes"] == size, reply

        echo_stream = await a.open_stream(b.peer_id, ECHO)
        rtts = []
        for i in range(round_trips):
            t = trio.current_time()
            await echo_stream.send({"type": "ping", "n": i})
            await echo_stream.receive()
            rtts.append(trio.current_time() - t)
        await echo_stream.aclose()
        requests = []
        for i in range(max(50, round_trips // 10)):
            t = trio.current_time()
            await a.request(b.peer_id, ECHO, {"type": "ping", "n": i}, timeout=10)
            requests.append(trio.current_time() - t)
        nursery.cancel_scope.cancel()
    return {
        "stream_mb_s": round(size / elapsed / 1e6, 1),
        "connect": summary(connects),
        "rtt_open_stream": summary(rtts),
        "request_new_stream": summary(requests),
    }


async def dht_bench(n: int) -> dict[str, Any]:
    # One process runs every node here, so heartbeats are spaced out to leave CPU for the DHT.
    timings = {"heartbeat_interval": 5.0, "peer_timeout": 30.0, "discovery_interval": 5.0}
    async with trio.open_nursery() as nursery:
        first = P2PNode(Identity.generate(), listen=[LOOPBACK], **timings)
        addrs = await nursery.start(first.run)
        nodes = [first]
        for _ in range(n - 1):
            node = P2PNode(Identity.generate(), listen=[LOOPBACK], bootstrap=[addrs[0]], **timings)
            await nursery.start(node.run)
            nodes.append(node)
        start = trio.current_time()
        converged: float | None = None
        with trio.move_on_after(90):
            for node in nodes:
                await node.wait_peer_count(n - 1)
            converged = round(trio.current_time() - start, 2)
        fewest_peers = min(len(node.peers()) for node in nodes)
        publishers = nodes[1:4]
        for pub in publishers:
            await pub.put_record("bench", pub.peer_id, {"name": pub.peer_id[-6:]}, ttl=300)
        gets = []
        for pub in publishers:
            for node in nodes:
                if node is pub:
                    continue
                t = trio.current_time()
                await node.get_record("bench", pub.peer_id, timeout=30)
                gets.append(trio.current_time() - t)
        finds = []
        for node in nodes[::3]:
            t = trio.current_time()
            found = await node.find_records("bench", timeout=30)
            finds.append(trio.current_time() - t)
            assert len(found) == len(publishers), len(found)
        nursery.cancel_scope.cancel()
    return {
        "nodes": n,
        "all_peers_live_after_s": converged,  # None: not within 90 s
        "fewest_live_peers_of_any_node": fewest_peers,
        "get_record": summary(gets),
        "find_records_3_publishers": summary(finds),
    }


async def main(args: argparse.Namespace) -> None:
    size = args.mib * MIB
    raw = await raw_tcp_mb_s(size)
    p2p = await p2p_bench(size, args.round_trips)
    dht = []
    for n in args.sizes.split(","):
        dht.append(await dht_bench(int(n)))
        print(json.dumps(dht[-1]), file=sys.stderr, flush=True)
    print(
        json.dumps(
            {
                "bench": "p2p",
                "bytes": size,
                "raw_tcp_mb_s": round(raw, 1),
                **p2p,
                "stream_vs_raw": round(p2p["stream_mb_s"] / raw, 4),
                "dht": dht,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--round-trips", type=int, default=500)
    parser.add_argument("--sizes", default="10,30")
    logging.basicConfig(level=logging.CRITICAL)
    trio.run(main, parser.parse_args())
