"""Blobs: ordered lists of chunks, named by the hash of their canonical manifest.

A manifest is the msgpack array ``[1, total_size, [[chunk_id, size], ...]]`` (format version,
bytes, chunks in order). Its encoding is canonical (one byte string per manifest, checked on
decode), so the blob ID, blake3 of those bytes, verifies a manifest fetched from anyone, and the
chunk IDs inside it verify every chunk. A blob references each distinct chunk once; a chunk
shared by several blobs is stored once (see :mod:`catalog.chunk_store`).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NewType

import blake3
import msgpack
import trio

from catalog.chunk_files import Buffer
from catalog.chunk_store import ChunkStore, GcResult
from catalog.chunking import (
    DEFAULT_PARAMS,
    ID_SIZE,
    MAX_CHUNK_SIZE,
    MIB,
    Chunker,
    ChunkId,
    ChunkParams,
    hash_chunk,
)
from catalog.errors import (
    CatalogError,
    ChunkCorruptError,
    FileAccessError,
    IncompleteBlobError,
    InvalidIdError,
    ManifestError,
    QuotaExceededError,
    UnknownBlobError,
)
from node.supervise import one_error

log = logging.getLogger("vmlend.catalog.blob")

BlobId = NewType("BlobId", bytes)
"""The 32-byte blake3 digest of a blob's canonical manifest."""

MANIFEST_VERSION = 1
MAX_BLOB_CHUNKS = 100_000
"""At ~1.25 MiB per chunk that is ~120 GiB per blob, and a manifest of ~4 MiB (one frame)."""
MAX_MANIFEST_SIZE = MAX_CHUNK_SIZE

BATCH_BYTES = 64 * MIB
"""Bytes handled per worker-thread call: big enough to amortise the hop, small enough that a
cancel or a progress report is never far away."""


def parse_blob_id(text: str) -> BlobId:
    """A blob ID from its hex form (as ``vmlend blob add`` prints it)."""
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        raw = b""
    if len(raw) != ID_SIZE:
        raise InvalidIdError(f"not a blob ID (want {2 * ID_SIZE} hex digits): {text[:80]!r}")
    return BlobId(raw)


@dataclass(frozen=True, slots=True)
class ChunkRef:
    chunk_id: ChunkId
    size: int


