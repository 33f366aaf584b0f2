"""The four libraries of the catalog, in their own sqlite file ``<data>/catalog.db``.

One table holds every entry (the kind is a column): its canonical body and signature, plus the
columns lookups need. Nothing enters except through :meth:`Library.insert`, which verifies the
signature and the publisher's trust every time (whether the entry came from the CLI, a build, or
a peer), so a forged or untrusted entry can never be stored. Inserting an entry already present
is a no-op: entries are immutable and named by the hash of their body.

"Latest" means the newest ``created_at`` (then the greatest ID, so the choice is the same on
every scheduler); version strings are free-form and are not ordered.

The set of IDs is also kept in memory (:class:`catalog.replication.IdIndex`) for anti-entropy,
and every insert wakes :meth:`wait_for` / :meth:`wait_changed` waiters.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from catalog.entries import KINDS, Entry, TrustPolicy, decode_body
from catalog.errors import AmbiguousEntryError, InvalidEntryError, UnknownEntryError
from catalog.replication import IdIndex
from node.errors import StoreError
from node.store import Database

log = logging.getLogger("vmlend.catalog.library")

DB_FILE = "catalog.db"
MIN_PREFIX = 8  # hex digits of an ID prefix accepted by resolve()

# Numbered schema migrations; never edit a shipped one, append a new one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE entries (
        id TEXT PRIMARY KEY,          -- blake3 hex of body
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        publisher BLOB NOT NULL,
        created_at INTEGER NOT NULL,
        body BLOB NOT NULL,
        signature BLOB NOT NULL
    );
    CREATE INDEX entries_by_name ON entries (kind, name, created_at);
    """,
]

_COLUMNS = "body, signature"
_ORDER_LATEST = "ORDER BY created_at DESC, id DESC"
_HEX_RE = re.compile(r"[0-9a-f]+")


