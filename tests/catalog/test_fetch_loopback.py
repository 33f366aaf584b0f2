"""Providers and a fetcher wired back to back through the real codec and real stores, no sockets.

This is the shape of the networked transfer: the only thing the p2p glue adds is moving these frames
over streams (with deadlines) and running requests concurrently.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from catalog.blob import BlobId, BlobStore, Manifest
from catalog.chunk_store import ChunkStore, GcResult
from catalog.chunking import ChunkId
from catalog.transfer_messages import (
    MESSAGES,
    WIRE_LIMITS,
    ChunkRequest,
    ChunkResponse,
    ErrorCode,
    ErrorResponse,
    HaveRequest,
    HaveResponse,
    ManifestRequest,
    ManifestResponse,
    Message,
    Request,
    respond,
)
from catalog.transfer_plan import CancelFetch, FetchChunk, State, TransferPlan, Verdict
from node.wire import FrameDecoder, encode_frame
from tests.catalog.conftest import SMALL, random_bytes

_ids = itertools.count()


async def call(provider: BlobStore, request: Request) -> Message:
    """One request/response round trip through frames, both ways."""
    decoder = FrameDecoder(WIRE_LIMITS)
    decoder.feed(encode_frame(MESSAGES.encode(request), WIRE_LIMITS))
    raw = decoder.next_message()
    assert raw is not None
    received = MESSAGES.decode(raw)
    assert isinstance(received, HaveRequest | ManifestRequest | ChunkRequest)
    answer = await respond(provider, received)
    decoder.feed(encode_frame(MESSAGES.encode(answer), WIRE_LIMITS))
    raw = decoder.next_message()
    assert raw is not None
    return MESSAGES.decode(raw)


async def fetch(
    fetcher: BlobStore,
    providers: dict[str, BlobStore],
    blob_id: BlobId,
    *,
    stop_after: int | None = None,
) -> int:
    """Fetch ``blob_id``; return the chunk bytes that crossed the 'network'.

    With ``stop_after``, stop (like a killed process) once that many chunks are stored.
    """
    first = next(iter(providers.values()))
    reply = await call(first, ManifestRequest(request_id=next(_ids), blob_id=blob_id))
    assert isinstance(reply, ManifestResponse)
    manifest = Manifest.decode(reply.manifest, expected=blob_id)
    present = await fetcher.begin_fetch(manifest)
    plan = TransferPlan(manifest, present=present, now=0.0)
    for peer, store in providers.items():
        have = await call(store, HaveRequest(request_id=next(_ids), blob_id=blob_id))
        assert isinstance(have, HaveResponse)
        assert have.chunk_count == len(manifest.chunks)
        plan.add_provider(peer, have.held())
    moved = stored = 0
    now = 0.0
    while plan.state is State.RUNNING:
        actions = plan.next_actions(now)
        for action in actions:
            if isinstance(action, CancelFetch):
                continue
            assert isinstance(action, FetchChunk)
            now += 0.001
            reply = await call(
                providers[action.peer],
                ChunkRequest(request_id=next(_ids), chunk_id=action.chunk_id),
            )
            if isinstance(reply, ErrorResponse):
                assert reply.code is ErrorCode.NOT_FOUND
                plan.on_not_found(action.peer, action.chunk_id, now)
                continue
            assert isinstance(reply, ChunkResponse)
            moved += len(reply.data)
            chunk_id = ChunkId(reply.chunk_id)
            if plan.on_chunk(action.peer, chunk_id, reply.data, now) is Verdict.ACCEPTED:
                await fetcher.chunks.put(reply.data, expected=chunk_id)
                stored += 1
                if stored == stop_after:
                    return moved
        if not actions:
            break
    assert plan.state is State.COMPLETE, plan.error
    return moved


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[list[BlobStore]]:
    async with AsyncExitStack() as stack:
        out = []
        for name in ("fetcher", "p1", "p2", "p3"):
            store = await stack.enter_async_context(ChunkStore.open(tmp_path / name))
            out.append(BlobStore(store, params=SMALL))
        yield out


async def test_fetch_from_three_providers_then_dedup(
    stores: list[BlobStore], tmp_path: Path
) -> None:
    fetcher, *providers = stores
    data = random_bytes(600_000, 1)
    blob_id = await providers[0].add_bytes(data)
    for p in providers[1:]:
        assert await p.add_bytes(data) == blob_id
    moved = await fetch(fetcher, {f"p{i}": p for i, p in enumerate(providers)}, blob_id)
    assert moved == len(data)
    await fetcher.export(blob_id, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data
    # A second blob sharing ~90 % of the first moves only its new chunks.
    second = data[:540_000] + random_bytes(60_000, 2)
    second_id = await providers[0].add_bytes(second)
    moved = await fetch(fetcher, {"p0": providers[0]}, second_id)
    assert moved < 60_000 + 2 * SMALL.max_size
    await fetcher.export(second_id, tmp_path / "out2")
    assert (tmp_path / "out2").read_bytes() == second


async def test_provider_missing_a_chunk_answers_not_found(stores: list[BlobStore]) -> None:
    fetcher, p1, p2, _ = stores
    data = random_bytes(200_000, 3)
    blob_id = await p1.add_bytes(data)
    await p2.add_bytes(data)
    victim = (await p2.manifest(blob_id)).chunks[5].chunk_id
    await p2.chunks.quarantine(victim)  # p2 lost its copy (e.g. found corrupt)
    reply = await call(p2, ChunkRequest(request_id=1, chunk_id=victim))
    assert isinstance(reply, ErrorResponse)
    assert reply.code is ErrorCode.NOT_FOUND
    assert await fetch(fetcher, {"p1": p1, "p2": p2}, blob_id) == len(data)


async def test_unknown_blob_is_an_error_answer(stores: list[BlobStore]) -> None:
    reply = await call(stores[1], HaveRequest(request_id=9, blob_id=b"\x07" * 32))
    assert reply == ErrorResponse(request_id=9, code=ErrorCode.UNKNOWN_BLOB)


async def test_fetch_resumes_after_restart(tmp_path: Path) -> None:
    data = random_bytes(400_000, 4)
    async with ChunkStore.open(tmp_path / "p") as pstore:
        provider = BlobStore(pstore, params=SMALL)
        blob_id = await provider.add_bytes(data)
        async with ChunkStore.open(tmp_path / "f") as fstore:
            first = await fetch(BlobStore(fstore), {"p": provider}, blob_id, stop_after=30)
        # "Restarted": a new process opens the same store and finds the incomplete blob.
        async with ChunkStore.open(tmp_path / "f") as fstore:
            fetcher = BlobStore(fstore)
            [info] = await fetcher.ls()
            assert (info.blob_id, info.complete) == (blob_id, False)
            assert await fetcher.gc() == GcResult(0, 0)  # what was fetched is kept
            second = await fetch(fetcher, {"p": provider}, blob_id)
            assert first + second == len(data)  # nothing fetched twice
            await fetcher.export(blob_id, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data
