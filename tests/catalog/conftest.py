from __future__ import annotations

import ipaddress
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from catalog.blob import BlobId, BlobStore
from catalog.blob_service import BlobService, data_host_for
from catalog.chunk_store import ChunkStore
from catalog.chunking import KIB, ChunkId, ChunkParams
from node.identity import Identity
from node.p2p import P2PNode

# Small chunks keep tests fast while still giving many chunks per blob.
SMALL = ChunkParams(min_size=1 * KIB, avg_size=4 * KIB, max_size=16 * KIB)
# ~64 KiB chunks: a 2 MiB blob is ~30 chunks, enough for several providers to share it.
PARAMS = ChunkParams(min_size=16 * KIB, avg_size=64 * KIB, max_size=256 * KIB)
MIB = 1 << 20


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[ChunkStore]:
    async with ChunkStore.open(tmp_path / "chunks") as s:
        yield s


@pytest.fixture
def blobs(store: ChunkStore) -> BlobStore:
    return BlobStore(store, params=SMALL, batch_bytes=64 * KIB)


class HoldingStore(ChunkStore):
    """An honest store that serves nothing until ``released`` is set (on both paths)."""

    released: trio.Event

    async def get(self, chunk_id: ChunkId, *, verify: bool | None = None) -> bytes:
        await self.released.wait()
        return await super().get(chunk_id, verify=verify)

    def open_file_sync(self, chunk_id: ChunkId) -> tuple[int, int]:
        trio.from_thread.run(self.released.wait)  # called in the data channel's thread
        return super().open_file_sync(chunk_id)


@dataclass
class Peer:
    service: BlobService
    scope: trio.CancelScope

    @property
    def blobs(self) -> BlobStore:
        return self.service.blobs

    @property
    def addr(self) -> str:
        return self.service.p2p.addrs[0]

    @property
    def peer_id(self) -> str:
        return self.service.p2p.peer_id

    def kill(self) -> None:
        self.scope.cancel()


Spawn = Callable[..., Awaitable[Peer]]


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
        count = 0

        async def start(
            *,
            store_cls: type[ChunkStore] = ChunkStore,
            quota: int | None = None,
            bootstrap: tuple[str, ...] = (),
            request_timeout: float = 10.0,
            ip: str = "127.0.0.1",
            params: ChunkParams = PARAMS,
            max_data_connections: int = 64,
        ) -> Peer:
            nonlocal count
            count += 1
            home = tmp_path / f"peer{count}"
            store = await stack.enter_async_context(
                store_cls.open(home / "chunks", quota_bytes=quota)
            )
            listen = [f"/ip{ipaddress.ip_address(ip).version}/{ip}/tcp/0"]
            p2p = P2PNode(
                Identity.generate(),
                listen=listen,
                bootstrap=bootstrap,
                heartbeat_interval=0.5,
                peer_timeout=5.0,
            )
            service = BlobService(
                p2p,
                BlobStore(store, params=params),
                request_timeout=request_timeout,
                data_host=data_host_for(listen),  # as a node does
                max_data_connections=max_data_connections,
            )

            async def run(task_status: trio.TaskStatus[None]) -> None:
                async with trio.open_nursery() as inner:
                    await inner.start(p2p.run)
                    await inner.start(service.run)
                    task_status.started()

            scope = trio.CancelScope()

            async def guarded(
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
            ) -> None:
                with scope:
                    await run(task_status)

            await nursery.start(guarded)
            return Peer(service, scope)

        yield start
        nursery.cancel_scope.cancel()


async def add(peers: list[Peer], data: bytes, tmp: Path) -> BlobId:
    path = tmp / f"input-{len(data)}-{hash(data[:64])}"
    path.write_bytes(data)
    ids = {await p.service.add(path) for p in peers}
    assert len(ids) == 1
    return ids.pop()


async def exported(peer: Peer, blob_id: BlobId, tmp: Path) -> bytes:
    out = tmp / f"out-{blob_id.hex()[:8]}"
    await peer.blobs.export(blob_id, out)
    return out.read_bytes()
