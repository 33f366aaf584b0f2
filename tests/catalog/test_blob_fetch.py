"""``catalog.blob_fetch``: a blob made complete here in time from every provider there is, and a
small blob read whole (real chunk stores; real libp2p hosts on loopback where there is a
network, virtual time where there is none)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, cast

import pytest
import trio
import trio.testing

from catalog.blob import BlobId, BlobStore, ChunkRef, Manifest
from catalog.blob_fetch import ensure_blob, is_complete, read_small
from catalog.blob_service import BlobService
from catalog.chunking import ChunkId, hash_chunk
from catalog.errors import (
    BlobTooLargeError,
    ChunkCorruptError,
    FetchTimeoutError,
    IncompleteBlobError,
    ManifestError,
    NoProviderError,
    UnknownBlobError,
)
from catalog.transfer import Held, TransferResult
from node.dht_records import peer_id_of
from node.errors import DeadlineError
from node.identity import Identity
from node.p2p import P2PNode
from tests.catalog.conftest import MIB, HoldingStore, Spawn, add, exported, random_bytes

# ---- no network ------------------------------------------------------------------------------


class NoNetwork:
    """A P2PNode stand-in that fails the test on any use."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the network was used: P2PNode.{name}")


class SilentFetch(BlobService):
    """A service whose fetch never ends, as against providers that never answer."""

    fetches = 0

    async def fetch(self, blob_id: BlobId, **options: Any) -> TransferResult:
        self.fetches += 1
        await trio.sleep_forever()
        raise AssertionError("unreachable")


def offline(blobs: BlobStore, cls: type[BlobService] = BlobService) -> BlobService:
    return cls(cast(P2PNode, NoNetwork()), blobs, data_host=None)


def peer_addr(port: int) -> str:
    """An address on loopback of a peer nobody runs."""
    return f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id_of(Identity.generate().public_bytes)}"


async def test_a_complete_blob_is_returned_without_the_network(blobs: BlobStore) -> None:
    data = random_bytes(100_000, 1)
    blob_id = await blobs.add_bytes(data)
    # Even with no budget at all and an address nobody listens on: nothing is asked.
    result = await ensure_blob(offline(blobs), blob_id, sources=[peer_addr(9)], timeout=0)
    assert result.bytes_present == result.bytes_total == len(data)
    assert result.bytes_fetched == 0
    assert await is_complete(blobs, blob_id)


async def test_the_budget_ends_a_fetch_that_never_finishes(
    blobs: BlobStore, autojump_clock: trio.testing.MockClock
) -> None:
    missing = BlobId(bytes(32))
    assert not await is_complete(blobs, missing)
    service = offline(blobs, SilentFetch)
    started = trio.current_time()
    with pytest.raises(FetchTimeoutError) as caught:
        await ensure_blob(service, missing, sources=[peer_addr(9)], timeout=300)
    assert trio.current_time() - started == pytest.approx(300)
    assert (caught.value.blob_id_hex, caught.value.timeout) == (missing.hex(), 300)
    assert isinstance(caught.value, DeadlineError)  # a network failure to its callers too
    assert cast(SilentFetch, service).fetches == 1


# ---- read_small ------------------------------------------------------------------------------


async def test_read_small_returns_the_bytes(blobs: BlobStore) -> None:
    data = random_bytes(50_000, 2) + bytes(20 * 16 * 1024)  # ends in repeats of one chunk
    blob_id = await blobs.add_bytes(data)
    manifest = await blobs.manifest(blob_id)
    assert len(manifest.distinct_ids()) < len(manifest.chunks)
    assert await read_small(blobs, blob_id, max_size=len(data)) == data


