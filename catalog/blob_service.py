"""Blobs on a node: serve chunks to peers, announce what we hold, fetch from others, local RPC.

Served over libp2p (authenticated by Noise): ``/vmlend/chunks/1.0.0`` (have / manifest / chunk
requests, answered by :func:`catalog.transfer_messages.respond`) and ``TICKET_PROTOCOL`` (a
one-time token for the direct data channel, see :mod:`catalog.data_channel`). Bulk chunk bytes
go over that channel; they verify themselves by hash.

Providers: every complete blob is announced in the DHT under :func:`provider_key` (at start, after
an add or a finished fetch, and every ``announce_interval``); ``rm`` withdraws it.

Private blobs (``add(private=True)``, then ``grant`` per peer; see :mod:`catalog.blob_access`):
never announced, unknown to peers not granted them, and their chunks travel on the data channel
encrypted with a key handed over the granted peer's Noise stream.

RPC methods (params are MessagePack-RPC arrays)::

    blob.add  [ABS_PATH] | [ABS_PATH, {"private": bool}]  -> {"id", "size"}
    blob.grant [ID, PEER_ID]                      -> {"id", "peer"}   (private blobs only)
    blob.ls   []                                  -> [{"id", "size", "chunks", "missing", ...}]
    blob.rm   [ID]                                -> {"id"}
    blob.gc   []                                  -> {"chunks_freed", "bytes_freed"}
    blob.providers [ID]                           -> [peer ID, ...]
    blob.get  [ID, {"out"?, "from"?: [MULTIADDR], "timeout"?, "channel"?: bool}]  (streaming;
              channel false moves chunks on libp2p streams instead of the data channel)
              notifications "blob.progress" {bytes_done, bytes_total, bytes_fetched, rate_bps,
              peers} and "blob.peer" {peer, status: misbehaved|dropped, reason}; result {"id",
              "bytes_total", "bytes_fetched", "bytes_present", "seconds", "setup_seconds",
              "store_seconds", "out"}
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import trio

from catalog.blob import BlobId, BlobStore
from catalog.blob_access import BlobAccess
from catalog.blob_fetch import ensure_blob
from catalog.blob_rpc import (
    blob_param,
    blob_param_here,
    get_options,
    mapped_errors,
    progress_dict,
)
from catalog.chunking import ChunkId
from catalog.data_channel import KEY_SIZE, TICKET_PROTOCOL
from catalog.data_channel_server import ChunkFile, DataServer
from catalog.errors import (
    CatalogError,
    NoProviderError,
    UnknownBlobError,
)
from catalog.peer_quota import DEFAULT_PEER_QUOTA, PeerQuota
from catalog.provider_lookup import ProviderLookup, took
from catalog.transfer import Held, TransferResult, fetch_blob
from catalog.transfer_links import CONTROL_TIMEOUT, P2PLinks, connections_per_provider, ip_of
from catalog.transfer_messages import (
    MESSAGES,
    PROTOCOL_ID,
    WIRE_LIMITS,
    ChunkRequest,
    ErrorCode,
    ErrorResponse,
    HaveRequest,
    HaveResponse,
    ManifestRequest,
    Message,
    respond,
)
from catalog.transfer_plan import Event, PeerDropped, PeerMisbehaved, Progress
from node.errors import NetworkError, RemoteProtocolError, RpcError
from node.p2p import P2PNode
from node.p2p_stream import MessageStream
from node.rpc_server import SendNotification
from node.supervise import one_error

log = logging.getLogger("vmlend.catalog.blobs")

Handler = Callable[[list[Any]], Awaitable[Any]]
StreamHandler = Callable[[list[Any], SendNotification], Awaitable[Any]]
PROGRESS_INTERVAL = 0.1


# DHT lookups of providers left to finish after their fetch (see ``fetch``); beyond these, a
# fetch waits for its own lookup or cancels it.
MAX_BACKGROUND_LOOKUPS = 32


def provider_key(blob_id: BlobId) -> bytes:
    """The DHT key under which holders of a blob announce themselves (a sha256 multihash)."""
    return b"\x12\x20" + hashlib.sha256(b"vmlend-blob:" + blob_id).digest()


class BlobService:
    """Serves and fetches the blobs of one :class:`BlobStore` for a node."""

    def __init__(
        self,
        p2p: P2PNode,
        blobs: BlobStore,
        *,
        data_host: str | None = "127.0.0.1",
        announce_interval: float = 1800.0,
        request_timeout: float = 10.0,
        access: BlobAccess | None = None,
        max_data_connections: int = 64,
        peer_quota: int = DEFAULT_PEER_QUOTA,
    ) -> None:
        self.p2p = p2p
        self.blobs = blobs
        self._peer_quota = peer_quota
        self.peer_quota: PeerQuota
        """What peers made this node store (:mod:`catalog.peer_quota`); open once running."""
        self.access = access if access is not None else BlobAccess()
        self.data = (
            DataServer(
                lambda c: blobs.chunks.get(c, verify=True),
                open_chunk=self._open_chunk,
                host=data_host,
                max_connections=max_data_connections,
            )
            if data_host is not None
            else None
        )
        self._data_host = data_host
        self._announce_interval = announce_interval
        self.request_timeout = request_timeout
        self._announce_send, self._announce_receive = trio.open_memory_channel[BlobId](1000)
        self._background: trio.Nursery | None = None  # where lookups run on; set while running
        self._lookups = trio.Semaphore(MAX_BACKGROUND_LOOKUPS)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        ledger = self.blobs.chunks.root / "peer_quota.db"
        async with (
            PeerQuota.open(ledger, quota=self._peer_quota) as self.peer_quota,
            trio.open_nursery() as nursery,
        ):
            if self.data is not None:
                await nursery.start(self.data.run)
            self.p2p.set_handler(PROTOCOL_ID, self._serve_control, limits=WIRE_LIMITS)
            self.p2p.set_handler(TICKET_PROTOCOL, self._serve_ticket)
            nursery.start_soon(self._announce_loop)
            self._background = nursery
            try:
                task_status.started()
                await trio.sleep_forever()
            finally:
                self._background = None

    # ---- serving ---------------------------------------------------------------------------

    async def _serve_control(self, stream: MessageStream) -> None:
        async for raw in stream:
            request = MESSAGES.decode(raw)  # RemoteProtocolError resets only this stream
            if not isinstance(request, HaveRequest | ManifestRequest | ChunkRequest):
                raise RemoteProtocolError(f"{stream.peer_id} sent a {request.TYPE} as a request")
            await stream.send(MESSAGES.encode(await self._answer(stream.peer_id, request)))

    async def _answer(
        self, peer: str, request: HaveRequest | ManifestRequest | ChunkRequest
    ) -> Message:
        """:func:`respond`, for what ``peer`` may read: a private blob not granted to it is
        unknown, and so is a chunk that only such blobs use."""
        if isinstance(request, ChunkRequest):
            if not await self._may_read_chunk(peer, ChunkId(request.chunk_id)):
                return ErrorResponse(request_id=request.request_id, code=ErrorCode.NOT_FOUND)
        elif not self.access.may_read(BlobId(request.blob_id), peer):
            return ErrorResponse(request_id=request.request_id, code=ErrorCode.UNKNOWN_BLOB)
        return await respond(self.blobs, request)

    def _open_chunk(self, chunk_id: ChunkId) -> ChunkFile:
        # Blocking (the data channel calls it in a connection's thread). Public chunks go out
        # with sendfile, unverified here: every fetcher verifies each chunk (and stops using a
        # provider that sends wrong bytes), so a second check on this side would only cost a
        # read and a hash pass per byte. Local readers still verify.
        chunks = self.blobs.chunks
        fd, size = chunks.open_file_sync(chunk_id)
        return ChunkFile(fd, size, closer=partial(chunks.close_file, chunk_id))

    async def _may_read_chunk(self, peer: str, chunk_id: ChunkId) -> bool:
        if not self.access.private_ids():
            return True
        rows = await self.blobs.chunks.db.fetchall(
            "SELECT owner FROM chunk_refs WHERE chunk_id = ?", (chunk_id,)
        )
        return any(self.access.may_read(BlobId(bytes(row[0])), peer) for row in rows)

    async def _serve_ticket(self, stream: MessageStream) -> None:
        """A one-time data-channel token for the asking peer, scoped to one blob's chunks; for
        a private blob it carries the key its chunks will be encrypted with (this stream is
        Noise-encrypted, so only that peer learns it)."""
        try:
            raw = await stream.receive()
        except trio.EndOfChannel:
            raise RemoteProtocolError(f"{stream.peer_id}: ended without a ticket request") from None
        blob = raw.get("blob_id")
        if raw.get("type") != "ticket_request" or not isinstance(blob, bytes) or len(blob) != 32:
            raise RemoteProtocolError(f"{stream.peer_id}: expected a ticket request")
        blob_id = BlobId(blob)
        if self.data is None:
            await stream.send({"type": "no_channel"})
            return
        try:
            if not self.access.may_read(blob_id, stream.peer_id):
                raise UnknownBlobError(blob_id.hex())
            manifest = await self.blobs.manifest(blob_id)
        except UnknownBlobError:
            await stream.send({"type": "unknown_blob"})
            return
        key = secrets.token_bytes(KEY_SIZE) if self.access.is_private(blob_id) else None
        scope = frozenset(manifest.distinct_ids())
        token = self.data.tokens.issue(stream.peer_id, trio.current_time(), scope=scope, key=key)
        reply = {"type": "ticket", "token": token, "port": self.data.port}
        reply["host"] = self._data_host or ""
        if key is not None:
            reply["key"] = key
        await stream.send(reply)

    # ---- announcing ------------------------------------------------------------------------

    async def _announce_loop(self) -> None:
        while True:
            for info in await self.blobs.ls():
                if info.complete and not self.access.is_private(info.blob_id):
                    await self._provide(info.blob_id)
            with trio.move_on_after(self._announce_interval):
                async for blob_id in self._announce_receive:
                    await self._provide(blob_id)

    async def _provide(self, blob_id: BlobId) -> None:
        if self.access.is_private(blob_id):
            return  # never announced
        try:
            await self.p2p.provide(provider_key(blob_id), timeout=CONTROL_TIMEOUT)
        except NetworkError as e:
            log.info("announcing blob %s: %s", blob_id.hex(), e)

    def announce(self, blob_id: BlobId) -> None:
        try:
            self._announce_send.send_nowait(blob_id)
        except trio.WouldBlock:
            log.info("announce queue full; %s waits for the periodic announce", blob_id.hex())

    async def providers(self, blob_id: BlobId) -> list[str]:
        """Peers announced in the DHT as holding the blob that answer, now, that they hold all
        of it (announcements outlive a withdrawal or a dead node; this filters those out)."""
        return list(await self._confirmed_providers(blob_id))

    async def _confirmed_providers(self, blob_id: BlobId) -> dict[str, Held]:
        """:meth:`providers`, with what each said it holds (a fetch need not ask again)."""
        announced = await self.p2p.find_providers(provider_key(blob_id), timeout=CONTROL_TIMEOUT)
        confirmed: dict[str, Held] = {}

        async def confirm(peer: str) -> None:
            request = HaveRequest(request_id=0, blob_id=blob_id)
            with trio.move_on_after(CONTROL_TIMEOUT):
                try:
                    raw = await self.p2p.request(
                        peer,
                        PROTOCOL_ID,
                        MESSAGES.encode(request),
                        timeout=CONTROL_TIMEOUT,
                        limits=WIRE_LIMITS,
                    )
                    reply = MESSAGES.decode(raw)
                except (NetworkError, RemoteProtocolError) as e:
                    log.debug("provider %s of %s: %s", peer, blob_id.hex(), e)
                    return
                if isinstance(reply, HaveResponse):
                    held = reply.held()
                    if len(held) == reply.chunk_count:
                        confirmed[peer] = Held(reply.chunk_count, held)

        async with trio.open_nursery() as nursery:
            for peer in announced:
                nursery.start_soon(confirm, peer)
        return {peer: confirmed[peer] for peer in announced if peer in confirmed}

    # ---- operations ------------------------------------------------------------------------

    async def add(self, path: Path, *, private: bool = False) -> BlobId:
        """Store the file and announce it (done when this returns, so others can find it); a
        private blob is not announced and is served only to peers it is granted to."""
        blob_id = await self.blobs.add_file(path)
        if private:
            self.access.make_private(blob_id)
            await trio.to_thread.run_sync(self.access.save)
        await self._provide(blob_id)
        return blob_id

    async def grant(self, blob_id: BlobId, peer: str) -> None:
        """Let ``peer`` fetch the private blob ``blob_id`` from this node."""
        if not self.access.is_private(blob_id):
            raise CatalogError(f"blob {blob_id.hex()} is public; grants are for private blobs")
        await self.blobs.manifest(blob_id)  # UnknownBlobError
        self.access.grant(blob_id, peer)
        await trio.to_thread.run_sync(self.access.save)

    async def rm(self, blob_id: BlobId) -> None:
        await self.blobs.rm(blob_id)
        self.p2p.withdraw(provider_key(blob_id))
        if self.access.is_private(blob_id):
            self.access.forget(blob_id)
            await trio.to_thread.run_sync(self.access.save)

    async def fetch(
        self,
        blob_id: BlobId,
        *,
        sources: Sequence[str] = (),
        ask_dht: bool | None = None,
        on_event: Callable[[Event], None] = lambda e: None,
        use_channel: bool = True,
        max_size: int | None = None,
    ) -> TransferResult:
        """Fetch the blob's missing chunks from the peers at ``sources`` (multiaddrs) and, if
        ``ask_dht`` (by default only when there are no sources), from its DHT providers. An
        address that cannot be reached is left out; NoProviderError if no peer remains; a blob
        declaring more than ``max_size`` bytes, BlobTooLargeError before any chunk is fetched.
        :func:`catalog.blob_fetch.ensure_blob` is the call for "have it here in time"."""
        if ask_dht is None:
            ask_dht = not sources
        # A provider may say a blob new to us is private (then we keep it so); it cannot make
        # one we already know private, which would stop us announcing and serving it.
        known = await self._knows(blob_id)

        def on_private() -> None:
            if known:
                log.warning("a provider says %s is private; it is known here: unchanged", blob_id)
            else:
                self.access.make_private(blob_id)

        async with one_error(), trio.open_nursery() as nursery:
            lookup = ProviderLookup()
            if not ask_dht:
                lookup.done.set()
            elif self._background is not None and took(self._lookups):
                # A lookup this fetch stops needing is left to end within its own deadline:
                # cancelled in the middle of a query, py-libp2p breaks the connection the query
                # was on, and every other stream on it (a long "task.wait", say).
                self._background.start_soon(self._look_up, lookup, blob_id)
            else:
                nursery.start_soon(lookup.run, self._confirmed_providers, blob_id)
            hints, unreachable = await self._reach(blob_id, sources)
            if not hints:  # nobody to start with: the DHT's providers are all there is
                await lookup.done.wait()
            held = lookup.found
            if lookup.error is not None:
                unreachable["<dht>"] = lookup.error
            peers = list(dict.fromkeys([*hints, *held]))
            if not peers:
                raise NoProviderError(blob_id.hex(), ["<manifest>"], unreachable)
            links = P2PLinks(
                self.p2p,
                nursery,
                blob_id,
                use_channel=use_channel,
                on_private=on_private,
                spool=self.blobs.chunks.spool,
                connections=connections_per_provider(len(set(peers))),
                addr_hints=hints,
            )
            try:
                result = await fetch_blob(
                    self.blobs,
                    blob_id,
                    links,
                    peers,
                    request_timeout=self.request_timeout,
                    on_event=on_event,
                    held=held,
                    max_size=max_size,
                    late=None if lookup.done.is_set() else lookup.wait,
                )
            finally:
                await links.aclose()
                nursery.cancel_scope.cancel()
                if self.access.is_private(blob_id):
                    with trio.CancelScope(shield=True):
                        await trio.to_thread.run_sync(self.access.save)
        self.announce(blob_id)
        return result

    async def _look_up(self, lookup: ProviderLookup, blob_id: BlobId) -> None:
        try:
            await lookup.run(self._confirmed_providers, blob_id)
        finally:
            self._lookups.release()

    async def _knows(self, blob_id: BlobId) -> bool:
        try:
            await self.blobs.manifest(blob_id)
        except UnknownBlobError:
            return False
        return True

    async def _reach(
        self, blob_id: BlobId, sources: Sequence[str]
    ) -> tuple[dict[str, list[str]], dict[str, str]]:
        """The peers at ``sources`` that a connection reaches (with the addresses that reached
        them, in the order given), all dialled at once, and why each other address failed."""
        reached: dict[str, str] = {}
        unreachable: dict[str, str] = {}

        async def connect(addr: str) -> None:
            try:
                reached[addr] = await self.p2p.connect(addr)
            except NetworkError as e:
                log.info("source %s of blob %s: %s", addr, blob_id.hex(), e)
                unreachable[addr] = str(e)[:120]

        async with trio.open_nursery() as nursery:
            for addr in dict.fromkeys(sources):
                nursery.start_soon(connect, addr)
        hints: dict[str, list[str]] = {}
        for addr in dict.fromkeys(sources):
            if addr in reached:
                hints.setdefault(reached[addr], []).append(addr)
        return hints, unreachable

    # ---- local RPC -------------------------------------------------------------------------

    def rpc_methods(self) -> Mapping[str, Handler]:
        return {
            "blob.add": self._rpc_add,
            "blob.ls": self._rpc_ls,
            "blob.rm": self._rpc_rm,
            "blob.gc": self._rpc_gc,
            "blob.check": self._rpc_check,
            "blob.grant": self._rpc_grant,
            "blob.providers": self._rpc_providers,
        }

    def rpc_streams(self) -> Mapping[str, StreamHandler]:
        return {"blob.get": self._rpc_get}

    async def _rpc_add(self, params: list[Any]) -> dict[str, Any]:
        if not 1 <= len(params) <= 2 or not isinstance(params[0], str):
            raise RpcError("invalid_params", "expected [ABSOLUTE_PATH] or [PATH, {private}]")
        options = params[1] if len(params) == 2 else {}
        if not isinstance(options, dict) or set(options) - {"private"}:
            raise RpcError("invalid_params", "the only option is private (true or false)")
        private = options.get("private", False)
        if not Path(params[0]).is_absolute() or not isinstance(private, bool):
            raise RpcError("invalid_params", "the path must be absolute, private a bool")
        with mapped_errors():
            blob_id = await self.add(Path(params[0]), private=private)
            size = (await self.blobs.manifest(blob_id)).total_size
        return {"id": blob_id.hex(), "size": size}

    async def _rpc_ls(self, params: list[Any]) -> list[dict[str, Any]]:
        return [
            {
                "id": i.blob_id.hex(),
                "size": i.size,
                "chunks": i.chunk_count,
                "missing": i.missing_chunks,
                "complete": i.complete,
                "private": self.access.is_private(i.blob_id),
                "added_at": i.added_at,
            }
            for i in await self.blobs.ls()
        ]

    async def _rpc_rm(self, params: list[Any]) -> dict[str, Any]:
        with mapped_errors():
            blob_id = await blob_param_here(params, self._ids_here)
            await self.rm(blob_id)
        return {"id": blob_id.hex()}

    async def _rpc_grant(self, params: list[Any]) -> dict[str, Any]:
        if len(params) != 2 or not isinstance(params[1], str):
            raise RpcError("invalid_params", "expected [BLOB_ID, PEER_ID]")
        with mapped_errors():
            blob_id = await blob_param_here(params[:1], self._ids_here)
            await self.grant(blob_id, params[1])
        return {"id": blob_id.hex(), "peer": params[1]}

    async def _rpc_gc(self, params: list[Any]) -> dict[str, Any]:
        result = await self.blobs.gc()
        return {"chunks_freed": result.chunks_freed, "bytes_freed": result.bytes_freed}

    async def _rpc_check(self, params: list[Any]) -> dict[str, Any]:
        if params:
            raise RpcError("invalid_params", "blob.check takes no parameters")
        report = await self.blobs.chunks.scrub()
        # Unfinished rows and temp files belong to writes in flight (a fetch keeps its spooled
        # chunks under tmp/ until they are committed) or to a crash, which the next start
        # finishes: reported, not counted as problems.
        problems = report.corrupt or report.missing_files or report.stray_files
        return {
            "ok": not problems,
            "corrupt": report.corrupt,  # quarantined now
            "missing_files": report.missing_files,
            "stray_files": report.stray_files,
            "unfinished": report.unfinished_rows,
            "temp_files": report.temp_files,
        }

    async def _rpc_providers(self, params: list[Any]) -> list[str]:
        with mapped_errors():
            return await self.providers(blob_param(params))

    async def _ids_here(self) -> list[BlobId]:
        return [i.blob_id for i in await self.blobs.ls()]

    async def _rpc_get(self, params: list[Any], send: SendNotification) -> dict[str, Any]:
        with mapped_errors():
            blob_id = await blob_param_here(params[:1], self._ids_here)
        options = get_options(params)
        out = options.get("out")
        notes_send, notes_receive = trio.open_memory_channel[tuple[str, dict[str, Any]]](
            float("inf")
        )
        last = [-1.0]

        def on_event(event: Event) -> None:
            now = trio.current_time()
            if isinstance(event, Progress):
                final = event.bytes_done == event.bytes_total
                if not final and now - last[0] < PROGRESS_INTERVAL:
                    return
                last[0] = now
                notes_send.send_nowait(("blob.progress", progress_dict(event)))
            elif isinstance(event, PeerMisbehaved | PeerDropped):
                kind = "misbehaved" if isinstance(event, PeerMisbehaved) else "dropped"
                notes_send.send_nowait(
                    ("blob.peer", {"peer": event.peer, "status": kind, "reason": event.reason})
                )

        async def forward() -> None:
            async for method, note in notes_receive:
                await send(method, [note])

        sources = options.get("from", [])
        with mapped_errors():
            async with one_error(), trio.open_nursery() as nursery:
                nursery.start_soon(forward)
                try:
                    result = await ensure_blob(
                        self,
                        blob_id,
                        timeout=float(options.get("timeout", 3600)),
                        sources=sources,
                        ask_dht=not sources,  # --from names the only peers to ask
                        on_event=on_event,
                        use_channel=options.get("channel", True),
                    )
                finally:
                    notes_send.close()
            if out is not None:
                await self.blobs.export(blob_id, Path(out))
        return {
            "id": blob_id.hex(),
            "bytes_total": result.bytes_total,
            "bytes_fetched": result.bytes_fetched,
            "bytes_present": result.bytes_present,
            "seconds": result.seconds,
            "setup_seconds": result.setup_seconds,
            "store_seconds": result.store_seconds,
            "out": out,
        }


def data_host_for(listen: Sequence[str]) -> str | None:
    """Where the data channel listens: the IP address (v4 or v6) of the first libp2p listen
    address that has one (so it is reachable wherever libp2p is), or None (no channel)."""
    for addr in listen:
        if (ip := ip_of(addr)) is not None:
            return str(ip)
    return None
