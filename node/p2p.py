"""The p2p adapter: the one place vmlend talks to py-libp2p (with the other ``node.p2p_*`` modules).

What it offers (see :class:`P2PNode`): a libp2p host over TCP with Noise as the only security and
yamux as the only muxer, keyed by the node's :class:`Identity`; typed message streams with
deadlines and explicit ends; one-shot requests; live peers from application-level heartbeats; and
signed, expiring DHT records.

The py-libp2p 0.8.1 traps, and what this module does about each:

* every dial waits an extra 250 ms (``swarm._HAPPY_EYEBALLS_DELAY``, even with one address):
  set to 0 by :func:`disable_connect_delay`, checked at start;
* the default security options include plaintext, secio and TLS: we pass Noise only, so a
  plaintext-only peer fails the handshake;
* an exception escaping a stream handler tears down the host: every handler runs inside
  :meth:`P2PNode._serve`, the one place that catches ``Exception`` (logged with its traceback as a
  misbehaving-peer/bug event; only that stream is reset);
* a killed peer looks like a clean EOF, a frozen one blocks reads forever: see ``p2p_stream``
  (explicit end frames, per-operation deadlines);
* a dial to a silent address blocks for the kernel's ~2 minutes, and failed dials are retried
  with backoff: every dial runs under ``dial_timeout`` and the swarm has no retries;
* a peer whose dial failed once is refused for 60 s, and a connection to a vanished peer lives
  until the kernel gives up: see ``p2p_keepalive`` (our own short backoff, cleared when the peer
  reaches us; TCP keepalive and user timeout; a dead peer's connections are closed);
* a namespace without a validator accepts anything: see ``p2p_dht`` (strict validation).

API (errors from :mod:`node.errors` unless noted)::

    node = P2PNode(identity, listen=[...], bootstrap=[...], heartbeat_interval=1.0,
                   peer_timeout=5.0, stream_deadline=10.0, dial_timeout=5.0,
                   discovery_interval=10.0, limits=WireLimits(), wall_clock=time.time)
    addrs = await nursery.start(node.run)  # full addrs ending /p2p/<id> (also node.addrs)
    node.set_handler("/vmlend/x/1.0.0", handler)  # handler(MessageStream) -> None
    reply = await node.request(peer_id, protocol_id, msg, timeout=5.0)
    stream = await node.open_stream(peer_id, protocol_id)  # send/receive/send_end/aclose/reset
    # each of these three takes limits=WireLimits(...): that protocol's own frame limits (both
    # ends must pass the same); without it, the node's ``limits``
    await node.connect("/ip4/.../tcp/.../p2p/<id>") -> peer_id;  node.is_connected(peer_id)
    node.peers() -> list[PeerInfo];  await node.wait_peers(pred);  await node.wait_peer_count(n)
    await node.put_record(kind, node.peer_id, payload, ttl=60.0) -> Record
    await node.get_record(kind, owner_peer_id, timeout=5.0) -> Record   # RecordNotFoundError
    await node.find_records(kind, timeout=5.0) -> list[Record]
    node.statistics() -> {"handler_errors", "peer_errors", "pings_failed", "streams_refused",
                          "live_peers", "known"}
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.host.exceptions import StreamFailure
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo as Libp2pPeerInfo
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from node.dht_records import Record
from node.errors import (
    DeadlineError,
    NetworkError,
    PeerUnreachableError,
    ProtocolError,
    RemoteProtocolError,
    StreamBrokenError,
)
from node.heartbeat import PINGS, PONGS, Liveness, Ping, Pong
from node.heartbeat import PROTOCOL_ID as HEARTBEAT_PROTOCOL
from node.identity import Identity
from node.log_hygiene import route_libp2p_logs_through_ours
from node.p2p_dht import Dht, make_dht
from node.p2p_host import (
    PEERSTORE_ERRORS,
    DialTimeoutError,
    Handler,
    PeerInfo,
    UnsupportedProtocolError,
    build_host,
    check_listen_free,
    check_protocol_id,
    connect_delay,
    connection_config,
    disable_connect_delay,
    negative_dial_cache_disabled,
    open_connections,
    open_streams,
    parse_peer_id,
    peer_addr,
    protocol_refused,
    to_multiaddr,
)
from node.p2p_keepalive import ConnectionEvents, DialBackoff, KeepaliveTimes, tune_connection
from node.p2p_records import DhtRecords
from node.p2p_stream import LIBP2P_IO_ERRORS, MessageStream
from node.supervise import log_internal_error
from node.wire import DEFAULT_LIMITS, Message, WireLimits

__all__ = [
    "HEARTBEAT_PROTOCOL",
    "DialTimeoutError",
    "Handler",
    "MessageStream",
    "P2PNode",
    "PeerInfo",
    "UnsupportedProtocolError",
    "check_protocol_id",
    "connect_delay",
    "disable_connect_delay",
]

route_libp2p_logs_through_ours()  # libp2p is imported by now (see its docstring)
logger = logging.getLogger("vmlend.node.p2p")


class P2PNode:
    """A vmlend node's presence on the p2p network.

    Construct, then ``await nursery.start(node.run)``; everything else needs a running node.
    ``heartbeat_interval``: seconds between pings to each known peer; ``peer_timeout``: a peer
    with no heartbeat for this long leaves :meth:`peers`; ``stream_deadline``: default per-operation
    deadline of every :class:`MessageStream`; ``dial_timeout``: bound on each connection attempt.
    ``wall_clock`` is only used for the times signed into DHT records.
    """

    def __init__(
        self,
        identity: Identity,
        *,
        listen: Sequence[str],
        bootstrap: Sequence[str] = (),
        heartbeat_interval: float = 1.0,
        peer_timeout: float = 5.0,
        stream_deadline: float = 10.0,
        dial_timeout: float = 5.0,
        discovery_interval: float = 10.0,
        limits: WireLimits = DEFAULT_LIMITS,
        max_inbound_streams: int = 256,
        max_inbound_streams_per_peer: int = 16,
        max_connections: int = 300,
        max_connections_per_peer: int = 3,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < heartbeat_interval < peer_timeout:
            raise ValueError("need 0 < heartbeat_interval < peer_timeout")
        disable_connect_delay()
        self.identity = identity
        self._listen = [to_multiaddr(a) for a in listen]
        self._bootstrap = [peer_addr(a) for a in bootstrap]
        self._heartbeat_interval = heartbeat_interval
        self._stream_deadline = stream_deadline
        self._dial_timeout = dial_timeout
        self._discovery_interval = discovery_interval
        self._limits = limits
        self._max_inbound_streams = max_inbound_streams
        self._max_inbound_streams_per_peer = max_inbound_streams_per_peer
        self._wall_clock = wall_clock
        connections = connection_config(max_connections, max_connections_per_peer)
        self._host = build_host(identity, self._listen, connections=connections)
        self._dht = Dht(make_dht(self._host, wall_clock), query_timeout=stream_deadline)
        self._liveness = Liveness(peer_timeout=peer_timeout)
        self._ping_timeout = peer_timeout
        self._membership_changed = trio.Event()
        self._may_join = trio.Event()
        self._known: set[str] = set()
        self._dead: set[str] = set()
        self._dht.skip = lambda peer: str(peer) in self._dead
        self._heard: set[str] = set()  # peers that answered a heartbeat since last declared dead
        self._backoff = DialBackoff()
        self._keepalive = KeepaliveTimes.for_liveness(
            heartbeat_interval=heartbeat_interval, peer_timeout=peer_timeout
        )
        self._host.get_network().register_notifee(ConnectionEvents(self._on_connected))
        self._stats = {
            "handler_errors": 0,
            "peer_errors": 0,
            "pings_failed": 0,
            "streams_refused": 0,
        }
        self.peer_id = str(self._host.get_id())
        self._records = DhtRecords(
            self._dht,
            identity,
            self.peer_id,
            liveness=self._liveness,
            is_connected=self.is_connected,
            wall_clock=wall_clock,
        )
        self.set_handler(HEARTBEAT_PROTOCOL, self._on_heartbeat)

    # ---- lifecycle ---------------------------------------------------------------------------

    @property
    def addrs(self) -> list[str]:
        """Full listen addresses, each ending in /p2p/<peer_id>."""
        return [str(a) for a in self._host.get_addrs()]

    async def run(
        self,
        *,
        join: bool = True,
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen, join the DHT, keep heartbeats going; ``started`` with :attr:`addrs`.

        With ``join=False`` the bootstrap peers are dialled only once :meth:`join` is called: a
        node whose services still register their protocols would otherwise tell its first peers
        it speaks none of them."""
        if join:
            self.join()
        if connect_delay() != 0:
            raise RuntimeError("py-libp2p's connect delay came back; disable_connect_delay()")
        if not negative_dial_cache_disabled(self._host):
            raise RuntimeError("py-libp2p's negative dial cache came back; see p2p_keepalive")
        check_listen_free(self._listen)
        async with (
            self._host.run(self._listen),
            background_trio_service(self._dht.kad),
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(self._join)
            nursery.start_soon(self._heartbeat_loop)
            logger.info("p2p node %s listening on %s", self.peer_id, self.addrs)
            task_status.started(self.addrs)
            await trio.sleep_forever()

    def join(self) -> None:
        """Let :meth:`run` dial the bootstrap peers and look for others (idempotent)."""
        self._may_join.set()

    async def _join(self) -> None:
        await self._may_join.wait()
        for info in self._bootstrap:
            if info.peer_id == self._host.get_id():
                continue
            self._known.add(str(info.peer_id))
            self._host.get_peerstore().add_addrs(info.peer_id, info.addrs, 0)
            try:
                await self._connect(info.peer_id)
                await self._dht.add_peer(info.peer_id)
            except NetworkError as e:
                logger.warning("bootstrap peer %s: %s", info.peer_id, e)
        bootstrap_ids = {str(info.peer_id) for info in self._bootstrap}
        while True:
            found: list[ID] = []
            with trio.move_on_after(self._discovery_interval):
                try:
                    found = await self._dht.discover()
                except LIBP2P_IO_ERRORS as e:
                    logger.debug("discovery: %s", e)
            learned = {str(p) for p in found} - bootstrap_ids - {self.peer_id}
            self._known.update(learned)
            # A lookup that found no one beyond the bootstrap peers learned nothing (a busy
            # bootstrap resets DHT streams beyond 12 at once): try again soon.
            await trio.sleep(self._discovery_interval if learned else self._heartbeat_interval)

    # ---- connections and streams -------------------------------------------------------------

    async def connect(self, addr: str) -> str:
        """Connect to a full multiaddr (ending in /p2p/<id>); return the peer ID."""
        info = peer_addr(addr)
        self._host.get_peerstore().add_addrs(info.peer_id, info.addrs, 0)
        await self._connect(info.peer_id)
        self._known.add(str(info.peer_id))
        return str(info.peer_id)

    def is_connected(self, peer_id: str) -> bool:
        return self._has_connection(parse_peer_id(peer_id))

    def fell_silent(self, peer_id: str) -> bool:
        """Whether ``peer_id`` went ``peer_timeout`` without a heartbeat (since last heard, or
        since we began watching it) and has not been heard since."""
        return peer_id in self._dead

    def _has_connection(self, peer: ID) -> bool:
        return open_connections(self._host, peer) > 0

    async def _connect(self, peer: ID) -> None:
        if self._has_connection(peer):
            return
        wait = self._backoff.wait(str(peer), trio.current_time())
        if wait > self._dial_timeout:
            raise PeerUnreachableError(f"{peer} failed to answer dials; next try in {wait:.1f}s")
        try:
            with trio.fail_after(self._dial_timeout):
                if wait > 0:
                    await trio.sleep(wait)
                    if self._has_connection(peer):
                        return  # it reached us meanwhile
                addrs = self._addrs_of(peer)
                if not addrs:
                    found = await self._dht.kad.find_peer(peer)
                    addrs = list(found.addrs) if found is not None else []
                if not addrs:
                    raise PeerUnreachableError(f"no known address for {peer}")
                if self._host.get_network().connections.get(peer):
                    # Only closed ones are left, and host.connect would take them for a
                    # connection and return: dial (the swarm skips closed ones there).
                    self._host.get_peerstore().add_addrs(peer, addrs, 0)
                    await self._host.get_network().dial_peer(peer)
                else:
                    await self._host.connect(Libp2pPeerInfo(peer, addrs))
        except trio.TooSlowError as e:
            self._backoff.failed(str(peer), trio.current_time())
            raise DialTimeoutError(f"no connection to {peer} within {self._dial_timeout:g}s") from e
        except LIBP2P_IO_ERRORS as e:
            self._backoff.failed(str(peer), trio.current_time())
            raise PeerUnreachableError(f"cannot connect to {peer}: {e}") from e
        except PeerUnreachableError:
            self._backoff.failed(str(peer), trio.current_time())
            raise
        self._backoff.reached(str(peer))
        self._host.get_peerstore().add_addrs(peer, addrs, 0)

    def _on_connected(self, conn: Any) -> None:
        """Every new connection, dialled or accepted: keepalive on, the peer's backoff cleared."""
        tune_connection(conn, self._keepalive)
        self._backoff.reached(str(conn.muxed_conn.peer_id))

    def _addrs_of(self, peer: ID) -> list[Multiaddr]:
        try:
            addrs: list[Multiaddr] = self._host.get_peerstore().addrs(peer)
        except PEERSTORE_ERRORS:
            return []
        return addrs

    async def open_stream(
        self, peer_id: str, protocol_id: str, *, limits: WireLimits | None = None
    ) -> MessageStream:
        """Open a stream to ``peer_id`` speaking ``protocol_id``, whose frames are held to
        ``limits`` (the node's by default).

        Raises PeerUnreachableError (DialTimeoutError if the dial deadline passed),
        UnsupportedProtocolError, StreamBrokenError or DeadlineError."""
        check_protocol_id(protocol_id)
        peer = parse_peer_id(peer_id)
        await self._connect(peer)
        try:
            with trio.fail_after(self._stream_deadline):
                raw = await self._host.new_stream(peer, [TProtocol(protocol_id)])
        except trio.TooSlowError as e:
            raise DeadlineError(f"opening {protocol_id} to {peer_id} took too long") from e
        except StreamFailure as e:
            if protocol_refused(e):
                raise UnsupportedProtocolError(f"{peer_id} does not speak {protocol_id}") from e
            raise StreamBrokenError(f"opening {protocol_id} to {peer_id}: {e}") from e
        except SwarmException as e:
            raise PeerUnreachableError(f"cannot reach {peer_id}: {e}") from e
        except LIBP2P_IO_ERRORS as e:
            raise StreamBrokenError(f"opening {protocol_id} to {peer_id}: {e}") from e
        return MessageStream(
            raw,
            peer_id=peer_id,
            protocol_id=protocol_id,
            deadline=self._stream_deadline,
            limits=limits or self._limits,
        )

    async def request(
        self,
        peer_id: str,
        protocol_id: str,
        msg: Message,
        *,
        timeout: float,  # noqa: ASYNC109
        limits: WireLimits | None = None,
    ) -> Message:
        """Send one message and return the one reply, all within ``timeout`` (DeadlineError)."""
        try:
            with trio.fail_after(timeout):
                async with await self.open_stream(peer_id, protocol_id, limits=limits) as stream:
                    await stream.send(msg)
                    await stream.send_end()
                    try:
                        return await stream.receive()
                    except trio.EndOfChannel:
                        raise RemoteProtocolError(
                            f"{peer_id} ended {protocol_id} without a reply"
                        ) from None
        except trio.TooSlowError as e:
            raise DeadlineError(
                f"{protocol_id} request to {peer_id}: no reply in {timeout:g}s"
            ) from e

    def set_handler(
        self, protocol_id: str, handler: Handler, *, limits: WireLimits | None = None
    ) -> None:
        """Serve ``protocol_id``: ``handler`` gets each inbound stream, whose frames are held
        to ``limits`` (the node's by default); when it returns the stream is closed with an end
        frame; if it raises, only that stream is reset. At most ``max_inbound_streams`` run at
        once per protocol, and at most ``max_inbound_streams_per_peer`` of them for one peer (so
        one peer cannot take every slot and make the node look dead to the others); streams
        beyond either are reset."""
        check_protocol_id(protocol_id)
        slots = trio.CapacityLimiter(self._max_inbound_streams)
        per_peer: dict[str, int] = {}

        async def serve(raw: Any) -> None:
            peer = str(raw.muxed_conn.peer_id)
            if per_peer.get(peer, 0) >= self._max_inbound_streams_per_peer:
                await self._refuse(raw, protocol_id, f"{peer} already has that many open")
                return
            try:
                slots.acquire_nowait()
            except trio.WouldBlock:
                await self._refuse(raw, protocol_id, "all slots are taken")
                return
            per_peer[peer] = per_peer.get(peer, 0) + 1
            try:
                await self._serve(protocol_id, handler, raw, limits or self._limits)
            finally:
                slots.release()
                if (left := per_peer[peer] - 1) > 0:
                    per_peer[peer] = left
                else:
                    del per_peer[peer]

        self._host.set_stream_handler(TProtocol(protocol_id), serve)

    async def _refuse(self, raw: Any, protocol_id: str, why: str) -> None:
        self._stats["streams_refused"] += 1
        logger.info("%s: refusing a stream: %s", protocol_id, why)
        await MessageStream(raw, peer_id="?", protocol_id=protocol_id, deadline=1.0).reset()

    async def _serve(
        self, protocol_id: str, handler: Handler, raw: Any, limits: WireLimits
    ) -> None:
        peer_id = str(raw.muxed_conn.peer_id)
        stream = MessageStream(
            raw,
            peer_id=peer_id,
            protocol_id=protocol_id,
            deadline=self._stream_deadline,
            limits=limits,
        )
        try:
            await handler(stream)
        except trio.EndOfChannel:
            # The peer ended the stream where the handler expected a message: its mistake.
            self._stats["peer_errors"] += 1
            logger.info("%s stream from %s ended early", protocol_id, peer_id)
            await stream.reset()
            return
        except (NetworkError, ProtocolError) as e:
            self._stats["peer_errors"] += 1
            logger.info("%s stream from %s failed: %s", protocol_id, peer_id, e)
            await stream.reset()
            return
        except Exception:
            # The one catch-all: a bug in a handler, or a peer that drove it somewhere unforeseen.
            # It must not take the host down; it is logged loudly and only this stream is reset.
            self._stats["handler_errors"] += 1
            log_internal_error(logger, "the %s handler, for a stream from %s", protocol_id, peer_id)
            await stream.reset()
            return
        await stream.aclose()

    # ---- liveness ----------------------------------------------------------------------------

    def peers(self) -> list[PeerInfo]:
        """Peers that answered or sent a heartbeat within ``peer_timeout``."""
        return sorted(
            (PeerInfo(p, self._full_addrs(p)) for p in self._liveness.live),
            key=lambda info: info.peer_id,
        )

    def _full_addrs(self, peer_id: str) -> tuple[str, ...]:
        suffix = f"/p2p/{peer_id}"
        addrs = (str(a) for a in self._addrs_of(parse_peer_id(peer_id)))
        return tuple(sorted({a if a.endswith(suffix) else a + suffix for a in addrs}))

    async def wait_peers(self, predicate: Callable[[list[PeerInfo]], bool]) -> list[PeerInfo]:
        """Wait until ``predicate(self.peers())`` holds (re-checked on every membership change)."""
        while not predicate(peers := self.peers()):
            await self._membership_changed.wait()
        return peers

    async def wait_peer_count(self, n: int) -> list[PeerInfo]:
        return await self.wait_peers(lambda peers: len(peers) >= n)

    def statistics(self) -> dict[str, int]:
        return {**self._stats, "live_peers": len(self._liveness.live), "known": len(self._known)}

    def _mark(self, changed: bool) -> None:
        if changed:
            self._membership_changed.set()
            self._membership_changed = trio.Event()

    async def _on_heartbeat(self, stream: MessageStream) -> None:
        # A watcher pings every heartbeat_interval; longer silence means it is gone or frozen.
        stream.deadline = self._liveness.peer_timeout + self._heartbeat_interval
        self._known.add(stream.peer_id)
        try:
            async for msg in stream:
                PINGS.decode(msg)
                self._seen(stream.peer_id)
                await stream.send(PONGS.encode(Pong()))
        except NetworkError as e:  # the watcher died or froze: routine, not a peer fault
            logger.debug("heartbeat stream from %s ended: %s", stream.peer_id, e)

    async def _heartbeat_loop(self) -> None:
        """Keep one watcher per known peer; sweep the live set every interval."""
        watching: set[str] = set()
        async with trio.open_nursery() as nursery:
            while True:
                self._known.update(str(p) for p in self._dht.routing_peers())
                self._known.update(str(p) for p in self._host.get_connected_peers())
                self._known.discard(self.peer_id)
                for peer_id in self._known - watching:
                    watching.add(peer_id)
                    nursery.start_soon(self._watch, peer_id, watching)
                self._mark(self._liveness.sweep(trio.current_time()))
                await trio.sleep(self._heartbeat_interval)

    async def _watch(self, peer_id: str, watching: set[str]) -> None:
        """Ping ``peer_id`` every interval on one long-lived stream (reopened after a failure)
        until it has been dead for ``peer_timeout``."""
        since = trio.current_time()
        try:
            while peer_id in self._known:
                try:
                    await self._ping_forever(peer_id)
                except (NetworkError, ProtocolError, trio.EndOfChannel, trio.TooSlowError) as e:
                    self._stats["pings_failed"] += 1
                    logger.debug("heartbeat to %s failed: %s", peer_id, e)
                    await self._forget_if_dead(peer_id, watched_since=since)
                await trio.sleep(self._heartbeat_interval)
        finally:
            watching.discard(peer_id)

    async def _ping_forever(self, peer_id: str) -> None:
        with trio.fail_after(self._ping_timeout):
            stream = await self.open_stream(peer_id, HEARTBEAT_PROTOCOL)
        async with stream:
            stream.deadline = self._ping_timeout
            while True:
                await stream.send(PINGS.encode(Ping()))
                PONGS.decode(await stream.receive())
                self._seen(peer_id)
                await trio.sleep(self._heartbeat_interval)

    def _seen(self, peer_id: str) -> None:
        self._heard.add(peer_id)
        self._dead.discard(peer_id)
        self._backoff.reached(peer_id)
        self._mark(self._liveness.seen(peer_id, trio.current_time()))

    async def _forget_if_dead(self, peer_id: str, *, watched_since: float) -> None:
        """After ``peer_timeout`` without a heartbeat (counted from when watching began, for a
        peer never heard yet): stop watching it, drop it from the routing table, and keep DHT
        queries away from it until it shows up again. A peer that was alive and fell silent also
        has its connections closed: a stream opened on a connection to a vanished peer would
        wait on it until the kernel gives up. One that never answered may just not speak our
        heartbeat: its connections are closed only when idle (no stream open)."""
        last = self._liveness.last_seen(peer_id)  # None once swept, or if never heard
        since = last if last is not None else watched_since
        if trio.current_time() - since <= self._liveness.peer_timeout:
            return
        self._dead.add(peer_id)
        peer = parse_peer_id(peer_id)
        self._dht.drop_peer(peer)
        heard, self._heard = peer_id in self._heard, self._heard - {peer_id}
        if not heard and self._has_connection(peer) and not open_streams(self._host, peer):
            # Never a vmlend peer, and idle: it holds a connection slot for nothing.
            logger.info("peer %s never answered a heartbeat and is idle: closing", peer_id)
            with trio.move_on_after(self._dial_timeout):
                await self._host.get_network().close_peer(peer)
        elif heard and self._has_connection(peer):
            logger.info(
                "peer %s silent for %gs: closing its connections",
                peer_id,
                self._liveness.peer_timeout,
            )
            with trio.move_on_after(self._dial_timeout):
                await self._host.get_network().close_peer(peer)
        if any(str(b.peer_id) == peer_id for b in self._bootstrap):
            return  # keep trying bootstrap peers: they may come back
        self._known.discard(peer_id)

    # ---- DHT records and content providers (see node.p2p_records) ----------------------------

    async def put_record(
        self, kind: str, name: str, payload: dict[str, Any], *, ttl: float
    ) -> Record:
        """Publish this node's signed record of ``kind`` (:meth:`DhtRecords.put_record`)."""
        return await self._records.put_record(kind, name, payload, ttl=ttl)

    async def get_record(
        self,
        kind: str,
        owner: str,
        *,
        timeout: float,  # noqa: ASYNC109
    ) -> Record:
        """The newest valid record of ``kind`` by ``owner`` (:meth:`DhtRecords.get_record`)."""
        return await self._records.get_record(kind, owner, timeout=timeout)

    async def find_records(
        self,
        kind: str,
        *,
        timeout: float,  # noqa: ASYNC109
    ) -> list[Record]:
        """Every valid record of ``kind`` in its index (:meth:`DhtRecords.find_records`)."""
        return await self._records.find_records(kind, timeout=timeout)

    async def provide(self, key: bytes, *, timeout: float) -> None:  # noqa: ASYNC109
        """Announce that this node holds ``key`` (:meth:`DhtRecords.provide`)."""
        await self._records.provide(key, timeout=timeout)

    def withdraw(self, key: bytes) -> None:
        """Stop announcing ``key`` (:meth:`DhtRecords.withdraw`)."""
        self._records.withdraw(key)

    async def find_providers(
        self,
        key: bytes,
        *,
        timeout: float,  # noqa: ASYNC109
    ) -> list[str]:
        """Peers that announced ``key``, live ones first (:meth:`DhtRecords.find_providers`)."""
        return await self._records.find_providers(key, timeout=timeout)
