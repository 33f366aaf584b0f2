from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from catalog.blob import (
    MAX_BLOB_CHUNKS,
    BlobId,
    BlobStore,
    ChunkRef,
    Manifest,
    parse_blob_id,
)
from catalog.chunk_store import ChunkStore
from catalog.chunking import MIB, ChunkId, hash_chunk
from catalog.errors import (
    ChunkCorruptError,
    FileAccessError,
    IncompleteBlobError,
    InvalidIdError,
    ManifestError,
    QuotaExceededError,
    UnknownBlobError,
)
from tests.catalog.conftest import SMALL, random_bytes


async def roundtrip(blobs: BlobStore, tmp_path: Path, data: bytes) -> BlobId:
    src = tmp_path / "src"
    src.write_bytes(data)
    blob_id = await blobs.add_file(src)
    out = tmp_path / "out"
    await blobs.export(blob_id, out)
    assert out.read_bytes() == data
    assert not (tmp_path / "out.part").exists()
    return blob_id


@pytest.mark.parametrize("size", [0, 1, 5 * MIB + 123])
async def test_add_file_export_roundtrip(blobs: BlobStore, tmp_path: Path, size: int) -> None:
    data = random_bytes(size, size)
    blob_id = await roundtrip(blobs, tmp_path, data)
    manifest = await blobs.manifest(blob_id)
    assert manifest.total_size == size
    assert blob_id == manifest.blob_id
    assert await blobs.add_bytes(data) == blob_id  # same bytes, same ID, file or buffer
    [info] = await blobs.ls()
    assert (info.blob_id, info.size, info.complete) == (blob_id, size, True)
    assert (await blobs.chunks.check()).ok


