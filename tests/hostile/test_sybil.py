"""A quorum attacked by five identities on one address, against a real scheduler over libp2p.

Every peer here is a real libp2p host. On loopback every connection would come from 127.0.0.1,
so each host stands for a machine by its own loopback address (the attacker's five keys on
127.0.0.1, the honest worker on 127.0.1.1, a second honest worker on 127.0.2.1: three /24s): it
listens there and its TCP dials leave from there (py-libp2p's TCP dial with the socket bound to
that address first). The scheduler sees each connection come from that address, exactly as it
would see a remote machine's; nothing a worker sends says where it is. (py-libp2p's own
``dial_with_source`` sets SO_REUSEPORT for hole punching; with it, connections here broke.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.transport.exceptions import OpenConnectionError
from multiaddr import Multiaddr

from catalog.blob import BlobStore
from catalog.blob_service import BlobService, data_host_for
from catalog.chunk_store import ChunkStore
from catalog.dispatch import (
    LeaseGrant,
    NoWork,
    ResultAck,
    ResultStatus,
    WorkRequest,
    decode_reply,
    encode_request,
)
from catalog.owner_protocol import PROTOCOL_ID as TASKS
from catalog.owner_protocol import REPLIES, REQUESTS, ResultsRequest, TaskResults
from node.errors import NetworkError
from node.identity import Identity
from node.p2p import P2PNode
from node.p2p_stream import MessageStream
from scheduler_role.lifecycle import TaskState
from scheduler_role.service import SchedulerService
from scheduler_role.trust import Policy
from tests.hostile.conftest import Node, Scheduler, _no_boot_files
from tests.hostile.test_results import dispatch_stream, report_of
from tests.p2p_helpers import FAST
from tests.scheduler.conftest import offer, spec

ATTACKER_IP = "127.0.0.1"
HONEST_IP = "127.0.1.1"
HELPER_IP = "127.0.2.1"
FORGED = b"forged\n"
HONEST = b"42\n"
ATTEMPTS = 4
Opener = Callable[[Node, Scheduler], Awaitable[MessageStream]]
# Nine hosts in one process on a busy machine: slower liveness than FAST; the result's answer
# waits for the scheduler to fetch its blobs.
OPTIONS: dict[str, Any] = {
    **FAST,
    "heartbeat_interval": 1.0,
    "peer_timeout": 20.0,
    "stream_deadline": 30.0,
    "dial_timeout": 15.0,
}


@dataclass
class Lab:
    scheduler: Scheduler
    owner: Node
    attackers: list[Node]
    honest: Node
    helper: Node


async def _node(stack: AsyncExitStack, nursery: trio.Nursery, home: Path, ip: str) -> Node:
    store = await stack.enter_async_context(ChunkStore.open(home / "chunks"))
    p2p = P2PNode(Identity.generate(), listen=[f"/ip4/{ip}/tcp/0"], **OPTIONS)
    dial_from(p2p, ip)
    await nursery.start(p2p.run)
    blobs = BlobService(p2p, BlobStore(store), data_host=data_host_for(p2p.addrs))
    await nursery.start(blobs.run)
    return Node(p2p, blobs, home)


def dial_from(p2p: P2PNode, ip: str) -> None:
    """Make every TCP dial of ``p2p`` leave from ``ip`` (its machine's address): py-libp2p's
    own dial, with the socket bound to ``ip`` first (``local_address``; no port reuse)."""
    for transport in p2p._host.get_network().transport_manager.get_transports():

        async def dial(maddr: Multiaddr) -> RawConnection:
            host, port = maddr.value_for_protocol("ip4"), int(maddr.value_for_protocol("tcp"))
            try:
                stream = await trio.open_tcp_stream(host, port, local_address=ip)
            except OSError as e:
                raise OpenConnectionError(f"dialing {maddr} from {ip}: {e}") from e
            return RawConnection(TrioTCPStream(stream), True)

        transport.dial = dial  # type: ignore[method-assign]


@asynccontextmanager
async def lab(tmp_path: Path, policy: Policy | None) -> AsyncIterator[Lab]:
    async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
        base = await _node(stack, nursery, tmp_path / "scheduler", ATTACKER_IP)
        service = SchedulerService(
            base.p2p, base.blobs, base.home, boot=_no_boot_files, lease_timeout=60.0, policy=policy
        )
        await nursery.start(service.run)
        scheduler = Scheduler(base.p2p, base.blobs, base.home, service)
        attackers = [
            await _node(stack, nursery, tmp_path / f"attacker{n}", ATTACKER_IP) for n in range(5)
        ]
        honest = await _node(stack, nursery, tmp_path / "honest", HONEST_IP)
        helper = await _node(stack, nursery, tmp_path / "helper", HELPER_IP)
        owner = helper  # the owner is any peer: the helper's key submits the tasks
        peers = (*attackers, honest, helper)
        for peer in peers:
            await scheduler.p2p.connect(peer.p2p.addrs[0])
            await peer.p2p.connect(scheduler.p2p.addrs[0])
        # Every peer and the scheduler have heard each other's heartbeat before the attack.
        ids = {peer.p2p.peer_id for peer in peers}
        with trio.fail_after(60):
            await scheduler.p2p.wait_peers(lambda live: ids <= {p.peer_id for p in live})
            for peer in peers:
                await peer.p2p.wait_peers(
                    lambda live: scheduler.p2p.peer_id in {p.peer_id for p in live}
                )
        yield Lab(scheduler, owner, attackers, honest, helper)
        nursery.cancel_scope.cancel()


async def exchange(peer: Node, scheduler: Scheduler, open_: Opener, frame: Any) -> Any:
    """Send ``frame`` on a new stream and return the answer. As real peers do, ask again when
    the connection broke (on this loaded machine the p2p layer sometimes closes a busy one):
    the peer connects again, from its own address."""
    for attempt in range(ATTEMPTS):
        try:
            with trio.fail_after(60):
                await peer.p2p.connect(scheduler.p2p.addrs[0])
                async with await open_(peer, scheduler) as stream:
                    await stream.send(frame)
                    return await stream.receive()
        except NetworkError:
            if attempt == ATTEMPTS - 1:
                raise
            # As an agent waits retry_after: the swarm forgets a closed connection meanwhile
            # (until then P2PNode takes it for a live one and does not dial again).
            await trio.sleep(2.0)
    raise AssertionError("unreachable")


async def _dispatch(peer: Node, scheduler: Scheduler) -> MessageStream:
    return await dispatch_stream(peer, scheduler)


async def _tasks(peer: Node, scheduler: Scheduler) -> MessageStream:
    return await peer.p2p.open_stream(scheduler.p2p.peer_id, TASKS)


async def ask_work(worker: Node, scheduler: Scheduler) -> LeaseGrant | NoWork:
    frame = encode_request(1, WorkRequest(offer=offer()))
    reply = decode_reply(await exchange(worker, scheduler, _dispatch, frame))
    assert isinstance(reply, tuple), reply
    assert isinstance(reply[1], LeaseGrant | NoWork), reply
    return reply[1]


async def run_replica(worker: Node, scheduler: Scheduler, stdout: bytes) -> LeaseGrant:
    """Take a lease and report ``stdout`` for it, as a worker would (the report is signed and
    its blobs are in the worker's store for the scheduler to fetch)."""
    grant = await ask_work(worker, scheduler)
    assert isinstance(grant, LeaseGrant), grant
    frame = encode_request(2, await report_of(worker, grant.lease, stdout))
    reply = decode_reply(await exchange(worker, scheduler, _dispatch, frame))
    assert isinstance(reply, tuple), reply
    assert isinstance(reply[1], ResultAck), reply
    # A report delivered again after a broken stream is counted once (DUPLICATE the second time).
    assert reply[1].status in (ResultStatus.RECORDED, ResultStatus.DUPLICATE), reply
    return grant


async def nothing_for(workers: list[Node], scheduler: Scheduler) -> None:
    for worker in workers:
        assert isinstance(await ask_work(worker, scheduler), NoWork)


async def owners_results(lab: Lab, task_id: str) -> TaskResults:
    frame = REQUESTS.encode(ResultsRequest(task_id=task_id))
    answer = REPLIES.decode(await exchange(lab.owner, lab.scheduler, _tasks, frame))
    assert isinstance(answer, TaskResults), answer
    return answer


async def submit(lab: Lab, task_id: str, *, replicas: int = 1, quorum: int = 1) -> None:
    task = spec(task_id, replicas=replicas, quorum=quorum)
    await lab.scheduler.service.queue.submit(dataclasses.replace(task, owner=lab.owner.p2p.peer_id))


async def test_five_identities_on_one_address_never_get_their_forged_answer_accepted(
    tmp_path: Path,
) -> None:
    """The default policy, every worker new, the owner asks for two agreeing workers: the five
    keys on one address get one replica between them, the honest worker the other; they
    disagree, the task fails at once and says why, and the owner is never handed the forged
    answer (before: two of the five keys took both replicas and agreed on it)."""
    async with lab(tmp_path, None) as the:
        queue = the.scheduler.service.queue
        await submit(the, "t", replicas=2, quorum=2)
        first, *others = the.attackers
        await run_replica(first, the.scheduler, FORGED)
        await nothing_for(others, the.scheduler)  # one network holds one replica of a task
        assert (await queue.status("t")).state is TaskState.ACTIVE
        await run_replica(the.honest, the.scheduler, HONEST)
        status = await queue.status("t")
        assert status.state is TaskState.FAILED
        assert "results disagree" in status.reason
        results = await owners_results(the, "t")
        assert results.stdout == b""
        assert results.status.verdict == "failed"
        assert results.status.exit_code is None


async def test_five_identities_on_one_address_lose_to_one_trusted_worker(tmp_path: Path) -> None:
    """The honest worker earned trust here (one task confirmed from a third network, with
    ``trust_after = 1``); the forger answers first, is not believed alone, and the honest answer
    decides; the forger's disagreement is on its record."""
    async with lab(tmp_path, Policy(trust_after=1)) as the:
        queue = the.scheduler.service.queue
        await submit(the, "warm-up")
        await run_replica(the.honest, the.scheduler, HONEST)
        await run_replica(the.helper, the.scheduler, HONEST)
        assert (await queue.status("warm-up")).state is TaskState.SUCCEEDED
        assert queue.policy.trusted(await queue.record_of(the.honest.p2p.peer_id))

        await submit(the, "t")
        first, *others = the.attackers
        await run_replica(first, the.scheduler, FORGED)
        assert (await queue.status("t")).state is TaskState.ACTIVE
        await nothing_for(others, the.scheduler)
        await run_replica(the.honest, the.scheduler, HONEST)
        status = await queue.status("t")
        assert status.state is TaskState.SUCCEEDED
        assert status.dissenters == (first.p2p.peer_id,)
        results = await owners_results(the, "t")
        assert results.stdout == HONEST
        record = await queue.record_of(first.p2p.peer_id)
        assert (record.disagreed, record.streak) == (1, 0)
        networks = {n for _, n in (await queue.workers()).values()}
        assert {"127.0.0.0/24", "127.0.1.0/24", "127.0.2.0/24"} <= networks
