"""Blob transfer between real in-process P2P nodes on loopback (libp2p control + data channel)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio

from catalog.blob import BlobId
from catalog.chunk_store import ChunkStore
from catalog.chunking import DEFAULT_PARAMS, KIB, MAX_CHUNK_SIZE, ChunkId
from catalog.errors import NoProviderError, QuotaExceededError
from catalog.transfer_links import P2PLinks, connections_per_provider
from catalog.transfer_plan import Event, PeerDropped, PeerMisbehaved, Progress
from node.p2p import P2PNode
from tests.catalog.conftest import (
    MIB,
    PARAMS,
    HoldingStore,
    Spawn,
    add,
    exported,
    random_bytes,
)


class RogueStore(ChunkStore):
    """Serves through :meth:`get` on both paths: what a rogue ``get`` returns is also what the
    data channel's sendfile path sends (from an in-memory file)."""

    def open_file_sync(self, chunk_id: ChunkId) -> tuple[int, int]:
        data = trio.from_thread.run(self.get, chunk_id)  # called in the data channel's thread
        fd = os.memfd_create("chunk", os.MFD_CLOEXEC)
        os.write(fd, data)
        return fd, len(data)


class CorruptingStore(RogueStore):
    """A malicious provider's store: every chunk it serves has its first byte changed."""

    async def get(self, chunk_id: ChunkId, *, verify: bool | None = None) -> bytes:
        data = await super().get(chunk_id, verify=verify)
        return bytes([data[0] ^ 0xFF]) + data[1:]


class TruncatingStore(RogueStore):
    """Serves every chunk one byte short."""

    async def get(self, chunk_id: ChunkId, *, verify: bool | None = None) -> bytes:
        return (await super().get(chunk_id, verify=verify))[:-1]


class FreezingStore(RogueStore):
    """Serves three chunks, then never answers again (no error, no EOF: frozen)."""

    served = 0

    async def get(self, chunk_id: ChunkId, *, verify: bool | None = None) -> bytes:
        self.served += 1
        if self.served > 3:
            await trio.sleep_forever()
        return await super().get(chunk_id, verify=verify)


@pytest.mark.parametrize("use_channel", [True, False])
async def test_chunks_of_the_largest_size_travel(
    spawn: Spawn, tmp_path: Path, use_channel: bool
) -> None:
    # Zeros have no content-defined cut point: every chunk is cut at MAX_CHUNK_SIZE. Such a
    # chunk once did not fit a libp2p stream's frame (the node-wide limit, not the chunk
    # protocol's own), so a fetch on libp2p streams dropped every provider.
    provider = await spawn(params=DEFAULT_PARAMS)
    me = await spawn(params=DEFAULT_PARAMS)
    data = bytes(2 * MAX_CHUNK_SIZE + 12345)
    blob_id = await add([provider], data, tmp_path)
    manifest = await provider.blobs.manifest(blob_id)
    assert [ref.size for ref in manifest.chunks][:2] == [MAX_CHUNK_SIZE, MAX_CHUNK_SIZE]
    result = await me.service.fetch(blob_id, sources=[provider.addr], use_channel=use_channel)
    assert result.bytes_fetched == MAX_CHUNK_SIZE + 12345  # the two equal chunks are one
    assert await exported(me, blob_id, tmp_path) == data
    assert provider.service.data is not None
    assert provider.service.data.served == (connections_per_provider(1) if use_channel else 0)


