"""Peers that break the rules, built from raw py-libp2p (tests only)."""

from __future__ import annotations

from typing import Any

from libp2p import new_swarm
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.basic_host import BasicHost
from libp2p.network.config import RetryConfig
from libp2p.peer.id import ID
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from multiaddr import Multiaddr

from node.p2p import P2PNode


def plaintext_host() -> Any:
    """A libp2p host that offers only /plaintext/2.0.0 security."""
    key_pair = create_new_key_pair()
    swarm = new_swarm(
        key_pair=key_pair,
        sec_opt={TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(key_pair)},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        listen_addrs=[Multiaddr("/ip4/127.0.0.1/tcp/0")],
        retry_config=RetryConfig(max_retries=0),
    )
    return BasicHost(network=swarm)


async def push_raw_value(node: P2PNode, peer_id: str, key: str, value: bytes) -> bool:
    """Store ``value`` under ``key`` at ``peer_id`` with no local validation (a forger's PUT)."""
    ok: bool = await node._dht.kad.value_store._store_at_peer(
        ID.from_base58(peer_id), key.encode(), value
    )
    return ok


def local_value(node: P2PNode, key: str) -> bytes | None:
    record = node._dht.kad.value_store.get(key.encode())
    return None if record is None else bytes(record.value)