@dataclass(frozen=True, slots=True)
class Manifest:
    """The chunks of a blob, in order. ``encoded`` and ``blob_id`` are derived."""

    chunks: tuple[ChunkRef, ...]
    total_size: int = field(init=False)
    encoded: bytes = field(init=False, repr=False)
    blob_id: BlobId = field(init=False)

    def __post_init__(self) -> None:
        if len(self.chunks) > MAX_BLOB_CHUNKS:
            raise ManifestError(f"{len(self.chunks)} chunks; at most {MAX_BLOB_CHUNKS} allowed")
        for ref in self.chunks:
            if len(ref.chunk_id) != ID_SIZE or not 1 <= ref.size <= MAX_CHUNK_SIZE:
                raise ManifestError(f"bad chunk entry: {len(ref.chunk_id)}-byte ID, {ref.size} B")
        total = sum(ref.size for ref in self.chunks)
        encoded = msgpack.packb(
            [MANIFEST_VERSION, total, [[ref.chunk_id, ref.size] for ref in self.chunks]],
            use_bin_type=True,
        )
        object.__setattr__(self, "total_size", total)
        object.__setattr__(self, "encoded", encoded)
        object.__setattr__(self, "blob_id", BlobId(blake3.blake3(encoded).digest()))

    @classmethod
    def decode(cls, data: bytes, *, expected: BlobId | None = None) -> Manifest:
        """Parse manifest bytes; refuse anything non-canonical, oversized or not hashing to
        ``expected``."""
        if len(data) > MAX_MANIFEST_SIZE:
            raise ManifestError(f"manifest of {len(data)} bytes exceeds {MAX_MANIFEST_SIZE}")
        if expected is not None and blake3.blake3(data).digest() != expected:
            raise ManifestError(f"manifest bytes do not hash to blob {expected.hex()}")
        try:
            # Bounded at decode time: a 4 MiB manifest of a million tiny entries would
            # otherwise cost over a second of CPU to build before being refused.
            obj = msgpack.unpackb(
                data,
                raw=False,
                max_ext_len=0,
                strict_map_key=True,
                max_array_len=MAX_BLOB_CHUNKS,
                max_map_len=0,
            )
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as e:
            raise ManifestError(f"malformed manifest: {e}") from e
        if not (isinstance(obj, list) and len(obj) == 3 and obj[0] == MANIFEST_VERSION):
            raise ManifestError("manifest is not [1, size, chunks]")
        _, total, entries = obj
        if not isinstance(entries, list) or type(total) is not int:
            raise ManifestError("manifest size or chunk list has the wrong type")
        refs = []
        for entry in entries:
            if not (isinstance(entry, list) and len(entry) == 2):
                raise ManifestError("manifest chunk entry is not [id, size]")
            chunk_id, size = entry
            if not isinstance(chunk_id, bytes) or type(size) is not int:
                raise ManifestError("manifest chunk entry has the wrong types")
            refs.append(ChunkRef(ChunkId(chunk_id), size))
        manifest = cls(tuple(refs))
        if manifest.encoded != data:
            raise ManifestError("manifest is not in canonical form (or its size is wrong)")
        return manifest

    def distinct_ids(self) -> list[ChunkId]:
        """Each chunk ID once, in first-use order."""
        return list(dict.fromkeys(ref.chunk_id for ref in self.chunks))

    def sizes(self) -> dict[ChunkId, int]:
        return {ref.chunk_id: ref.size for ref in self.chunks}


@dataclass(frozen=True, slots=True)
class BlobInfo:
    blob_id: BlobId
    size: int
    chunk_count: int
    missing_chunks: int
    added_at: float  # wall clock, for display only

    @property
    def complete(self) -> bool:
        return self.missing_chunks == 0


ProgressFn = Callable[[int, int], None]
"""``(bytes_done, bytes_total)``."""