async def test_read_small_refuses_a_larger_blob_before_reading_it(
    blobs: BlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    blob_id = await blobs.add_bytes(random_bytes(100_000, 3))
    reads: list[object] = []

    def read_sync(chunk_id: bytes, verify: bool) -> bytes:
        reads.append(chunk_id)
        raise AssertionError("a chunk was read")

    monkeypatch.setattr(blobs.chunks, "read_sync", read_sync)
    with pytest.raises(BlobTooLargeError) as caught:
        await read_small(blobs, blob_id, max_size=99_999)
    assert (caught.value.size, caught.value.limit) == (100_000, 99_999)
    assert reads == []


async def test_read_small_refuses_what_is_not_all_here(blobs: BlobStore) -> None:
    with pytest.raises(UnknownBlobError):
        await read_small(blobs, BlobId(bytes(32)), max_size=MIB)
    parts = [random_bytes(3000, i) for i in range(3)]
    manifest = Manifest(tuple(ChunkRef(hash_chunk(p), len(p)) for p in parts))
    await blobs.begin_fetch(manifest)
    await blobs.chunks.put(parts[0])
    with pytest.raises(IncompleteBlobError):
        await read_small(blobs, manifest.blob_id, max_size=MIB)


async def test_read_small_verifies_each_chunk(blobs: BlobStore) -> None:
    blob_id = await blobs.add_bytes(random_bytes(100_000, 4))
    victim = (await blobs.manifest(blob_id)).chunks[2].chunk_id
    path = blobs.chunks.path_of(victim)
    raw = bytearray(path.read_bytes())
    raw[0] ^= 0x80
    path.write_bytes(bytes(raw))
    with pytest.raises(ChunkCorruptError):
        await read_small(blobs, blob_id, max_size=MIB)
    assert not await is_complete(blobs, blob_id)  # quarantined; a fetch can repair it


async def test_read_small_refuses_a_manifest_that_understates_a_chunk(blobs: BlobStore) -> None:
    # A peer's manifest may name a chunk already here with a smaller size than it has, so that
    # the declared total passes the limit; what is read must not exceed it anyway.
    big = random_bytes(12_000, 5)
    await blobs.chunks.put(big)
    lying = Manifest((ChunkRef(hash_chunk(big), 10),))
    await blobs.begin_fetch(lying)
    assert await is_complete(blobs, lying.blob_id)
    with pytest.raises(ManifestError):
        await read_small(blobs, lying.blob_id, max_size=100)


# ---- real providers --------------------------------------------------------------------------


async def dead_addr(spawn: Spawn) -> str:
    """The address of a node that has stopped (its port now refuses connections)."""
    gone = await spawn()
    addr = gone.addr
    gone.kill()
    await trio.testing.wait_all_tasks_blocked()
    return addr


async def test_a_dead_first_address_is_passed_over(spawn: Spawn, tmp_path: Path) -> None:
    first = await spawn()
    second = await spawn()
    me = await spawn()
    data = random_bytes(2 * MIB, 6)
    blob_id = await add([first, second], data, tmp_path)
    dead = first.addr
    first.kill()
    await trio.testing.wait_all_tasks_blocked()
    sources = [dead, second.addr]
    with pytest.raises(NoProviderError):  # what asking only the first address got
        await me.service.fetch(blob_id, sources=sources[:1])
    result = await ensure_blob(me.service, blob_id, sources=sources, timeout=30)
    assert result.bytes_fetched == len(data)
    assert await exported(me, blob_id, tmp_path) == data


async def test_providers_the_dht_names_join_the_known_addresses(
    spawn: Spawn, tmp_path: Path
) -> None:
    provider = await spawn()
    me = await spawn(bootstrap=(provider.addr,))
    await me.service.p2p.wait_peer_count(1)
    data = random_bytes(MIB, 8)
    blob_id = await add([provider], data, tmp_path)
    sources = [await dead_addr(spawn)]  # the only address the caller knows is dead
    with pytest.raises(NoProviderError):
        await ensure_blob(me.service, blob_id, sources=sources, ask_dht=False, timeout=30)
    result = await ensure_blob(me.service, blob_id, sources=sources, timeout=30)
    assert result.bytes_fetched == len(data)
    assert await exported(me, blob_id, tmp_path) == data


async def silent_port(nursery: trio.Nursery) -> int:
    """A port that accepts connections and never says a word (a frozen node)."""
    listeners = await nursery.start(partial(trio.serve_tcp, hold, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def hold(stream: trio.SocketStream) -> None:
    async with stream:
        await trio.sleep_forever()


@pytest.mark.parametrize("sources", [1, 2])
async def test_the_budget_holds_against_a_silent_peer(
    spawn: Spawn, nursery: trio.Nursery, sources: int
) -> None:
    me = await spawn()
    addrs = [peer_addr(await silent_port(nursery)) for _ in range(sources)]
    started = trio.current_time()
    with trio.fail_after(5), pytest.raises(FetchTimeoutError):
        await ensure_blob(me.service, BlobId(bytes(32)), sources=addrs, timeout=0.5)
    assert trio.current_time() - started < 2


async def test_a_fetch_out_of_budget_resumes_on_the_next_call(spawn: Spawn, tmp_path: Path) -> None:
    slow = await spawn(store_cls=HoldingStore)
    assert isinstance(slow.blobs.chunks, HoldingStore)
    slow.blobs.chunks.released = trio.Event()
    me = await spawn()
    data = random_bytes(MIB, 9)
    blob_id = await add([slow], data, tmp_path)
    with pytest.raises(FetchTimeoutError):
        await ensure_blob(me.service, blob_id, sources=[slow.addr], timeout=1)
    assert not await is_complete(me.blobs, blob_id)  # known, waiting for its chunks
    slow.blobs.chunks.released.set()
    result = await ensure_blob(me.service, blob_id, sources=[slow.addr], timeout=30)
    assert result.bytes_total == len(data)
    assert await read_small(me.blobs, blob_id, max_size=len(data)) == data


async def test_a_blob_declaring_more_than_allowed_is_refused_before_any_chunk(
    spawn: Spawn, tmp_path: Path
) -> None:
    # A manifest may repeat one chunk as often as it likes: its declared size is what counts.
    provider = await spawn()
    me = await spawn()
    chunk = random_bytes(64 * 1024, 11)
    await provider.blobs.add_bytes(chunk)  # one chunk, stored
    huge = Manifest(chunks=tuple(ChunkRef(hash_chunk(chunk), len(chunk)) for _ in range(5000)))
    await provider.blobs.begin_fetch(huge)  # the provider now holds a ~320 MiB blob
    with pytest.raises(BlobTooLargeError):
        await ensure_blob(
            me.service, huge.blob_id, sources=[provider.addr], timeout=30, max_size=MIB
        )
    with pytest.raises(UnknownBlobError):  # nothing of it was recorded, let alone fetched
        await me.blobs.missing(huge.blob_id)


class AskedHoldingStore(HoldingStore):
    """A :class:`HoldingStore` that says when it is first asked for a chunk."""

    asked: trio.Event

    async def get(self, chunk_id: ChunkId, *, verify: bool | None = None) -> bytes:
        self.asked.set()
        return await super().get(chunk_id, verify=verify)

    def open_file_sync(self, chunk_id: ChunkId) -> tuple[int, int]:
        trio.from_thread.run_sync(self.asked.set)
        return super().open_file_sync(chunk_id)


async def test_a_known_source_is_fetched_from_without_waiting_for_the_dht(
    spawn: Spawn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind a NAT every DHT lookup ran into its 10 s deadline, and each blob of a lease's
    image waited for it although the scheduler named in the lease held them all."""
    source = await spawn()
    me = await spawn()
    data = random_bytes(MIB, 30)
    blob_id = await add([source], data, tmp_path)
    asked = trio.Event()

    async def never_answers(blob_id: BlobId) -> dict[str, Held]:
        asked.set()
        await trio.sleep_forever()

    monkeypatch.setattr(me.service, "_confirmed_providers", never_answers)
    with trio.fail_after(5):
        result = await ensure_blob(me.service, blob_id, sources=[source.addr], timeout=30)
    assert asked.is_set()
    assert result.bytes_fetched == len(data)
    assert await exported(me, blob_id, tmp_path) == data


async def test_a_provider_the_dht_names_later_joins_a_fetch_already_running(
    spawn: Spawn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    held_back = await spawn(store_cls=AskedHoldingStore)
    store = held_back.blobs.chunks
    assert isinstance(store, AskedHoldingStore)
    store.released, store.asked = trio.Event(), trio.Event()
    other = await spawn()
    me = await spawn(bootstrap=(other.addr,))
    await me.service.p2p.wait_peer_count(1)
    data = random_bytes(MIB, 31)
    blob_id = await add([held_back, other], data, tmp_path)
    lookup = me.service._confirmed_providers

    async def once_the_fetch_runs(blob_id: BlobId) -> dict[str, Held]:
        await store.asked.wait()  # the known source has been asked for a chunk
        return await lookup(blob_id)

    monkeypatch.setattr(me.service, "_confirmed_providers", once_the_fetch_runs)
    with trio.fail_after(20):
        result = await ensure_blob(me.service, blob_id, sources=[held_back.addr], timeout=30)
    assert result.bytes_fetched == len(data)
    assert not store.released.is_set()  # every chunk came from the provider that joined
    assert await exported(me, blob_id, tmp_path) == data


async def test_a_fetch_that_ends_first_leaves_its_lookup_to_finish(
    spawn: Spawn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DHT query cancelled midway breaks the libp2p connection it ran on (py-libp2p 0.8: 300
    lookups cut short at random broke a long request on the same connection within a second),
    and with it, in CI, an owner's "task.wait" to a scheduler that had just fetched a small
    result. A fetch that no longer needs its lookup leaves it to end within its own deadline."""
    source = await spawn()
    me = await spawn()
    blob_id = await add([source], random_bytes(3000, 50), tmp_path)
    release, ended = trio.Event(), trio.Event()

    async def slow_lookup(blob_id: BlobId) -> dict[str, Held]:
        await release.wait()
        ended.set()
        return {}

    monkeypatch.setattr(me.service, "_confirmed_providers", slow_lookup)
    with trio.fail_after(5):
        await ensure_blob(me.service, blob_id, sources=[source.addr], timeout=30)
    release.set()
    with trio.fail_after(5):
        await ended.wait()  # not cancelled with the fetch
