"""Trio glue for catalog anti-entropy (:mod:`catalog.replication`) on a :class:`P2PNode`.

Serves ``/vmlend/catalog-sync/1.0.0`` from the library, and every ``interval`` seconds pulls
from every other scheduler it knows: those advertised in the DHT (``scheduler`` records,
refreshed in the background every ``discover_interval``) plus live peers. A peer that does not
speak the protocol is a worker, or a scheduler still starting: it is asked again after a
back-off that doubles from ``interval`` up to ``not_serving_retry``.

A peer caught sending a forged, tampered or malformed entry is logged once as misbehaving
(logger ``vmlend.catalog.replication``) and neither pulled from nor served for ``ban_duration``.
Every pull runs under ``request_timeout`` in its own task, so a peer that is down, frozen or
slow delays only its own pull; a peer whose pulls fail is retried after a back-off that doubles
from ``interval`` up to ``max_backoff``, or at once when it shows up live again (a healed
partition or a restart: its heartbeat is heard, whatever it answered before), so catalogs
agree again within a round trip.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from functools import partial

import trio

from catalog.library import Library
from catalog.replication import (
    MAX_MESSAGES_PER_SESSION,
    PullSession,
    WantEntries,
    entries_reply,
    respond,
)
from catalog.replication_messages import (
    PROTOCOL_ID,
    REPLIES,
    REQUESTS,
    WIRE_LIMITS,
    MisbehavingPeerError,
    Request,
    decode_reply,
    decode_request,
)
from catalog.scheduler_record import SchedulerDirectory
from node.errors import NetworkError, RemoteProtocolError
from node.p2p import P2PNode, PeerInfo, UnsupportedProtocolError
from node.p2p_stream import MessageStream

log = logging.getLogger("vmlend.catalog.replication")

MAX_REMEMBERED_REFUSALS = 100_000


class ReplicationService:
    """Keeps ``library`` in sync with the other schedulers' libraries. Start with
    ``await nursery.start(service.run)``; the handler is registered before ``started``."""

    def __init__(
        self,
        p2p: P2PNode,
        library: Library,
        *,
        interval: float = 2.0,
        request_timeout: float = 10.0,
        discover_interval: float = 10.0,
        ban_duration: float = 300.0,
        not_serving_retry: float = 60.0,
        max_backoff: float = 5.0,
        max_concurrent_pulls: int = 8,
        extra_peers: Callable[[], Iterable[str]] | None = None,
    ) -> None:
        self.p2p = p2p
        self.library = library
        self.interval = interval
        self.request_timeout = request_timeout
        self.discover_interval = discover_interval
        self.ban_duration = ban_duration
        self.not_serving_retry = not_serving_retry
        self.max_backoff = max_backoff
        self._limiter = trio.CapacityLimiter(max_concurrent_pulls)
        self._extra_peers = extra_peers
        self._directory = SchedulerDirectory(p2p)
        self._schedulers: set[str] = set()
        self._banned_until: dict[str, float] = {}
        self._retry_at: dict[str, float] = {}  # not serving the protocol, or failing: back off
        self._failures: dict[str, int] = {}
        self._refused: dict[str, str] = {}
        self._pulling: set[str] = set()
        self._progress = trio.Event()
        self._stats = {"rounds": 0, "pulls": 0, "pull_failures": 0, "received": 0}
        self._stats.update({"refused": 0, "misbehaving": 0, "served": 0, "not_serving": 0})

    # ---- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.p2p.set_handler(PROTOCOL_ID, self._serve, limits=WIRE_LIMITS)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._discover_loop)
            nursery.start_soon(self._pull_on_return, nursery)
            task_status.started()
            while True:
                # Pulls are not awaited here: a frozen or slow peer delays only its own pull,
                # never the next round with the others.
                self._start_pulls(nursery)
                await trio.sleep(self.interval)

    async def pull_round(self) -> None:
        """Pull once from every candidate not already being pulled from, and wait for those
        pulls (each bounded by ``request_timeout``; failures are logged and counted)."""
        async with trio.open_nursery() as nursery:
            self._start_pulls(nursery)

    def _start_pulls(self, nursery: trio.Nursery, only: frozenset[str] | None = None) -> None:
        """Pull from every candidate (or those of ``only``) not already being pulled from."""
        if only is None:
            self._stats["rounds"] += 1
        now = trio.current_time()
        # Forget expired bans and back-offs, so peers long gone cost no memory.
        for table in (self._banned_until, self._retry_at):
            for peer_id in [p for p, until in table.items() if until <= now]:
                del table[peer_id]
        for peer_id in self.candidates():
            if peer_id not in self._pulling and (only is None or peer_id in only):
                self._pulling.add(peer_id)
                nursery.start_soon(self._pull_guarded, peer_id)
        self._woke()

    @property
    def pulling(self) -> frozenset[str]:
        """Peers a pull from is in progress right now."""
        return frozenset(self._pulling)

    @property
    def known_schedulers(self) -> frozenset[str]:
        """Schedulers found through their DHT records (pulled from even when not connected)."""
        return frozenset(self._schedulers)

    def candidates(self) -> list[str]:
        now = trio.current_time()
        peers = set(self._schedulers) | {p.peer_id for p in self.p2p.peers()}
        if self._extra_peers is not None:
            peers.update(self._extra_peers())
        peers.discard(self.p2p.peer_id)
        return sorted(
            p
            for p in peers
            if self._banned_until.get(p, 0.0) <= now and self._retry_at.get(p, 0.0) <= now
        )

    def statistics(self) -> dict[str, int]:
        return {
            **self._stats,
            "entries": len(self.library),
            "known_schedulers": len(self._schedulers),
        }

    async def wait_until(self, predicate: Callable[[ReplicationService], bool]) -> None:
        """Wait until ``predicate(self)`` holds, re-checked whenever pulls start or end, a peer
        misbehaves or the schedulers are found again (for tests and ``wait``-style RPCs: no
        polling)."""
        while not predicate(self):
            await self._progress.wait()

    def _woke(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    def refusals(self) -> dict[str, str]:
        """IDs of entries refused (untrusted publisher) -> the reason."""
        return dict(self._refused)

    def is_banned(self, peer_id: str) -> bool:
        return self._banned_until.get(peer_id, 0.0) > trio.current_time()

    async def _discover_loop(self) -> None:
        while True:
            with trio.move_on_after(self.discover_interval):
                try:
                    found = await self._directory.find(timeout=self.discover_interval)
                except NetworkError as e:
                    log.debug("finding schedulers: %s", e)
                else:
                    self._schedulers = {s.peer_id for s in found} - {self.p2p.peer_id}
                    self._woke()
            await trio.sleep(self.discover_interval)

    async def _pull_on_return(self, nursery: trio.Nursery) -> None:
        """Pull at once from a peer that joins or is heard again (a healed partition, a
        restart): a failed peer's back-off only guessed when it might be back, and a peer's new
        entries should not wait for the next round."""
        live = frozenset(p.peer_id for p in self.p2p.peers())
        while True:
            peers = await self.p2p.wait_peers(partial(_other_than, live))
            now_live = frozenset(p.peer_id for p in peers)
            arrived, live = now_live - live, now_live
            for peer_id in arrived:
                self._failures.pop(peer_id, None)
                self._retry_at.pop(peer_id, None)
            if arrived:
                self._start_pulls(nursery, only=arrived)

    # ---- pulling -----------------------------------------------------------------------------

    async def _pull_guarded(self, peer_id: str) -> None:
        ok = not_serving = False
        try:
            async with self._limiter:
                with trio.move_on_after(self.request_timeout):
                    await self.pull_from(peer_id)
                    ok = True
                if not ok:
                    log.debug("pull from %s: no end within %gs", peer_id, self.request_timeout)
        except UnsupportedProtocolError:
            # A worker, or a scheduler whose services are still starting: ask again soon, then
            # ever more rarely.
            not_serving = True
        except MisbehavingPeerError as e:
            self._misbehaved(peer_id, e)
        except (NetworkError, RemoteProtocolError) as e:
            log.debug("pull from %s failed: %s", peer_id, e)
        finally:
            self._pulling.discard(peer_id)
            if ok:
                self._failures.pop(peer_id, None)
            else:
                self._stats["not_serving" if not_serving else "pull_failures"] += 1
                self._back_off(peer_id, self.not_serving_retry if not_serving else self.max_backoff)
            self._woke()

    def _back_off(self, peer_id: str, longest: float) -> None:
        # Down, frozen or not serving: wait interval, doubling up to ``longest``, so a
        # scheduler whose DHT record outlives it is not dialled every round; short enough
        # that once it is back its new entries still reach us quickly.
        failures = self._failures[peer_id] = self._failures.get(peer_id, 0) + 1
        delay = min(self.interval * 2 ** min(failures - 1, 16), longest)
        self._retry_at[peer_id] = trio.current_time() + delay

    async def pull_from(self, peer_id: str) -> int:
        """One complete pull from ``peer_id``; return how many new entries were stored.

        Raises MisbehavingPeerError, UnsupportedProtocolError, NetworkError or
        RemoteProtocolError; entries stored before a failure stay stored."""
        self._stats["pulls"] += 1
        session = PullSession(self.library.index, self.library.policy, skip=self._refused)
        stored = 0
        async with await self.p2p.open_stream(peer_id, PROTOCOL_ID, limits=WIRE_LIMITS) as stream:
            request: Request | None = session.start()
            while request is not None:
                await stream.send(REQUESTS.encode(request))
                try:
                    reply = await stream.receive()
                except trio.EndOfChannel:
                    raise RemoteProtocolError(f"{peer_id} ended the catalog sync early") from None
                request = session.receive(decode_reply(reply))
                stored += await self._store(peer_id, session)
            await stream.send_end()
        return stored

    async def _store(self, peer_id: str, session: PullSession) -> int:
        for entry_id, reason in session.refused.items():
            if entry_id not in self._refused:
                self._stats["refused"] += 1
                log.info("refused catalog entry %s from %s: %s", entry_id, peer_id, reason)
                if len(self._refused) < MAX_REMEMBERED_REFUSALS:
                    self._refused[entry_id] = reason
        session.refused.clear()
        if not session.admitted:
            return 0
        # Library.insert_many verifies every entry again: the one gate nothing bypasses.
        added = await self.library.insert_many(session.admitted)
        session.admitted.clear()
        self._stats["received"] += len(added)
        return len(added)

    def _misbehaved(self, peer_id: str, error: Exception) -> None:
        self._stats["misbehaving"] += 1
        self._banned_until[peer_id] = trio.current_time() + self.ban_duration
        log.warning("misbehaving peer %s on %s: %s", peer_id, PROTOCOL_ID, error)
        self._woke()

    # ---- serving -----------------------------------------------------------------------------

    async def _serve(self, stream: MessageStream) -> None:
        if self.is_banned(stream.peer_id):
            return  # closed at once; the peer sees its pull end early
        try:
            await self._answer_all(stream)
        except MisbehavingPeerError as e:
            self._misbehaved(stream.peer_id, e)
            raise  # P2PNode resets the stream

    async def _answer_all(self, stream: MessageStream) -> None:
        count = 0
        async for msg in stream:
            count += 1
            if count > MAX_MESSAGES_PER_SESSION:
                raise MisbehavingPeerError(f"more than {MAX_MESSAGES_PER_SESSION} requests")
            answer = respond(decode_request(msg), self.library.index)
            if isinstance(answer, WantEntries):
                encoded = await self.library.get_encoded(answer.ids)
                self._stats["served"] += len(encoded)
                answer = entries_reply(encoded)
            await stream.send(REPLIES.encode(answer))


def _other_than(known: frozenset[str], peers: list[PeerInfo]) -> bool:
    return frozenset(p.peer_id for p in peers) != known
