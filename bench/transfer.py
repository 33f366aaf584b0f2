"""Blob transfer between real ``vmlend node start`` processes on loopback, vs raw TCP (JSON).

    .venv/bin/python -m bench.transfer [--mib 512] [--dir DIR] [--repeats 3]

Measured in one run: a raw TCP copy of the blob's bytes (two threads, blocking sockets, into
memory), and the same copy into a file made durable with fdatasync (``nc > FILE && sync``: the
guarantee a fetch gives); the chunk store alone storing its chunks as a fetch does (no network);
``blob.get`` on a fresh node from 1 provider and from 3 providers (the fetcher stores, fsyncs
and indexes every chunk), from 1 provider with chunks on libp2p streams instead of the data
channel, and from 1 provider into a node whose store is on tmpfs (the transfer without the
disk); then a second blob sharing 90 % of its bytes with the first (ten 1/100 slices
rewritten): how many bytes moved. Each step starts after ``sync``, with no dirty pages left by
the one before, and each fetching node has fetched the blob once before (warm-up, reported
apart). This VM's speed drifts by 10-20 % within minutes, so every case (and baseline) runs
``--repeats`` times (default 3): the best run is reported and compared, as for raw TCP, with
the median and every run beside it. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import trio

from node.localnet import LocalNode, local_network

MIB = 1 << 20


def note(msg: str) -> None:
    print(f"[bench.transfer] {msg}", file=sys.stderr, flush=True)


@contextmanager
def serving(data: bytes) -> Iterator[int]:
    """A thread that sends ``data`` to the first connection on the yielded loopback port."""
    server = socket.create_server(("127.0.0.1", 0))

    def send() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(data)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        yield server.getsockname()[1]
    finally:
        sender.join()
        server.close()


def raw_tcp_copy(data: bytes) -> float:
    """Seconds to move ``data`` over one loopback TCP connection into a receive buffer."""
    buf = bytearray(len(data))
    view = memoryview(buf)
    with serving(data) as port:
        began = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            got = 0
            while got < len(data):
                got += sock.recv_into(view[got:], min(len(data) - got, 4 * MIB))
        seconds = time.perf_counter() - began
    assert buf == data
    return seconds


def raw_tcp_to_disk(data: bytes, path: Path) -> float:
    """Seconds to move ``data`` over one loopback TCP connection into a file and fdatasync it
    (``nc > FILE && sync``): the same bytes made durable with no chunking, hashing or index."""
    view = memoryview(bytearray(4 * MIB))
    with serving(data) as port:
        began = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                while count := sock.recv_into(view):
                    os.write(fd, view[:count])
            os.fdatasync(fd)
        finally:
            os.close(fd)
        seconds = time.perf_counter() - began
    assert path.stat().st_size == len(data)
    path.unlink()
    return seconds


def settle() -> None:
    """Write back what earlier steps left dirty, so each measurement starts with an idle disk
    (otherwise the kernel throttles whichever step comes after a big write)."""
    os.sync()


def settled(step: Callable[..., float], *args: Any) -> float:
    settle()
    return step(*args)


def make_data(mib: int, seed: int) -> bytes:
    rng = random.Random(seed)  # randbytes takes at most 2**31 bits at once
    return b"".join(rng.randbytes(MIB) for _ in range(mib))


def variant(data: bytes, seed: int) -> bytes:
    """``data`` with ten slices of 1 % each rewritten: 90 % shared."""
    rng = random.Random(seed)
    out = bytearray(data)
    step = len(data) // 10
    for i in range(10):
        start = i * step + step // 2
        out[start : start + step // 10] = rng.randbytes(step // 10)
    return bytes(out)


async def get(
    fetcher: LocalNode,
    blob_id: str,
    sources: list[str],
    out: Path | None,
    *,
    channel: bool = True,
) -> dict[str, Any]:
    """``blob.get`` on ``fetcher``: into its store, and exported to ``out`` if given."""
    from node.rpc_client import AsyncClient

    began = time.perf_counter()
    options: dict[str, Any] = {"from": sources, "channel": channel}
    if out is not None:
        options["out"] = str(out)
    async with AsyncClient.connect(fetcher.rpc_path) as client:
        result: dict[str, Any] = await client.call("blob.get", blob_id, options, timeout=None)
    result["wall_seconds"] = time.perf_counter() - began
    return result


def cpu_seconds(node: LocalNode) -> float:
    """CPU time (user + system, every thread) the node's process has used so far."""
    assert node.process is not None
    fields = Path(f"/proc/{node.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def store_only(data: bytes, root: Path) -> float:
    """Seconds to store ``data``'s chunks as a fetch does (16 MiB batches, 4 at once), with no
    network: the chunk store's own ceiling in this run."""
    from catalog.chunk_store import ChunkStore
    from catalog.chunking import Chunker, hash_chunk
    from catalog.transfer import WRITE_BATCH_BYTES, WRITERS

    chunks = [(hash_chunk(c), bytes(c)) for c in Chunker().cut(data)]
    batches: list[list[Any]] = [[]]
    for item in chunks:
        if sum(len(c) for _, c in batches[-1]) >= WRITE_BATCH_BYTES:
            batches.append([])
        batches[-1].append(item)
    async with ChunkStore.open(root) as store:
        limit = trio.Semaphore(WRITERS)

        async def put(batch: list[Any]) -> None:
            try:
                with store.pins() as pins:
                    await store.put_many(batch, pins=pins, verified=True)
            finally:
                limit.release()

        began = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for batch in batches:
                await limit.acquire()
                nursery.start_soon(put, batch)
        return time.perf_counter() - began


async def fetch_case(
    into: LocalNode,
    blob_id: str,
    sources: list[LocalNode],
    out: Path,
    channel: bool,
    repeats: int,
) -> dict[str, Any]:
    """``blob.get`` on ``into`` from ``sources``, ``repeats`` times (its copy dropped and
    collected before each). The best run is reported, as for raw TCP; the median beside it."""
    addrs = [s.addrs[0] for s in sources]
    runs: list[dict[str, Any]] = []
    for _ in range(repeats):
        if await into.call("blob.ls"):
            await into.call("blob.rm", blob_id)
        await into.call("blob.gc")
        settle()
        cpu = [cpu_seconds(node) for node in (into, *sources)]
        result = await get(into, blob_id, addrs, None, channel=channel)
        cpu = [
            cpu_seconds(node) - before for node, before in zip((into, *sources), cpu, strict=True)
        ]
        runs.append(
            {
                "transfer_seconds": result["seconds"],
                "setup_seconds": result["setup_seconds"],
                "store_seconds": result["store_seconds"],
                "bytes_fetched": result["bytes_fetched"],
                # Where the time goes: CPU seconds of each process over the whole blob.get,
                # and how many of this machine's cores that kept busy on average.
                "cpu_seconds_fetcher": cpu[0],
                "cpu_seconds_providers": sum(cpu[1:]),
                "cores_busy": sum(cpu) / result["wall_seconds"],
            }
        )
    await get(into, blob_id, addrs, out, channel=channel)  # complete now: only exports
    got = await trio.to_thread.run_sync(out.read_bytes)
    await trio.to_thread.run_sync(out.unlink)
    by_time = sorted(runs, key=lambda run: float(run["transfer_seconds"]))
    best, median = by_time[0], by_time[len(by_time) // 2]
    size = len(got)
    return {
        **best,
        "mib_s": size / best["transfer_seconds"] / MIB,
        "mib_s_median": size / median["transfer_seconds"] / MIB,
        "mib_s_runs": [size / run["transfer_seconds"] / MIB for run in runs],
        "out": got,
    }


@asynccontextmanager
async def in_ram_node(bootstrap: LocalNode) -> AsyncIterator[LocalNode]:
    """A node whose data directory (chunk store included) is on tmpfs, where fsync costs
    nothing: fetching into it measures the transfer without the disk."""
    ram = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="bench-transfer-"))
    try:
        async with trio.open_nursery() as nursery:
            node = LocalNode("ram", ram / "node", ("owner",), bootstrap.addrs[:1])
            await node.start(nursery)
            try:
                yield node
            finally:
                with trio.CancelScope(shield=True):
                    await node.stop()
    finally:
        shutil.rmtree(ram, ignore_errors=True)


