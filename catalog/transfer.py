"""Fetch a blob from several providers at once: the trio glue around :class:`TransferPlan`.

The network is behind :class:`Links` (``catalog.blob_service`` implements it over libp2p plus the
direct data channel; tests may fake it). This module owns concurrency, deadlines and the store:

* the manifest comes from any provider (it verifies itself against the blob ID);
* every provider is asked which chunks it holds (one deadline each; silent ones are left out);
  providers found while the fetch runs (``late``: a DHT lookup) join it as they are known, so a
  fetch from a known source never waits for the lookup;
* chunks are requested as the plan says, each under ``request_timeout``; an accepted chunk (the
  plan verified its hash) goes to a writer task that stores chunks in batches (fewer fsync
  rounds); wrong bytes are dropped by the plan and their sender excluded;
* a broken connection or a protocol violation drops that provider; a timeout counts as a
  failure (``max_failures`` in a row drop it);
* what is stored stays: :meth:`BlobStore.begin_fetch` recorded the blob first, so a later call
  (after a cancel, a failure or a crash) fetches only what is still missing.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import trio

from catalog.blob import BlobId, BlobStore, Manifest
from catalog.chunking import ChunkId, HashedChunk, SpooledChunk
from catalog.errors import BlobTooLargeError, ManifestError, NoProviderError
from catalog.transfer_plan import (
    CancelFetch,
    Event,
    FetchChunk,
    State,
    TransferPlan,
    Verdict,
)
from node.errors import DeadlineError, NetworkError, RemoteProtocolError
from node.supervise import one_error

log = logging.getLogger("vmlend.catalog.transfer")

WRITE_BATCH_BYTES = 16 * 1024 * 1024
WRITERS = 4
BATCH_LINGER = 0.02  # seconds a started batch waits for more chunks
# Requests in flight per provider: ~9 MiB of 2 MiB-average chunks keeps one loopback provider
# busy; 8 (~18 MiB) were no faster from 1 provider and 5-10 % slower from 3 (bench/transfer,
# 512 MiB: more bytes in flight than the caches and 2 cores take).
MAX_IN_FLIGHT = 4


class Links(Protocol):
    """What the transfer needs from the network, per provider peer.

    Each method may raise NetworkError (StreamBrokenError, PeerUnreachableError, DeadlineError)
    or RemoteProtocolError; the transfer bounds each call with its own deadline too."""

    async def manifest(self, peer: str, blob_id: BlobId) -> bytes | None: ...

    async def have(self, peer: str, blob_id: BlobId, chunk_count: int) -> list[int] | None: ...

    async def chunk(
        self, peer: str, chunk_id: ChunkId
    ) -> bytes | bytearray | HashedChunk | SpooledChunk | None: ...


Accepted = tuple[ChunkId, bytes | bytearray | SpooledChunk]  # a chunk the plan accepted


@dataclass(frozen=True, slots=True)
class Held:
    """What a provider said it holds of a blob: its chunk count and the positions held."""

    chunk_count: int
    positions: list[int]


@dataclass(frozen=True, slots=True)
class TransferResult:
    blob_id: BlobId
    bytes_total: int
    bytes_fetched: int  # over the network in this call
    bytes_present: int  # already on disk when it started (resume or dedup)
    chunks_fetched: int
    seconds: float
    setup_seconds: float  # manifest, begin_fetch and have requests
    store_seconds: float  # wall time with a chunk-store write in progress (overlaps the network)


async def get_manifest(
    links: Links, blob_id: BlobId, peers: Sequence[str], *, request_timeout: float
) -> Manifest:
    """The blob's manifest from the first provider whose bytes hash to ``blob_id``."""
    why: dict[str, str] = {}
    for peer in peers:
        with trio.move_on_after(request_timeout):
            try:
                raw = await links.manifest(peer, blob_id)
            except (NetworkError, RemoteProtocolError) as e:
                why[peer] = str(e)[:120]
                continue
            if raw is None:
                why[peer] = "does not hold it"
                continue
            try:
                return Manifest.decode(raw, expected=blob_id)
            except ManifestError as e:
                why[peer] = f"bad manifest: {e}"
                continue
        why.setdefault(peer, "timeout")
    raise NoProviderError(blob_id.hex(), ["<manifest>"], why)


