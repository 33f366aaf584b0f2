from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from catalog.chunk_store import ChunkStore
from catalog.chunking import ChunkId, SpooledChunk, hash_chunk
from catalog.errors import (
    ChunkCorruptError,
    MissingChunkError,
    QuotaExceededError,
    StoreLockedError,
)
from tests.catalog.conftest import random_bytes

REPO = Path(__file__).resolve().parents[2]


async def test_put_get_roundtrip_and_one_copy(store: ChunkStore) -> None:
    data = b"hello chunk"
    chunk_id = await store.put(data)
    assert chunk_id == hash_chunk(data)
    assert await store.put(data) == chunk_id  # second put: no second copy
    assert await store.get(chunk_id) == data
    usage = await store.usage()
    assert (usage.chunk_count, usage.used_bytes) == (1, len(data))
    assert store.path_of(chunk_id).read_bytes() == data
    assert (await store.check()).ok


async def test_put_refuses_bytes_that_do_not_match_the_expected_id(store: ChunkStore) -> None:
    with pytest.raises(ChunkCorruptError):
        await store.put(b"evil", expected=hash_chunk(b"good"))
    assert (await store.usage()).chunk_count == 0


async def test_put_many_reverifies_unless_the_caller_vouches(store: ChunkStore) -> None:
    data = b"bytes the caller hashed"
    with store.pins() as pins, pytest.raises(ChunkCorruptError):
        await store.put_many([(hash_chunk(b"something else"), data)], pins=pins)
    assert (await store.usage()).chunk_count == 0
    # verified=True skips that pass (a fetch's plan hashed these buffers already); if a caller
    # vouches falsely, verify-on-read still refuses the bytes and takes the chunk out.
    wrong_id = hash_chunk(b"something else")
    with store.pins() as pins:
        await store.put_many([(wrong_id, data)], pins=pins, verified=True)
    with pytest.raises(ChunkCorruptError):
        await store.get(wrong_id)
    assert await store.present([wrong_id]) == set()


async def test_open_file_is_the_chunk_as_stored(store: ChunkStore) -> None:
    data = random_bytes(300_000, 3)
    chunk_id = await store.put(data)
    fd, size = await store.open_file(chunk_id)
    try:
        assert size == len(data)
        assert os.pread(fd, size + 1, 0) == data
    finally:
        store.close_file(chunk_id, fd)
    with pytest.raises(MissingChunkError):
        await store.open_file(hash_chunk(b"nope"))


async def test_gc_never_recycles_a_file_that_is_being_sent(store: ChunkStore) -> None:
    data = random_bytes(5000, 1)
    chunk_id = await store.put(data)
    fd, size = await store.open_file(chunk_id)
    try:
        assert (await store.gc()).chunks_freed == 1  # dropped while a peer is being sent it
        assert list((store.root / "free").iterdir()) == []  # unlinked, not pooled for reuse
        await store.put(random_bytes(5000, 2))
        assert os.pread(fd, size, 0) == data  # the send goes on with the bytes it started
    finally:
        store.close_file(chunk_id, fd)
    other = await store.put(random_bytes(5000, 3))
    assert (await store.gc()).chunks_freed == 2  # nothing open now: both pooled
    assert len(list((store.root / "free").iterdir())) == 2
    assert not await store.has(other)


async def test_scrub_quarantines_rotted_chunks_only(store: ChunkStore) -> None:
    good = await store.put(random_bytes(5000, 1))
    rotted = await store.put(random_bytes(5000, 2))
    path = store.path_of(rotted)
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0x01  # one bit flipped on disk
    path.write_bytes(bytes(raw))
    report = await store.scrub()
    assert report.corrupt == [rotted.hex()]
    assert await store.present([good, rotted]) == {good}  # never served again
    assert (store.root / "corrupt" / rotted.hex()).exists()  # kept for a post-mortem
    assert (await store.scrub()).ok


def spool(store: ChunkStore, data: bytes) -> tuple[ChunkId, SpooledChunk]:
    chunk_id = hash_chunk(data)
    path = store.spool_dir / f"{chunk_id.hex()}.{len(list(store.spool_dir.iterdir()))}"
    path.write_bytes(data)
    return chunk_id, SpooledChunk(path, len(data), chunk_id)


async def test_adopt_many_names_spooled_files_and_consumes_every_one(store: ChunkStore) -> None:
    here = await store.put(random_bytes(3000, 1))
    a, b = random_bytes(4000, 2), random_bytes(5000, 3)
    batch = [spool(store, a), spool(store, b), spool(store, a), spool(store, random_bytes(3000, 1))]
    with store.pins() as pins:
        await store.adopt_many(batch, pins=pins)
    assert await store.present([hash_chunk(a), hash_chunk(b), here]) == {
        hash_chunk(a),
        hash_chunk(b),
        here,
    }
    assert await store.get(hash_chunk(b)) == b
    assert list(store.spool_dir.iterdir()) == []  # adopted, or deleted as a duplicate
    assert (await store.check()).ok


