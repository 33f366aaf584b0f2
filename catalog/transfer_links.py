"""The network side of a blob transfer on a :class:`P2PNode` (implements
:class:`catalog.transfer.Links`): control requests (manifest, have) on libp2p streams of
``/vmlend/chunks/1.0.0``; chunk bytes on one direct data-channel connection per provider,
authorised by a one-time token asked for over libp2p (see :mod:`catalog.data_channel`), or on
libp2p streams when the channel is off or the provider has none.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

import trio

from catalog.blob import BlobId
from catalog.chunk_files import Spool
from catalog.chunking import ChunkId, HashedChunk, SpooledChunk
from catalog.data_channel import KEY_SIZE, TICKET_PROTOCOL
from catalog.data_channel_client import DataConnection
from catalog.transfer_messages import (
    MESSAGES,
    PROTOCOL_ID,
    WIRE_LIMITS,
    ChunkRequest,
    ChunkResponse,
    ErrorCode,
    ErrorResponse,
    HaveRequest,
    HaveResponse,
    ManifestRequest,
    ManifestResponse,
)
from node.errors import NetworkError, RemoteProtocolError, StreamBrokenError
from node.p2p import P2PNode

_IP_ADDR = re.compile(r"^/(ip4|ip6)/([^/]+)/")
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

log = logging.getLogger("vmlend.catalog.links")


def ip_of(multiaddr: str) -> IpAddress | None:
    """The IP address a multiaddr starts with (``/ip4/...`` or ``/ip6/...``), if it does."""
    match = _IP_ADDR.match(multiaddr)
    if match is None:
        return None
    try:
        ip = ipaddress.ip_address(match.group(2))
    except ValueError:
        return None
    return ip if f"ip{ip.version}" == match.group(1) else None


def channel_host(ticket_host: str, known: Iterable[str]) -> str:
    """Where to reach a provider's data channel: the host its ticket names, or, when that is
    unspecified (it listens on every address: "0.0.0.0", "::"), the first address of that
    family among the multiaddrs ``known`` for the provider. ValueError if there is none."""
    try:
        ip = ipaddress.ip_address(ticket_host)
    except ValueError:
        raise ValueError(f"the ticket's host {ticket_host[:60]!r} is not an IP address") from None
    if not ip.is_unspecified:
        return str(ip)
    for addr in known:
        mine = ip_of(addr)
        if mine is not None and mine.version == ip.version and not mine.is_unspecified:
            return str(mine)
    raise ValueError(f"no IPv{ip.version} address known for its data channel")


CONTROL_TIMEOUT = 10.0
# Data connections a fetch opens in all (at least one per provider), each read by a thread of
# its own (and served by one there), so that receiving, hashing and writing answers use two
# cores. Measured here (512 MiB): from 1 provider, two connections were ~10 % faster than one,
# three no faster than two; from 3 providers, two each were slower than one each.
CONNECTIONS_PER_FETCH = 2


def connections_per_provider(providers: int) -> int:
    """How many data connections to open to each of ``providers`` providers."""
    return max(1, CONNECTIONS_PER_FETCH // max(1, providers))


class P2PLinks:
    """:class:`catalog.transfer.Links` for fetching ``blob_id`` over a :class:`P2PNode`: control
    requests on libp2p streams; chunks on ``connections`` data-channel connections per provider
    (see :func:`connections_per_provider`), asked in turn, each with its own ticket scoped to
    this blob, or on libp2p when ``use_channel`` is off or the provider has no channel for us.
    ``on_private`` is called once a provider said the blob is private (its ticket carried a
    key). ``addr_hints``: addresses each peer was reached at, where its channel may be too."""

    def __init__(
        self,
        p2p: P2PNode,
        nursery: trio.Nursery,
        blob_id: BlobId,
        *,
        use_channel: bool = True,
        on_private: Callable[[], None] = lambda: None,
        spool: Spool | None = None,
        connections: int = 1,
        addr_hints: dict[str, list[str]] | None = None,
    ) -> None:
        self._p2p = p2p
        self._blob_id = blob_id
        self._on_private = on_private
        self._nursery = nursery
        self._use_channel = use_channel
        self._spool = spool  # where data connections write verified chunks (see DataConnection)
        self._conns: dict[str, list[DataConnection]] = {}  # empty: chunks go on libp2p
        self._locks: dict[str, trio.Lock] = {}
        self._ids = itertools.count(1)
        self._connections = connections
        self._addr_hints = addr_hints or {}  # addresses a peer was reached at (for its channel)

    async def _ask(self, peer: str, request: HaveRequest | ManifestRequest | ChunkRequest) -> Any:
        raw = await self._p2p.request(
            peer, PROTOCOL_ID, MESSAGES.encode(request), timeout=CONTROL_TIMEOUT, limits=WIRE_LIMITS
        )
        reply = MESSAGES.decode(raw)
        if getattr(reply, "request_id", None) != request.request_id:
            raise RemoteProtocolError(f"{peer} answered another request")
        return reply

    async def manifest(self, peer: str, blob_id: BlobId) -> bytes | None:
        reply = await self._ask(peer, ManifestRequest(request_id=next(self._ids), blob_id=blob_id))
        if isinstance(reply, ManifestResponse) and reply.blob_id == blob_id:
            return reply.manifest
        if isinstance(reply, ErrorResponse):
            return None
        raise RemoteProtocolError(f"{peer}: unexpected answer to a manifest request")

    async def have(self, peer: str, blob_id: BlobId, chunk_count: int) -> list[int] | None:
        reply = await self._ask(peer, HaveRequest(request_id=next(self._ids), blob_id=blob_id))
        if isinstance(reply, HaveResponse) and reply.chunk_count == chunk_count:
            return reply.held()
        if isinstance(reply, ErrorResponse):
            return None
        raise RemoteProtocolError(f"{peer}: unexpected answer to a have request")

    async def chunk(
        self, peer: str, chunk_id: ChunkId
    ) -> bytes | bytearray | HashedChunk | SpooledChunk | None:
        while (conn := await self._connection(peer)) is not None:
            try:
                return await conn.get_hashed(chunk_id)
            except StreamBrokenError as e:
                if not self._forget(peer, conn):
                    # The last one broke. Strangers can fill a provider's small pool of
                    # connections still showing no token, and it then refuses ours: chunks go
                    # on libp2p streams from now on (if the provider is gone, they fail too).
                    log.info("data channel to %s lost (%s); fetching on libp2p", peer, e)
                    await conn.aclose()
                    self._conns[peer] = []
                    break
                # Another connection to it still works (this one may have been refused as
                # one too many, say): ask there.
        reply = await self._ask(peer, ChunkRequest(request_id=next(self._ids), chunk_id=chunk_id))
        if isinstance(reply, ChunkResponse) and reply.chunk_id == chunk_id:
            return reply.data
        if isinstance(reply, ErrorResponse) and reply.code is ErrorCode.NOT_FOUND:
            return None
        raise RemoteProtocolError(f"{peer}: unexpected answer to a chunk request")

    async def _connection(self, peer: str) -> DataConnection | None:
        if not self._use_channel:
            return None
        if peer not in self._conns:  # once per peer: the lock is not taken after that
            async with self._locks.setdefault(peer, trio.Lock()):
                if peer not in self._conns:
                    self._conns[peer] = await self._open_channels_or_none(peer)
        conns = self._conns[peer]
        if not conns:
            return None
        conns.append(conns.pop(0))  # they take turns
        return conns[-1]

    def _forget(self, peer: str, conn: DataConnection) -> bool:
        """Take a broken connection out of ``peer``'s turns if another remains (the last one is
        the caller's to replace); whether it is out."""
        conns = self._conns.get(peer, [])
        if conn in conns and len(conns) > 1:
            conns.remove(conn)
            log.info("a data connection to %s broke; %d left", peer, len(conns))
        return conn not in conns

    async def _open_channels_or_none(self, peer: str) -> list[DataConnection]:
        try:
            return await self._open_channels(peer)
        except StreamBrokenError as e:
            # Its channel cannot be reached from here (it is behind a NAT, or a firewall drops
            # it), but we hold a libp2p connection to it: chunks go there.
            log.info("data channel to %s unreachable (%s); fetching on libp2p", peer, e)
            return []

    async def _open_channels(self, peer: str) -> list[DataConnection]:
        """``connections`` connections to ``peer``'s data channel, or none if it has no
        channel for us. The first one's failure is the caller's; a later one's only means
        fewer connections."""
        first = await self._open_channel(peer)
        if first is None:
            return []
        conns = [first]

        async def another() -> None:
            try:
                conn = await self._open_channel(peer)
            except (NetworkError, RemoteProtocolError) as e:
                log.info("a second data connection to %s failed: %s", peer, e)
                return
            if conn is not None:
                conns.append(conn)

        async with trio.open_nursery() as nursery:
            for _ in range(self._connections - 1):
                nursery.start_soon(another)
        return conns

    async def _open_channel(self, peer: str) -> DataConnection | None:
        request = {"type": "ticket_request", "blob_id": self._blob_id}
        reply = await self._p2p.request(peer, TICKET_PROTOCOL, request, timeout=CONTROL_TIMEOUT)
        if reply.get("type") in ("no_channel", "unknown_blob"):
            return None  # chunk requests go on libp2p, where the provider answers each
        token, port, host = reply.get("token"), reply.get("port"), reply.get("host")
        key = reply.get("key")
        if key is not None and not (isinstance(key, bytes) and len(key) == KEY_SIZE):
            raise RemoteProtocolError(f"{peer}: malformed data-channel key")
        if not (
            reply.get("type") == "ticket"
            and isinstance(token, bytes)
            and len(token) == 32
            and type(port) is int
            and 0 < port < 65536
            and isinstance(host, str)
        ):
            raise RemoteProtocolError(f"{peer}: malformed data-channel ticket")
        addrs = list(self._addr_hints.get(peer, []))
        addrs += [a for p in self._p2p.peers() if p.peer_id == peer for a in p.addrs]
        try:
            host = channel_host(host, addrs)
        except ValueError as e:
            raise RemoteProtocolError(f"{peer}: {e}") from None
        if key is not None:
            self._on_private()
        return await DataConnection.open(
            self._nursery, host, port, token, peer, key=key, spool=self._spool
        )

    async def aclose(self) -> None:
        for conns in self._conns.values():
            for conn in conns:
                await conn.aclose()
