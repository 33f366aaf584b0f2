"""The guest's only way out: an HTTP proxy on loopback applying one VM's allow-list and rate cap.

The guest's user-mode NIC (``restrict=on``) forwards one guest address to this proxy, which accepts
``CONNECT host:port`` tunnels and absolute-URI plain HTTP requests. A destination must be allowed
by both the lender's list and the task's (:class:`node.allow_rules.EgressRules`); the addresses it
resolves to are judged after DNS, against the host's own addresses as they are at that moment, and
the proxy connects to exactly those addresses. The protocol and the rules are sans-IO
(:mod:`worker_role.egress_http`, :mod:`node.allow_rules`, :mod:`worker_role.token_bucket`); this
module is the trio glue, the limits and the counters.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import psutil
import trio

from node.allow_rules import DestinationRefused, EgressRules, IPAddress, parse_ip
from worker_role.egress_errors import (
    BadProxyRequest,
    HostAddressesUnknown,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from worker_role.egress_http import ConnectRequest, ProxyRequest, find_head_end, parse_request_head
from worker_role.egress_http import response as http_response
from worker_role.token_bucket import TokenBucket

log = logging.getLogger("vmlend.worker.egress")

READ_CHUNK = 16 * 1024
# Uncapped, fewer and larger reads are what throughput depends on (one syscall per read).
_UNCAPPED_CHUNK = 256 * 1024
# How long a refused client gets to read our answer before the socket is closed under it (closing
# with its unread bytes pending would send a RST that can destroy the answer in flight).
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 256 * 1024

# Distinct refused destinations logged per proxy; a guest probing more is counted, not logged.
MAX_LOGGED_REFUSALS = 64

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
HostAddresses = Callable[[], frozenset[IPAddress]]


class PortStatus(Protocol):
    """What ``run`` needs of its ``task_status``. Spelled out because the venv's trio-stubs (from
    trio_typing) shadow trio's own types and lack ``trio.TaskStatus``."""

    def started(self, value: int) -> None: ...


@dataclass(frozen=True, slots=True)
class EgressStatistics:
    """Counters since the proxy started; bytes are payload relayed, both capped by the rate."""

    bytes_up: int
    bytes_down: int
    connections: int
    refused: int
    rejected: int
    failed: int
    active: int


