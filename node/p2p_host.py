"""Building the py-libp2p host the way vmlend needs it, and the small typed helpers around it.

Only the ``node.p2p*`` modules import libp2p. See :mod:`node.p2p` for the traps this handles.
"""

from __future__ import annotations

import errno
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from libp2p import new_swarm
from libp2p.crypto.ed25519 import Ed25519PrivateKey as Libp2pEd25519
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.host.basic_host import BasicHost
from libp2p.network import swarm as swarm_module
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo as Libp2pPeerInfo
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.protocol_muxer.exceptions import MultiselectClientError, ProtocolNotSupportedError
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from multiaddr import Multiaddr
from multiaddr.exceptions import ProtocolLookupError

from node.errors import (
    DeadlineError,
    LocalProtocolError,
    NetworkError,
    PeerUnreachableError,
    RemoteProtocolError,
)
from node.identity import Identity
from node.p2p_stream import LIBP2P_IO_ERRORS, MessageStream

PROTOCOL_ID_RE = re.compile(r"/vmlend/[a-z0-9][a-z0-9-]*/\d+\.\d+\.\d+")

Handler = Callable[[MessageStream], Awaitable[None]]
PEERSTORE_ERRORS: tuple[type[BaseException], ...] = (*LIBP2P_IO_ERRORS, KeyError)


class UnsupportedProtocolError(RemoteProtocolError):
    """The peer does not speak the protocol we asked for."""


class ListenAddressInUseError(NetworkError):
    """Another socket (often another vmlend node) already listens on a listen address."""


class DialTimeoutError(PeerUnreachableError, DeadlineError):
    """No connection to the peer within the dial deadline (e.g. a silent port)."""


@dataclass(frozen=True, slots=True)
class PeerInfo:
    peer_id: str
    addrs: tuple[str, ...]  # full multiaddrs ending in /p2p/<peer_id>


def disable_connect_delay() -> None:
    """Remove py-libp2p's 250 ms happy-eyeballs wait after every dial (process-wide)."""
    swarm_module._HAPPY_EYEBALLS_DELAY = 0.0


def connect_delay() -> float:
    delay: float = swarm_module._HAPPY_EYEBALLS_DELAY
    return delay


def disable_negative_dial_cache(host: BasicHost) -> None:
    """Stop the swarm refusing for 60 s to dial a peer whose dial failed once (it checks that
    even before reusing a live connection); :class:`node.p2p_keepalive.DialBackoff` replaces it."""
    host.get_network()._negative_peer_cache = swarm_module._NegativePeerCache(ttl=0.0)  # type: ignore[attr-defined]


def negative_dial_cache_disabled(host: BasicHost) -> bool:
    cache = getattr(host.get_network(), "_negative_peer_cache", None)
    return cache is None or getattr(cache, "_ttl", None) == 0.0


def open_connections(host: BasicHost, peer: ID) -> int:
    """Connections to ``peer`` still open (the swarm keeps a closed one's object a while)."""
    conns = host.get_network().connections.get(peer) or []
    return sum(1 for conn in conns if not getattr(conn, "is_closed", False))


def open_streams(host: BasicHost, peer: ID) -> int:
    conns = host.get_network().connections.get(peer) or []
    return sum(len(getattr(conn, "streams", ())) for conn in conns)


def check_protocol_id(protocol_id: str) -> str:
    if not PROTOCOL_ID_RE.fullmatch(protocol_id):
        raise LocalProtocolError(
            f"protocol ID {protocol_id!r} is not /vmlend/<name>/<major>.<minor>.<patch>"
        )
    return protocol_id


def parse_peer_id(peer_id: str) -> ID:
    try:
        return ID.from_base58(peer_id)
    except (ValueError, TypeError) as e:
        raise LocalProtocolError(f"not a peer ID: {peer_id!r}") from e


def to_multiaddr(addr: str) -> Multiaddr:
    try:
        return Multiaddr(addr)
    except ValueError as e:
        raise LocalProtocolError(f"not a multiaddr: {addr!r}: {e}") from e


def peer_addr(addr: str) -> Libp2pPeerInfo:
    """A full multiaddr ending in /p2p/<peer id>."""
    try:
        return info_from_p2p_addr(to_multiaddr(addr))
    except ValueError as e:  # InvalidAddrError
        raise LocalProtocolError(f"{addr!r} does not end in /p2p/<peer id>: {e}") from e


def protocol_refused(error: BaseException) -> bool:
    """True if multistream-select said "na" to our protocol somewhere down ``error``'s chain."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ProtocolNotSupportedError) or (
            isinstance(seen, MultiselectClientError) and "not supported" in str(seen)
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def key_pair_of(identity: Identity) -> KeyPair:
    private = Libp2pEd25519.from_bytes(identity.private_bytes)
    return KeyPair(private, private.get_public_key())


def check_listen_free(listen: Sequence[Multiaddr]) -> None:
    """Refuse a fixed TCP port some socket already listens on.

    py-libp2p listens with SO_REUSEPORT (for hole punching), so a second node given the same
    port would start without error and the kernel would split incoming connections between
    the two. A probe bound without SO_REUSEPORT fails on a port that anyone listens on."""
    for addr in listen:
        names = [protocol.name for protocol in addr.protocols()]
        ip = "ip6" if "ip6" in names else "ip4"
        try:
            port = int(addr.value_for_protocol("tcp"))
            host = str(addr.value_for_protocol(ip))
        except (ValueError, TypeError, ProtocolLookupError):
            continue  # not an IP/TCP address: nothing to probe
        if port == 0:
            continue
        family = socket.AF_INET6 if ip == "ip6" else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
            try:
                probe.bind((host, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise ListenAddressInUseError(
                        f"port {port} on {host} is already in use (another vmlend node?); "
                        "stop it, or choose another port with --listen"
                    ) from None
                raise ListenAddressInUseError(f"cannot listen on {addr}: {e.strerror}") from None


def connection_config(max_connections: int, max_connections_per_peer: int) -> ConnectionConfig:
    """py-libp2p's connection limits from ours: at most ``max_connections`` connections in all
    (the swarm prunes the newest past it) and ``max_connections_per_peer`` to any one peer; its
    watermarks scaled down to fit when the ceiling is below them. A connection still showing no
    identity is cut after py-libp2p's upgrade timeout (10 s)."""
    high = min(max_connections, DEFAULT_CONNECTIONS.high_watermark)
    low = min(DEFAULT_CONNECTIONS.low_watermark, high // 2)
    return ConnectionConfig(
        max_connections=max_connections,
        max_connections_per_peer=max_connections_per_peer,
        high_watermark=high,
        low_watermark=low,
        min_connections=min(DEFAULT_CONNECTIONS.min_connections, low),
    )


DEFAULT_CONNECTIONS = ConnectionConfig()


def build_host(
    identity: Identity,
    listen: Sequence[Multiaddr],
    *,
    connections: ConnectionConfig = DEFAULT_CONNECTIONS,
) -> BasicHost:
    key_pair = key_pair_of(identity)
    security = {
        TProtocol(NOISE_PROTOCOL_ID): NoiseTransport(
            key_pair, noise_privkey=new_x25519_key_pair().private_key
        )
    }
    swarm = new_swarm(
        key_pair=key_pair,
        sec_opt=security,
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        listen_addrs=list(listen),
        retry_config=RetryConfig(max_retries=0),
        connection_config=connections,
    )
    host = BasicHost(network=swarm)
    disable_negative_dial_cache(host)
    return host
