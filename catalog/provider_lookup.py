"""A DHT lookup of a blob's providers that a fetch runs beside dialling its sources (see
:meth:`catalog.blob_service.BlobService.fetch`)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from catalog.blob import BlobId
from catalog.transfer import Held
from node.errors import NetworkError

log = logging.getLogger("vmlend.catalog.blobs")


class ProviderLookup:
    """``run`` it (once); ``found`` holds the confirmed providers once ``done`` is set, and
    ``error`` why the DHT could not say. A fetch waits for it only when no source answered."""

    def __init__(self) -> None:
        self.found: dict[str, Held] = {}
        self.error: str | None = None
        self.done = trio.Event()

    async def run(
        self, confirmed: Callable[[BlobId], Awaitable[dict[str, Held]]], blob_id: BlobId
    ) -> None:
        try:
            self.found = await confirmed(blob_id)
        except NetworkError as e:
            log.info("providers of blob %s: %s", blob_id.hex(), e)
            self.error = str(e)[:120]
        finally:
            self.done.set()

    async def wait(self) -> dict[str, Held]:
        await self.done.wait()
        return self.found


def took(semaphore: trio.Semaphore) -> bool:
    """Take a unit of ``semaphore`` if one is free at once."""
    try:
        semaphore.acquire_nowait()
    except trio.WouldBlock:
        return False
    return True
