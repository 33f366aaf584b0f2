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
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import sqlite3
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import trio

from catalog.chunking import MAX_CHUNK_SIZE, ChunkId, SpooledChunk, hash_chunk
from catalog.errors import (
    CatalogError,
    ChunkCorruptError,
    MissingChunkError,
    QuotaExceededError,
    StoreIOError,
    StoreLockedError,
)
from catalog.file_pool import FilePool
from catalog.writeback import start_writeback
from node.store import Database

log = logging.getLogger("vmlend.catalog.chunks")

Buffer = bytes | bytearray | memoryview

WRITING, PRESENT, DELETING = 0, 1, 2

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE chunks (
        id BLOB PRIMARY KEY,
        size INTEGER NOT NULL,
        state INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX chunks_by_state ON chunks(state);
    CREATE TABLE chunk_refs (
        owner BLOB NOT NULL,
        chunk_id BLOB NOT NULL,
        PRIMARY KEY (owner, chunk_id)
    ) WITHOUT ROWID;
    CREATE INDEX chunk_refs_by_chunk ON chunk_refs(chunk_id);
    -- Blob manifests; used by catalog.blob, kept here so the whole index is one schema.
    CREATE TABLE blobs (
        id BLOB PRIMARY KEY,
        manifest BLOB NOT NULL,
        size INTEGER NOT NULL,
        chunk_count INTEGER NOT NULL,
        added_at REAL NOT NULL
    ) WITHOUT ROWID;
    """,
)


@dataclass(frozen=True, slots=True)
class Usage:
    used_bytes: int
    chunk_count: int
    quota_bytes: int | None


@dataclass(frozen=True, slots=True)
class GcResult:
    chunks_freed: int
    bytes_freed: int


@dataclass(frozen=True, slots=True)
class CheckReport:
    """What :meth:`ChunkStore.check` found; ``ok`` when every list is empty."""

    missing_files: list[str] = field(default_factory=list)  # rows PRESENT without a file
    stray_files: list[str] = field(default_factory=list)  # files without a row
    corrupt: list[str] = field(default_factory=list)  # files whose bytes do not match
    unfinished_rows: list[str] = field(default_factory=list)  # rows WRITING/DELETING
    temp_files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        lists = (self.missing_files, self.stray_files, self.corrupt, self.unfinished_rows)
        return not any(lists) and not self.temp_files


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
        lock_fd = await trio.to_thread.run_sync(_lock_root, root)
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
        name = chunk_id.hex()
        return self.root / name[:2] / name

    # ----------------------------------------------------------------------------- queries

    async def has(self, chunk_id: ChunkId) -> bool:
        return chunk_id in await self.present([chunk_id])

    async def present(self, chunk_ids: Iterable[ChunkId]) -> set[ChunkId]:
        """The subset of ``chunk_ids`` fully on disk (what a resumed transfer need not fetch)."""
        wanted = list(dict.fromkeys(chunk_ids))

        def query(conn: sqlite3.Connection) -> set[ChunkId]:
            found: set[ChunkId] = set()
            for start in range(0, len(wanted), 500):  # sqlite caps the number of parameters
                batch = wanted[start : start + 500]
                marks = ",".join("?" * len(batch))
                rows = conn.execute(
                    f"SELECT id FROM chunks WHERE state = {PRESENT} AND id IN ({marks})", batch
                ).fetchall()
                found.update(ChunkId(row[0]) for row in rows)
            return found

        return await self.db.transaction(query)

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
        path = self.path_of(chunk_id)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise MissingChunkError(chunk_id.hex()) from None
        if verify and hash_chunk(data) != chunk_id:
            raise ChunkCorruptError(chunk_id.hex(), str(path))
        return data

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
            await trio.to_thread.run_sync(
                _move_aside, self.path_of(chunk_id), self.root / "corrupt"
            )
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
            to_write, inserted = await self.db.transaction(lambda c: self._reserve(c, sizes))
            pins.created.update(inserted)
            if not to_write:
                return
            todo = [(i, data) for i, data in unique.items() if i in to_write]
            write = partial(_write_batch, self.spool, self.root, todo, not verified)
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
                to_write, inserted = await self.db.transaction(lambda c: self._reserve(c, sizes))
                pins.created.update(inserted)
                extra += [sp.path for chunk_id, sp in unique.items() if chunk_id not in to_write]
                todo = [
                    (chunk_id, sp.path) for chunk_id, sp in unique.items() if chunk_id in to_write
                ]
                unique.clear()
                if not todo:
                    return
                try:
                    write = partial(_adopt_batch, self.root, todo)
                    await self._commit(write, pins, inserted, to_write)
                except BaseException:
                    extra += [path for _, path in todo]  # whatever was not renamed yet
                    raise
        finally:
            extra += [sp.path for sp in unique.values()]  # not reached: reservation failed
            if extra:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(_unlink_paths, extra)

    def _reserve(
        self, conn: sqlite3.Connection, sizes: dict[ChunkId, int]
    ) -> tuple[set[ChunkId], set[ChunkId]]:
        """Insert WRITING rows for new chunks if they fit the quota; return (to write, inserted)."""
        to_write: set[ChunkId] = set()
        new: dict[ChunkId, int] = {}
        for chunk_id, size in sizes.items():
            row = conn.execute("SELECT state FROM chunks WHERE id = ?", (chunk_id,)).fetchone()
            if row is None:
                new[chunk_id] = size
                to_write.add(chunk_id)
            elif row[0] == WRITING:
                # Another task is writing it; writing the same bytes again is harmless and saves
                # us from waiting on a writer that may yet fail.
                to_write.add(chunk_id)
        needed = sum(new.values())
        if self.quota_bytes is not None and needed:
            used = conn.execute("SELECT COALESCE(SUM(size), 0) FROM chunks").fetchone()[0]
            if used + needed > self.quota_bytes:
                raise QuotaExceededError(used=used, needed=needed, quota=self.quota_bytes)
        conn.executemany(
            f"INSERT INTO chunks (id, size, state) VALUES (?, ?, {WRITING})", new.items()
        )
        return to_write, set(new)

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
        file's writeback before waiting for any (see :func:`_sync_files`), so the disk works
        on the whole batch at once.
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
            await self.db.transaction(lambda c: _mark_present(c, list(written)))

    async def _unreserve(self, chunk_ids: set[ChunkId], pins: PinSet) -> None:
        """Take back chunks a failed write reserved (their files may already be in place)."""
        doomed = await self.db.transaction(
            lambda c: self._mark_unreferenced(c, chunk_ids, dict(pins._ids))
        )
        await self._delete(doomed)

    async def discard_created(self, pins: PinSet) -> None:
        """Undo a failed operation: free the chunks it created that nothing else uses or pins."""
        mine = {chunk_id: count for chunk_id, count in pins._ids.items()}
        async with self._exclusive():
            doomed = await self.db.transaction(
                lambda c: self._mark_unreferenced(c, pins.created, mine)
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
            doomed = await self.db.transaction(lambda c: self._mark_unreferenced(c, None, {}))
            await self._delete(doomed)
        result = GcResult(len(doomed), sum(doomed.values()))
        log.info("gc freed %d chunks, %d bytes", result.chunks_freed, result.bytes_freed)
        return result

    def _mark_unreferenced(
        self,
        conn: sqlite3.Connection,
        among: set[ChunkId] | None,
        own_pins: dict[ChunkId, int],
    ) -> dict[ChunkId, int]:
        rows = conn.execute(
            f"SELECT id, size FROM chunks WHERE state IN ({PRESENT}, {WRITING}) AND NOT EXISTS "
            "(SELECT 1 FROM chunk_refs WHERE chunk_refs.chunk_id = chunks.id)"
        ).fetchall()
        doomed: dict[ChunkId, int] = {}
        for raw_id, size in rows:
            chunk_id = ChunkId(raw_id)
            if among is not None and chunk_id not in among:
                continue
            if self._pins.get(chunk_id, 0) > own_pins.get(chunk_id, 0):
                continue
            doomed[chunk_id] = size
        conn.executemany(
            f"UPDATE chunks SET state = {DELETING} WHERE id = ?", ((i,) for i in doomed)
        )
        return doomed

    async def _delete(self, doomed: dict[ChunkId, int]) -> None:
        if not doomed:
            return
        with trio.CancelScope(shield=True):  # rows are DELETING; finish so the quota frees up
            await trio.to_thread.run_sync(self._dispose, list(doomed))
            await self.db.transaction(
                lambda c: c.executemany(
                    f"DELETE FROM chunks WHERE id = ? AND state = {DELETING}",
                    ((chunk_id,) for chunk_id in doomed),
                )
            )

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
                _fsync_dir(directory)

    async def _recover(self) -> None:
        """Finish what a crash interrupted: temp files, half-reserved and half-deleted chunks."""
        await trio.to_thread.run_sync(_clear_dir, self.root / "tmp")
        await trio.to_thread.run_sync(self._free.load)
        rows = await self.db.fetchall(
            f"SELECT id, state FROM chunks WHERE state IN ({WRITING}, {DELETING})"
        )
        if not rows:
            return
        verdicts = await trio.to_thread.run_sync(self._recover_files, rows)
        keep = [(chunk_id,) for chunk_id, ok in verdicts.items() if ok]
        drop = [(chunk_id,) for chunk_id, ok in verdicts.items() if not ok]

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(f"UPDATE chunks SET state = {PRESENT} WHERE id = ?", keep)
            conn.executemany("DELETE FROM chunks WHERE id = ?", drop)

        await self.db.transaction(op)
        log.info("recovered chunk store: %d chunks kept, %d dropped", len(keep), len(drop))

    def _recover_files(self, rows: list[tuple[bytes, int]]) -> dict[ChunkId, bool]:
        verdicts: dict[ChunkId, bool] = {}
        for raw_id, state in rows:
            chunk_id = ChunkId(raw_id)
            path = self.path_of(chunk_id)
            if state == WRITING:
                # The rename is atomic, so a file here is whole; verify anyway since it is cheap.
                with contextlib.suppress(MissingChunkError, ChunkCorruptError):
                    self.read_sync(chunk_id, verify=True)
                    verdicts[chunk_id] = True
                    continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            verdicts[chunk_id] = False
        return verdicts

    async def check(self, *, verify: bool = True) -> CheckReport:
        """Compare index and files (and, with ``verify``, every chunk's bytes). Read-only."""
        rows = await self.db.fetchall("SELECT id, state FROM chunks")
        return await trio.to_thread.run_sync(self._check_files, rows, verify)

    async def scrub(self) -> CheckReport:
        """:meth:`check` every chunk's bytes, and quarantine the corrupt ones (their blobs turn
        incomplete; a later fetch replaces them). Why: chunks are served to peers unverified
        (see :meth:`open_file`), so disk rot is otherwise noticed only by the fetchers."""
        report = await self.check(verify=True)
        for name in report.corrupt:
            await self.quarantine(ChunkId(bytes.fromhex(name)))
        return report

    def _check_files(self, rows: list[tuple[bytes, int]], verify: bool) -> CheckReport:
        report = CheckReport()
        indexed = {bytes(raw).hex(): state for raw, state in rows}
        on_disk: set[str] = set()
        for sub in self.root.iterdir():
            if sub.is_dir() and len(sub.name) == 2:
                on_disk.update(p.name for p in sub.iterdir())
        tmp = self.root / "tmp"
        if tmp.exists():
            report.temp_files.extend(p.name for p in tmp.iterdir())
        for name, state in indexed.items():
            if state != PRESENT:
                report.unfinished_rows.append(name)
            elif name not in on_disk:
                report.missing_files.append(name)
            elif verify:
                try:
                    self.read_sync(ChunkId(bytes.fromhex(name)), verify=True)
                except ChunkCorruptError:
                    report.corrupt.append(name)
        report.stray_files.extend(sorted(on_disk - indexed.keys()))
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


# --------------------------------------------------------------------------------- file helpers
# These block; they run in worker threads.


@asynccontextmanager
async def one_error() -> AsyncIterator[None]:
    """Let a nursery's only error out as itself, so callers can catch QuotaExceededError & co."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise


def _lock_root(root: Path) -> int:
    for sub in ("tmp", "corrupt"):
        (root / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(root / "LOCK", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise StoreLockedError(f"chunk store {root} is in use by another process") from None
        raise CatalogError(f"cannot lock chunk store {root}: {e.strerror}") from e
    return fd


def _write_all(fd: int, data: Buffer) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


@dataclass(frozen=True, slots=True)
class Spool:
    """Where chunks are written before the store names them: fresh temp files in
    ``directory``, taken from ``pool`` (recycled files of deleted chunks) when it has some.
    Its methods block; any thread may call them."""

    directory: Path
    pool: FilePool | None = None

    def open(self, chunk_id: ChunkId) -> tuple[Path, int]:
        """A new temp file for ``chunk_id``, open for reading and writing; the caller closes
        it, and deletes it if it will not be adopted."""
        path = self.directory / f"{chunk_id.hex()}.{secrets.token_hex(4)}"
        fd = self.pool.take(path) if self.pool is not None else None
        if fd is None:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        return path, fd

    def write(self, chunk_id: ChunkId, data: Buffer) -> Path:
        """Write ``data`` to a new temp file and start its writeback; nothing is left on
        failure."""
        path, fd = self.open(chunk_id)
        try:
            _write_all(fd, data)
            start_writeback(fd)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        return path


def _write_temp_files(
    spool: Spool, root: Path, chunks: list[tuple[ChunkId, Buffer]], verify: bool
) -> list[tuple[Path, Path]]:
    """Write each chunk to a new temp file and start its writeback; return (temp path, final
    path) pairs."""
    written: list[tuple[Path, Path]] = []
    try:
        for chunk_id, data in chunks:
            if verify and hash_chunk(data) != chunk_id:
                raise ChunkCorruptError(chunk_id.hex(), "bytes changed before they were written")
            name = chunk_id.hex()
            written.append((spool.write(chunk_id, data), root / name[:2] / name))
    except BaseException:
        _unlink_temps(written)
        raise
    return written


def _write_batch(
    spool: Spool, root: Path, chunks: list[tuple[ChunkId, Buffer]], verify: bool
) -> None:
    _commit_temps(_write_temp_files(spool, root, chunks, verify))


def _adopt_batch(root: Path, chunks: list[tuple[ChunkId, Path]]) -> None:
    _commit_temps([(path, root / chunk_id.hex()[:2] / chunk_id.hex()) for chunk_id, path in chunks])


def _commit_temps(written: list[tuple[Path, Path]]) -> None:
    """fsync the temp files, give them their final names, fsync the directories."""
    try:
        _sync_files([tmp for tmp, _ in written])
        dirs = _rename_all(written)
    except BaseException:
        _unlink_temps(written)  # leave no temp file behind
        raise
    # One after another, in this thread. A pool of fsync threads woke ~4000 times per 512 MiB
    # fetched and each woken thread took the GIL from the transfer's reader thread (strace
    # here); one after another was as fast or faster (A/B here). On a journaled file system
    # the first fsync commits every rename of the batch, so the others find nothing to do.
    for directory in dirs:
        _fsync_dir(directory)


def _unlink_paths(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _unlink_temps(written: list[tuple[Path, Path]]) -> None:
    for tmp, _ in written:
        tmp.unlink(missing_ok=True)


def _sync_files(paths: list[Path]) -> None:
    """Make the files durable: start every file's writeback, then wait for each in turn. The
    disk works on all of them at once, as with an fsync per thread, without the threads:
    measured here, a fetch ran ~7 % faster this way (16 fsync threads woke ~5000 times per
    512 MiB and fought the transfer for the cores); the chunk store alone, ~5 % slower."""
    fds: list[int] = []
    try:
        for path in paths:
            fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        for fd in fds:
            start_writeback(fd)
        for fd in fds:
            os.fdatasync(fd)  # data and size; the name is made durable by the directory fsync
    finally:
        for fd in fds:
            os.close(fd)


def _rename_all(written: list[tuple[Path, Path]]) -> list[Path]:
    """Move fsynced temp files to their final names; return the directories to fsync."""
    dirs: dict[Path, None] = {}
    for tmp, final in written:
        try:
            os.rename(tmp, final)
        except FileNotFoundError:  # the first chunk of its fan-out directory
            final.parent.mkdir(exist_ok=True, mode=0o700)
            os.rename(tmp, final)
        dirs[final.parent] = None
    return list(dirs)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mark_present(conn: sqlite3.Connection, chunk_ids: list[ChunkId]) -> None:
    conn.executemany(
        f"UPDATE chunks SET state = {PRESENT} WHERE id = ? AND state = {WRITING}",
        ((chunk_id,) for chunk_id in chunk_ids),
    )


def _clear_dir(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for path in directory.iterdir():
        path.unlink(missing_ok=True)


def _move_aside(path: Path, corrupt_dir: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.replace(path, corrupt_dir / path.name)