async def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to for a TCP connection (the host's own resolver)."""
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def host_addresses() -> frozenset[IPAddress]:
    """Every address of every interface of this host, now (read again at each check: DHCP, a VPN
    or a new interface can add one at any time). OSError if they cannot be listed."""
    found: set[IPAddress] = set()
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family in (socket.AF_INET, socket.AF_INET6):
                ip = parse_ip(str(entry.address))
                if ip is not None:
                    found.add(ip)
    return frozenset(found)


class EgressProxy:
    """One VM's egress proxy. ``rate_bps`` is bytes/s for all its connections and both directions
    together (0 = unlimited); ``allow`` is the task's list and ``lender`` the lender's, entries as
    in :mod:`node.allow_rules` (where one is run for oneself, both are the same list)."""

    def __init__(
        self,
        allow: Sequence[str],
        rate_bps: int,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        lender: Sequence[str],
        max_head_bytes: int = 16 * 1024,
        max_connections: int = 64,
        connect_timeout: float = 10.0,
        head_timeout: float = 30.0,
        resolver: Resolver = resolve,
        own_addresses: HostAddresses = host_addresses,
    ) -> None:
        if rate_bps < 0:
            raise ValueError(f"rate_bps must be >= 0, got {rate_bps}")
        self.rules = EgressRules(lender=lender, task=allow)
        self.rate_bps = rate_bps
        self.host = host
        self.port = port
        self.max_head_bytes = max_head_bytes
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.head_timeout = head_timeout
        self._resolver = resolver
        self._own_addresses = own_addresses
        self._own: frozenset[IPAddress] = frozenset()
        self._logged: set[tuple[str, int]] = set()
        # Capped, reads are no larger than a tenth of a second's worth, so a slow cap stays smooth.
        self._chunk = min(READ_CHUNK, max(1024, rate_bps // 10)) if rate_bps else _UNCAPPED_CHUNK
        self._bucket: TokenBucket | None = None
        self._up = self._down = self._connections = 0
        self._refused = self._rejected = self._failed = self._active = 0

    def statistics(self) -> EgressStatistics:
        return EgressStatistics(
            bytes_up=self._up,
            bytes_down=self._down,
            connections=self._connections,
            refused=self._refused,
            rejected=self._rejected,
            failed=self._failed,
            active=self._active,
        )

    async def run(self, *, task_status: PortStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status.started(port)`` once the port is listening."""
        self._own = self._own_addresses()  # an OSError here is the proxy's own failure to start
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        if self.rate_bps:
            burst = max(self._chunk, self.rate_bps / 8)
            self._bucket = TokenBucket(self.rate_bps, burst, now=trio.current_time())
        log.info(
            "egress proxy on %s:%d allowing %r at %d B/s",
            self.host,
            self.port,
            self.rules,
            self.rate_bps,
        )
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        # serve_listeners lets a handler's exception take the whole proxy down: every error a
        # client or an upstream can cause is caught here, by name.
        self._connections += 1
        try:
            await self._admit(client)
        except* (trio.BrokenResourceError, trio.ClosedResourceError) as group:
            # except*: a peer vanishing mid-relay surfaces from the relay's nursery as a group.
            log.debug("egress connection broke: %s", group.exceptions[0])
        finally:
            await trio.aclose_forcefully(client)

    async def _admit(self, client: trio.SocketStream) -> None:
        if self._active >= self.max_connections:
            self._rejected += 1
            await self._refuse(client, 503, "too many connections through this proxy")
            return
        self._active += 1
        try:
            await self._serve(client)
        finally:
            self._active -= 1

    async def _serve(self, client: trio.SocketStream) -> None:
        try:
            got = await self._read_request(client)
            if got is None:
                return
            request, early = got
            upstream = await self._open_upstream(request)
        except DestinationRefused as exc:
            await self._refuse(client, exc.status, str(exc))  # counted and logged where raised
            return
        except (BadProxyRequest, HostAddressesUnknown, UpstreamUnreachable, UpstreamTimeout) as exc:
            if isinstance(exc, BadProxyRequest):
                self._rejected += 1
            else:
                self._failed += 1
            # Per attempt, so only at debug: a guest decides how often this happens.
            log.debug("egress %d: %s", exc.status, exc)
            await self._refuse(client, exc.status, str(exc))
            return
        async with upstream:
            if isinstance(request, ConnectRequest):
                await client.send_all(http_response(200))
            else:
                await self._send_up(upstream, request.head)
            if early:
                await self._send_up(upstream, early)
            await self._relay(client, upstream)

    async def _read_request(self, client: trio.SocketStream) -> tuple[ProxyRequest, bytes] | None:
        """The parsed request and any bytes after its head; None if the client left or stalled."""
        buffer = bytearray()
        with trio.move_on_after(self.head_timeout) as scope:
            while (end := find_head_end(buffer, max_head=self.max_head_bytes)) is None:
                data = await client.receive_some(self.max_head_bytes - len(buffer))
                if not data:
                    if buffer:
                        raise BadProxyRequest("connection closed in the middle of the request head")
                    return None
                buffer += data
        if scope.cancelled_caught:
            self._rejected += 1
            await self._refuse(client, 408, f"no complete request head in {self.head_timeout} s")
            return None
        return parse_request_head(bytes(buffer[:end])), bytes(buffer[end:])

    def _note_refusal(self, host: str, port: int, exc: DestinationRefused) -> None:
        """Count a refusal; log it the first time this destination is refused, up to a bound."""
        self._refused += 1
        key = (host, port)
        if key in self._logged:
            return
        if len(self._logged) < MAX_LOGGED_REFUSALS:
            self._logged.add(key)
            log.info("egress refused: %s (further refusals of %s:%d not logged)", exc, host, port)
        elif len(self._logged) == MAX_LOGGED_REFUSALS:
            self._logged.add(key)  # one past the bound: this line is written once
            log.info(
                "egress refused more than %d destinations; further ones are counted only",
                MAX_LOGGED_REFUSALS,
            )

    async def _open_upstream(self, request: ProxyRequest) -> trio.SocketStream:
        host, port = request.host, request.port
        try:
            ips = await self._judge(host, port)
        except DestinationRefused as exc:
            self._note_refusal(host, port, exc)
            raise
        with trio.move_on_after(self.connect_timeout):
            errors: list[str] = []
            for ip in ips:
                try:
                    # Connect to the address judged above, never to the name again: a second
                    # lookup could answer differently (DNS rebinding).
                    return await trio.open_tcp_stream(str(ip), port)
                except OSError as exc:
                    errors.append(f"{ip}: {exc.strerror or exc}")
            raise UpstreamUnreachable(f"cannot connect to {host}:{port} ({'; '.join(errors)})")
        raise UpstreamTimeout(f"{host}:{port} did not accept within {self.connect_timeout} s")

    async def _judge(self, host: str, port: int) -> list[IPAddress]:
        """The addresses to connect to for ``host:port``; DestinationRefused if any is refused."""
        self.rules.check(host, port)
        literal = parse_ip(host)
        if literal is not None:
            addresses: Sequence[str] = [str(literal)]
        else:
            try:
                addresses = await self._resolver(host, port)
            except OSError as exc:  # socket.gaierror and friends
                raise UpstreamUnreachable(f"cannot resolve {host}: {exc}") from None
        # After DNS, right before connecting: judged against the host's addresses as they are now.
        try:
            self._own = self._own_addresses()
        except OSError as exc:
            raise HostAddressesUnknown(f"cannot list this host's addresses: {exc}") from None
        return self.rules.check_addresses(host, port, addresses, own=self._own)

    async def _relay(self, client: trio.SocketStream, upstream: trio.SocketStream) -> None:
        async def up() -> None:
            await pipe(
                client, upstream, bucket=self._bucket, chunk=self._chunk, count=self._count_up
            )
            # The guest finished sending; the answer may still be coming.
            await _send_eof(upstream)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(up)
            await pipe(
                upstream, client, bucket=self._bucket, chunk=self._chunk, count=self._count_down
            )
            # Upstream is done (a plain request always ends so, with Connection: close): nothing
            # more the guest sends can matter.
            nursery.cancel_scope.cancel()

    async def _send_up(self, upstream: trio.SocketStream, data: bytes) -> None:
        await _throttle(self._bucket, len(data))
        await upstream.send_all(data)
        self._count_up(len(data))

    def _count_up(self, n: int) -> None:
        self._up += n

    def _count_down(self, n: int) -> None:
        self._down += n

    async def _refuse(self, client: trio.SocketStream, status: int, reason: str) -> None:
        await client.send_all(http_response(status, reason))
        await _send_eof(client)
        # Read (and drop) what the client still sends, until it closes or a deadline, so that it
        # reads our answer rather than a reset.
        drained = 0
        with trio.move_on_after(_LINGER_SECONDS):
            while drained < _LINGER_BYTES and (data := await client.receive_some(READ_CHUNK)):
                drained += len(data)


async def pipe(
    source: trio.abc.ReceiveStream,
    sink: trio.abc.SendStream,
    *,
    bucket: TokenBucket | None,
    chunk: int = READ_CHUNK,
    count: Callable[[int], None] = lambda n: None,
) -> None:
    """Copy ``source`` to ``sink`` until end of stream, holding to ``bucket``'s rate if any."""
    while data := await source.receive_some(chunk):
        # Not reading while we wait is what slows the sender: TCP's window closes behind us.
        await _throttle(bucket, len(data))
        await sink.send_all(data)
        count(len(data))


async def _throttle(bucket: TokenBucket | None, n: int) -> None:
    if bucket is not None:
        delay = bucket.reserve(n, trio.current_time())
        if delay > 0 and math.isfinite(delay):
            await trio.sleep(delay)


async def _send_eof(stream: trio.SocketStream) -> None:
    # Already closed by us means there is nothing left to end.
    with contextlib.suppress(trio.ClosedResourceError):
        await stream.send_eof()
