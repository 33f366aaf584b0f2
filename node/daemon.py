"""The node process: composes identity, store, p2p adapter, local RPC and the roles.

This is one of the two modules of ``node`` allowed to import the roles (the other is ``node.cli``).
"""

from __future__ import annotations

import functools
import logging
import signal
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

import node
from catalog import scheduler_record
from catalog.blob import BlobStore
from catalog.blob_access import BlobAccess
from catalog.blob_service import BlobService, data_host_for
from catalog.build.service import ImageBuildService
from catalog.chunk_store import ChunkStore
from catalog.replication_service import ReplicationService
from catalog.scheduler_choice import SchedulerChoice, choice_key
from catalog.scrubber import Scrubber
from catalog.service import open_catalog
from node import rpc_params
from node.config import Config
from node.errors import DeadlineError, RpcError
from node.identity import Identity
from node.p2p import P2PNode, PeerInfo
from node.rpc_server import RpcServer
from node.store import Database
from owner_role.service import OwnerService
from scheduler_role.service import SchedulerService
from scheduler_role.trust import Policy
from worker_role import tinyos
from worker_role.agent import WorkerAgent
from worker_role.lease_blobs import NodeLeaseBlobs
from worker_role.vm.backend import open_backend

log = logging.getLogger("vmlend.node.daemon")

# Numbered schema migrations of <data>/state.db; never edit a shipped one, append a new one.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE node_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
]