async def test_adopt_many_over_quota_deletes_the_spooled_files(tmp_path: Path) -> None:
    async with ChunkStore.open(tmp_path / "q", quota_bytes=6000) as store:
        batch = [spool(store, random_bytes(4000, 1)), spool(store, random_bytes(4000, 2))]
        with store.pins() as pins, pytest.raises(QuotaExceededError):
            await store.adopt_many(batch, pins=pins)
        assert (await store.usage()).chunk_count == 0
        assert list(store.spool_dir.iterdir()) == []


async def test_get_unknown_chunk(store: ChunkStore) -> None:
    with pytest.raises(MissingChunkError):
        await store.get(hash_chunk(b"nope"))


async def test_verify_on_read_detects_a_flipped_byte(store: ChunkStore) -> None:
    data = random_bytes(5000)
    chunk_id = await store.put(data)
    path = store.path_of(chunk_id)
    raw = bytearray(path.read_bytes())
    raw[1234] ^= 0x01
    path.write_bytes(bytes(raw))
    assert await store.get(chunk_id, verify=False) == bytes(raw)  # the unverified path sees it
    with pytest.raises(ChunkCorruptError):
        await store.get(chunk_id)
    # Quarantined: never served again, no longer counted as present.
    assert not await store.has(chunk_id)
    assert (store.root / "corrupt" / chunk_id.hex()).exists()
    assert (await store.check()).ok


async def test_gc_frees_exactly_unreferenced_chunks(store: ChunkStore) -> None:
    a, b, c = [await store.put(x) for x in (b"a" * 10, b"b" * 20, b"c" * 30)]
    await store.db.transaction(lambda conn: ChunkStore.add_refs_in(conn, b"owner1", [a, b]))
    await store.db.transaction(lambda conn: ChunkStore.add_refs_in(conn, b"owner2", [b]))
    assert [await store.refcount(x) for x in (a, b, c)] == [1, 2, 0]
    result = await store.gc()
    assert (result.chunks_freed, result.bytes_freed) == (1, 30)
    assert await store.present([a, b, c]) == {a, b}
    await store.db.transaction(lambda conn: ChunkStore.drop_refs_in(conn, b"owner1"))
    assert (await store.gc()).chunks_freed == 1
    assert await store.present([a, b, c]) == {b}
    assert not store.path_of(a).exists()
    assert (await store.check()).ok


async def test_gc_keeps_the_freed_files_empty_for_the_next_writes(tmp_path: Path) -> None:
    async with ChunkStore.open(tmp_path / "store") as store:
        old = [await store.put(random_bytes(5000, i)) for i in range(3)]
        inodes = {store.path_of(chunk_id).stat().st_ino for chunk_id in old}
        assert (await store.gc()).chunks_freed == 3
        pooled = list((tmp_path / "store" / "free").iterdir())
        assert [p.stat().st_size for p in pooled] == [0, 0, 0]  # no data, no disk blocks
        assert (await store.usage()).used_bytes == 0
        new = await store.put(b"new bytes")  # written into a recycled file
        path, fd = store.spool.open(hash_chunk(b"spooled"))  # so is a spool file
        os.close(fd)
        assert {store.path_of(new).stat().st_ino, path.stat().st_ino} <= inodes
        path.unlink()
        assert await store.get(new) == b"new bytes"
        assert (await store.check()).ok  # the pool is neither stray nor temp files
    async with ChunkStore.open(tmp_path / "store") as again:  # the rest is found again
        assert len(list((tmp_path / "store" / "free").iterdir())) == 1
        assert again.path_of(await again.put(b"more")).stat().st_ino in inodes


async def test_gc_spares_pinned_chunks(store: ChunkStore) -> None:
    with store.pins() as pins:
        data = b"in flight"
        await store.put_many([(hash_chunk(data), data)], pins=pins)
        assert (await store.gc()).chunks_freed == 0
    assert (await store.gc()).chunks_freed == 1


async def test_quota_error_is_clear_and_stores_nothing(tmp_path: Path) -> None:
    async with ChunkStore.open(tmp_path / "q", quota_bytes=100) as store:
        await store.put(b"x" * 60)
        with pytest.raises(QuotaExceededError) as info:
            await store.put(b"y" * 50)
        err = info.value
        assert (err.used, err.needed, err.quota) == (60, 50, 100)
        assert "60 bytes used + 50 bytes needed > quota of 100 bytes" in str(err)
        await store.put(b"x" * 60)  # already present: costs nothing, allowed
        usage = await store.usage()
        assert (usage.used_bytes, usage.chunk_count) == (60, 1)
        assert (await store.check()).ok


