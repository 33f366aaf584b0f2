"""Chunking and store throughput on one core, with baselines measured in the same run. Prints JSON.

    .venv/bin/python bench/chunking.py [--mib 256] [--runs 3]

Chunking: pyfastcdc (our parameters) with and without hashing, against fixed-size splitting hashed
with blake3 and with sha256, over the same pseudo-random buffer (blake3 XOF output, so it does not
compress or dedup). Store: ``BlobStore.add_file`` (chunk + hash + write each chunk with fsync +
index) against a plain copy of the same file with and without a final fsync, and a second add of
the same file (all chunks already present). The best of ``--runs`` is reported, in MB/s (10^6).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import blake3
import trio

from catalog.blob import BlobStore
from catalog.chunk_store import ChunkStore
from catalog.chunking import DEFAULT_PARAMS, MIB, Chunker


def best_rate(nbytes: int, runs: int, fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return round(nbytes / best / 1e6, 1)


def fixed_split(data: bytes, size: int, digest: Callable[[memoryview], bytes]) -> int:
    view = memoryview(data)
    return sum(1 for off in range(0, len(view), size) if digest(view[off : off + size]))


def chunking(data: bytes, runs: int) -> dict[str, object]:
    chunker = Chunker(DEFAULT_PARAMS)
    n = len(data)
    chunks = chunker.boundaries(data)
    return {
        "chunks": len(chunks),
        "mean_chunk_bytes": n // max(len(chunks), 1),
        "fastcdc_cut_only": best_rate(n, runs, lambda: chunker.boundaries(data)),
        "fastcdc_blake3": best_rate(
            n, runs, lambda: [blake3.blake3(c).digest() for c in chunker.cut(data)]
        ),
        "fastcdc_sha256": best_rate(
            n, runs, lambda: [hashlib.sha256(c).digest() for c in chunker.cut(data)]
        ),
        "fixed_1mib_blake3": best_rate(
            n, runs, lambda: fixed_split(data, MIB, lambda v: blake3.blake3(v).digest())
        ),
        "fixed_1mib_sha256": best_rate(
            n, runs, lambda: fixed_split(data, MIB, lambda v: hashlib.sha256(v).digest())
        ),
    }


def copy_file(src: Path, dst: Path, fsync: bool) -> None:
    shutil.copyfile(src, dst)
    if fsync:
        fd = os.open(dst, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


async def add_file_once(root: Path, src: Path, twice: bool) -> tuple[float, float]:
    async with ChunkStore.open(root) as store:
        blobs = BlobStore(store)
        start = time.perf_counter()
        await blobs.add_file(src)
        first = time.perf_counter() - start
        start = time.perf_counter()
        if twice:
            await blobs.add_file(src)
        return first, time.perf_counter() - start


def store(data: bytes, runs: int, workdir: Path) -> dict[str, object]:
    src = workdir / "src.bin"
    src.write_bytes(data)
    n = len(data)
    out: dict[str, object] = {
        "plain_copy": best_rate(n, runs, lambda: copy_file(src, workdir / "copy", False)),
        "plain_copy_fsync": best_rate(n, runs, lambda: copy_file(src, workdir / "copy", True)),
    }
    firsts, seconds = [], []
    for run in range(runs):
        root = workdir / f"store{run}"
        first, second = trio.run(add_file_once, root, src, True)
        firsts.append(first)
        seconds.append(second)
        shutil.rmtree(root)
    out["add_file_new"] = round(n / min(firsts) / 1e6, 1)
    out["add_file_again_dedup"] = round(n / min(seconds) / 1e6, 1)
    out["add_file_vs_copy_fsync"] = round(
        float(out["add_file_new"]) / float(out["plain_copy_fsync"]),
        2,  # type: ignore[arg-type]
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: tmp)")
    args = parser.parse_args(argv)
    data = blake3.blake3(b"vmlend bench").digest(length=args.mib * MIB)
    result: dict[str, object] = {
        "bench": "chunking",
        "unit": "MB/s (10^6 bytes), one core, best of runs",
        "bytes": len(data),
        "runs": args.runs,
        "params": {
            "min": DEFAULT_PARAMS.min_size,
            "avg": DEFAULT_PARAMS.avg_size,
            "max": DEFAULT_PARAMS.max_size,
        },
        "chunking": chunking(data, args.runs),
    }
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        result["store"] = store(data, args.runs, Path(tmp))
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
