"""A lease whose image fills the worker's disk, on a real small filesystem (a tmpfs mounted for the
test): the fetch into the chunk store, or the export of the image into the VM directory, runs out
of room. A real worker agent fetching from a real provider over libp2p loses that lease, tells its
scheduler, leaves no half-written file behind, and keeps serving (the scheduler is a fake one over
in-memory streams; the VMs are fakes: no image is ever complete)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, cast

import pytest
import trio

from catalog import scheduler_record
from catalog.blob import BlobStore
from catalog.blob_service import BlobService, data_host_for
from catalog.caps import Caps
from catalog.chunk_store import ChunkStore
from catalog.dispatch import LeaseGrant, Lost
from catalog.manifest import ImageManifest, LayerRef
from node.config import WorkerConfig
from node.dht_records import Record, make_record, parse_record, peer_id_of
from node.identity import Identity
from node.p2p import P2PNode
from node.units import MIB
from tests.p2p_helpers import FAST, LOOPBACK
from tests.worker.fake_backend import FakeBackend
from tests.worker.fake_scheduler import FakeNetwork, FakeScheduler, lease
from worker_role.agent import WorkerAgent
from worker_role.lease_blobs import NodeLeaseBlobs

SMALL = 4 * MIB  # the small filesystem's size
LAYER = 12 * MIB  # more than fits on it


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL}", "tmpfs", where], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", where], check=True)


class Provider:
    """A scheduler's blobs: a real p2p node and blob service holding one image."""

    def __init__(self, identity: Identity, p2p: P2PNode, service: BlobService) -> None:
        self.identity = identity
        self.p2p = p2p
        self.service = service

    async def image(self, tmp: Path, layer: bytes) -> bytes:
        async def add(name: str, data: bytes) -> str:
            path = tmp / name
            path.write_bytes(data)
            return bytes(await self.service.add(path)).hex()

        manifest = ImageManifest(
            os="tiny", os_version="1", kernel=await add("kernel", b"k" * 1000),
            initramfs=await add("initrd", b"i" * 1000), cmdline="console=ttyS0",
            layers=(LayerRef(blob=await add("layer", layer), what="task"),), caps=Caps(),
            command=("true",), env=(), cwd="/", timeout_s=60,
        )  # fmt: skip
        return bytes.fromhex(await add("manifest", manifest.encode()))

    def record(self) -> Record:
        payload = {"name": "s", "peer_id": self.p2p.peer_id, "addrs": list(self.p2p.addrs)}
        key, value = make_record(self.identity, scheduler_record.KIND, payload, ttl=600, now=1.0)
        return parse_record(key, value, now=1.0)


class ProviderFound(FakeNetwork):
    """The worker's dispatch network, where the DHT names the provider as the scheduler (so the
    agent fetches its images from there)."""

    provider: Provider

    async def find_records(self, kind: str, *, timeout: float) -> list[Record]:  # noqa: ASYNC109
        await trio.lowlevel.checkpoint()
        return [self.provider.record()]


async def p2p_node(
    stack: AsyncExitStack, nursery: trio.Nursery, chunks: Path, identity: Identity
) -> tuple[P2PNode, BlobService]:
    store = await stack.enter_async_context(ChunkStore.open(chunks))
    p2p = P2PNode(identity, listen=[LOOPBACK], **cast(dict[str, Any], FAST))
    await nursery.start(p2p.run)
    service = BlobService(p2p, BlobStore(store), data_host=data_host_for(p2p.addrs))
    await nursery.start(service.run)
    return p2p, service


@pytest.fixture
async def provider(tmp_path: Path) -> AsyncIterator[Provider]:
    async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
        identity = Identity.generate()
        p2p, service = await p2p_node(stack, nursery, tmp_path / "provider", identity)
        yield Provider(identity, p2p, service)
        nursery.cancel_scope.cancel()


def files_under(root: Path) -> set[str]:
    return {str(Path(d, f).relative_to(root)) for d, _, fs in os.walk(root) for f in fs}


def fill(where: Path) -> None:
    """Take every free byte of the filesystem at ``where``."""
    with (where / "filler").open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


@pytest.mark.parametrize("full", ["chunks", "images", "data"])
async def test_an_image_that_fills_the_disk_costs_only_its_lease(
    provider: Provider, small_fs: Path, tmp_path: Path, full: str
) -> None:
    image_id = await provider.image(tmp_path, os.urandom(LAYER))
    # The chunk store, or the VM directory the image is exported into, is on the small fs; or
    # the worker's data dir is, already full, so that its lease file cannot be written.
    chunks = small_fs / "chunks" if full == "chunks" else tmp_path / "worker-chunks"
    vm_dir = small_fs / "vm" if full == "images" else tmp_path / "vm"
    identity = Identity.generate()
    async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
        _, service = await p2p_node(stack, nursery, chunks, identity)
        network = ProviderFound(nursery, worker=peer_id_of(identity.public_bytes))
        network.provider = provider
        scheduler = network.add(FakeScheduler(provider.p2p.peer_id, identity.public_bytes))
        key = lease(1)
        caps = Caps(memory_mib=256)
        grant = LeaseGrant(
            lease=key, image_id=image_id, caps=caps, lease_timeout=30.0, max_runtime=60.0
        )
        scheduler.work.append(grant)
        backend = FakeBackend()
        config = WorkerConfig(schedulers=(), vm_dir=vm_dir)
        data_dir = small_fs / "data" if full == "data" else tmp_path / "worker"
        data_dir.mkdir()
        if full == "data":
            fill(small_fs)
        agent = WorkerAgent(
            network, NodeLeaseBlobs(service, vm_dir / "images"), identity, data_dir, config,
            open_backend=backend.open,
        )  # fmt: skip
        await nursery.start(agent.run)
        with trio.fail_after(120):
            await scheduler.changes.wait_for(lambda: bool(scheduler.of_type(Lost)))
        assert scheduler.of_type(Lost) == [Lost(leases=(key,))]
        assert not backend.vms
        # No half-written image is left behind, and the agent serves on: it asks for work again.
        assert not [f for f in files_under(small_fs) if f.endswith((".part", ".tmp"))]
        asked = len(scheduler.of_type(Lost))
        with trio.fail_after(60):
            await scheduler.changes.wait_for(lambda: len(scheduler.received) > asked + 2)
        nursery.cancel_scope.cancel()