async def test_progress_is_reported_per_batch(blobs: BlobStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(random_bytes(300_000))
    seen: list[tuple[int, int]] = []
    await blobs.add_file(src, progress=lambda done, total: seen.append((done, total)))
    assert len(seen) >= 4
    assert seen[-1] == (300_000, 300_000)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


async def test_dedup_two_blobs_sharing_content_store_one_copy(blobs: BlobStore) -> None:
    common = random_bytes(400_000, 1)
    a = await blobs.add_bytes(common + random_bytes(50_000, 2))
    used_after_a = (await blobs.chunks.usage()).used_bytes
    b = await blobs.add_bytes(random_bytes(50_000, 3) + common)
    used_after_b = (await blobs.chunks.usage()).used_bytes
    # b's new bytes are its own head plus a chunk or two around the seam.
    assert used_after_b - used_after_a < 50_000 + 3 * SMALL.max_size
    shared = set((await blobs.manifest(a)).distinct_ids()) & set(
        (await blobs.manifest(b)).distinct_ids()
    )
    assert len(shared) > 50
    assert all([await blobs.chunks.refcount(c) == 2 for c in shared])
    # Remove a: gc frees a's own chunks only; b still exports.
    await blobs.rm(a)
    freed = await blobs.gc()
    assert freed.chunks_freed > 0
    assert (await blobs.chunks.usage()).used_bytes == sum(
        ref.size for ref in {r.chunk_id: r for r in (await blobs.manifest(b)).chunks}.values()
    )
    assert await blobs.missing(b) == []
    await blobs.rm(b)
    await blobs.gc()
    assert (await blobs.chunks.usage()).chunk_count == 0
    assert (await blobs.chunks.check()).ok


async def test_repeated_chunk_is_stored_and_referenced_once(blobs: BlobStore) -> None:
    # Zeros never trigger a content-defined cut: ten identical max-size chunks.
    blob_id = await blobs.add_bytes(bytes(SMALL.max_size * 10))
    manifest = await blobs.manifest(blob_id)
    assert len(manifest.chunks) == 10
    assert len(manifest.distinct_ids()) == 1
    assert (await blobs.chunks.usage()).chunk_count == 1
    assert await blobs.chunks.refcount(manifest.chunks[0].chunk_id) == 1


async def test_rm_and_export_unknown_blob(blobs: BlobStore, tmp_path: Path) -> None:
    unknown = BlobId(b"\x00" * 32)
    with pytest.raises(UnknownBlobError):
        await blobs.rm(unknown)
    with pytest.raises(UnknownBlobError):
        await blobs.export(unknown, tmp_path / "x")


async def test_export_detects_a_flipped_byte(blobs: BlobStore, tmp_path: Path) -> None:
    blob_id = await blobs.add_bytes(random_bytes(200_000, 6))
    victim = (await blobs.manifest(blob_id)).chunks[3].chunk_id
    path = blobs.chunks.path_of(victim)
    raw = bytearray(path.read_bytes())
    raw[0] ^= 0x80
    path.write_bytes(bytes(raw))
    with pytest.raises(ChunkCorruptError):
        await blobs.export(blob_id, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "out.part").exists()
    [info] = await blobs.ls()
    assert info.missing_chunks == 1  # quarantined, so a later fetch can repair the blob
    with pytest.raises(IncompleteBlobError):
        await blobs.export(blob_id, tmp_path / "out")


async def test_quota_exceeded_during_add_leaves_store_as_it_was(tmp_path: Path) -> None:
    async with ChunkStore.open(tmp_path / "q", quota_bytes=300_000) as store:
        blobs = BlobStore(store, params=SMALL, batch_bytes=64 * 1024)
        first = await blobs.add_bytes(random_bytes(100_000, 1))
        before = await store.usage()
        src = tmp_path / "big"
        src.write_bytes(random_bytes(400_000, 2))
        with pytest.raises(QuotaExceededError) as info:
            await blobs.add_file(src)
        assert info.value.quota == 300_000
        assert info.value.used + info.value.needed > 300_000
        assert await store.usage() == before  # the batches that fitted were taken back
        assert [i.blob_id for i in await blobs.ls()] == [first]
        assert (await store.check()).ok


async def test_cancelled_add_takes_back_its_chunks(blobs: BlobStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(random_bytes(500_000))
    with trio.CancelScope() as scope:
        await blobs.add_file(src, progress=lambda done, total: scope.cancel())
    assert scope.cancelled_caught
    assert (await blobs.chunks.usage()).chunk_count == 0
    assert await blobs.ls() == []


async def test_begin_fetch_records_incomplete_blob_and_reports_present(blobs: BlobStore) -> None:
    data = [random_bytes(3000, i) for i in range(4)]
    manifest = Manifest(tuple(ChunkRef(hash_chunk(d), len(d)) for d in data))
    await blobs.chunks.put(data[1])
    present = await blobs.begin_fetch(manifest)
    assert present == {hash_chunk(data[1])}
    [info] = await blobs.ls()
    assert (info.complete, info.missing_chunks) == (False, 3)
    assert await blobs.have_positions(manifest.blob_id) == [1]
    assert (await blobs.gc()).chunks_freed == 0  # the incomplete blob holds its chunks
    for d in data:
        await blobs.chunks.put(d, expected=hash_chunk(d))
    assert await blobs.missing(manifest.blob_id) == []


@settings(derandomize=True, deadline=None)  # same examples every run, no timing
@given(sizes=st.lists(st.integers(1, 4 * MIB), max_size=20), seed=st.integers(0, 255))
def test_manifest_decode_inverts_encode(sizes: list[int], seed: int) -> None:
    refs = tuple(ChunkRef(ChunkId(bytes([seed, i]) * 16), s) for i, s in enumerate(sizes))
    manifest = Manifest(refs)
    assert Manifest.decode(manifest.encoded, expected=manifest.blob_id) == manifest


def test_manifest_rejects_tampering() -> None:
    manifest = Manifest((ChunkRef(hash_chunk(b"x"), 1),))
    with pytest.raises(ManifestError):
        Manifest.decode(manifest.encoded, expected=BlobId(b"\x01" * 32))
    with pytest.raises(ManifestError):
        Manifest.decode(b"\x93\x01\x05\x90")  # total size 5 with no chunks
    with pytest.raises(ManifestError):
        Manifest.decode(b"\xc1garbage")


@pytest.mark.parametrize("cancel_at", range(1, 30, 2))
async def test_cancel_add_at_every_thread_hop(
    blobs: BlobStore, monkeypatch: pytest.MonkeyPatch, cancel_at: int
) -> None:
    data = random_bytes(150_000, 8)  # three batches of ~64 KiB
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
        await blobs.add_bytes(data)
    monkeypatch.undo()
    assert (await blobs.chunks.check()).ok
    listed = await blobs.ls()
    if scope.cancelled_caught:
        assert listed == []
        assert (await blobs.chunks.usage()).chunk_count == 0
    else:
        assert [i.complete for i in listed] == [True]


# Blobs made of "pieces" that are each exactly one max-size chunk of zeros-with-a-tag, so which
# chunks a blob uses is known without running the chunker.
def piece(tag: int) -> bytes:
    block = bytearray(SMALL.max_size)
    block[0] = tag
    return bytes(block)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.lists(st.integers(0, 7), min_size=1, max_size=5)),
        st.tuples(st.just("rm"), st.integers(0, 9)),
        st.tuples(st.just("gc"), st.just(0)),
    ),
    max_size=12,
)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(ops)
def test_refcounts_and_gc_match_a_model(steps: list[tuple[str, Any]]) -> None:
    async def run(root: Path) -> None:
        async with ChunkStore.open(root) as store:
            blobs = BlobStore(store, params=SMALL)
            live: dict[BlobId, set[ChunkId]] = {}
            added: list[BlobId] = []
            for op, arg in steps:
                if op == "add":
                    blob_id = await blobs.add_bytes(b"".join(piece(t) for t in arg))
                    live[blob_id] = {hash_chunk(piece(t)) for t in arg}
                    added.append(blob_id)
                elif op == "rm" and arg < len(added):
                    if added[arg] in live:
                        await blobs.rm(added[arg])
                        del live[added[arg]]
                    else:
                        with pytest.raises(UnknownBlobError):
                            await blobs.rm(added[arg])
                else:
                    await blobs.gc()
                    wanted = set().union(*live.values())
                    every = {hash_chunk(piece(t)) for t in range(8)}
                    assert await store.present(every) == wanted
                for chunk_id in {hash_chunk(piece(t)) for t in range(8)}:
                    users = sum(chunk_id in chunks for chunks in live.values())
                    assert await store.refcount(chunk_id) == users
            assert (await store.check()).ok

    with tempfile.TemporaryDirectory() as tmp:
        trio.run(run, Path(tmp) / "chunks")


