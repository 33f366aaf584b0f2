"""A real scheduler (libp2p host, chunk store, sqlite queue) in this process, for hostile peers
to attack over the real p2p adapter."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from catalog.blob import BlobStore
from catalog.blob_service import BlobService, data_host_for
from catalog.build.os_tiny import BootFiles
from catalog.chunk_store import ChunkStore
from node.identity import Identity
from node.p2p import P2PNode
from scheduler_role.service import SchedulerService
from tests.p2p_helpers import FAST, LOOPBACK


@dataclass
class Node:
    p2p: P2PNode
    blobs: BlobService
    home: Path


@dataclass
class Scheduler(Node):
    service: SchedulerService


def _no_boot_files() -> BootFiles:
    # These tests attack the protocol, not the image builder: an accepted task's assembly fails.
    raise OSError("no boot files in the hostile-peer tests")


async def _node(stack: AsyncExitStack, nursery: trio.Nursery, home: Path) -> Node:
    store = await stack.enter_async_context(ChunkStore.open(home / "chunks"))
    p2p = P2PNode(Identity.generate(), listen=[LOOPBACK], **FAST)
    await nursery.start(p2p.run)
    blobs = BlobService(p2p, BlobStore(store), data_host=data_host_for(p2p.addrs))
    await nursery.start(blobs.run)
    return Node(p2p, blobs, home)


@pytest.fixture
async def scheduler_and_peers(tmp_path: Path) -> AsyncIterator[tuple[Scheduler, Node, Node]]:
    """A scheduler and two peers connected to it (an owner and a stranger, or two strangers)."""
    async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
        base = await _node(stack, nursery, tmp_path / "scheduler")
        service = SchedulerService(
            base.p2p, base.blobs, base.home, boot=_no_boot_files, lease_timeout=5.0
        )
        await nursery.start(service.run)
        peers = [await _node(stack, nursery, tmp_path / f"peer{n}") for n in (1, 2)]
        for peer in peers:
            await peer.p2p.connect(base.p2p.addrs[0])
        yield Scheduler(base.p2p, base.blobs, base.home, service), *peers
        nursery.cancel_scope.cancel()


@pytest.fixture
async def scheduler_and_peer(
    scheduler_and_peers: tuple[Scheduler, Node, Node],
) -> tuple[Scheduler, Node]:
    """A scheduler and a peer connected to it (the peer plays the hostile owner)."""
    return scheduler_and_peers[0], scheduler_and_peers[1]
