"""The on-disk chunk store: one file per chunk, an sqlite index of sizes and references.

Layout under ``root`` (normally ``<data>/chunks/``)::

    ab/abcdef...      a chunk, named by the hex of its ID, fanned out by its first byte
    tmp/              chunks being written (cleared on open)
    corrupt/          chunks that failed verification, kept for a post-mortem
    index.db          sqlite: chunk rows, references, blob manifests
    LOCK              flock'ed by the one process that owns the store

Invariants, kept across crashes:

* A file under its final name is complete: it is written under ``tmp/``, fsynced, then renamed.
* Every chunk file has a row, and the quota counts it: the row is inserted (state ``WRITING``)
  before the file is written, and deleted (after state ``DELETING``) only once the file is gone.
  :meth:`ChunkStore.open` finishes whatever a crash interrupted.
* One file per chunk ID, however many blobs use it; a chunk's reference count is the number of
  owners (blobs, including blobs still being fetched) listing it, and :meth:`ChunkStore.gc` frees
  exactly the chunks with none that no operation in flight has pinned.

The blocking work on the files is in :mod:`catalog.chunk_files` (writing, reading) and
:mod:`catalog.chunk_check` (checking, crash recovery); the schema and the statements on the index
are in :mod:`catalog.chunk_index`.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio

from catalog.chunk_check import CheckReport, check_files, recover_files
from catalog.chunk_files import (
    Buffer,
    Spool,
    adopt_batch,
    chunk_path,
    clear_dir,
    lock_root,
    move_aside,
    read_chunk,
    unlink_paths,
    write_batch,
)
from catalog.chunk_index import (
    DELETING,
    MIGRATIONS,
    PRESENT,
    WRITING,
    delete_marked,
    mark_present,
    mark_unreferenced,
    reserve,
    select_present,
)
from catalog.chunking import MAX_CHUNK_SIZE, ChunkId, SpooledChunk, hash_chunk
from catalog.errors import ChunkCorruptError, MissingChunkError, StoreIOError
from catalog.file_pool import FilePool
from node.durable import sync_directory
from node.store import Database

log = logging.getLogger("vmlend.catalog.chunks")


@dataclass(frozen=True, slots=True)
class Usage:
    used_bytes: int
    chunk_count: int
    quota_bytes: int | None


@dataclass(frozen=True, slots=True)
class GcResult:
    chunks_freed: int
    bytes_freed: int


class PinSet:
    """Chunks an operation is using, protected from :meth:`ChunkStore.gc` until it exits.

    ``created`` lists the chunks this operation wrote itself, so a failed operation can take back
    exactly what it added (see :meth:`ChunkStore.discard_created`).
    """

    def __init__(self, store: ChunkStore) -> None:
        self._store = store
        self._ids: Counter[ChunkId] = Counter()
        self.created: set[ChunkId] = set()

    def add(self, chunk_ids: Iterable[ChunkId]) -> None:
        for chunk_id in chunk_ids:
            self._ids[chunk_id] += 1
            self._store._pins[chunk_id] += 1

    def release(self) -> None:
        for chunk_id, count in self._ids.items():
            self._store._pins[chunk_id] -= count
            if self._store._pins[chunk_id] <= 0:
                del self._store._pins[chunk_id]
        self._ids.clear()

    def __enter__(self) -> PinSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ChunkStore:
    """Content-addressed chunk files with a quota. Open with :meth:`open`."""

    def __init__(self, root: Path, db: Database, quota_bytes: int | None, verify_on_read: bool):
        self.root = root
        self.db = db
        self.quota_bytes = quota_bytes
        self.verify_on_read = verify_on_read
        self._pins: Counter[ChunkId] = Counter()
        # Writers run concurrently with each other but never with gc, so gc cannot free a chunk a
        # writer has just found present and is about to reference.
        self._writers = 0
        self._gc_running = False
        self._cond = trio.Condition()
        self._free = FilePool(root / "free")  # files of deleted chunks, for the next writes
        # Chunk files open for sending (open_file_sync until close_file): gc deletes these
        # instead of recycling them, since a sender reads them unverified.
        self._sending: Counter[ChunkId] = Counter()
        self._sending_lock = threading.Lock()

    @classmethod
    @asynccontextmanager
    async def open(
        cls, root: Path, *, quota_bytes: int | None = None, verify_on_read: bool = True
    ) -> AsyncIterator[ChunkStore]:
        """Open (creating) the store at ``root``, finishing anything a crash interrupted."""
        if quota_bytes is not None and quota_bytes < 0:
            raise ValueError(f"quota_bytes must be >= 0, got {quota_bytes}")
        lock_fd = await trio.to_thread.run_sync(lock_root, root)
        try:
            async with Database.open(root / "index.db", MIGRATIONS) as db:
                store = cls(root, db, quota_bytes, verify_on_read)
                await store._recover()
                yield store
        finally:
            os.close(lock_fd)

    def pins(self) -> PinSet:
        return PinSet(self)

    def path_of(self, chunk_id: ChunkId) -> Path:
        return chunk_path(self.root, chunk_id)

    # ----------------------------------------------------------------------------- queries

    async def has(self, chunk_id: ChunkId) -> bool:
        return chunk_id in await self.present([chunk_id])

    async def present(self, chunk_ids: Iterable[ChunkId]) -> set[ChunkId]:
        """The subset of ``chunk_ids`` fully on disk (what a resumed transfer need not fetch)."""
        wanted = list(dict.fromkeys(chunk_ids))
        return await self.db.transaction(lambda c: select_present(c, wanted))

    async def present_sizes(self) -> list[tuple[ChunkId, int]]:
        """Every chunk fully on disk, with its size."""
        rows = await self.db.fetchall(f"SELECT id, size FROM chunks WHERE state = {PRESENT}")
        return [(ChunkId(bytes(row[0])), int(row[1])) for row in rows]

    async def refcount(self, chunk_id: ChunkId) -> int:
        row = await self.db.fetchone(
            "SELECT COUNT(*) FROM chunk_refs WHERE chunk_id = ?", (chunk_id,)
        )
        return int(row[0]) if row else 0

    async def usage(self) -> Usage:
        row = await self.db.fetchone("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM chunks")
        assert row is not None
        return Usage(int(row[0]), int(row[1]), self.quota_bytes)

    # ----------------------------------------------------------------------------- reads

    async def get(self, chunk_id: ChunkId, *, verify: bool | None = None) -> bytes:
        """The bytes of a chunk; verified against its ID unless ``verify`` (or the store) says not.

        A chunk that fails verification is moved to ``corrupt/`` and dropped from the index, so it
        is never served again and a later fetch of its blob replaces it.
        """
        check = self.verify_on_read if verify is None else verify
        try:
            return await trio.to_thread.run_sync(self.read_sync, chunk_id, check)
        except ChunkCorruptError:
            await self.quarantine(chunk_id)
            raise

    def read_sync(self, chunk_id: ChunkId, verify: bool) -> bytes:
        """Blocking read of one chunk (for worker threads that stream many chunks)."""
        return read_chunk(self.root, chunk_id, verify)

    async def open_file(self, chunk_id: ChunkId) -> tuple[int, int]:
        """A read-only descriptor of the chunk's file and its size, for sending it to a peer
        as it is (close it with :meth:`close_file`). Not verified: the receiver checks the
        bytes against the chunk ID anyway, as every fetch does; local readers use :meth:`get`."""
        return await trio.to_thread.run_sync(self.open_file_sync, chunk_id)

    def open_file_sync(self, chunk_id: ChunkId) -> tuple[int, int]:
        """Blocking :meth:`open_file` (for a thread that serves a connection); pass the
        descriptor to :meth:`close_file` when done."""
        with self._sending_lock:  # gc sees the file open, or this open fails: never between
            try:
                fd = os.open(self.path_of(chunk_id), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise MissingChunkError(chunk_id.hex()) from None
            self._sending[chunk_id] += 1
        try:
            size = os.fstat(fd).st_size
            # Start reading it in now, so sending it does not wait on the disk.
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)
        except BaseException:
            self.close_file(chunk_id, fd)
            raise
        return fd, size

    def close_file(self, chunk_id: ChunkId, fd: int) -> None:
        """Close a descriptor from :meth:`open_file` (any thread)."""
        os.close(fd)
        with self._sending_lock:
            left = self._sending[chunk_id] - 1
            if left > 0:
                self._sending[chunk_id] = left
            else:
                self._sending.pop(chunk_id, None)

    async def quarantine(self, chunk_id: ChunkId) -> None:
        """Move a corrupt chunk aside and forget it; blobs using it become incomplete."""
        log.error("chunk %s failed verification; moved to corrupt/", chunk_id.hex())
        # DELETING first, so a crash half-way is finished by _recover like any other delete.
        await self.db.execute(f"UPDATE chunks SET state = {DELETING} WHERE id = ?", (chunk_id,))
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(move_aside, self.path_of(chunk_id), self.root / "corrupt")
            await self.db.execute("DELETE FROM chunks WHERE id = ?", (chunk_id,))

    # ----------------------------------------------------------------------------- writes

    async def put(self, data: Buffer, *, expected: ChunkId | None = None) -> ChunkId:
        """Store one chunk; with ``expected``, refuse bytes that do not hash to it."""
        chunk_id = hash_chunk(data)
        if expected is not None and chunk_id != expected:
            raise ChunkCorruptError(expected.hex(), "bytes received for it hash differently")
        with self.pins() as pins:
            await self.put_many([(chunk_id, data)], pins=pins)
        return chunk_id

    async def put_many(
        self, chunks: Sequence[tuple[ChunkId, Buffer]], *, pins: PinSet, verified: bool = False
    ) -> None:
        """Store chunks whose IDs the caller computed; each is re-verified before it is written,
        unless the caller says it hashed these very buffers itself (``verified``: a fetch whose
        plan checked every chunk, an add that just hashed them), which saves a pass over every
        byte. The buffers must not change until this returns.

        Every chunk stays pinned in ``pins`` (safe from gc) until the caller releases it, which it
        does after recording its references. Raises :class:`QuotaExceededError` before writing
        anything if the new chunks do not fit; chunks already present cost nothing.
        """
        unique = dict(chunks)
        for chunk_id, data in unique.items():
            if len(data) > MAX_CHUNK_SIZE or len(chunk_id) != 32:
                raise ValueError(f"chunk {chunk_id.hex()} is {len(data)} bytes or has a bad ID")
        pins.add(unique)
        async with self._writing():
            sizes = {chunk_id: len(data) for chunk_id, data in unique.items()}
            to_write, inserted = await self.db.transaction(
                lambda c: reserve(c, sizes, self.quota_bytes)
            )
            pins.created.update(inserted)
            if not to_write:
                return
            todo = [(i, data) for i, data in unique.items() if i in to_write]
            write = partial(write_batch, self.spool, self.root, todo, not verified)
            await self._commit(write, pins, inserted, to_write)

    @property
    def spool(self) -> Spool:
        """Where a receiver may write the chunks it receives, for :meth:`adopt_many` (files
        left there by a crash are cleared when the store opens)."""
        return Spool(self.root / "tmp", self._free)

    @property
    def spool_dir(self) -> Path:
        return self.spool.directory

    async def adopt_many(
        self, chunks: Sequence[tuple[ChunkId, SpooledChunk]], *, pins: PinSet
    ) -> None:
        """Store chunks a receiver already wrote under :attr:`spool_dir` and hashed itself
        (their bytes are not read again): fsync, name and index them like :meth:`put_many`.
        Every spooled file is consumed: adopted, or deleted (a duplicate, a chunk already
        here, or any failure, QuotaExceededError included)."""
        unique: dict[ChunkId, SpooledChunk] = {}
        extra: list[Path] = []
        for chunk_id, spooled in chunks:
            if chunk_id in unique or spooled.size > MAX_CHUNK_SIZE or len(chunk_id) != 32:
                extra.append(spooled.path)
            else:
                unique[chunk_id] = spooled
        try:
            pins.add(unique)
            async with self._writing():
                sizes = {chunk_id: spooled.size for chunk_id, spooled in unique.items()}
                to_write, inserted = await self.db.transaction(
                    lambda c: reserve(c, sizes, self.quota_bytes)
                )
                pins.created.update(inserted)
                extra += [sp.path for chunk_id, sp in unique.items() if chunk_id not in to_write]
                todo = [
                    (chunk_id, sp.path) for chunk_id, sp in unique.items() if chunk_id in to_write
                ]
                unique.clear()
                if not todo:
                    return
                try:
                    write = partial(adopt_batch, self.root, todo)
                    await self._commit(write, pins, inserted, to_write)
                except BaseException:
                    extra += [path for _, path in todo]  # whatever was not renamed yet
                    raise
        finally:
            extra += [sp.path for sp in unique.values()]  # not reached: reservation failed
            if extra:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(unlink_paths, extra)

    async def _commit(
        self,
        write: Callable[[], None],
        pins: PinSet,
        inserted: set[ChunkId],
        written: set[ChunkId],
    ) -> None:
        """Run ``write`` (blocking: write, fsync, rename, fsync directories; no name ever points
        at bytes not on disk) for the ``written`` chunks, reserved WRITING, then mark them
        present; on failure take back what this operation reserved (``inserted``).

        One worker thread does the whole batch (no trio round trip per file), starting every
        file's writeback before waiting for any (see :mod:`catalog.chunk_files`), so the disk
        works on the whole batch at once.
        """
        try:
            await trio.to_thread.run_sync(write)
        except BaseException as e:
            with trio.CancelScope(shield=True):
                await self._unreserve(inserted, pins)
            if isinstance(e, OSError):
                # ENOSPC, EIO, EACCES...: the disk's fault, not the data's; say where.
                raise StoreIOError(f"cannot write chunks under {self.root}: {e.strerror}") from e
            raise
        with trio.CancelScope(shield=True):  # the files are in place: finish the bookkeeping
            await self.db.transaction(lambda c: mark_present(c, list(written)))

    async def _unreserve(self, chunk_ids: set[ChunkId], pins: PinSet) -> None:
        """Take back chunks a failed write reserved (their files may already be in place)."""
        doomed = await self.db.transaction(
            lambda c: mark_unreferenced(c, chunk_ids, self._pins, dict(pins._ids))
        )
        await self._delete(doomed)

    async def discard_created(self, pins: PinSet) -> None:
        """Undo a failed operation: free the chunks it created that nothing else uses or pins."""
        mine = {chunk_id: count for chunk_id, count in pins._ids.items()}
        async with self._exclusive():
            doomed = await self.db.transaction(
                lambda c: mark_unreferenced(c, pins.created, self._pins, mine)
            )
            await self._delete(doomed)
        pins.created.clear()

    # ----------------------------------------------------------------------------- references

    @staticmethod
    def add_refs_in(conn: sqlite3.Connection, owner: bytes, chunk_ids: Iterable[ChunkId]) -> None:
        """Inside a transaction: ``owner`` uses ``chunk_ids`` (once each, however often listed)."""
        conn.executemany(
            "INSERT OR IGNORE INTO chunk_refs (owner, chunk_id) VALUES (?, ?)",
            ((owner, chunk_id) for chunk_id in chunk_ids),
        )

    @staticmethod
    def drop_refs_in(conn: sqlite3.Connection, owner: bytes) -> int:
        """Inside a transaction: ``owner`` uses nothing any more; return how many refs it held."""
        return conn.execute("DELETE FROM chunk_refs WHERE owner = ?", (owner,)).rowcount

    # ----------------------------------------------------------------------------- gc / repair

    async def gc(self) -> GcResult:
        """Delete every chunk no owner references and no operation in flight has pinned."""
        async with self._exclusive():
            doomed = await self.db.transaction(lambda c: mark_unreferenced(c, None, self._pins, {}))
            await self._delete(doomed)
        result = GcResult(len(doomed), sum(doomed.values()))
        log.info("gc freed %d chunks, %d bytes", result.chunks_freed, result.bytes_freed)
        return result

    async def _delete(self, doomed: dict[ChunkId, int]) -> None:
        if not doomed:
            return
        with trio.CancelScope(shield=True):  # rows are DELETING; finish so the quota frees up
            await trio.to_thread.run_sync(self._dispose, list(doomed))
            await self.db.transaction(lambda c: delete_marked(c, list(doomed)))

    def _dispose(self, doomed: list[ChunkId]) -> None:
        """Blocking: delete chunk files for good. Each goes to the pool of files for the next
        writes (see catalog.file_pool), unless the pool is full or someone is sending it: that
        send must go on reading the old bytes, so that file is unlinked (its inode lives on
        until closed)."""
        for chunk_id in doomed:
            path = self.path_of(chunk_id)
            with self._sending_lock:
                pooled = chunk_id not in self._sending and self._free.keep(path)
            if not pooled:
                path.unlink(missing_ok=True)
        for directory in {self.path_of(c).parent for c in doomed} | {self._free.directory}:
            if directory.exists():
                sync_directory(directory)

    async def _recover(self) -> None:
        """Finish what a crash interrupted: temp files, half-reserved and half-deleted chunks."""
        await trio.to_thread.run_sync(clear_dir, self.root / "tmp")
        await trio.to_thread.run_sync(self._free.load)
        rows = await self.db.fetchall(
            f"SELECT id, state FROM chunks WHERE state IN ({WRITING}, {DELETING})"
        )
        if not rows:
            return
        verdicts = await trio.to_thread.run_sync(recover_files, self.root, rows)
        keep = [(chunk_id,) for chunk_id, ok in verdicts.items() if ok]
        drop = [(chunk_id,) for chunk_id, ok in verdicts.items() if not ok]

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(f"UPDATE chunks SET state = {PRESENT} WHERE id = ?", keep)
            conn.executemany("DELETE FROM chunks WHERE id = ?", drop)

        await self.db.transaction(op)
        log.info("recovered chunk store: %d chunks kept, %d dropped", len(keep), len(drop))

    async def check(self, *, verify: bool = True) -> CheckReport:
        """Compare index and files (and, with ``verify``, every chunk's bytes). Read-only."""
        rows = await self.db.fetchall("SELECT id, state FROM chunks")
        return await trio.to_thread.run_sync(check_files, self.root, rows, verify)

    async def scrub(self) -> CheckReport:
        """:meth:`check` every chunk's bytes, and quarantine the corrupt ones (their blobs turn
        incomplete; a later fetch replaces them). Why: chunks are served to peers unverified
        (see :meth:`open_file`), so disk rot is otherwise noticed only by the fetchers."""
        report = await self.check(verify=True)
        for name in report.corrupt:
            await self.quarantine(ChunkId(bytes.fromhex(name)))
        return report

    # ----------------------------------------------------------------------------- locking

    @asynccontextmanager
    async def _writing(self) -> AsyncIterator[None]:
        async with self._cond:
            while self._gc_running:
                await self._cond.wait()
            self._writers += 1
        try:
            yield
        finally:
            with trio.CancelScope(shield=True):
                async with self._cond:
                    self._writers -= 1
                    self._cond.notify_all()

    @asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        async with self._cond:
            while self._gc_running or self._writers:
                await self._cond.wait()
            self._gc_running = True
        try:
            yield
        finally:
            with trio.CancelScope(shield=True):
                async with self._cond:
                    self._gc_running = False
                    self._cond.notify_all()