async def test_file_truncated_during_add_does_not_kill_the_process(
    blobs: BlobStore, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    data = random_bytes(400_000, 11)
    src.write_bytes(data)
    blob_id = await blobs.add_file(src, progress=lambda done, total: os.truncate(src, 1000))
    out = tmp_path / "out"
    await blobs.export(blob_id, out)
    got = out.read_bytes()
    assert data.startswith(got)  # what was read before the truncation, nothing invented


async def test_unreadable_and_unwritable_paths_are_typed_errors(
    blobs: BlobStore, tmp_path: Path
) -> None:
    with pytest.raises(FileAccessError, match="cannot read"):
        await blobs.add_file(tmp_path / "absent")
    with pytest.raises(FileAccessError, match="cannot read"):
        await blobs.add_file(tmp_path)  # a directory
    blob_id = await blobs.add_bytes(b"x")
    with pytest.raises(FileAccessError, match="cannot write"):
        await blobs.export(blob_id, tmp_path / "no" / "such" / "dir")


async def test_begin_fetch_refuses_up_front_when_missing_bytes_exceed_quota(tmp_path: Path) -> None:
    data = [random_bytes(3000, i) for i in range(4)]
    manifest = Manifest(tuple(ChunkRef(hash_chunk(d), len(d)) for d in data))
    async with ChunkStore.open(tmp_path / "q", quota_bytes=10_000) as store:
        blobs = BlobStore(store)
        await store.put(data[0])  # present chunks cost nothing: 9,000 bytes still needed
        await store.put(random_bytes(2000, 99))  # unrelated: 5,000 used in all
        with pytest.raises(QuotaExceededError) as info:
            await blobs.begin_fetch(manifest)
        assert (info.value.used, info.value.needed, info.value.quota) == (5000, 9000, 10_000)
        assert await blobs.ls() == []  # nothing recorded


def test_parse_blob_id() -> None:
    blob_id = Manifest(()).blob_id
    assert parse_blob_id(blob_id.hex()) == blob_id
    assert parse_blob_id(f"  {blob_id.hex().upper()}\n") == blob_id
    for bad in ("", "zz", blob_id.hex()[:-2], blob_id.hex() + "00"):
        with pytest.raises(InvalidIdError):
            parse_blob_id(bad)


def test_a_manifest_listing_more_chunks_than_allowed_is_refused_as_it_is_decoded() -> None:
    """Found by bench/fuzz.py: a 4 MiB manifest of a million ``[b"", 1]`` entries cost 1.4 s of
    CPU to build before the chunk count was checked; the decoder now stops at the count."""
    entries = [[b"", 1]] * (MAX_BLOB_CHUNKS + 1)
    data = msgpack.packb([1, MAX_BLOB_CHUNKS + 1, entries], use_bin_type=True)
    with pytest.raises(ManifestError, match="max_array_len"):
        Manifest.decode(data)
