"""Connections that heal: TCP keepalive on every connection, and our own short dial backoff.

Two py-libp2p behaviours made a restarted or partitioned peer look gone for about a minute:

* a peer whose dial failed once is refused for 60 s by the swarm's negative dial cache, checked
  even before an existing connection is reused, so a restarted scheduler that had already
  connected to a worker could not be reached by it; the cache is switched off
  (:func:`disable_negative_dial_cache`) and replaced by :class:`DialBackoff`: short, jittered,
  and cleared the moment the peer reaches us;
* a connection to a peer that vanished without a FIN (a partition, a frozen host) stays open
  until the kernel gives up retransmitting, ~15 minutes by default, and every stream opened on
  it waits on the dead socket; every connection gets TCP keepalive and ``TCP_USER_TIMEOUT``
  (:func:`tune_socket`), and :class:`~node.p2p.P2PNode` closes the connections of a peer it
  declares dead.

Both are sans-IO except :func:`tune_socket`, which only sets socket options.
"""

from __future__ import annotations

import logging
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

logger = logging.getLogger("vmlend.node.p2p")

# Attribute names that lead from a libp2p connection down to its TCP socket (swarm connection
# -> yamux -> secure session -> noise framing -> raw connection -> trio stream -> socket); a
# search rather than one fixed path, so a reshuffled py-libp2p only loses the tuning, logged.
_LINKS = ("muxed_conn", "secured_conn", "conn", "read_writer", "read_write_closer", "stream")
_MAX_DEPTH = 8


def socket_of(conn: Any) -> trio.socket.SocketType | None:
    """The TCP socket under a py-libp2p connection, or None if it cannot be found."""
    seen: set[int] = set()
    frontier = [conn]
    for _ in range(_MAX_DEPTH):
        following: list[Any] = []
        for obj in frontier:
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if isinstance(obj, trio.SocketStream):
                return obj.socket
            following.extend(
                child for name in _LINKS if (child := getattr(obj, name, None)) is not None
            )
        frontier = following
    return None


@dataclass(frozen=True, slots=True)
class KeepaliveTimes:
    """When an idle connection is probed and how long unacknowledged data may wait.

    ``idle``: seconds of silence before the first probe; ``interval``: between probes;
    ``probes``: unanswered probes before the kernel closes; ``user_timeout``: seconds sent data
    may stay unacknowledged before the kernel closes (this is what ends a connection on which
    we keep writing to a vanished peer: keepalive probes only run on an idle connection).
    """

    idle: int
    interval: int
    probes: int
    user_timeout: float

    @classmethod
    def for_liveness(cls, *, heartbeat_interval: float, peer_timeout: float) -> KeepaliveTimes:
        # Heartbeats already detect a silent peer after peer_timeout; the kernel's limits are
        # the backstop for connections the heartbeat does not use, and must not cut a live but
        # congested home uplink: twice the peer timeout, at least 10 s.
        return cls(
            idle=max(1, round(peer_timeout)),
            interval=max(1, round(heartbeat_interval)),
            probes=3,
            user_timeout=max(10.0, 2 * peer_timeout),
        )


def tune_socket(sock: trio.socket.SocketType, times: KeepaliveTimes) -> None:
    """Turn on keepalive and ``TCP_USER_TIMEOUT`` (Linux names; others keep what they have)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    options = {
        "TCP_KEEPIDLE": times.idle,
        "TCP_KEEPINTVL": times.interval,
        "TCP_KEEPCNT": times.probes,
        "TCP_USER_TIMEOUT": round(times.user_timeout * 1000),
    }
    for name, value in options.items():
        if (option := getattr(socket, name, None)) is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


def tune_connection(conn: Any, times: KeepaliveTimes) -> bool:
    """Tune the TCP socket under ``conn``; False if there is none (or it is already closed)."""
    sock = socket_of(conn)
    if sock is None:
        logger.debug("no TCP socket found under %r; keepalive not set", conn)
        return False
    try:
        tune_socket(sock, times)
    except OSError as e:  # closed in the meantime: nothing to tune
        logger.debug("keepalive not set on %r: %s", conn, e)
        return False
    return True


class DialBackoff:
    """Per peer: how long to wait before dialling it again after failed dials.

    The first failure waits ``first`` seconds, each further one doubles it up to ``most``, each
    wait jittered by +-``jitter`` (so peers that lost the same scheduler do not redial it in
    step). Any sign of the peer (a connection either way, a heartbeat) clears it at once. Times
    are ``trio.current_time()`` values passed in by the caller. At most ``max_peers`` are
    remembered (peers' records name peers for us to dial): past that, the longest-free go first.
    """

    def __init__(
        self,
        *,
        first: float = 0.25,
        most: float = 4.0,
        jitter: float = 0.2,
        rng: Callable[[], float] = random.random,
        max_peers: int = 4096,
    ) -> None:
        if not 0 < first <= most or not 0 <= jitter < 1:
            raise ValueError("need 0 < first <= most and 0 <= jitter < 1")
        self._first, self._most, self._jitter, self._rng = first, most, jitter, rng
        self._max_peers = max_peers
        self._state: dict[str, tuple[float, float]] = {}  # peer -> (not before, last delay)

    def wait(self, peer: str, now: float) -> float:
        """Seconds left before ``peer`` may be dialled (0.0: now)."""
        state = self._state.get(peer)
        return 0.0 if state is None else max(0.0, state[0] - now)

    def failed(self, peer: str, now: float) -> float:
        """Record a failed dial; return the wait before the next one."""
        previous = self._state.get(peer)
        delay = self._first if previous is None else min(self._most, 2 * previous[1])
        spread = delay * self._jitter * (2 * self._rng() - 1)
        self._state[peer] = (now + delay + spread, delay)
        if len(self._state) > self._max_peers:
            del self._state[min(self._state, key=lambda p: self._state[p][0])]
        return delay + spread

    def reached(self, peer: str) -> None:
        """The peer showed up: dial it freely again."""
        self._state.pop(peer, None)

    def __len__(self) -> int:
        return len(self._state)


class ConnectionEvents:
    """py-libp2p's ``INotifee`` for the swarm: ``on_connected(conn)`` for every new connection;
    the other notifications are not needed."""

    def __init__(self, on_connected: Callable[[Any], None]) -> None:
        self._on_connected = on_connected

    async def connected(self, network: Any, conn: Any) -> None:
        self._on_connected(conn)

    async def disconnected(self, network: Any, conn: Any) -> None:
        pass

    async def opened_stream(self, network: Any, stream: Any) -> None:
        pass

    async def closed_stream(self, network: Any, stream: Any) -> None:
        pass

    async def listen(self, network: Any, multiaddr: Any) -> None:
        pass

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        pass