class Node:
    """One running vmlend node. ``run`` returns when cancelled (SIGINT/SIGTERM in the CLI)."""

    def __init__(self, config: Config, data_dir: Path, identity: Identity) -> None:
        self.config = config
        self.data_dir = data_dir
        self.identity = identity
        net = config.network
        self.p2p = P2PNode(
            identity,
            listen=list(net.listen),
            bootstrap=list(net.bootstrap),
            heartbeat_interval=net.heartbeat_interval,
            peer_timeout=net.peer_timeout,
            dial_timeout=net.dial_timeout,
            stream_deadline=net.stream_deadline,
            max_inbound_streams=net.max_inbound_streams,
            max_inbound_streams_per_peer=net.max_inbound_streams_per_peer,
            max_connections=net.max_connections,
            max_connections_per_peer=net.max_connections_per_peer,
        )
        self.schedulers = scheduler_record.SchedulerDirectory(self.p2p)
        self.choice = SchedulerChoice(
            choice_key(identity.private_bytes), frozenset(net.trusted_schedulers)
        )

    agent: WorkerAgent | None = None
    owner: OwnerService | None = None
    blobs: BlobService | None = None
    scheduler: SchedulerService | None = None

    @property
    def roles(self) -> list[str]:
        return sorted(str(r) for r in self.config.node.roles)

    async def run(
        self, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        trusted = self.config.catalog.trusted_publisher_keys
        async with (
            Database.open(self.data_dir / "state.db", MIGRATIONS) as db,
            open_catalog(self.data_dir, self.identity, trusted) as catalog,
            ChunkStore.open(
                self.data_dir / "chunks", quota_bytes=self.config.catalog.chunk_quota
            ) as chunks,
        ):
            self.db = db
            async with trio.open_nursery() as nursery:
                addrs: list[str] = await nursery.start(functools.partial(self.p2p.run, join=False))
                blobs = BlobService(
                    self.p2p,
                    BlobStore(chunks),
                    data_host=data_host_for(self.config.network.listen),
                    access=BlobAccess(self.data_dir / "blob_access.json"),
                    peer_quota=self.config.catalog.peer_quota,
                )
                await nursery.start(blobs.run)
                self.blobs = blobs
                scrubber = Scrubber(
                    chunks,
                    interval=self.config.catalog.scrub_interval,
                    rate=self.config.catalog.scrub_rate,
                )
                await nursery.start(scrubber.run)
                methods = {**self.rpc_methods(), **catalog.rpc_methods(), **blobs.rpc_methods()}
                streams = dict(blobs.rpc_streams())
                if self.config.has_role("owner"):
                    owner = OwnerService(self.p2p, blobs, self.data_dir, choice=self.choice)
                    self.owner = owner
                    methods.update(owner.rpc_methods())
                    streams.update(owner.rpc_streams())
                else:
                    methods.update(dict.fromkeys(OwnerService.METHODS, _not_an_owner))
                images = ImageBuildService(
                    blobs.blobs, catalog.library, self.identity, tinyos.locate
                )
                methods.update(images.rpc_methods())
                rpc = RpcServer(self.data_dir / "rpc.sock", methods, streams=streams)
                await nursery.start(rpc.run)
                if self.config.has_role("scheduler"):
                    scheduler = SchedulerService(
                        self.p2p, blobs, self.data_dir, boot=tinyos.locate,
                        lease_timeout=self.config.scheduler.lease_timeout,
                        library=catalog.library,
                        policy=Policy.from_config(self.config.scheduler),
                        keep_finished=self.config.scheduler.keep_finished,
                    )  # fmt: skip
                    await nursery.start(scheduler.run)
                    self.scheduler = scheduler
                    await nursery.start(ReplicationService(self.p2p, catalog.library).run)
                if self.config.has_role("worker"):
                    lease_blobs = NodeLeaseBlobs(blobs, self.config.worker.vm_dir / "images")
                    self.agent = WorkerAgent(
                        self.p2p, lease_blobs, self.identity, self.data_dir, self.config.worker,
                        open_backend=functools.partial(
                            open_backend,
                            warm_dir=self.data_dir / "warm",
                            warm_budget_mib=self.config.worker.warm_budget >> 20,
                            warm_slots=max(1, min(self.config.worker.max_concurrent_vms, 4)),
                        ),
                    )  # fmt: skip
                    self.agent.trusted_schedulers = self.choice.trusted
                    await nursery.start(self.agent.run)
                self.p2p.join()  # every protocol is served now
                if self.scheduler is not None:
                    await nursery.start(self._advertise_scheduler)
                task_status.started(addrs)

    async def _advertise_scheduler(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep this scheduler's signed record fresh in the DHT (republished well before expiry)."""
        started = False
        while True:
            advert = scheduler_record.SchedulerRecord(
                name=self.config.scheduler.name or self.p2p.peer_id[-8:],
                peer_id=self.p2p.peer_id,
                addrs=tuple(self.p2p.addrs[: scheduler_record.MAX_ADDRS]),
            )
            await self.p2p.put_record(
                scheduler_record.KIND,
                self.p2p.peer_id,
                advert.to_payload(),
                ttl=scheduler_record.TTL,
            )
            if not started:
                task_status.started()
                started = True
            alone = not self.p2p.peers()
            with trio.move_on_after(scheduler_record.TTL / 3):
                if alone:  # the record reached no one: put it again once someone can hold it
                    await self.p2p.wait_peer_count(1)
                else:
                    await trio.sleep_forever()

    def rpc_methods(self) -> Mapping[str, Callable[[list[Any]], Awaitable[Any]]]:
        return {
            "node.info": self._rpc_node_info,
            "peers.list": self._rpc_peers_list,
            "schedulers.list": self._rpc_schedulers_list,
            "peers.wait": self._rpc_peers_wait,
            "schedulers.wait": self._rpc_schedulers_wait,
        }

    async def _rpc_node_info(self, params: list[Any]) -> dict[str, Any]:
        return {
            "peer_id": self.p2p.peer_id,
            "name": self.config.node.name,
            "addrs": self.p2p.addrs,
            "roles": self.roles,
            "version": node.__version__,
            "data_dir": str(self.data_dir),
            # None when lending works (or the node has no worker role), else the reason.
            "lending_problem": self.agent.problem if self.agent is not None else None,
        }

    async def _rpc_peers_list(self, params: list[Any]) -> list[dict[str, Any]]:
        return [{"peer_id": p.peer_id, "addrs": list(p.addrs)} for p in self.p2p.peers()]

    async def _rpc_schedulers_list(self, params: list[Any]) -> list[dict[str, Any]]:
        """Each scheduler record found, with ``trusted`` (listed in network.trusted_schedulers),
        ``default`` (the one a submission without a scheduler would go to, reachable or not:
        :mod:`catalog.scheduler_choice`) and ``stale`` (known from an earlier lookup only),
        trusted ones first, then in this node's order."""
        found = {s.peer_id: s for s in await self.schedulers.find(timeout=10.0)}
        known = self.owner.known_schedulers() if self.owner is not None else set()
        ranked = self.choice.rank(found, known=known)
        return [
            {
                **found[peer].to_payload(),
                "trusted": self.choice.is_trusted(peer),
                "default": i == 0,
                # Listed from an earlier lookup: this one could not reach it in time.
                "stale": peer in self.schedulers.stale,
            }
            for i, peer in enumerate(ranked)
        ]

    async def _rpc_peers_wait(self, params: list[Any]) -> list[dict[str, Any]]:
        """Block until at least ``count`` live peers, or until ``absent`` is no longer live."""
        args = rpc_params.options(params, 0, {"count", "absent", "timeout"})
        count = rpc_params.int_option(args, "count", default=0)
        timeout = rpc_params.timeout_option(args, default=30, maximum=3600)
        absent = args.get("absent")

        def done(peers: list[PeerInfo]) -> bool:
            ids = {p.peer_id for p in peers}
            return len(peers) >= count and (absent is None or absent not in ids)

        with _rpc_deadline(timeout, "peers"):
            await self.p2p.wait_peers(done)
        return await self._rpc_peers_list([])

    async def _rpc_schedulers_wait(self, params: list[Any]) -> list[dict[str, Any]]:
        """Block until at least ``count`` scheduler records are found in the DHT.

        Records have no change notification in Kademlia, so the node re-queries with back-off.
        """
        args = rpc_params.options(params, 0, {"count", "timeout"})
        count = rpc_params.int_option(args, "count", default=1)
        timeout = rpc_params.timeout_option(args, default=30, maximum=3600)
        delay = 0.1
        with _rpc_deadline(timeout, "schedulers"):
            while True:
                try:
                    found = await self._rpc_schedulers_list([])
                except DeadlineError:  # one lookup overran (nothing known yet): ask again
                    found = []
                if len(found) >= count:
                    return found
                await trio.sleep(delay)
                delay = min(delay * 2, 2.0)


@contextmanager
def _rpc_deadline(seconds: float, what: str) -> Iterator[None]:
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError as e:
        raise RpcError("timeout", f"{what} condition not reached in time") from e


async def serve_until_signalled(
    node_: Node, *, on_started: Callable[[list[str]], None] | None = None
) -> None:
    """Run the node until SIGINT or SIGTERM, then drain and return."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            addrs: list[str] = await nursery.start(node_.run)
            if on_started is not None:
                on_started(addrs)
            async for signum in signals:
                log.info("received %s, shutting down", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


async def _not_an_owner(params: list[Any]) -> Any:
    raise RpcError(
        "role_off",
        'this node does not borrow compute: add "owner" to roles in [node] of node.toml '
        "(or to --roles)",
    )
