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
import math
import time
from collections.abc import Callable
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
    at most ``rate`` bytes a second (0: as fast as the disk goes).

    The end of each pass is written (wall-clock time) to ``<store>/scrubbed``, and a new
    Scrubber waits only for what is left of the interval since then: a node restarted more
    often than ``interval`` still scrubs on schedule."""

    def __init__(
        self,
        store: ChunkStore,
        *,
        interval: float,
        rate: int,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if interval < 0 or rate < 0:
            raise ValueError(f"need interval >= 0 and rate >= 0, got {interval} and {rate}")
        self.store = store
        self.interval = interval
        self.rate = rate
        self.last: ScrubPass | None = None
        self._passed = trio.Event()
        self._wall_clock = wall_clock
        self._stamp = store.root / "scrubbed"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        if not self.interval:
            return
        await trio.sleep(await self._due_in())
        while True:
            found = await self.scrub_once()
            try:
                await trio.to_thread.run_sync(self._write_stamp, self._wall_clock())
            except OSError as e:  # the next start then scrubs a little early: no harm
                log.warning("cannot record the scrub pass in %s: %s", self._stamp, e)
            self.last, passed, self._passed = found, self._passed, trio.Event()
            passed.set()
            log.info(
                "scrub pass: %d chunks (%d bytes) checked, %d corrupt, %d missing",
                found.checked,
                found.bytes_read,
                found.corrupt,
                found.missing,
            )
            await trio.sleep(self.interval)

    async def _due_in(self) -> float:
        """Seconds until the next pass: what is left of the interval since the last one (a
        stamp from the future, after the clock was set back, counts as just now)."""
        last = await trio.to_thread.run_sync(self._read_stamp)
        if last is None:
            return self.interval
        return min(self.interval, max(0.0, last + self.interval - self._wall_clock()))

    def _read_stamp(self) -> float | None:
        try:
            last = float(self._stamp.read_text().strip())
        except (OSError, ValueError):  # none yet, or unreadable: a full interval from now
            return None
        return last if math.isfinite(last) else None

    def _write_stamp(self, when: float) -> None:
        temp = self._stamp.with_name(self._stamp.name + ".tmp")
        temp.write_text(f"{when:.3f}\n")
        temp.replace(self._stamp)  # whole or not at all; losing it only brings a pass forward

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
