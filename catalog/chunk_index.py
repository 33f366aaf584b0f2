"""The chunk store's index: its sqlite schema, and the statements the store's operations run
inside their transactions (blocking: :meth:`node.store.Database.transaction` runs them in its
thread).

A chunk's row is inserted ``WRITING`` before its file is written, turns ``PRESENT`` once the
file is durable under its final name, and is ``DELETING`` while the file is being deleted; the
quota counts every row, whatever its state. ``chunk_refs`` says which owner (a blob, or a blob
still being fetched) uses which chunk. The invariants these keep are described in
:mod:`catalog.chunk_store`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping

from catalog.chunking import ChunkId
from catalog.errors import QuotaExceededError

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


def select_present(conn: sqlite3.Connection, chunk_ids: list[ChunkId]) -> set[ChunkId]:
    """The subset of ``chunk_ids`` (no duplicates) whose rows are ``PRESENT``."""
    found: set[ChunkId] = set()
    for start in range(0, len(chunk_ids), 500):  # sqlite caps the number of parameters
        batch = chunk_ids[start : start + 500]
        marks = ",".join("?" * len(batch))
        rows = conn.execute(
            f"SELECT id FROM chunks WHERE state = {PRESENT} AND id IN ({marks})", batch
        ).fetchall()
        found.update(ChunkId(row[0]) for row in rows)
    return found


def reserve(
    conn: sqlite3.Connection, sizes: dict[ChunkId, int], quota_bytes: int | None
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
    if quota_bytes is not None and needed:
        used = conn.execute("SELECT COALESCE(SUM(size), 0) FROM chunks").fetchone()[0]
        if used + needed > quota_bytes:
            raise QuotaExceededError(used=used, needed=needed, quota=quota_bytes)
    conn.executemany(f"INSERT INTO chunks (id, size, state) VALUES (?, ?, {WRITING})", new.items())
    return to_write, set(new)


def mark_present(conn: sqlite3.Connection, chunk_ids: list[ChunkId]) -> None:
    conn.executemany(
        f"UPDATE chunks SET state = {PRESENT} WHERE id = ? AND state = {WRITING}",
        ((chunk_id,) for chunk_id in chunk_ids),
    )


def mark_unreferenced(
    conn: sqlite3.Connection,
    among: set[ChunkId] | None,
    pins: Mapping[ChunkId, int],
    own_pins: Mapping[ChunkId, int],
) -> dict[ChunkId, int]:
    """Mark DELETING every chunk (of ``among``, unless None) that no owner references and
    nobody pins but the caller (``pins`` counts everyone's, ``own_pins`` the caller's share);
    return their sizes."""
    rows = conn.execute(
        f"SELECT id, size FROM chunks WHERE state IN ({PRESENT}, {WRITING}) AND NOT EXISTS "
        "(SELECT 1 FROM chunk_refs WHERE chunk_refs.chunk_id = chunks.id)"
    ).fetchall()
    doomed: dict[ChunkId, int] = {}
    for raw_id, size in rows:
        chunk_id = ChunkId(raw_id)
        if among is not None and chunk_id not in among:
            continue
        if pins.get(chunk_id, 0) > own_pins.get(chunk_id, 0):
            continue
        doomed[chunk_id] = size
    conn.executemany(f"UPDATE chunks SET state = {DELETING} WHERE id = ?", ((i,) for i in doomed))
    return doomed


def delete_marked(conn: sqlite3.Connection, chunk_ids: list[ChunkId]) -> None:
    """Drop the rows of chunks marked DELETING whose files are gone."""
    conn.executemany(
        f"DELETE FROM chunks WHERE id = ? AND state = {DELETING}",
        ((chunk_id,) for chunk_id in chunk_ids),
    )
