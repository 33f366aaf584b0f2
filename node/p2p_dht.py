"""Our use of py-libp2p's Kademlia DHT: the validator, and lookups that always ask the network.

Every node runs the DHT in server mode with *strict* validation and only the ``vmlend`` namespace
registered: py-libp2p otherwise accepts any value under a namespace it has no validator for
(``NamespacedValidator`` falls back to accepting), so a node without our validator would store and
serve forged records.

``KadDHT.get_value`` and ``find_providers`` answer from the local store when it holds anything,
which hides newer records and other providers. :class:`Dht` therefore queries the k closest peers
every time (the peers every put and provide went to) and merges their answers with the local ones.
This uses two private helpers of py-libp2p 0.8.1 (``ValueStore._get_from_peer`` and
``ProviderStore._get_providers_from_peer_with_closers``); the version is pinned.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence

import trio
from libp2p.abc import IHost
from libp2p.kad_dht.common import BUCKET_SIZE
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.records.validator import NamespacedValidator, Validator

from node import dht_records
from node.p2p_stream import LIBP2P_IO_ERRORS

logger = logging.getLogger("vmlend.node.p2p.dht")


class _VmlendValidator(Validator):  # type: ignore[misc]  # libp2p is untyped here
    def __init__(self, clock: Callable[[], float]) -> None:
        self._inner = dht_records.RecordValidator(clock)

    def validate(self, key: str, value: bytes) -> None:
        self._inner.validate(key, value)

    def select(self, key: str, values: list[bytes]) -> int:
        return self._inner.select(key, values)


def make_dht(host: IHost, wall_clock: Callable[[], float]) -> KadDHT:
    validator = NamespacedValidator(
        {dht_records.NAMESPACE: _VmlendValidator(wall_clock)}, strict_validation=True
    )
    return KadDHT(
        host,
        DHTMode.SERVER,
        validator=validator,
        validator_changed=True,
        strict_validation=True,
    )


MAX_EXTRA_ASKS = 64


def lookup_target(key: bytes) -> bytes:
    """The FIND_NODE target for a record key: its sha256 multihash.

    py-libp2p's FIND_NODE handler ignores targets that are neither a multihash nor at most 50 bytes
    (``/vmlend/<kind>/<peer id>`` is longer), so looking up the raw key would find nobody."""
    return b"\x12\x20" + hashlib.sha256(key).digest()


class Dht:
    """Typed, network-first access to the values and providers we use."""

    def __init__(self, kad: KadDHT, *, query_timeout: float) -> None:
        self.kad = kad
        self._query_timeout = query_timeout
        # Peers not to ask (the node sets it to "known dead": heartbeats stopped).
        self.skip: Callable[[ID], bool] = lambda peer: False

    async def _closest(self, key: bytes) -> list[ID]:
        """The k closest peers to ``key``: the network lookup's answer, or our routing table's
        if the lookup overruns ``query_timeout`` (py-libp2p waits 10 s on each frozen peer)."""
        peers: list[ID] = self.kad.routing_table.find_local_closest_peers(key, BUCKET_SIZE)
        with trio.move_on_after(self._query_timeout):
            peers = await self.kad.peer_routing.find_closest_peers_network(key)
        me = self.kad.local_peer_id
        return [p for p in peers if p != me and not self.skip(p)]

    async def put(self, key: str, value: bytes) -> int:
        """Validate, store locally and at the k closest peers; return how many peers took it.

        Raises the validator's error (``InvalidRecordError``) for a value we would not accept."""
        self.kad.validator.validate(key, value)
        key_bytes = key.encode()
        self.kad.value_store.put(key_bytes, value)
        stored = 0

        async def store(peer: ID) -> None:
            nonlocal stored
            with trio.move_on_after(self._query_timeout):
                try:
                    if await self.kad.value_store._store_at_peer(peer, key_bytes, value):
                        stored += 1
                except LIBP2P_IO_ERRORS as e:
                    logger.debug("put %s at %s: %s", key, peer, e)

        async with trio.open_nursery() as nursery:
            for peer in await self._closest(lookup_target(key_bytes)):
                nursery.start_soon(store, peer)
        return stored

    async def get_all(self, key: str, *, also_ask: ID | None = None) -> list[bytes]:
        """Every distinct value for ``key`` held locally, by the k closest peers, or by
        ``also_ask`` (e.g. the record's owner, who always holds its own) - unvalidated."""
        key_bytes = key.encode()
        found: dict[bytes, None] = {}
        local = self.kad.value_store.get(key_bytes)
        if local is not None:
            found[local.value] = None

        async def ask(peer: ID) -> None:
            with trio.move_on_after(self._query_timeout):
                try:
                    rec = await self.kad.value_store._get_from_peer(
                        peer, key_bytes, return_record=True
                    )
                except LIBP2P_IO_ERRORS as e:
                    logger.debug("get %s from %s: %s", key, peer, e)
                    return
                if rec is not None and isinstance(getattr(rec, "value", None), bytes):
                    found[rec.value] = None

        async with trio.open_nursery() as nursery:
            extra = also_ask
            if extra is not None and extra != self.kad.local_peer_id and not self.skip(extra):
                nursery.start_soon(ask, extra)
            for peer in await self._closest(lookup_target(key_bytes)):
                if peer != also_ask:
                    nursery.start_soon(ask, peer)
        return list(found)

    def get_local(self, key: str) -> bytes | None:
        record = self.kad.value_store.get(key.encode())
        return None if record is None else bytes(record.value)

    async def get_from(self, peer: ID, key: str) -> bytes | None:
        """The value ``peer`` holds for ``key`` (unvalidated), or None."""
        with trio.move_on_after(self._query_timeout):
            try:
                rec = await self.kad.value_store._get_from_peer(
                    peer, key.encode(), return_record=True
                )
            except LIBP2P_IO_ERRORS as e:
                logger.debug("get %s from %s: %s", key, peer, e)
                return None
            value = getattr(rec, "value", None)
            return value if isinstance(value, bytes) else None
        return None

    async def provide(self, index: str) -> None:
        await self.kad.provider_store.provide(bytes.fromhex(index))

    def withdraw(self, index: str) -> None:
        key = bytes.fromhex(index)
        store = self.kad.provider_store
        store.providing_keys.discard(key)
        store.providers.get(key, {}).pop(str(self.kad.local_peer_id), None)

    async def providers(self, index: str, *, also_ask: Sequence[ID] = ()) -> set[str]:
        """Peer IDs that announced ``index``, locally known or held by the k closest peers or by
        ``also_ask`` (at most ``MAX_EXTRA_ASKS`` of them; the node passes its live peers, so a
        small network finds every announcement even when a lookup came back short)."""
        key = bytes.fromhex(index)
        found = {str(p.peer_id) for p in self.kad.provider_store.get_providers(key)}

        async def ask(peer: ID) -> None:
            with trio.move_on_after(self._query_timeout):
                try:
                    (
                        infos,
                        _closer,
                    ) = await self.kad.provider_store._get_providers_from_peer_with_closers(
                        peer, key
                    )
                except LIBP2P_IO_ERRORS as e:
                    logger.debug("providers of %s from %s: %s", index, peer, e)
                    return
                for info in infos:
                    found.add(str(info.peer_id))

        async with trio.open_nursery() as nursery:
            extra = [p for p in also_ask if not self.skip(p)][:MAX_EXTRA_ASKS]
            for peer in extra:
                nursery.start_soon(ask, peer)
            for peer in await self._closest(key):
                if peer not in extra:
                    nursery.start_soon(ask, peer)
        return found

    async def add_peer(self, peer: ID) -> None:
        await self.kad.add_peer(peer, skip_server_mode_check=True)

    def routing_peers(self) -> list[ID]:
        peers: list[ID] = self.kad.routing_table.get_peer_ids()
        return peers

    def drop_peer(self, peer: ID) -> None:
        self.kad.routing_table.remove_peer(peer)

    async def discover(self) -> list[ID]:
        """One lookup of our own ID: fills the routing table with the peers near us."""
        return await self._closest(self.kad.local_peer_id.to_bytes())
