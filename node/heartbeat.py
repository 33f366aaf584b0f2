"""Which peers are alive, from application-level heartbeats, sans-IO.

A watcher keeps one ``/vmlend/heartbeat/1.0.0`` stream to each peer it knows and sends a
:class:`Ping` every interval; the peer answers each with a :class:`Pong` (:data:`PINGS` and
:data:`PONGS` encode and decode them). A peer is live while its last answered (or received)
heartbeat is at most ``peer_timeout`` old. Time is passed in (``trio.current_time()`` in the
node). :meth:`Liveness.sweep` recomputes the live set and says whether it changed, so the node can
wake whoever waits on membership.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from node.wire_message import MessageSet

PROTOCOL_ID = "/vmlend/heartbeat/1.0.0"


@dataclass(frozen=True, slots=True)
class Ping:
    TYPE: ClassVar[str] = "ping"


@dataclass(frozen=True, slots=True)
class Pong:
    TYPE: ClassVar[str] = "pong"


PINGS: MessageSet[Ping] = MessageSet(PROTOCOL_ID, Ping)  # watcher -> peer
PONGS: MessageSet[Pong] = MessageSet(PROTOCOL_ID, Pong)  # peer -> watcher


class Liveness:
    def __init__(self, *, peer_timeout: float) -> None:
        if peer_timeout <= 0:
            raise ValueError("peer_timeout must be positive")
        self.peer_timeout = peer_timeout
        self._last_seen: dict[str, float] = {}
        self._live: frozenset[str] = frozenset()

    @property
    def live(self) -> frozenset[str]:
        """The live set as of the last :meth:`sweep`."""
        return self._live

    def seen(self, peer_id: str, now: float) -> bool:
        """Record a heartbeat from ``peer_id``; True if that made it live.

        Expiring the others is :meth:`sweep`'s job (once per interval), not every heartbeat's:
        sweeping here made each interval cost O(peers^2)."""
        self._last_seen[peer_id] = max(now, self._last_seen.get(peer_id, now))
        if peer_id in self._live:
            return False
        self._live = self._live | {peer_id}
        return True

    def last_seen(self, peer_id: str) -> float | None:
        return self._last_seen.get(peer_id)

    def sweep(self, now: float) -> bool:
        """Drop peers silent for longer than ``peer_timeout``; True if the live set changed."""
        cutoff = now - self.peer_timeout
        live = frozenset(p for p, t in self._last_seen.items() if t >= cutoff)
        for peer in self._last_seen.keys() - live:
            del self._last_seen[peer]
        changed = live != self._live
        self._live = live
        return changed

    def forget(self, peer_id: str, now: float) -> bool:
        self._last_seen.pop(peer_id, None)
        return self.sweep(now)