@pytest.mark.parametrize("providers", [1, 3])
async def test_fetch_from_providers(spawn: Spawn, tmp_path: Path, providers: int) -> None:
    sources = [await spawn() for _ in range(providers)]
    me = await spawn()
    data = random_bytes(2 * MIB, providers)
    blob_id = await add(sources, data, tmp_path)
    events: list[Event] = []
    result = await me.service.fetch(
        blob_id, sources=[p.addr for p in sources], on_event=events.append
    )
    assert result.bytes_fetched == len(data)
    assert result.bytes_present == 0
    assert 0 < result.store_seconds <= result.seconds
    assert await exported(me, blob_id, tmp_path) == data
    final = [e for e in events if isinstance(e, Progress)][-1]
    assert final.bytes_done == len(data)
    assert {p.peer for p in final.peers if p.bytes_received > 0} == {s.peer_id for s in sources}
    # Chunks came spooled to files by the data channel; every one was adopted or deleted
    # (endgame duplicates included), none is left behind.
    assert list(me.blobs.chunks.spool_dir.iterdir()) == []
    assert (await me.blobs.chunks.check()).ok
    assert all(
        s.service.data is not None and s.service.data.served == connections_per_provider(providers)
        for s in sources
    )


async def test_a_refused_extra_connection_leaves_the_others_in_use(
    spawn: Spawn, tmp_path: Path
) -> None:
    # The provider takes one data connection at a time: the fetcher's second one is refused
    # (closed at once). Its requests move to the first; the provider is not dropped.
    source = await spawn(max_data_connections=1)
    me = await spawn()
    data = random_bytes(2 * MIB, 21)
    blob_id = await add([source], data, tmp_path)
    result = await me.service.fetch(blob_id, sources=[source.addr])
    assert result.bytes_fetched == len(data)
    assert await exported(me, blob_id, tmp_path) == data
    assert source.service.data is not None
    assert (source.service.data.served, source.service.data.refused) == (1, 1)


async def test_ipv6_only_nodes_fetch_on_the_data_channel(spawn: Spawn, tmp_path: Path) -> None:
    source = await spawn(ip="::1")
    me = await spawn(ip="::1")
    data = random_bytes(MIB, 20)
    blob_id = await add([source], data, tmp_path)
    result = await me.service.fetch(blob_id, sources=[source.addr])
    assert result.bytes_fetched == len(data)
    assert await exported(me, blob_id, tmp_path) == data
    assert source.service.data is not None
    # not the libp2p streams, at a tenth of the rate
    assert source.service.data.served == connections_per_provider(1)


async def test_providers_announced_in_dht_and_withdrawn(spawn: Spawn, tmp_path: Path) -> None:
    provider = await spawn()
    me = await spawn(bootstrap=(provider.addr,))
    await me.service.p2p.wait_peer_count(1)
    data = random_bytes(MIB, 7)
    blob_id = await add([provider], data, tmp_path)
    assert await me.service.providers(blob_id) == [provider.peer_id]
    result = await me.service.fetch(blob_id)  # no --from: found through the DHT
    assert result.bytes_fetched == len(data)
    assert await exported(me, blob_id, tmp_path) == data
    await me.service.rm(blob_id)
    await provider.service.rm(blob_id)
    await me.blobs.gc()
    assert await me.service.providers(blob_id) == []  # announced, but no longer holding it
    # The provider no longer holds it: a fetch fails clearly (its stale DHT copy is not trusted).
    with pytest.raises(NoProviderError):
        await me.service.fetch(blob_id, sources=[provider.addr])


