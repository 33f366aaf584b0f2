"""``catalog.transfer.fetch_blob`` in virtual time, against in-process providers.

The providers implement the transfer's ``Links`` interface from snapshots of real stores (taken
with the real provider-side ``respond``); their faults include a peer that freezes mid-transfer,
which only a deadline can detect. The same loop runs over real nodes in test_blob_transfer.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trio.testing

from catalog.blob import BlobId, BlobStore
from catalog.chunk_store import ChunkStore
from catalog.chunking import ChunkId
from catalog.errors import NoProviderError
from catalog.transfer import fetch_blob
from catalog.transfer_messages import (
    ChunkRequest,
    ChunkResponse,
    HaveRequest,
    HaveResponse,
    ManifestRequest,
    ManifestResponse,
    Message,
    respond,
)
from catalog.transfer_plan import Event, PeerMisbehaved
from tests.catalog.conftest import SMALL, random_bytes


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

    async def manifest(self, peer: str, blob_id: BlobId) -> bytes | None:
        reply = self.answers[peer][b"m"]
        return reply.manifest if isinstance(reply, ManifestResponse) else None

    async def have(self, peer: str, blob_id: BlobId, chunk_count: int) -> list[int] | None:
        reply = self.answers[peer][b"h"]
        if isinstance(reply, HaveResponse) and reply.chunk_count == chunk_count:
            return sorted(reply.held())
        return None

    async def chunk(self, peer: str, chunk_id: ChunkId) -> bytes | None:
        count = self.answered.get(peer, 0)
        if count >= self.freeze_after.get(peer, 1 << 30):
            await trio.sleep_forever()  # frozen: no answer, no EOF
        reply = self.answers[peer][chunk_id]
        if not isinstance(reply, ChunkResponse):
            return None
        self.answered[peer] = count + 1
        await trio.sleep(0.001 + len(reply.data) / self.rate.get(peer, 1e6))
        return b"\x00" + reply.data[1:] if peer in self.corrupt else reply.data


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
    await fetch_blob(
        stores["me"], blob_id, swarm, list(peers), request_timeout=1.0, on_event=events.append
    )
    assert await stores["me"].missing(blob_id) == []
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
    await fetch_blob(
        stores["me"], blob_id, swarm, ["a", "b", "c"], request_timeout=1.0, on_event=events.append
    )
    assert await stores["me"].missing(blob_id) == []
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
        await fetch_blob(
            stores["me"], blob_id, swarm, ["a"], request_timeout=1.0, on_event=lambda e: None
        )
    [info] = await stores["me"].ls()
    assert info.complete is False  # kept for a later resume
    assert info.missing_chunks < info.chunk_count
