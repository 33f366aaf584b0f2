"""Which chunk to ask of which provider, and what to make of the answers. Sans-IO.

The trio glue (later, around the p2p adapter) owns streams, deadlines and the store; it feeds this
class what happened and does what it says (``tests/catalog/test_fetch_loopback.py`` is that loop
without sockets; the provider side is :func:`catalog.transfer_messages.respond`)::

    present = await blobs.begin_fetch(manifest)
    plan = TransferPlan(manifest, present=present, now=trio.current_time())
    for peer, have in have_responses: plan.add_provider(peer, have.held())
    while plan.state is State.RUNNING:
        for action in plan.next_actions(now):      # FetchChunk / CancelFetch: send them
            ...
        # then one of, as answers arrive:
        plan.on_chunk(peer, chunk_id, data, now)   # ACCEPTED -> await chunks.put(data, expected=id)
        plan.on_not_found(peer, chunk_id, now) / plan.on_failure(peer, chunk_id, now, why)
        plan.provider_gone(peer, now)
        for event in plan.take_events(): ...        # Progress, PeerMisbehaved, PeerDropped, ...

Policy: rarest chunk first, each to the holder with the most free request slots (at most
``max_in_flight`` per peer); when every missing chunk is already asked for, idle peers re-ask the
longest-outstanding ones (endgame), and the first good copy cancels the others. A chunk whose bytes
do not hash to its ID is dropped and its sender is never used again. If some missing chunk has no
live provider left, the plan fails with :class:`NoProviderError`.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from catalog.blob import Manifest
from catalog.chunking import ChunkId, hash_chunk
from catalog.errors import NoProviderError, TransferCancelledError, TransferError

log = logging.getLogger("vmlend.catalog.transfer")

PeerId = str


class State(Enum):
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Verdict(Enum):
    ACCEPTED = "accepted"  # verified and new: store it
    DUPLICATE = "duplicate"  # verified, but another copy came first: drop it
    REJECTED = "rejected"  # wrong bytes, unsolicited, or from an excluded peer: drop it


# ------------------------------------------------------------------------------------ actions


@dataclass(frozen=True, slots=True)
class FetchChunk:
    """Send a ChunkRequest for ``chunk_id`` to ``peer``."""

    peer: PeerId
    chunk_id: ChunkId
    size: int
    duplicate: bool = False  # an endgame re-ask of a chunk already requested elsewhere


@dataclass(frozen=True, slots=True)
class CancelFetch:
    """The chunk is no longer wanted from ``peer``; send a CancelRequest (a late answer is fine)."""

    peer: PeerId
    chunk_id: ChunkId


Action = FetchChunk | CancelFetch

# ------------------------------------------------------------------------------------ events


@dataclass(frozen=True, slots=True)
class PeerProgress:
    peer: PeerId
    bytes_received: int
    in_flight: int
    rate_bps: float
    status: str  # "live", "gone", "misbehaving"


@dataclass(frozen=True, slots=True)
class Progress:
    bytes_done: int  # bytes of the blob now on disk, resumed ones included
    bytes_total: int
    chunks_done: int  # distinct chunks
    chunks_total: int
    bytes_fetched: int  # bytes that came over the network in this transfer
    rate_bps: float  # over the last ``rate_window`` seconds
    peers: tuple[PeerProgress, ...]


@dataclass(frozen=True, slots=True)
class PeerMisbehaved:
    peer: PeerId
    chunk_id: ChunkId | None
    reason: str


@dataclass(frozen=True, slots=True)
class PeerDropped:
    peer: PeerId
    reason: str


@dataclass(frozen=True, slots=True)
class Completed:
    pass


@dataclass(frozen=True, slots=True)
class Failed:
    error: TransferError


Event = Progress | PeerMisbehaved | PeerDropped | Completed | Failed

# ------------------------------------------------------------------------------------ state


class _Meter:
    """Bytes per second over a sliding window of injected time, O(1) amortised per sample."""

    def __init__(self, start: float, window: float = 5.0) -> None:
        self.start = start
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()
        self._total = 0

    def add(self, now: float, size: int) -> None:
        self._samples.append((now, size))
        self._total += size

    def rate(self, now: float) -> float:
        while self._samples and self._samples[0][0] < now - self.window:
            self._total -= self._samples.popleft()[1]
        span = min(self.window, now - self.start)
        return self._total / span if span > 0 else 0.0


@dataclass(slots=True)
class _Peer:
    peer: PeerId
    has: set[ChunkId] = field(default_factory=set)
    in_flight: dict[ChunkId, float] = field(default_factory=dict)  # chunk -> time asked
    cancelled: set[ChunkId] = field(default_factory=set)  # asked, then cancelled by us
    status: str = "live"
    failures: int = 0  # consecutive
    bytes_received: int = 0
    meter: _Meter = field(default_factory=lambda: _Meter(0.0))


class TransferPlan:
    """The state of one blob transfer. All times are ``trio.current_time()``-style seconds."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        present: Iterable[ChunkId],
        now: float,
        max_in_flight: int = 4,
        max_failures: int = 3,
        endgame_copies: int = 2,
        rate_window: float = 5.0,
    ) -> None:
        if max_in_flight < 1 or max_failures < 1 or endgame_copies < 1 or rate_window <= 0:
            raise ValueError("limits must be positive")
        self.manifest = manifest
        self.max_in_flight = max_in_flight
        self.max_failures = max_failures
        self.endgame_copies = endgame_copies  # most requests outstanding for one chunk
        self.rate_window = rate_window
        self._start = now
        self._sizes = manifest.sizes()
        self._uses: dict[ChunkId, int] = {}
        self._position: dict[ChunkId, int] = {}
        for i, ref in enumerate(manifest.chunks):
            self._uses[ref.chunk_id] = self._uses.get(ref.chunk_id, 0) + 1
            self._position.setdefault(ref.chunk_id, i)
        have = set(present)
        self._needed: set[ChunkId] = {c for c in self._sizes if c not in have}
        self._bytes_done = sum(ref.size for ref in manifest.chunks if ref.chunk_id in have)
        self._bytes_fetched = 0
        self._meter = _Meter(now, rate_window)
        self._peers: dict[PeerId, _Peer] = {}
        self._asked: dict[ChunkId, set[PeerId]] = {}  # outstanding, uncancelled requests
        self._queue: deque[ChunkId] = deque()  # needed chunks, rarest first; rebuilt when dirty
        self._dirty = True
        self._cancels: list[CancelFetch] = []
        self._events: list[Event] = []
        self.state = State.RUNNING
        self.error: TransferError | None = None
        if not self._needed:
            self._finish()

    # -------------------------------------------------------------------------------- inputs

    def add_provider(self, peer: PeerId, positions: Iterable[int]) -> None:
        """``peer`` holds the chunks at these manifest positions (adds to what it said before).

        A peer dropped as gone may come back this way (it reconnected); a misbehaving one never.
        """
        meter = _Meter(self._start, self.rate_window)
        state = self._peers.setdefault(peer, _Peer(peer, meter=meter))
        if state.status == "misbehaving":
            return
        if state.status == "gone":
            state.status, state.failures = "live", 0
        chunks = self.manifest.chunks
        for position in positions:
            if not 0 <= position < len(chunks):
                self._misbehaved(state, None, f"have-map position {position} out of range")
                return
            state.has.add(chunks[position].chunk_id)
        self._dirty = True

    def provider_gone(self, peer: PeerId, now: float, reason: str = "gone") -> None:
        """The peer disconnected or stopped answering: forget it; its requests go elsewhere."""
        state = self._peers.get(peer)
        if state is not None and state.status == "live":
            self._exclude(state, "gone")
            self._events.append(PeerDropped(peer, reason))

    def on_chunk(
        self,
        peer: PeerId,
        chunk_id: ChunkId,
        data: bytes | bytearray,
        now: float,
        *,
        digest: ChunkId | None = None,
    ) -> Verdict:
        """A ChunkResponse arrived. Store the bytes only if this returns ``ACCEPTED``.

        ``digest`` is the blake3 of ``data`` if the caller computed it itself (off the event
        loop); it is never a value a peer supplied."""
        if digest is None:
            digest = hash_chunk(data)
        return self.on_received(peer, chunk_id, len(data), digest, now)

    def on_received(
        self, peer: PeerId, chunk_id: ChunkId, size: int, digest: ChunkId, now: float
    ) -> Verdict:
        """:meth:`on_chunk` for bytes the caller holds elsewhere (e.g. already spooled to a
        file): their size and the blake3 the caller computed."""
        state = self._peers.get(peer)
        if state is None or state.status != "live":
            return Verdict.REJECTED  # a late answer from a peer we already stopped using
        if chunk_id in state.cancelled:
            state.cancelled.discard(chunk_id)
        elif chunk_id in state.in_flight:
            self._unask(state, chunk_id)
        else:
            self._misbehaved(state, chunk_id, "sent a chunk it was not asked for")
            return Verdict.REJECTED
        if size != self._sizes.get(chunk_id, -1) or digest != chunk_id:
            self._misbehaved(state, chunk_id, "sent bytes that do not hash to the chunk ID")
            return Verdict.REJECTED
        state.failures = 0
        state.bytes_received += size
        state.meter.add(now, size)
        if chunk_id not in self._needed or self.state is not State.RUNNING:
            return Verdict.DUPLICATE
        self._needed.discard(chunk_id)
        self._bytes_done += size * self._uses[chunk_id]
        self._bytes_fetched += size
        self._meter.add(now, size)
        for other in sorted(self._asked.pop(chunk_id, set())):
            other_state = self._peers[other]
            del other_state.in_flight[chunk_id]
            other_state.cancelled.add(chunk_id)
            self._cancels.append(CancelFetch(other, chunk_id))
        self._events.append(self.progress(now))
        if not self._needed:
            self._finish()
        return Verdict.ACCEPTED

    def on_not_found(self, peer: PeerId, chunk_id: ChunkId, now: float) -> None:
        """The peer answered that it does not hold the chunk (after all): ask someone else."""
        state = self._peers.get(peer)
        if state is None:
            return
        state.cancelled.discard(chunk_id)
        if chunk_id in state.in_flight:
            self._unask(state, chunk_id)
        state.has.discard(chunk_id)
        self._dirty = True

    def on_failure(self, peer: PeerId, chunk_id: ChunkId, now: float, reason: str) -> None:
        """A request timed out or errored; after ``max_failures`` in a row the peer is dropped."""
        state = self._peers.get(peer)
        if state is None:
            return
        state.cancelled.discard(chunk_id)
        if chunk_id in state.in_flight:
            self._unask(state, chunk_id)
        self._dirty = True
        state.failures += 1
        if state.status == "live" and state.failures >= self.max_failures:
            self._exclude(state, "gone")
            self._events.append(PeerDropped(peer, f"{state.failures} failures, last: {reason}"))

    def cancel(self) -> None:
        """Stop: every outstanding request is cancelled; what was stored stays for a resume."""
        if self.state is not State.RUNNING:
            return
        self._cancel_all()
        self.state = State.CANCELLED
        self.error = TransferCancelledError(f"transfer of blob {self._blob_hex} cancelled")
        self._events.append(Failed(self.error))

    # -------------------------------------------------------------------------------- outputs

    def next_actions(self, now: float) -> list[Action]:
        """Requests to send now (and cancels owed); call after every input."""
        fetches: list[FetchChunk] = []
        if self.state is State.RUNNING and self._dirty:
            self._rebuild()
        if self.state is State.RUNNING:
            fetches = self._assign(now)
            if not fetches and not self._asked:
                # Defensive: _rebuild guarantees a live holder with free slots for every need.
                self._fail(sorted(c.hex() for c in self._needed))
        actions: list[Action] = [*self._cancels, *fetches]
        self._cancels.clear()
        return actions

    def take_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def progress(self, now: float) -> Progress:
        peers = tuple(
            PeerProgress(p.peer, p.bytes_received, len(p.in_flight), p.meter.rate(now), p.status)
            for p in sorted(self._peers.values(), key=lambda p: p.peer)
        )
        return Progress(
            bytes_done=self._bytes_done,
            bytes_total=self.manifest.total_size,
            chunks_done=len(self._sizes) - len(self._needed),
            chunks_total=len(self._sizes),
            bytes_fetched=self._bytes_fetched,
            rate_bps=self._meter.rate(now),
            peers=peers,
        )

    @property
    def needed(self) -> frozenset[ChunkId]:
        return frozenset(self._needed)

    def excluded(self) -> dict[PeerId, str]:
        return {p.peer: p.status for p in self._peers.values() if p.status != "live"}

    # -------------------------------------------------------------------------------- internals

    @property
    def _blob_hex(self) -> str:
        return self.manifest.blob_id.hex()

    def _rebuild(self) -> None:
        self._dirty = False
        live = [p for p in self._peers.values() if p.status == "live"]
        rarity = {c: sum(1 for p in live if c in p.has) for c in self._needed}
        orphans = sorted(c.hex() for c, n in rarity.items() if n == 0)
        if orphans:
            self._fail(orphans)
            return
        self._queue = deque(sorted(self._needed, key=lambda c: (rarity[c], self._position[c])))

    def _assign(self, now: float) -> list[FetchChunk]:
        live = sorted((p for p in self._peers.values() if p.status == "live"), key=lambda p: p.peer)
        free = {p.peer: self.max_in_flight - len(p.in_flight) for p in live}
        if sum(max(n, 0) for n in free.values()) <= 0:
            return []
        out: list[FetchChunk] = []
        unasked = False
        # Chunks complete roughly in queue order: drop the done ones at the front so each call
        # scans about as many entries as there are requests in flight, not the whole blob.
        while self._queue and self._queue[0] not in self._needed:
            self._queue.popleft()
        for chunk_id in self._queue:
            if chunk_id not in self._needed or chunk_id in self._asked:
                continue
            unasked = True
            holders = [p for p in live if chunk_id in p.has and free[p.peer] > 0]
            if not holders:
                continue
            best = max(holders, key=lambda p: (free[p.peer], p.meter.rate(now)))
            out.append(self._ask(best, chunk_id, now, duplicate=False))
            free[best.peer] -= 1
            if sum(max(n, 0) for n in free.values()) <= 0:
                return out
        if not unasked:
            out.extend(self._endgame(live, free, now))
        return out

    def _endgame(self, live: list[_Peer], free: dict[PeerId, int], now: float) -> list[FetchChunk]:
        """Every missing chunk is asked for: idle peers re-ask the longest-waiting ones."""
        oldest = sorted(
            self._asked.items(),
            key=lambda item: min(self._peers[p].in_flight[item[0]] for p in item[1]),
        )
        out: list[FetchChunk] = []
        for chunk_id, askers in oldest:
            if len(askers) >= self.endgame_copies:
                continue
            holders = [
                p for p in live if chunk_id in p.has and free[p.peer] > 0 and p.peer not in askers
            ]
            if not holders:
                continue
            best = max(holders, key=lambda p: (free[p.peer], p.meter.rate(now)))
            out.append(self._ask(best, chunk_id, now, duplicate=True))
            free[best.peer] -= 1
        return out

    def _ask(self, peer: _Peer, chunk_id: ChunkId, now: float, *, duplicate: bool) -> FetchChunk:
        peer.in_flight[chunk_id] = now
        self._asked.setdefault(chunk_id, set()).add(peer.peer)
        return FetchChunk(peer.peer, chunk_id, self._sizes[chunk_id], duplicate)

    def _unask(self, peer: _Peer, chunk_id: ChunkId) -> None:
        del peer.in_flight[chunk_id]
        askers = self._asked.get(chunk_id)
        if askers is not None:
            askers.discard(peer.peer)
            if not askers:
                del self._asked[chunk_id]

    def _exclude(self, peer: _Peer, status: str) -> None:
        """Stop using ``peer``: its outstanding requests return to the pool."""
        peer.status = status
        for chunk_id in list(peer.in_flight):
            self._unask(peer, chunk_id)
        peer.cancelled.clear()
        peer.has.clear()
        self._dirty = True

    def _misbehaved(self, peer: _Peer, chunk_id: ChunkId | None, reason: str) -> None:
        # The one log event per misbehaving peer; the transfer carries on without it.
        log.warning("peer %s misbehaved in transfer of %s: %s", peer.peer, self._blob_hex, reason)
        self._exclude(peer, "misbehaving")
        self._events.append(PeerMisbehaved(peer.peer, chunk_id, reason))

    def _finish(self) -> None:
        self.state = State.COMPLETE
        self._events.append(Completed())

    def _fail(self, missing_hex: list[str]) -> None:
        self.state = State.FAILED
        self.error = NoProviderError(self._blob_hex, missing_hex, self.excluded())
        self._cancel_all()
        self._events.append(Failed(self.error))

    def _cancel_all(self) -> None:
        for chunk_id, peers in sorted(self._asked.items()):
            for peer in sorted(peers):
                del self._peers[peer].in_flight[chunk_id]
                self._peers[peer].cancelled.add(chunk_id)
                self._cancels.append(CancelFetch(peer, chunk_id))
        self._asked.clear()
