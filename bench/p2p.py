"""The p2p adapter on loopback, with raw trio TCP as the baseline in the same run. Prints JSON.

- stream throughput: one MessageStream moving ``--mib`` MiB in 256 KiB messages vs one raw trio
  TCP connection moving the same bytes;
- round trip of one message on an open stream, and of a request on a new stream;
- connect time on loopback (py-libp2p's default adds 250 ms; the adapter removes it);
- DHT record lookup latency at 10 and 30 nodes: one measuring node in this process, the others
  each in its own process (3 of them publish a record); get_record and find_records from here.

    .venv/bin/python bench/p2p.py [--mib 64] [--round-trips 500] [--sizes 10,30]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from contextlib import AsyncExitStack
from functools import partial
from typing import Any

import trio

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from node.dht_records import RecordNotFoundError, record_key
from node.errors import DeadlineError
from node.identity import Identity
from node.p2p import P2PNode
from node.p2p_stream import MessageStream
from tests.p2p_helpers.subprocess_peer import peer_process

MIB = 1024 * 1024
BLOCK = 256 * 1024
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
SINK = "/vmlend/bench-sink/1.0.0"
ECHO = "/vmlend/bench-echo/1.0.0"


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


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


async def dht_bench(n: int, lookups: int) -> dict[str, Any]:
    """One measuring node here, ``n - 1`` nodes in their own processes (3 of them publish).
    get_record asks the (connected) owner first; dht_lookup_only measures the DHT path alone."""
    timings = {"heartbeat_interval": 2.0, "peer_timeout": 10.0, "discovery_interval": 5.0}
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        me = P2PNode(Identity.generate(), listen=[LOOPBACK], **timings)
        addrs = await nursery.start(me.run)
        spawn_start = trio.current_time()
        procs = [
            await stack.enter_async_context(
                peer_process(
                    addrs[0],
                    publish="bench" if i < 3 else None,
                    timings=timings,
                    start_timeout=120,
                )
            )
            for i in range(n - 1)
        ]
        spawned = trio.current_time() - spawn_start
        progress(f"{n} nodes: processes up after {spawned:.1f}s")
        start = trio.current_time()
        converged: float | None = None
        with trio.move_on_after(90):
            await me.wait_peer_count(n - 1)
            converged = round(trio.current_time() - start, 2)
        progress(f"{n} nodes: {len(me.peers())} live peers (all after {converged}s)")
        for proc in procs[:3]:
            with trio.fail_after(60):
                await proc.wait_event("published")
        progress(f"{n} nodes: 3 records published")
        gets, failures = [], 0
        for _ in range(lookups):
            for proc in procs[:3]:
                t = trio.current_time()
                try:
                    await me.get_record("bench", proc.peer_id, timeout=30)
                except (RecordNotFoundError, DeadlineError):
                    failures += 1
                    continue
                gets.append(trio.current_time() - t)
            progress(f"{n} nodes: {len(gets)} lookups, {failures} failed")
        # The DHT path alone (what get_record falls back to when the owner is not connected):
        # an iterative FIND_NODE for the key, then GET_VALUE from the k closest peers.
        dht_gets, dht_misses = [], 0
        for _ in range(lookups):
            for proc in procs[:3]:
                key = record_key("bench", proc.peer_id)
                t = trio.current_time()
                values = await me._dht.get_all(key)
                elapsed = trio.current_time() - t
                if me._records.best_record(key, values) is None:
                    dht_misses += 1
                else:
                    dht_gets.append(elapsed)
        finds, found_counts = [], []
        for _ in range(max(3, lookups // 3)):
            t = trio.current_time()
            found = await me.find_records("bench", timeout=30)
            finds.append(trio.current_time() - t)
            found_counts.append(len(found))
        nursery.cancel_scope.cancel()
    return {
        "nodes": n,
        "processes_started_in_s": round(spawned, 1),
        "peers_live_after_s": converged,  # None: not all within 90 s
        "live_peers_seen": len(me.peers()),
        "get_record": summary(gets) if gets else None,
        "get_record_failures": failures,
        "dht_lookup_only": summary(dht_gets) if dht_gets else None,
        "dht_lookup_misses": dht_misses,
        "find_records_3_publishers": summary(finds),
        "find_records_found": sorted(set(found_counts)),
    }


async def main(args: argparse.Namespace) -> None:
    size = args.mib * MIB
    raw = await raw_tcp_mb_s(size)
    p2p = await p2p_bench(size, args.round_trips)
    dht = []
    for n in args.sizes.split(","):
        dht.append(await dht_bench(int(n), args.lookups))
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
    parser.add_argument("--lookups", type=int, default=20)
    logging.basicConfig(level=logging.CRITICAL)
    trio.run(main, parser.parse_args())