async def test_providers_found_in_the_dht_are_asked_what_they_hold_once(
    spawn: Spawn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = await spawn()
    me = await spawn(bootstrap=(provider.addr,))
    await me.service.p2p.wait_peer_count(1)
    blob_id = await add([provider], random_bytes(MIB, 8), tmp_path)
    have_requests: list[str] = []
    original = P2PNode.request

    async def counting(self: P2PNode, peer: str, protocol: str, message: Any, **kw: Any) -> Any:
        if isinstance(message, dict) and message.get("type") == "have_request":
            have_requests.append(peer)
        return await original(self, peer, protocol, message, **kw)

    monkeypatch.setattr(P2PNode, "request", counting)
    result = await me.service.fetch(blob_id)  # confirms the DHT's providers, then fetches
    assert result.bytes_fetched == MIB
    assert have_requests == [provider.peer_id]  # the confirmation's answer is reused


async def test_provider_killed_mid_transfer(spawn: Spawn, tmp_path: Path) -> None:
    sources = [await spawn() for _ in range(3)]
    me = await spawn()
    data = random_bytes(16 * MIB, 3)  # so the victim still has chunks to serve
    blob_id = await add(sources, data, tmp_path)
    victim = sources[0]
    events: list[Event] = []

    def on_event(event: Event) -> None:
        events.append(event)
        if isinstance(event, Progress):
            victim.kill()  # gone while its requests are in flight

    result = await me.service.fetch(blob_id, sources=[p.addr for p in sources], on_event=on_event)
    assert result.bytes_total == len(data)
    assert await exported(me, blob_id, tmp_path) == data
    assert victim.peer_id in {e.peer for e in events if isinstance(e, PeerDropped)}


async def test_frozen_provider_is_worked_around(spawn: Spawn, tmp_path: Path) -> None:
    frozen = await spawn(store_cls=FreezingStore)
    honest = await spawn()
    me = await spawn(request_timeout=2.0)
    data = random_bytes(2 * MIB, 11)
    blob_id = await add([frozen, honest], data, tmp_path)
    with trio.fail_after(20):
        await me.service.fetch(blob_id, sources=[frozen.addr, honest.addr])
    assert await exported(me, blob_id, tmp_path) == data


async def test_only_a_frozen_provider_fails_after_its_deadlines(
    spawn: Spawn, tmp_path: Path
) -> None:
    frozen = await spawn(store_cls=FreezingStore)
    me = await spawn(request_timeout=2.0)
    blob_id = await add([frozen], random_bytes(MIB, 12), tmp_path)
    events: list[Event] = []
    with pytest.raises(NoProviderError, match="gone"):
        await me.service.fetch(blob_id, sources=[frozen.addr], on_event=events.append)
    assert [e.peer for e in events if isinstance(e, PeerDropped)] == [frozen.peer_id]
    [info] = await me.blobs.ls()
    assert info.missing_chunks < info.chunk_count  # the three it served are kept


@pytest.mark.parametrize("store_cls", [CorruptingStore, TruncatingStore])
async def test_malicious_provider_is_excluded(
    spawn: Spawn, tmp_path: Path, store_cls: type[ChunkStore]
) -> None:
    # The honest providers answer only once the evil one has been caught, so that it is asked
    # and answers (else the honest ones may finish the whole blob first).
    HoldingStore.released = trio.Event()
    honest = [await spawn(store_cls=HoldingStore), await spawn(store_cls=HoldingStore)]
    evil = await spawn(store_cls=store_cls)
    me = await spawn()
    data = random_bytes(2 * MIB, 4)
    blob_id = await add([*honest, evil], data, tmp_path)
    events: list[Event] = []

    def on_event(event: Event) -> None:
        events.append(event)
        if isinstance(event, PeerMisbehaved):
            HoldingStore.released.set()

    await me.service.fetch(
        blob_id, sources=[evil.addr, *(p.addr for p in honest)], on_event=on_event
    )
    assert [e.peer for e in events if isinstance(e, PeerMisbehaved)] == [evil.peer_id]
    assert await exported(me, blob_id, tmp_path) == data
    assert (await me.blobs.chunks.check()).ok  # nothing corrupt was stored
    assert list(me.blobs.chunks.spool_dir.iterdir()) == []


async def test_only_a_malicious_provider_fails_clearly(spawn: Spawn, tmp_path: Path) -> None:
    evil = await spawn(store_cls=CorruptingStore)
    me = await spawn()
    blob_id = await add([evil], random_bytes(MIB, 5), tmp_path)
    with pytest.raises(NoProviderError, match="misbehaving"):
        await me.service.fetch(blob_id, sources=[evil.addr])
    [info] = await me.blobs.ls()
    assert info.missing_chunks == info.chunk_count  # not one wrong chunk kept
    assert (await me.blobs.chunks.check()).ok
    # The malicious node and ours both keep serving.
    honest = await spawn()
    await add([honest], random_bytes(MIB, 5), tmp_path)
    await me.service.fetch(blob_id, sources=[honest.addr])


async def test_cancelled_fetch_resumes_from_disk(spawn: Spawn, tmp_path: Path) -> None:
    source = await spawn()
    me = await spawn()
    data = random_bytes(4 * MIB, 6)
    blob_id = await add([source], data, tmp_path)
    with trio.CancelScope() as scope:

        def on_event(event: Event) -> None:
            if isinstance(event, Progress) and event.bytes_done >= len(data) // 4:
                scope.cancel()

        await me.service.fetch(blob_id, sources=[source.addr], on_event=on_event)
    assert scope.cancelled_caught
    [info] = await me.blobs.ls()
    assert 0 < info.missing_chunks < info.chunk_count
    result = await me.service.fetch(blob_id, sources=[source.addr])
    assert result.bytes_present > 0
    assert result.bytes_fetched < len(data)
    assert result.bytes_fetched + result.bytes_present == len(data)
    assert await exported(me, blob_id, tmp_path) == data


async def test_dedup_moves_only_new_chunks(spawn: Spawn, tmp_path: Path) -> None:
    source = await spawn()
    me = await spawn()
    first = random_bytes(4 * MIB, 8)
    second = first[: 2 * MIB] + random_bytes(256 * KIB, 9) + first[2 * MIB :]
    first_id = await add([source], first, tmp_path)
    second_id = await add([source], second, tmp_path)
    await me.service.fetch(first_id, sources=[source.addr])
    result = await me.service.fetch(second_id, sources=[source.addr])
    # The inserted 256 KiB plus the chunks around it (at most max_size on each side).
    assert result.bytes_fetched <= 256 * KIB + 2 * PARAMS.max_size
    assert result.bytes_present >= len(second) - result.bytes_fetched
    assert await exported(me, second_id, tmp_path) == second


async def test_full_quota_fails_clearly_and_stores_nothing(spawn: Spawn, tmp_path: Path) -> None:
    source = await spawn()
    me = await spawn(quota=MIB)
    blob_id = await add([source], random_bytes(2 * MIB, 10), tmp_path)
    with pytest.raises(QuotaExceededError, match="quota exceeded"):
        await me.service.fetch(blob_id, sources=[source.addr])
    assert await me.blobs.ls() == []
    assert (await me.blobs.chunks.usage()).used_bytes == 0
    assert list(me.blobs.chunks.spool_dir.iterdir()) == []  # received, refused, deleted


async def test_unknown_blob_fails_clearly(spawn: Spawn) -> None:
    source = await spawn()
    me = await spawn()
    with pytest.raises(NoProviderError, match="does not hold it"):
        await me.service.fetch(BlobId(bytes(32)), sources=[source.addr])


async def test_private_blob_is_served_only_to_granted_peers(spawn: Spawn, tmp_path: Path) -> None:
    owner = await spawn()
    me = await spawn(bootstrap=(owner.addr,))
    stranger = await spawn()
    data = random_bytes(MIB, 13)
    (tmp_path / "secret").write_bytes(data)
    blob_id = await owner.service.add(tmp_path / "secret", private=True)
    await me.service.p2p.wait_peer_count(1)
    assert await me.service.providers(blob_id) == []  # never announced
    with pytest.raises(NoProviderError, match="does not hold it"):
        await stranger.service.fetch(blob_id, sources=[owner.addr])
    await owner.service.grant(blob_id, me.peer_id)
    result = await me.service.fetch(blob_id, sources=[owner.addr])  # encrypted channel
    assert result.bytes_fetched == len(data)
    assert await exported(me, blob_id, tmp_path) == data
    assert me.service.access.is_private(blob_id)  # and private where it was fetched to
    with pytest.raises(NoProviderError, match="does not hold it"):
        await stranger.service.fetch(blob_id, sources=[me.addr])
    # Nor does asking for its chunks by ID on libp2p reveal them.
    chunk_id = (await owner.blobs.manifest(blob_id)).chunks[0].chunk_id
    async with trio.open_nursery() as nursery:
        links = P2PLinks(stranger.service.p2p, nursery, blob_id, use_channel=False)
        await stranger.service.p2p.connect(owner.addr)
        assert await links.chunk(owner.peer_id, chunk_id) is None
        links_me = P2PLinks(me.service.p2p, nursery, blob_id, use_channel=False)
        assert await links_me.chunk(owner.peer_id, chunk_id) is not None


async def test_a_provider_cannot_make_a_blob_we_know_private(spawn: Spawn, tmp_path: Path) -> None:
    # We know the blob as public (its manifest is here, a chunk short); a provider that
    # answers with a keyed ticket, as for a private blob, must not flip how we treat it.
    provider = await spawn()
    me = await spawn()
    data = random_bytes(MIB, 17)
    (tmp_path / "blob").write_bytes(data)
    blob_id = await provider.service.add(tmp_path / "blob", private=True)
    await provider.service.grant(blob_id, me.peer_id)
    await me.blobs.begin_fetch(await provider.blobs.manifest(blob_id))  # known here, public
    result = await me.service.fetch(blob_id, sources=[provider.addr])  # a keyed ticket
    assert result.bytes_fetched == len(data)
    assert not me.service.access.is_private(blob_id)


async def test_strangers_holding_every_tokenless_slot_do_not_stop_a_fetch(
    spawn: Spawn, tmp_path: Path
) -> None:
    """Sixteen silent connections from four addresses take the provider's whole pool of
    connections that have shown no token yet, so it refuses ours: the fetch moves to libp2p
    streams instead of dropping the provider (it failed before)."""
    source = await spawn()
    me = await spawn()
    data = random_bytes(2 * MIB, 23)
    blob_id = await add([source], data, tmp_path)
    server = source.service.data
    assert server is not None
    squatters: list[trio.SocketStream] = []
    for i in range(16):
        sock = trio.socket.socket()
        await sock.bind((f"127.0.0.{2 + i // 4}", 0))
        await sock.connect(("127.0.0.1", server.port))
        squatters.append(trio.SocketStream(sock))
    with trio.fail_after(5):
        while server.refused == 0 and len(server._unauthorised_by_ip) < 4:  # noqa: ASYNC110
            await trio.sleep(0.01)
    try:
        result = await me.service.fetch(blob_id, sources=[source.addr])
    finally:
        for stream in squatters:
            await stream.aclose()
    assert result.bytes_fetched == len(data)
    assert await exported(me, blob_id, tmp_path) == data
    assert server.refused >= 1  # ours was refused on the data channel


async def test_a_provider_whose_data_channel_cannot_be_reached_serves_on_libp2p(
    spawn: Spawn, tmp_path: Path
) -> None:
    """A provider behind a NAT names a channel address nobody outside can reach, but we hold a
    libp2p connection to it (it dialled us): chunks go there (the provider was dropped before)."""
    source = await spawn()
    me = await spawn()
    data = random_bytes(2 * MIB, 29)
    blob_id = await add([source], data, tmp_path)
    server = source.service.data
    assert server is not None
    with trio.socket.socket() as dead:  # a port nothing listens on: its tickets name it
        await dead.bind(("127.0.0.1", 0))
        server.port = dead.getsockname()[1]
    with trio.fail_after(20):
        result = await me.service.fetch(blob_id, sources=[source.addr])
    assert result.bytes_fetched == len(data)
    assert await exported(me, blob_id, tmp_path) == data
    assert server.served == 0  # nothing came over the data channel