async def fetch_blob(
    blobs: BlobStore,
    blob_id: BlobId,
    links: Links,
    peers: Sequence[str],
    *,
    request_timeout: float = 10.0,
    max_in_flight: int = MAX_IN_FLIGHT,
    on_event: Callable[[Event], None] = lambda e: None,
    manifest: Manifest | None = None,
    held: Mapping[str, Held] | None = None,
    max_size: int | None = None,
    late: Callable[[], Awaitable[Mapping[str, Held]]] | None = None,
) -> TransferResult:
    """Fetch what is missing of ``blob_id`` from ``peers``; raise a TransferError if it cannot
    complete (NoProviderError names the peers dropped and why). ``held``: what some peers have
    just said they hold (they are not asked again if it fits the manifest). ``late``: more
    providers, with what each holds, once known; they join a fetch still running. A blob whose
    manifest declares more than ``max_size`` bytes raises BlobTooLargeError before any chunk
    is asked for."""
    started = trio.current_time()
    if manifest is None:
        try:
            manifest = await get_manifest(links, blob_id, peers, request_timeout=request_timeout)
        except NoProviderError:
            if late is None:
                raise
            # None of those we started with gave it (a dead source, say): the lookup's may.
            found = {peer: h for peer, h in (await late()).items() if peer not in peers}
            late = None
            if not found:
                raise
            peers, held = [*peers, *found], {**(held or {}), **found}
            manifest = await get_manifest(
                links, blob_id, list(found), request_timeout=request_timeout
            )
    if max_size is not None and manifest.total_size > max_size:
        raise BlobTooLargeError(blob_id.hex(), manifest.total_size, max_size)
    present = await blobs.begin_fetch(manifest)
    plan = TransferPlan(
        manifest, present=present, now=trio.current_time(), max_in_flight=max_in_flight
    )
    bytes_present = sum(ref.size for ref in manifest.chunks if ref.chunk_id in present)

    async def ask_have(peer: str, known: Held | None) -> None:
        if known is not None and known.chunk_count == len(manifest.chunks):
            plan.add_provider(peer, known.positions)
            return
        with trio.move_on_after(request_timeout):
            try:
                positions = await links.have(peer, blob_id, len(manifest.chunks))
            except (NetworkError, RemoteProtocolError) as e:
                log.info("provider %s: have request failed: %s", peer, e)
                return
            if positions is not None:
                plan.add_provider(peer, positions)

    store_seconds = 0.0
    setup_seconds = trio.current_time() - started
    if plan.state is State.RUNNING:
        async with trio.open_nursery() as nursery:
            for peer in dict.fromkeys(peers):
                nursery.start_soon(ask_have, peer, (held or {}).get(peer))
        setup_seconds = trio.current_time() - started

        async def join_late() -> None:
            assert late is not None
            found = await late()
            async with trio.open_nursery() as nursery:
                for peer, known in found.items():
                    if peer not in peers:
                        nursery.start_soon(ask_have, peer, known)

        store_seconds = await _run_plan(
            plan, blobs, links, request_timeout, on_event, None if late is None else join_late
        )
    for event in plan.take_events():
        on_event(event)
    if plan.error is not None:
        raise plan.error
    progress = plan.progress(trio.current_time())
    return TransferResult(
        blob_id=blob_id,
        bytes_total=manifest.total_size,
        bytes_fetched=progress.bytes_fetched,
        bytes_present=bytes_present,
        chunks_fetched=progress.chunks_done - len(present),
        seconds=trio.current_time() - started,
        setup_seconds=setup_seconds,
        store_seconds=store_seconds,
    )