async def run(mib: int, base: Path, repeats: int) -> dict[str, Any]:
    data = make_data(mib, 1)
    data_mib = len(data) / MIB
    first = base / "first.bin"
    first.write_bytes(data)
    second_data = variant(data, 2)
    second = base / "second.bin"
    second.write_bytes(second_data)
    settle()
    raw = min(raw_tcp_copy(data) for _ in range(max(3, repeats)))
    note(f"raw TCP: {len(data) / raw / MIB:.0f} MiB/s")
    raw_disk = min(settled(raw_tcp_to_disk, data, base / "raw-to-disk.bin") for _ in range(repeats))
    note(f"raw TCP into a file, fdatasync'ed: {len(data) / raw_disk / MIB:.0f} MiB/s")
    stored = float("inf")
    for i in range(repeats):
        settle()
        stored = min(stored, await store_only(data, base / f"store-only-{i}"))
        # Deleted before the next, as a fetch's chunks are collected before the next fetch:
        # on this VM's disk, a store written into blocks freed just before ran at ~1300 MiB/s,
        # one written into blocks never written before at ~700.
        shutil.rmtree(base / f"store-only-{i}")
    note(f"chunk store alone: {len(data) / stored / MIB:.0f} MiB/s")
    report: dict[str, Any] = {
        "blob_bytes": len(data),
        "cpu_count": os.cpu_count(),
        "raw_tcp_seconds": raw,
        "raw_tcp_mib_s": len(data) / raw / MIB,
        "raw_tcp_to_disk_seconds": raw_disk,
        "raw_tcp_to_disk_mib_s": len(data) / raw_disk / MIB,
        "repeats": repeats,
        "store_only_seconds": stored,
        "store_only_mib_s": len(data) / stored / MIB,
    }
    async with local_network(base / "nodes", 4) as nodes:
        fetcher, providers = nodes[0], nodes[1:]
        blob_id = ""
        add_seconds: list[float] = []
        for p in providers:
            began = time.perf_counter()
            blob_id = (await p.call("blob.add", str(first)))["id"]
            add_seconds.append(time.perf_counter() - began)
            note(f"added on {p.name} in {add_seconds[-1]:.2f}s")
        report["add_seconds_per_provider"] = add_seconds
        report["load_average_1min"] = os.getloadavg()[0]
        async with in_ram_node(nodes[0]) as ram_fetcher:
            cases = (
                ("one_provider", fetcher, providers[:1], True),
                ("three_providers", fetcher, providers, True),
                ("one_provider_libp2p_streams_only", fetcher, providers[:1], False),
                # The same fetch into a chunk store on tmpfs: the network and CPU side alone.
                ("one_provider_store_in_ram", ram_fetcher, providers[:1], True),
            )
            # The first fetch into a node runs on page-cache pages this VM touches for the first
            # time (the host backs guest memory lazily; seen here up to 2x slower): reported
            # apart, and not counted as a case.
            for label, into in (("warmup_fetch", fetcher), ("warmup_fetch_ram", ram_fetcher)):
                case = await fetch_case(into, blob_id, providers[:1], base / "warmup.bin", True, 1)
                assert case.pop("out") == data
                report[label] = {"mib_s": case["mib_s"]}
                note(f"{label}: {case['mib_s']:.0f} MiB/s")
            for label, into, srcs, channel in cases:
                out = base / f"out-{label}.bin"
                # libp2p streams alone take ~7 s per run: once is enough to see the gap.
                case = await fetch_case(
                    into, blob_id, srcs, out, channel, repeats if channel else 1
                )
                assert case.pop("out") == data
                case["ratio_to_raw_tcp"] = raw / case["transfer_seconds"]
                case["ratio_to_raw_tcp_median"] = raw / (data_mib / case["mib_s_median"])
                case["ratio_to_raw_tcp_to_disk"] = raw_disk / case["transfer_seconds"]
                note(
                    f"{label}: {case['mib_s']:.0f} MiB/s (median {case['mib_s_median']:.0f}),"
                    f" {case['ratio_to_raw_tcp']:.2f}x raw TCP"
                )
                report[label] = case
        second_id = (await providers[0].call("blob.add", str(second)))["id"]
        out = base / "out-second.bin"
        result = await get(fetcher, second_id, [providers[0].addrs[0]], out)
        assert out.read_bytes() == second_data
        report["second_blob_90pct_shared"] = {
            "bytes_total": result["bytes_total"],
            "bytes_fetched": result["bytes_fetched"],
            "bytes_present": result["bytes_present"],
            "fetched_fraction": result["bytes_fetched"] / result["bytes_total"],
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per fetch case (best reported)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-transfer-") as tmp:
        os.chmod(tmp, 0o700)
        report = trio.run(run, args.mib, Path(tmp), args.repeats)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