class Library:
    """The catalog's entries. Open with :meth:`open`; every method is safe from any trio task."""

    def __init__(self, db: Database, policy: TrustPolicy, ids: Iterable[str]) -> None:
        self._db = db
        self.policy = policy
        self.index = IdIndex(ids)
        self._changed = trio.Event()

    @classmethod
    @asynccontextmanager
    async def open(cls, data_dir: Path, policy: TrustPolicy) -> AsyncIterator[Library]:
        """Open ``<data_dir>/catalog.db`` (created and migrated as needed)."""
        async with Database.open(data_dir / DB_FILE, MIGRATIONS) as db:
            rows = await db.fetchall("SELECT id FROM entries")
            yield cls(db, policy, (row[0] for row in rows))

    # ---- writing -----------------------------------------------------------------------------

    async def insert(self, entry: Entry) -> bool:
        """Verify and store ``entry``; True if it is new. Raises :class:`EntrySignatureError`
        or :class:`UntrustedPublisherError` (nothing stored)."""
        return bool(await self.insert_many([entry]))

    async def insert_many(self, entries: Sequence[Entry]) -> list[str]:
        """Verify every entry, then store them in one transaction; return the new IDs.

        If any entry fails verification nothing is stored."""
        for entry in entries:
            self.policy.admit(entry)
        fresh = [e for e in entries if e.id not in self.index]
        if not fresh:
            return []

        def op(conn: sqlite3.Connection) -> list[str]:
            added = []
            for e in fresh:
                cursor = conn.execute(
                    "INSERT OR IGNORE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        e.id,
                        e.kind,
                        e.name,
                        e.version,
                        e.publisher,
                        e.created_at,
                        e.body,
                        e.signature,
                    ),
                )
                if cursor.rowcount:
                    added.append(e.id)
            return added

        added = await self._db.transaction(op)
        for entry_id in added:
            self.index.add(entry_id)
        if added:
            log.info("catalog: %d new entries (%s...)", len(added), added[0][:12])
            self._changed.set()
            self._changed = trio.Event()
        return added

    # ---- waiting -----------------------------------------------------------------------------

    async def wait_changed(self) -> None:
        """Return after the next insert that adds at least one entry."""
        await self._changed.wait()

    async def wait_for(self, entry_id: str) -> None:
        """Return once ``entry_id`` is in the library (at once if it already is).

        No timeout here: put one around the call (``trio.fail_after``)."""
        while entry_id not in self.index:
            await self._changed.wait()

    # ---- reading -----------------------------------------------------------------------------

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self.index

    def __len__(self) -> int:
        return len(self.index)

    async def get(self, entry_id: str) -> Entry:
        row = await self._db.fetchone(f"SELECT {_COLUMNS} FROM entries WHERE id = ?", (entry_id,))
        if row is None:
            raise UnknownEntryError(f"no catalog entry {entry_id}")
        return _entry(row)

    async def get_encoded(self, entry_ids: Sequence[str]) -> list[bytes]:
        """``Entry.encode()`` of each of ``entry_ids`` held here (unknown IDs are skipped)."""
        entries = []
        for entry_id in entry_ids:
            if entry_id in self.index:
                entries.append((await self.get(entry_id)).encode())
        return entries

    async def find(self, kind: str, name: str, version: str | None = None) -> Entry:
        """The latest entry of ``kind`` called ``name`` (of ``version`` if given)."""
        sql = f"SELECT {_COLUMNS} FROM entries WHERE kind = ? AND name = ?"
        params: list[Any] = [kind, name]
        if version is not None:
            sql += " AND version = ?"
            params.append(version)
        row = await self._db.fetchone(f"{sql} {_ORDER_LATEST} LIMIT 1", params)
        if row is None:
            wanted = f"{name} {version}" if version is not None else name
            raise UnknownEntryError(f"no {kind} entry {wanted} in the catalog")
        return _entry(row)

    async def list_entries(self, kind: str | None = None) -> list[Entry]:
        """Every entry (of ``kind``), by kind, name, then newest first."""
        if kind is not None and kind not in KINDS:
            raise InvalidEntryError(f"unknown entry kind {kind!r} (one of {', '.join(KINDS)})")
        where, params = ("WHERE kind = ?", [kind]) if kind is not None else ("", [])
        rows = await self._db.fetchall(
            f"SELECT {_COLUMNS} FROM entries {where} ORDER BY kind, name, created_at DESC, id DESC",
            params,
        )
        return [_entry(row) for row in rows]

    async def resolve(self, ref: str, kind: str | None = None) -> Entry:
        """The entry ``ref`` names: a full ID, an ID prefix of at least 8 hex digits,
        ``NAME`` (latest) or ``NAME@VERSION``; ``kind`` narrows a name."""
        ref = ref.strip()
        if len(ref) >= MIN_PREFIX and _HEX_RE.fullmatch(ref):
            matches = await self._db.fetchall(
                f"SELECT id, {_COLUMNS} FROM entries WHERE id >= ? AND id < ? LIMIT 2",
                (ref, ref + "g"),  # 'g' sorts after every hex digit
            )
            if len(matches) > 1:
                raise AmbiguousEntryError(f"ID prefix {ref} matches several entries")
            if matches:
                return _entry(matches[0][1:])
        name, _, version = ref.partition("@")
        kinds = [kind] if kind is not None else list(KINDS)
        found: list[Entry] = []
        for k in kinds:
            try:
                found.append(await self.find(k, name, version or None))
            except UnknownEntryError:
                continue
        if not found:
            raise UnknownEntryError(f"no catalog entry matches {ref!r}")
        if len(found) > 1:
            raise AmbiguousEntryError(
                f"{ref!r} names entries of kinds {', '.join(e.kind for e in found)}; "
                "give the kind or the ID"
            )
        return found[0]


def _entry(row: tuple[Any, ...]) -> Entry:
    body, signature = row
    try:
        return decode_body(body, signature)
    except InvalidEntryError as e:
        # It was valid when stored: the file was damaged or edited behind our back.
        raise StoreError(f"catalog.db holds an undecodable entry: {e}") from e
