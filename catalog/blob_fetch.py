"""What the roles do with blobs: make one complete here in time, and read a small one whole.

:func:`ensure_blob` returns at once, without the network, when the blob is complete; otherwise
it fetches the missing chunks from every provider it can find (the addresses the caller knows
and the providers the DHT names, together) within the caller's budget, and what arrived stays
for the next call if the budget runs out. :func:`read_small` reads a blob into memory straight
from the chunk store after checking its declared size against the caller's limit, so a peer
that names a huge blob costs a manifest lookup, not a read. :func:`fetch_for_peer` is
:func:`ensure_blob` on a peer's word: within that peer's quota (:mod:`catalog.peer_quota`), and
what it brought is removed again if the fetch fails; :func:`discard_blob` removes such a blob once
nothing holds it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import trio

from catalog.blob import BlobId, BlobStore
from catalog.chunking import ChunkId
from catalog.errors import (
    BlobTooLargeError,
    FetchTimeoutError,
    IncompleteBlobError,
    ManifestError,
    UnknownBlobError,
)
from catalog.transfer import TransferResult
from catalog.transfer_plan import Event

if TYPE_CHECKING:
    from catalog.blob_service import BlobService

__all__ = ["discard_blob", "ensure_blob", "fetch_for_peer", "is_complete", "read_small"]


async def is_complete(blobs: BlobStore, blob_id: BlobId) -> bool:
    """Whether every chunk of the blob is in the store (False for a blob it does not know)."""
    try:
        return not await blobs.missing(blob_id)
    except UnknownBlobError:
        return False


async def ensure_blob(
    service: BlobService,
    blob_id: BlobId,
    *,
    timeout: float,  # noqa: ASYNC109 -- its overrun is a FetchTimeoutError naming the blob
    sources: Sequence[str] = (),
    ask_dht: bool = True,
    on_event: Callable[[Event], None] = lambda e: None,
    use_channel: bool = True,
    max_size: int | None = None,
) -> TransferResult:
    """Make the blob complete in ``service``'s store within ``timeout`` seconds; one that
    declares more than ``max_size`` bytes raises BlobTooLargeError before a chunk is fetched.

    Chunks come from the peers at ``sources`` (multiaddrs; one that cannot be reached is
    passed over) and, unless ``ask_dht`` is false, from the providers the DHT names. Raises
    :class:`FetchTimeoutError` when the budget runs out, NoProviderError when no peer that
    holds the blob could be reached, another TransferError when it cannot complete."""
    blobs = service.blobs
    if await is_complete(blobs, blob_id):
        size = (await blobs.manifest(blob_id)).total_size
        if max_size is not None and size > max_size:
            raise BlobTooLargeError(blob_id.hex(), size, max_size)
        return TransferResult(blob_id, size, 0, size, 0, 0.0, 0.0, 0.0)
    with trio.move_on_after(timeout):
        return await service.fetch(
            blob_id,
            sources=sources,
            ask_dht=ask_dht,
            on_event=on_event,
            use_channel=use_channel,
            max_size=max_size,
        )
    raise FetchTimeoutError(blob_id.hex(), timeout)


async def read_small(blobs: BlobStore, blob_id: BlobId, *, max_size: int) -> bytes:
    """The blob's bytes, if it declares at most ``max_size`` of them.

    The size is the one its manifest declares (which the blob ID verifies): a larger blob
    raises :class:`BlobTooLargeError` before any chunk is read. Every chunk is verified; a
    corrupt one is quarantined and raises ChunkCorruptError, one of another size than the
    manifest says raises ManifestError. UnknownBlobError or IncompleteBlobError if the blob
    is not all here."""
    manifest = await blobs.manifest(blob_id)
    if manifest.total_size > max_size:
        raise BlobTooLargeError(blob_id.hex(), manifest.total_size, max_size)
    missing = await blobs.missing(blob_id)
    if missing:
        raise IncompleteBlobError(blob_id.hex(), len(missing))
    parts: dict[ChunkId, bytes] = {}
    for ref in manifest.chunks:
        if ref.chunk_id not in parts:
            data = await blobs.chunks.get(ref.chunk_id, verify=True)
            # The chunk is what its ID names; a manifest may still understate its size (a
            # chunk already here from another blob is not fetched again), and then the
            # declared total would not bound what is read.
            if len(data) != ref.size:
                raise ManifestError(
                    f"blob {blob_id.hex()} says chunk {ref.chunk_id.hex()} has {ref.size} "
                    f"bytes; it has {len(data)}"
                )
            parts[ref.chunk_id] = data
    return b"".join(parts[ref.chunk_id] for ref in manifest.chunks)


async def fetch_for_peer(
    service: BlobService,
    peer: str,
    blob_id: BlobId,
    *,
    max_size: int,
    timeout: float,  # noqa: ASYNC109 -- as ensure_blob's
    sources: Sequence[str] = (),
    ask_dht: bool = True,
    task: str | None = None,
    keep_partial: bool = False,
) -> int:
    """:func:`ensure_blob` on ``peer``'s word, charged to ``peer``; the blob's size.

    ``max_size`` is reserved from the peer's quota while the fetch runs (PeerQuotaError, and
    nothing fetched, if it does not fit); then the blob is charged to the peer, with ``task``
    if given, until released. A fetch that fails removes what it brought here, except one that
    ran out of time when ``keep_partial``: what arrived stays, charged to the peer at
    ``max_size``, for the peer's next try."""
    quota = service.peer_quota
    async with quota.reserve(peer, max_size):
        created = not await _knows(service.blobs, blob_id)
        quota.fetching[blob_id] += 1
        failed = True
        try:
            result = await ensure_blob(
                service, blob_id, timeout=timeout, sources=sources, ask_dht=ask_dht,
                max_size=max_size,
            )  # fmt: skip
            await quota.charge(peer, blob_id, result.bytes_total, created=created, task=task)
            failed = False
        except FetchTimeoutError:
            if keep_partial:
                with trio.CancelScope(shield=True):
                    await quota.charge(peer, blob_id, max_size, created=created, task=task)
                failed = False
            raise
        finally:
            quota.fetching[blob_id] -= 1
            if quota.fetching[blob_id] <= 0:
                del quota.fetching[blob_id]
            if failed and created:
                with trio.CancelScope(shield=True):
                    await discard_blob(service, blob_id)
    return result.bytes_total


async def discard_blob(service: BlobService, blob_id: BlobId) -> bool:
    """Remove a blob a peer's word brought here, and collect its chunks, unless a fetch still
    runs for it or a charge holds it; whether it was removed."""
    quota = service.peer_quota
    if quota.fetching[blob_id] > 0 or await quota.charged(blob_id):
        return False
    try:
        await service.rm(blob_id)
    except UnknownBlobError:
        return False
    await service.blobs.gc()
    return True


async def _knows(blobs: BlobStore, blob_id: BlobId) -> bool:
    try:
        await blobs.manifest(blob_id)
    except UnknownBlobError:
        return False
    return True