async def _run_plan(
    plan: TransferPlan,
    blobs: BlobStore,
    links: Links,
    request_timeout: float,
    on_event: Callable[[Event], None],
    join_late: Callable[[], Awaitable[None]] | None = None,
) -> float:
    """Run the plan to its end; return the seconds during which some chunk write was in
    progress (wall time, however many batches overlapped). ``join_late`` adds providers to the
    plan while it runs (cancelled if the plan ends first)."""
    store_seconds = 0.0
    busy_since = 0.0
    active = 0  # batches being written now
    scopes: dict[tuple[str, ChunkId], trio.CancelScope] = {}
    writers = trio.Semaphore(WRITERS)
    to_store, stored = trio.open_memory_channel[Accepted](64)

    async def store(batch: list[Accepted]) -> None:
        nonlocal store_seconds, busy_since, active
        active += 1
        if active == 1:
            busy_since = trio.current_time()
        try:
            in_memory = [(i, d) for i, d in batch if not isinstance(d, SpooledChunk)]
            spooled = [(i, d) for i, d in batch if isinstance(d, SpooledChunk)]
            with blobs.chunks.pins() as pins:
                # The plan checked these very bytes (their hash) when it accepted them.
                if spooled:
                    await blobs.chunks.adopt_many(spooled, pins=pins)
                if in_memory:
                    await blobs.chunks.put_many(in_memory, pins=pins, verified=True)
        finally:
            writers.release()
            active -= 1
            if active == 0:
                store_seconds += trio.current_time() - busy_since

    async def writer() -> None:
        # Up to WRITERS batches are written at once, so their fsyncs overlap. Shielded: what
        # was accepted is stored even when the transfer is cancelled (it ends when the fetchers
        # have stopped and the channel is closed), so a resume does not fetch it again.
        with trio.CancelScope(shield=True):
            await write_all()

    async def write_all() -> None:
        # Group commit: a batch is formed only once a writer is free, from what arrived while
        # they were busy, topped up for at most BATCH_LINGER; each batch costs two index
        # transactions and a thread hop whatever its size, so one-chunk batches (what a free
        # writer took before) spent more time on bookkeeping than on bytes.
        async with stored:
            try:
                async with one_error(), trio.open_nursery() as batches:
                    while True:
                        await writers.acquire()
                        try:
                            batch = [await stored.receive()]
                        except trio.EndOfChannel:
                            writers.release()
                            return
                        size = _size(batch[0][1])
                        with trio.move_on_after(BATCH_LINGER):
                            while size < WRITE_BATCH_BYTES:
                                try:
                                    item = await stored.receive()
                                except trio.EndOfChannel:
                                    break
                                batch.append(item)
                                size += _size(item[1])
                        batches.start_soon(store, batch)
            finally:
                _drop_unstored(stored)  # a writer failed: these are never stored

    async with one_error(), trio.open_nursery() as outer:
        outer.start_soon(writer)
        async with to_store, one_error(), trio.open_nursery() as nursery:

            def pump() -> None:
                for action in plan.next_actions(trio.current_time()):
                    if isinstance(action, FetchChunk):
                        nursery.start_soon(fetch_one, action)
                    elif isinstance(action, CancelFetch):
                        scope = scopes.get((action.peer, action.chunk_id))
                        if scope is not None:
                            scope.cancel()
                for event in plan.take_events():
                    on_event(event)
                if plan.state is not State.RUNNING:
                    nursery.cancel_scope.cancel()

            async def fetch_one(action: FetchChunk) -> None:
                key = (action.peer, action.chunk_id)
                with trio.CancelScope() as scopes[key]:
                    await _fetch_chunk(plan, links, action, request_timeout, to_store)
                del scopes[key]
                pump()

            async def then_pump() -> None:
                assert join_late is not None
                await join_late()
                pump()

            if join_late is not None:
                nursery.start_soon(then_pump)
            pump()
    return store_seconds


async def _fetch_chunk(
    plan: TransferPlan,
    links: Links,
    action: FetchChunk,
    request_timeout: float,
    to_store: trio.MemorySendChannel[Accepted],
) -> None:
    peer, chunk_id = action.peer, action.chunk_id
    data: bytes | bytearray | HashedChunk | SpooledChunk | None = None
    failure: str | None = None
    gone: str | None = None
    with trio.move_on_after(request_timeout) as deadline:
        try:
            data = await links.chunk(peer, chunk_id)
        except DeadlineError as e:
            failure = str(e)
        except NetworkError as e:
            gone = f"connection failed: {e}"
        except RemoteProtocolError as e:
            gone = f"protocol violation: {e}"
    now = trio.current_time()
    if deadline.cancelled_caught:
        plan.on_failure(peer, chunk_id, now, f"no answer in {request_timeout:g}s")
    elif failure is not None:
        plan.on_failure(peer, chunk_id, now, failure)
    elif gone is not None:
        log.warning("provider %s dropped: %s", peer, gone)
        plan.provider_gone(peer, now, gone)
    elif data is None:
        plan.on_not_found(peer, chunk_id, now)
    elif isinstance(data, SpooledChunk):
        verdict = plan.on_received(peer, chunk_id, data.size, data.digest, now)
        if verdict is not Verdict.ACCEPTED or not await _accept(to_store, chunk_id, data):
            data.discard()  # a duplicate or a rejected copy
    else:
        digest = None
        if isinstance(data, HashedChunk):
            data, digest = data
        if plan.on_chunk(peer, chunk_id, data, now, digest=digest) is Verdict.ACCEPTED:
            await _accept(to_store, chunk_id, data)


async def _accept(
    to_store: trio.MemorySendChannel[Accepted],
    chunk_id: ChunkId,
    data: bytes | bytearray | SpooledChunk,
) -> bool:
    """Queue an accepted chunk for the writers; False if they are gone (their error is what the
    transfer raises). Shielded: an accepted chunk is stored even if we then stop."""
    try:
        try:
            to_store.send_nowait((chunk_id, data))  # the usual case: the queue has room
        except trio.WouldBlock:
            with trio.CancelScope(shield=True):
                await to_store.send((chunk_id, data))
    except trio.BrokenResourceError:
        return False
    return True


def _drop_unstored(stored: trio.MemoryReceiveChannel[Accepted]) -> None:
    while True:
        try:
            _, data = stored.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            return
        if isinstance(data, SpooledChunk):
            data.discard()


def _size(data: bytes | bytearray | SpooledChunk) -> int:
    return data.size if isinstance(data, SpooledChunk) else len(data)
