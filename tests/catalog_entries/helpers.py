"""Shared fixtures of the catalog entry tests: publishers and entry factories."""

from __future__ import annotations

import hashlib
from typing import Any

from catalog.entries import Entry, make_entry
from node.identity import Identity

PUBLISHER = Identity.generate()
OTHER_PUBLISHER = Identity.generate()  # trusted by no one
NOW = 1_800_000_000.0


def blob(tag: str) -> str:
    return hashlib.sha256(tag.encode()).hexdigest()  # any 64 hex digits stand for a blob ID


def os_entry(
    name: str = "tiny",
    version: str = "1",
    *,
    identity: Identity = PUBLISHER,
    now: float = NOW,
    meta: dict[str, Any] | None = None,
) -> Entry:
    return make_entry(
        identity,
        kind="os",
        name=name,
        version=version,
        blobs={"kernel": blob(name + "k"), "initrd": blob(name + "i"), "root": blob(name + "r")},
        meta=meta if meta is not None else {"arch": "x86_64"},
        now=now,
    )


def package_entry(name: str, version: str = "1.0", *, identity: Identity = PUBLISHER) -> Entry:
    return make_entry(
        identity,
        kind="package",
        name=name,
        version=version,
        blobs={"layer": blob(name + version)},
        meta={"os": "debian-12", "depends": ["libc6"]},
        now=NOW,
    )


def tampered(entry: Entry, **changes: Any) -> Entry:
    """``entry`` with fields changed but its old signature kept (what a forger would send)."""
    fields = {
        "kind": entry.kind,
        "name": entry.name,
        "version": entry.version,
        "publisher": entry.publisher,
        "created_at": entry.created_at,
        "blobs": entry.blobs,
        "meta": entry.meta,
        "signature": entry.signature,
    }
    fields.update(changes)
    return Entry(**fields)
