"""What each peer has made this node store, against one quota per peer.

A peer makes a node store bytes on its word: an owner's task files, a worker's results. Each
such blob is *charged* to the peer while it is kept (a row in ``peer_quota.db`` beside the
chunk index: the charges survive a restart), and *reserved* while it is being fetched (in
memory: the most the fetch may bring, so concurrent fetches cannot overshoot). A peer whose
charges and reservations would pass its quota is refused with :class:`PeerQuotaError` before
anything is fetched. A charge moves with responsibility (a recorded result goes from the worker
that sent it to the task's owner) and is released when the request is refused or the task is
forgotten; a blob that a peer's word brought here and that no charge holds any more is removed
and its chunks collected (:func:`catalog.blob_fetch.fetch_for_peer`, :func:`discard_blob`).
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from catalog.blob import BlobId
from catalog.errors import CatalogError
from node.store import Database

DEFAULT_PEER_QUOTA = 4 << 30

MIGRATIONS = [
    """
    CREATE TABLE charges (
        peer TEXT NOT NULL,
        blob BLOB NOT NULL,
        size INTEGER NOT NULL,
        task TEXT,
        created INTEGER NOT NULL,  -- 1: the peer's word brought the blob here
        PRIMARY KEY (peer, blob)
    );
    CREATE INDEX charges_blob ON charges (blob);
    CREATE INDEX charges_task ON charges (task);
    """
]


class PeerQuotaError(CatalogError):
    """A peer asked this node to store more than its quota allows; nothing more was stored."""

    code = "quota_exceeded"

    def __init__(self, peer: str, *, used: int, asked: int, quota: int) -> None:
        super().__init__(
            f"peer {peer[:16]}... has {used} bytes stored here or on the way; {asked} more "
            f"would pass its quota of {quota} bytes"
        )
        self.peer = peer
        self.used = used
        self.asked = asked
        self.quota = quota


class PeerQuota:
    """The charges and reservations of every peer. Open with :meth:`open`."""

    def __init__(self, db: Database, quota: int) -> None:
        if quota < 0:
            raise ValueError(f"quota must be >= 0, got {quota}")
        self.db = db
        self.quota = quota
        self._reserved: Counter[str] = Counter()
        self.fetching: Counter[BlobId] = Counter()
        """Blobs being fetched on some peer's word now: never discarded under a fetch."""

    @classmethod
    @asynccontextmanager
    async def open(cls, path: Path, *, quota: int = DEFAULT_PEER_QUOTA) -> AsyncIterator[PeerQuota]:
        async with Database.open(path, MIGRATIONS) as db:
            yield cls(db, quota)

    async def stored(self, peer: str) -> int:
        """Bytes charged to ``peer``."""
        row = await self.db.fetchone(
            "SELECT COALESCE(SUM(size), 0) FROM charges WHERE peer = ?", (peer,)
        )
        return int(row[0]) if row else 0

    async def used(self, peer: str) -> int:
        """Bytes charged to ``peer`` and reserved for its fetches in flight."""
        return await self.stored(peer) + self._reserved[peer]

    async def check(self, peer: str, size: int = 0) -> None:
        """:class:`PeerQuotaError` unless ``size`` more bytes fit in ``peer``'s quota."""
        used = await self.used(peer)
        if used + size > self.quota:
            raise PeerQuotaError(peer, used=used, asked=size, quota=self.quota)

    @asynccontextmanager
    async def reserve(self, peer: str, size: int) -> AsyncIterator[None]:
        """Hold ``size`` bytes of ``peer``'s quota for the block (a fetch in flight)."""
        await self.check(peer, size)
        self._reserved[peer] += size
        try:
            yield
        finally:
            self._reserved[peer] -= size
            if self._reserved[peer] <= 0:
                del self._reserved[peer]

    async def charge(
        self, peer: str, blob: BlobId, size: int, *, created: bool, task: str | None = None
    ) -> None:
        """Charge ``blob`` (``size`` bytes) to ``peer`` until it is released; ``created`` when
        the peer's word brought the blob here (it is removed once no charge holds it)."""
        await self.db.execute(
            "INSERT INTO charges (peer, blob, size, task, created) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (peer, blob) DO UPDATE SET size = excluded.size, "
            "created = MAX(created, excluded.created), task = COALESCE(excluded.task, task)",
            (peer, bytes(blob), size, task, int(created)),
        )

    async def transfer(self, blob: BlobId, source: str, to: str, *, task: str | None) -> None:
        """Move ``source``'s charge for ``blob`` to ``to`` (a result, from its worker to the
        task's owner, once it counts)."""

        def op(conn: sqlite3.Connection) -> None:
            row = conn.execute(
                "SELECT size, created FROM charges WHERE peer = ? AND blob = ?",
                (source, bytes(blob)),
            ).fetchone()
            if row is None:
                return
            conn.execute("DELETE FROM charges WHERE peer = ? AND blob = ?", (source, bytes(blob)))
            conn.execute(
                "INSERT INTO charges (peer, blob, size, task, created) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (peer, blob) DO UPDATE SET created = MAX(created, excluded.created)",
                (to, bytes(blob), row[0], task, row[1]),
            )

        await self.db.transaction(op)

    async def release(self, peer: str, blob: BlobId) -> bool:
        """Drop ``peer``'s charge for ``blob``; True when that leaves the blob uncharged and a
        peer's word brought it here (then it may be removed)."""
        return bool(await self._release("peer = ? AND blob = ?", (peer, bytes(blob))))

    async def release_task(self, task: str) -> list[BlobId]:
        """Drop every charge made for ``task`` (when it is forgotten); the blobs that leaves
        uncharged and that peers' words brought here."""
        return await self._release("task = ?", (task,))

    async def _release(self, where: str, params: tuple[object, ...]) -> list[BlobId]:
        def op(conn: sqlite3.Connection) -> list[BlobId]:
            rows = conn.execute(f"SELECT blob, created FROM charges WHERE {where}", params)
            released = {bytes(blob): bool(created) for blob, created in rows.fetchall()}
            conn.execute(f"DELETE FROM charges WHERE {where}", params)
            free = []
            for blob, created in released.items():
                left = conn.execute("SELECT MAX(created) FROM charges WHERE blob = ?", (blob,))
                still = left.fetchone()[0]
                if still is None and created:
                    free.append(BlobId(blob))
                elif still is not None and created and not still:
                    # Whoever holds it now holds what a peer's word brought here.
                    conn.execute("UPDATE charges SET created = 1 WHERE blob = ?", (blob,))
            return free

        return await self.db.transaction(op)

    async def charged(self, blob: BlobId) -> bool:
        """Whether any peer's charge holds ``blob``."""
        row = await self.db.fetchone("SELECT 1 FROM charges WHERE blob = ? LIMIT 1", (bytes(blob),))
        return row is not None