async def test_second_open_is_refused(tmp_path: Path) -> None:
    async with ChunkStore.open(tmp_path / "s"):
        with pytest.raises(StoreLockedError):
            async with ChunkStore.open(tmp_path / "s"):
                pass


async def test_concurrent_puts_of_the_same_chunk(store: ChunkStore) -> None:
    data = random_bytes(100_000, 5)
    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(store.put, data)
    assert (await store.usage()).chunk_count == 1
    assert (await store.check()).ok


# A child process that writes one chunk, then dies (SIGKILL from the test) half-way through
# writing a second: the kill lands between two writes of the same file, deterministically.
CRASHER = """
import os, random, sys
from pathlib import Path
from typing import Any
import trio
import catalog.chunk_files as chunk_files
import catalog.chunk_store as cs

def half_then_wait(fd, data):
    view = memoryview(data)
    os.write(fd, view[: len(view) // 2])
    os.fsync(fd)
    print("MID", flush=True)
    sys.stdin.read()  # never returns: the parent kills us here

async def main():
    async with cs.ChunkStore.open(Path(sys.argv[1])) as store:
        await store.put(b"first" * 1000)
        chunk_files._write_all = half_then_wait
        await store.put(random.Random(9).randbytes(200_000))

trio.run(main)
"""


def test_crash_mid_write_leaves_no_partial_chunk(tmp_path: Path) -> None:
    root = tmp_path / "chunks"
    second = random_bytes(200_000, 9)  # the same bytes the child writes
    second_id = hash_chunk(second)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", CRASHER, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        cwd=REPO,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"MID\n"
    finally:
        child.kill()
        child.wait()
    # Killed mid-write: the half file is only under tmp/, never under its final name.
    final = root / second_id.hex()[:2] / second_id.hex()
    assert not final.exists()
    assert [p.stat().st_size for p in (root / "tmp").iterdir()] == [100_000]
    with sqlite3.connect(root / "index.db") as conn:
        states = sorted(row[0] for row in conn.execute("SELECT state FROM chunks"))
    assert states == [0, 1]  # one WRITING row left behind by the crash

    async def reopen() -> None:
        async with ChunkStore.open(root) as store:
            report = await store.check()
            assert report.ok, report
            assert await store.has(hash_chunk(b"first" * 1000))
            assert not await store.has(second_id)
            assert (await store.usage()).chunk_count == 1
            await store.put(second)  # and the store works again
            assert await store.get(second_id) == second

    trio.run(reopen)


@pytest.mark.parametrize("cancel_at", range(1, 16))
async def test_cancel_at_every_thread_hop_leaves_store_consistent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cancel_at: int
) -> None:
    chunks = [random_bytes(3000, i) for i in range(5)]
    async with ChunkStore.open(tmp_path / "c") as store:
        original = trio.to_thread.run_sync
        calls = 0
        with trio.CancelScope() as scope:

            async def counting(*args: Any, **kwargs: Any) -> Any:
                nonlocal calls
                calls += 1
                if calls == cancel_at:
                    scope.cancel()
                return await original(*args, **kwargs)

            monkeypatch.setattr(trio.to_thread, "run_sync", counting)
            with store.pins() as pins:
                await store.put_many([(hash_chunk(c), c) for c in chunks], pins=pins)
        monkeypatch.undo()
        report = await store.check()
        assert report.ok, report
        assert (await store.usage()).chunk_count in (0, 5)
        assert (await store.usage()).chunk_count == 5 or scope.cancelled_caught


async def test_reopen_finishes_an_interrupted_gc_and_reservation(tmp_path: Path) -> None:
    root = tmp_path / "chunks"
    async with ChunkStore.open(root) as store:
        doomed = await store.put(b"doomed" * 100)
        kept = await store.put(b"kept" * 100)
        reserved = hash_chunk(b"never written")
    # What a crash leaves: a gc that marked a chunk DELETING but did not unlink it, and a
    # reservation whose file never got its final name.
    with sqlite3.connect(root / "index.db") as conn:
        conn.execute("UPDATE chunks SET state = 2 WHERE id = ?", (doomed,))
        conn.execute("INSERT INTO chunks (id, size, state) VALUES (?, 13, 0)", (reserved,))
    async with ChunkStore.open(root) as store:
        assert (await store.check()).ok
        assert await store.present([doomed, kept, reserved]) == {kept}
        assert not store.path_of(doomed).exists()
        assert (await store.usage()).used_bytes == 400