class BlobStore:
    """Adds, exports, lists and removes blobs in a :class:`ChunkStore`."""

    def __init__(
        self,
        chunks: ChunkStore,
        *,
        params: ChunkParams = DEFAULT_PARAMS,
        batch_bytes: int = BATCH_BYTES,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.chunks = chunks
        self._params = params
        self._batch_bytes = batch_bytes
        self._wall_clock = wall_clock

    # ----------------------------------------------------------------------------- adding

    async def add_file(self, path: Path, *, progress: ProgressFn | None = None) -> BlobId:
        """Chunk, store and record the file at ``path``; return its blob ID.

        Idempotent: adding the same bytes again stores nothing new and returns the same ID. On
        any failure (quota, I/O, cancel) the chunks this call wrote are removed again.
        """
        try:
            total = (await trio.to_thread.run_sync(path.stat)).st_size
            chunks = Chunker(self._params).cut_file(path)
            try:
                return await self._add(chunks, total, progress)
            finally:
                chunks.close()  # closes the file now, not whenever the generator is collected
        except OSError as e:  # the store maps its own I/O errors; these are about ``path``
            raise FileAccessError(f"cannot read {path}: {e.strerror}") from e

    async def add_bytes(self, data: bytes) -> BlobId:
        return await self._add(Chunker(self._params).cut(data), len(data), None)

    async def _add(
        self, source: Iterator[Buffer], total: int, progress: ProgressFn | None
    ) -> BlobId:
        refs: list[ChunkRef] = []
        done = 0
        send, receive = trio.open_memory_channel[list[tuple[ChunkId, Buffer]]](1)

        async def hash_ahead() -> None:
            # Cut and hash the next batch while the previous one is being written and fsynced.
            limit = self._batch_bytes
            async with send:
                while batch := await trio.to_thread.run_sync(_hash_batch, source, limit):
                    await send.send(batch)

        with self.chunks.pins() as pins:
            try:
                async with one_error(), trio.open_nursery() as nursery:
                    nursery.start_soon(hash_ahead)
                    async with receive:
                        async for batch in receive:
                            if len(refs) + len(batch) > MAX_BLOB_CHUNKS:
                                raise CatalogError(f"blob too large: over {MAX_BLOB_CHUNKS} chunks")
                            await self.chunks.put_many(batch, pins=pins, verified=True)
                            refs.extend(ChunkRef(chunk_id, len(data)) for chunk_id, data in batch)
                            done += sum(len(data) for _, data in batch)
                            if progress is not None:
                                progress(done, total)
                manifest = Manifest(tuple(refs))
                await self.chunks.db.transaction(lambda c: self._record(c, manifest))
            except BaseException:
                with trio.CancelScope(shield=True):
                    await self.chunks.discard_created(pins)
                raise
        log.info("added blob %s: %d bytes, %d chunks", manifest.blob_id.hex(), done, len(refs))
        return manifest.blob_id

    def _record(self, conn: sqlite3.Connection, manifest: Manifest) -> bool:
        """Insert the blob and its references; False if it was already there."""
        inserted = conn.execute(
            "INSERT OR IGNORE INTO blobs (id, manifest, size, chunk_count, added_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (
                manifest.blob_id,
                manifest.encoded,
                manifest.total_size,
                len(manifest.chunks),
                self._wall_clock(),
            ),
        ).rowcount
        ChunkStore.add_refs_in(conn, manifest.blob_id, manifest.distinct_ids())
        return bool(inserted)

    # ----------------------------------------------------------------------------- fetching

    async def begin_fetch(self, manifest: Manifest) -> set[ChunkId]:
        """Record a blob about to be fetched; return the chunks already on disk.

        The blob is listed (incomplete) and references all its chunks from now on, so what a
        transfer stores survives gc and a restart, and a resumed fetch asks only for the rest.
        Raises :class:`QuotaExceededError` up front if the missing chunks cannot fit.
        """
        present = await self.chunks.present(manifest.distinct_ids())
        sizes = manifest.sizes()
        needed = sum(size for chunk_id, size in sizes.items() if chunk_id not in present)
        quota = self.chunks.quota_bytes

        def op(conn: sqlite3.Connection) -> None:
            if quota is not None and needed:
                used = conn.execute("SELECT COALESCE(SUM(size), 0) FROM chunks").fetchone()[0]
                if used + needed > quota:
                    raise QuotaExceededError(used=used, needed=needed, quota=quota)
            self._record(conn, manifest)

        await self.chunks.db.transaction(op)
        return present

    async def missing(self, blob_id: BlobId) -> list[ChunkId]:
        manifest = await self.manifest(blob_id)
        present = await self.chunks.present(manifest.distinct_ids())
        return [chunk_id for chunk_id in manifest.distinct_ids() if chunk_id not in present]

    async def have_positions(self, blob_id: BlobId) -> list[int]:
        """Indices into the manifest's chunk list that this store can serve (for a HaveResponse)."""
        manifest = await self.manifest(blob_id)
        present = await self.chunks.present(manifest.distinct_ids())
        return [i for i, ref in enumerate(manifest.chunks) if ref.chunk_id in present]

    # ----------------------------------------------------------------------------- reading

    async def manifest(self, blob_id: BlobId) -> Manifest:
        row = await self.chunks.db.fetchone("SELECT manifest FROM blobs WHERE id = ?", (blob_id,))
        if row is None:
            raise UnknownBlobError(blob_id.hex())
        return Manifest.decode(bytes(row[0]), expected=blob_id)

    async def export(self, blob_id: BlobId, out_path: Path, *, verify: bool | None = None) -> None:
        """Write the blob's bytes to ``out_path``, streaming chunk by chunk.

        The file appears complete or not at all (written to ``<out>.part``, fsynced, renamed).
        Every chunk is verified unless ``verify`` (or the store's default) says not; a corrupt one
        is quarantined and raises :class:`ChunkCorruptError`.
        """
        manifest = await self.manifest(blob_id)
        missing = await self.missing(blob_id)
        if missing:
            raise IncompleteBlobError(blob_id.hex(), len(missing))
        check = self.chunks.verify_on_read if verify is None else verify
        part = out_path.with_name(out_path.name + ".part")
        try:
            await self._export_to(manifest, part, check)
            await trio.to_thread.run_sync(os.replace, part, out_path)
        except OSError as e:
            raise FileAccessError(f"cannot write {out_path}: {e.strerror}") from e

    async def _export_to(self, manifest: Manifest, part: Path, check: bool) -> None:
        fd = await trio.to_thread.run_sync(
            lambda: os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        )
        try:
            for batch in _ref_batches(manifest.chunks, self._batch_bytes):
                try:
                    await trio.to_thread.run_sync(self._export_batch, fd, batch, check)
                except ChunkCorruptError as e:
                    await self.chunks.quarantine(ChunkId(bytes.fromhex(e.chunk_id_hex)))
                    raise
            await trio.to_thread.run_sync(os.fsync, fd)
        except BaseException:
            with trio.CancelScope(shield=True):  # leave no half-written .part behind
                await trio.to_thread.run_sync(_close_and_unlink, fd, part)
            raise
        os.close(fd)

    def _export_batch(self, fd: int, refs: list[ChunkRef], verify: bool) -> None:
        for ref in refs:
            data = self.chunks.read_sync(ref.chunk_id, verify)
            if len(data) != ref.size:
                raise ChunkCorruptError(ref.chunk_id.hex(), f"{len(data)} bytes, want {ref.size}")
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]

    async def ls(self) -> list[BlobInfo]:
        rows = await self.chunks.db.fetchall(
            "SELECT b.id, b.size, b.chunk_count, b.added_at, "
            "(SELECT COUNT(*) FROM chunk_refs r LEFT JOIN chunks c "
            " ON c.id = r.chunk_id AND c.state = 1 WHERE r.owner = b.id AND c.id IS NULL) "
            "FROM blobs b ORDER BY b.added_at, b.id"
        )
        return [BlobInfo(BlobId(bytes(r[0])), r[1], r[2], r[4], r[3]) for r in rows]

    # ----------------------------------------------------------------------------- removing

    async def rm(self, blob_id: BlobId) -> None:
        """Forget a blob (complete or not). Its chunks are freed by the next :meth:`gc` unless
        another blob uses them."""

        def op(conn: sqlite3.Connection) -> None:
            if conn.execute("DELETE FROM blobs WHERE id = ?", (blob_id,)).rowcount == 0:
                raise UnknownBlobError(blob_id.hex())
            ChunkStore.drop_refs_in(conn, blob_id)

        await self.chunks.db.transaction(op)

    async def gc(self) -> GcResult:
        return await self.chunks.gc()


def _hash_batch(source: Iterator[Buffer], limit: int) -> list[tuple[ChunkId, Buffer]]:
    """Pull chunks from ``source`` (blocking: it may read a file) until ``limit`` bytes."""
    batch: list[tuple[ChunkId, Buffer]] = []
    size = 0
    for data in source:
        batch.append((hash_chunk(data), data))
        size += len(data)
        if size >= limit:
            break
    return batch


def _close_and_unlink(fd: int, path: Path) -> None:
    os.close(fd)
    path.unlink(missing_ok=True)


def _ref_batches(refs: tuple[ChunkRef, ...], limit: int) -> Iterator[list[ChunkRef]]:
    batch: list[ChunkRef] = []
    size = 0
    for ref in refs:
        batch.append(ref)
        size += ref.size
        if size >= limit:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
