"""A concurrent trio fetch loop over the sans-IO plan, with per-request deadlines, in virtual time.

``fetch_blob`` below is the whole networked transfer minus the p2p adapter: the adapter only has
to provide ``call(peer, request) -> response``. It lives in the tests until the adapter lands
(then it moves to ``catalog/``); here it runs against in-process providers whose faults include a
peer that freezes mid-transfer, which only a deadline can detect.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import pytest
import trio
import trio.testing

from catalog.blob import BlobId, BlobStore, Manifest
from catalog.chunk_store import ChunkStore
from catalog.chunking import ChunkId
from catalog.errors import ManifestError, NoProviderError
from catalog.transfer_messages import (
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
from catalog.transfer_plan import (
    CancelFetch,
    Event,
    FetchChunk,
    PeerMisbehaved,
    State,
    TransferPlan,
    Verdict,
)
from tests.catalog.conftest import SMALL, random_bytes


class Client(Protocol):
    async def call(self, peer: str, request: Request) -> Message: ...


async def fetch_blob(
    blobs: BlobStore,
    blob_id: BlobId,
    client: Client,
    peers: list[str],
    *,
    request_timeout: float,
    on_event: Callable[[Event], None],
) -> None:
    ids = itertools.count()
    manifest: Manifest | None = None
    for peer in peers:  # the manifest verifies itself, so any provider will do
        with trio.move_on_after(request_timeout):
            reply = await client.call(peer, ManifestRequest(request_id=next(ids), blob_id=blob_id))
            if isinstance(reply, ManifestResponse):
                try:
                    manifest = Manifest.decode(reply.manifest, expected=blob_id)
                    break
                except ManifestError:
                    continue
    if manifest is None:
        raise NoProviderError(blob_id.hex(), ["<manifest>"], {})
    present = await blobs.begin_fetch(manifest)
    plan = TransferPlan(manifest, present=present, now=trio.current_time())

    async def ask_have(peer: str) -> None:
        with trio.move_on_after(request_timeout):
            reply = await client.call(peer, HaveRequest(request_id=next(ids), blob_id=blob_id))
            if isinstance(reply, HaveResponse) and reply.chunk_count == len(manifest.chunks):
                plan.add_provider(peer, reply.held())

    async with trio.open_nursery() as nursery:
        for peer in peers:
            nursery.start_soon(ask_have, peer)

    scopes: dict[tuple[str, ChunkId], trio.CancelScope] = {}

    async with trio.open_nursery() as nursery:

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
            if plan.state in (State.FAILED, State.CANCELLED):
                nursery.cancel_scope.cancel()

        async def fetch_one(action: FetchChunk) -> None:
            key = (action.peer, action.chunk_id)
            with trio.CancelScope() as scopes[key]:
                with trio.move_on_after(request_timeout) as deadline:
                    reply = await client.call(
                        action.peer, ChunkRequest(request_id=next(ids), chunk_id=action.chunk_id)
                    )
                now = trio.current_time()
                if deadline.cancelled_caught:
                    plan.on_failure(action.peer, action.chunk_id, now, "timeout")
                elif isinstance(reply, ChunkResponse) and reply.chunk_id == action.chunk_id:
                    if plan.on_chunk(action.peer, action.chunk_id, reply.data, now) is (
                        Verdict.ACCEPTED
                    ):
                        # Shielded: an accepted chunk is stored even if the transfer then ends.
                        with trio.CancelScope(shield=True):
                            await blobs.chunks.put(reply.data, expected=action.chunk_id)
                elif isinstance(reply, ErrorResponse) and reply.code is ErrorCode.NOT_FOUND:
                    plan.on_not_found(action.peer, action.chunk_id, now)
                else:
                    plan.on_failure(action.peer, action.chunk_id, now, f"bad answer {reply!r:.80}")
            del scopes[key]
            pump()

        pump()
    if plan.error is not None:
        raise plan.error
    assert await blobs.missing(blob_id) == []


@dataclass
class Swarm:
    """Providers answering from a snapshot of their stores (taken with the real ``respond``).

    Answers cost latency + size / rate of virtual time and no thread: the autojump clock skips
    ahead whenever every task waits, and a task waiting on a worker thread counts as waiting, so
    provider-side disk reads inside a deadline would let deadlines fire spuriously.
    """

    answers: dict[str, dict[bytes, Message]]  # peer -> request key -> answer
    rate: dict[str, float] = field(default_factory=dict)
    freeze_after: dict[str, int] = field(default_factory=dict)  # answers, then silence
    corrupt: set[str] = field(default_factory=set)
    answered: dict[str, int] = field(default_factory=dict)

    @classmethod
    async def snapshot(cls, stores: dict[str, BlobStore], blob_id: BlobId) -> Swarm:
        answers: dict[str, dict[bytes, Message]] = {}
        for peer, store in stores.items():
            table: dict[bytes, Message] = {
                b"m": await respond(store, ManifestRequest(request_id=0, blob_id=blob_id)),
                b"h": await respond(store, HaveRequest(request_id=0, blob_id=blob_id)),
            }
            for ref in (await store.manifest(blob_id)).chunks:
                table[ref.chunk_id] = await respond(
                    store, ChunkRequest(request_id=0, chunk_id=ref.chunk_id)
                )
            answers[peer] = table
        return cls(answers)

    async def call(self, peer: str, request: Request) -> Message:
        count = self.answered.get(peer, 0)
        if isinstance(request, ChunkRequest) and count >= self.freeze_after.get(peer, 1 << 30):
            await trio.sleep_forever()  # frozen: no answer, no EOF
        key = {HaveRequest: b"h", ManifestRequest: b"m"}.get(type(request))
        if key is None:
            assert isinstance(request, ChunkRequest)
            key = request.chunk_id
        reply = replace(self.answers[peer][key], request_id=request.request_id)
        if isinstance(reply, ChunkResponse):
            self.answered[peer] = count + 1
            await trio.sleep(0.001 + len(reply.data) / self.rate.get(peer, 1e6))
            if peer in self.corrupt:
                reply = ChunkResponse(request_id=reply.request_id, chunk_id=reply.chunk_id,
                                      data=b"\x00" + reply.data[1:])
        return reply


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[dict[str, BlobStore]]:
    async with AsyncExitStack() as stack:
        out = {}
        for name in ("me", "a", "b", "c"):
            store = await stack.enter_async_context(ChunkStore.open(tmp_path / name))
            out[name] = BlobStore(store, params=SMALL)
        yield out


async def seed(stores: dict[str, BlobStore], peers: str, data: bytes) -> BlobId:
    ids = {await stores[p].add_bytes(data) for p in peers}
    assert len(ids) == 1
    return ids.pop()


@pytest.mark.parametrize("peers", ["a", "abc"])
async def test_fetch_concurrently(
    stores: dict[str, BlobStore], peers: str, autojump_clock: trio.testing.MockClock
) -> None:
    data = random_bytes(300_000, 1)
    blob_id = await seed(stores, peers, data)
    swarm = await Swarm.snapshot({p: stores[p] for p in peers}, blob_id)
    events: list[Event] = []
    await fetch_blob(stores["me"], blob_id, swarm, list(peers), request_timeout=1.0,
                     on_event=events.append)
    assert sum(swarm.answered.values()) >= len((await stores["me"].manifest(blob_id)).chunks)
    assert all(swarm.answered.get(p, 0) > 0 for p in peers)


async def test_frozen_and_malicious_providers(
    stores: dict[str, BlobStore], autojump_clock: trio.testing.MockClock
) -> None:
    data = random_bytes(300_000, 2)
    blob_id = await seed(stores, "abc", data)
    swarm = await Swarm.snapshot({p: stores[p] for p in "abc"}, blob_id)
    swarm.freeze_after, swarm.corrupt = {"a": 3}, {"b"}
    events: list[Event] = []
    await fetch_blob(stores["me"], blob_id, swarm, ["a", "b", "c"], request_timeout=1.0,
                     on_event=events.append)
    assert [e.peer for e in events if isinstance(e, PeerMisbehaved)] == ["b"]
    out = stores["me"]
    await out.export(blob_id, Path(str(out.chunks.root)) / "out")
    assert (out.chunks.root / "out").read_bytes() == data


async def test_all_providers_frozen_fails_clearly(
    stores: dict[str, BlobStore], autojump_clock: trio.testing.MockClock
) -> None:
    blob_id = await seed(stores, "a", random_bytes(100_000, 3))
    swarm = await Swarm.snapshot({"a": stores["a"]}, blob_id)
    swarm.freeze_after = {"a": 2}
    with pytest.raises(NoProviderError, match=r"a \(gone\)"):
        await fetch_blob(stores["me"], blob_id, swarm, ["a"], request_timeout=1.0,
                         on_event=lambda e: None)
    [info] = await stores["me"].ls()
    assert info.complete is False  # kept for a later resume
    assert info.missing_chunks < info.chunk_count
