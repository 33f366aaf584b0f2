"""Re-read every chunk now and then, so that a node notices rot in what it serves.

Why: a provider sends chunks with ``sendfile``, without reading them (see
:meth:`catalog.blob_service.BlobService._open_chunk`). A fetcher checks every chunk and stops
using a provider that sent wrong bytes, but the provider itself would go on serving a rotted
chunk to everyone else. The scrubber verifies each chunk once per ``interval``, paced at
``rate`` bytes a second so that it never competes with real work for the disk, and
quarantines what fails: the blobs using it turn incomplete, and a later fetch replaces it.
``vmlend blob check`` does the same at once, on demand.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from catalog.chunk_store import ChunkStore
from catalog.errors import ChunkCorruptError, MissingChunkError

log = logging.getLogger("vmlend.catalog.scrub")


@dataclass(slots=True)
class ScrubPass:
    """What one pass over the store found."""

    checked: int = 0
    bytes_read: int = 0
    corrupt: int = 0  # bytes that no longer hash to their ID: quarantined
    missing: int = 0  # indexed as present, but the file is gone: forgotten


class Scrubber:
    """Verify every present chunk of ``store`` each ``interval`` seconds (0: never), reading
    at most ``rate`` bytes a second (0: as fast as the disk goes)."""

    def __init__(self, store: ChunkStore, *, interval: float, rate: int) -> None:
        if interval < 0 or rate < 0:
            raise ValueError(f"need interval >= 0 and rate >= 0, got {interval} and {rate}")
        self.store = store
        self.interval = interval
        self.rate = rate
        self.last: ScrubPass | None = None
        self._passed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if not self.interval:
            return
        while True:
            await trio.sleep(self.interval)
            found = await self.scrub_once()
            self.last, passed, self._passed = found, self._passed, trio.Event()
            passed.set()
            log.info(
                "scrub pass: %d chunks (%d bytes) checked, %d corrupt, %d missing",
                found.checked,
                found.bytes_read,
                found.corrupt,
                found.missing,
            )

    async def next_pass(self) -> ScrubPass:
        """Wait for the end of :meth:`run`'s next pass; what it found."""
        await self._passed.wait()
        assert self.last is not None
        return self.last

    async def scrub_once(self) -> ScrubPass:
        """One paced pass over the chunks present when it starts."""
        found = ScrubPass()
        for chunk_id, size in await self.store.present_sizes():
            began = trio.current_time()
            try:
                # Verifies, and quarantines a chunk whose bytes no longer match its ID.
                await self.store.get(chunk_id, verify=True)
            except ChunkCorruptError:
                found.corrupt += 1
            except MissingChunkError:
                if await self.store.has(chunk_id):  # not just collected meanwhile
                    log.error("chunk %s is indexed but its file is gone", chunk_id.hex())
                    await self.store.quarantine(chunk_id)
                    found.missing += 1
            found.checked += 1
            found.bytes_read += size
            if self.rate:
                await trio.sleep_until(began + size / self.rate)
        return found


__all__ = ["ScrubPass", "Scrubber"]
