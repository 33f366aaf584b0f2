"""Which blobs are private, and which peers may read each (sans-IO state + a JSON file).

A public blob is served to any peer and announced in the DHT. A private one is never announced,
is unknown to every peer not granted it (have / manifest / tickets answer "unknown"), and its
chunks travel on the data channel only encrypted with a key handed over the peer's Noise
stream. A blob fetched over such a channel is private here too (granted to no one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from catalog.blob import BlobId
from catalog.errors import CatalogError


class BlobAccess:
    """Grants per private blob; ``path`` (or None: in memory only) keeps them across restarts."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._private: dict[BlobId, set[str]] = {}
        if path is not None and path.exists():
            try:
                raw = json.loads(path.read_text())
                self._private = {
                    BlobId(bytes.fromhex(blob)): set(peers) for blob, peers in raw.items()
                }
            except (ValueError, TypeError, AttributeError) as e:
                raise CatalogError(f"{path}: not a blob access file: {e}") from e

    def is_private(self, blob_id: BlobId) -> bool:
        return blob_id in self._private

    def may_read(self, blob_id: BlobId, peer: str) -> bool:
        grants = self._private.get(blob_id)
        return grants is None or peer in grants

    def private_ids(self) -> frozenset[BlobId]:
        return frozenset(self._private)

    def make_private(self, blob_id: BlobId) -> None:
        self._private.setdefault(blob_id, set())

    def grant(self, blob_id: BlobId, peer: str) -> None:
        self._private.setdefault(blob_id, set()).add(peer)

    def forget(self, blob_id: BlobId) -> None:
        self._private.pop(blob_id, None)

    def save(self) -> None:
        """Write the file atomically, mode 0600 (blocking: run it in a worker thread)."""
        if self.path is None:
            return
        data = json.dumps({b.hex(): sorted(p) for b, p in sorted(self._private.items())})
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
