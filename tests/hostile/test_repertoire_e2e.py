"""A hostile peer runs its whole repertoire against a real scheduler, a real worker (real VMs) and a
real owner, all ``vmlend node start`` processes, while the honest owner submits tasks that must
complete with the right output. Afterwards all three processes are alive, their logs hold no
"internal error" and no traceback, and no file appeared outside their data dirs.

The hostile peer is a real py-libp2p host in this process (with its own chunk store, so that it
can serve the blobs its submits name). What it tries, against every node unless said:
- path-traversal task IDs and package paths, a files archive with an escaping member, and a
  files blob whose manifest repeats one chunk 100,000 times (the scheduler's tasks protocol);
- an empty, an ill-typed and a forged scheduler record, published and announced;
- log frames and a result report for a lease it does not hold (the scheduler);
- floods of streams on every protocol, past the per-peer limits, held open;
- oversized and deeply nested frames, and random bytes, on every protocol it speaks, and random
  bytes straight into the libp2p port;
- connections to the chunk data channel without a ticket, held open or sending random bytes.
Its bare TCP connections come from another loopback address (127.0.0.66), as from another host:
on loopback every honest node is 127.0.0.1, and limits per address are meant to stop one address
from taking what the others need. The scheduler runs with a lab's trust settings (one worker
decides a task alone). Measured here: the whole test 64-115 s; the submit whose files blob
repeats one 4 MiB chunk 100,000 times is refused after ~8.5 s (its 4 MB manifest is fetched).
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID

from catalog import scheduler_record
from catalog.blob import BlobId, BlobStore, ChunkRef, Manifest
from catalog.blob_service import BlobService, data_host_for
from catalog.chunk_store import ChunkStore
from catalog.chunking import hash_chunk
from catalog.data_channel import TICKET_PROTOCOL
from catalog.dispatch import (
    LOGS,
    LOGS_PROTOCOL_ID,
    LOGS_WIRE_LIMITS,
    PROTOCOL_ID,
    WIRE_LIMITS,
    LeaseKey,
    LogChunk,
    ResultAck,
    ResultStatus,
    decode_reply,
    encode_request,
)
from catalog.owner_protocol import PROTOCOL_ID as TASKS_PROTOCOL_ID
from catalog.owner_protocol import REPLIES, Refused
from catalog.owner_protocol import WIRE_LIMITS as TASKS_WIRE_LIMITS
from catalog.replication_messages import PROTOCOL_ID as SYNC_PROTOCOL_ID
from catalog.transfer_messages import PROTOCOL_ID as CHUNKS_PROTOCOL_ID
from node.errors import VmlendError
from node.heartbeat import PROTOCOL_ID as HEARTBEAT_PROTOCOL_ID
from node.identity import Identity
from node.localnet import LocalNode, stop_all
from node.p2p import P2PNode
from tests.hostile.conftest import Node
from tests.hostile.test_results import report_of
from tests.hostile.test_tasks_protocol import submit, tar_of, task_map
from tests.p2p_helpers import LOOPBACK

pytestmark = [pytest.mark.e2e, pytest.mark.vm]

# One worker on loopback: its result must decide a task alone (a lab's trust settings).
SCHEDULER_TOML = "[scheduler]\ntrust_after = 0\ndistinct_networks = false\n"
TASK = """\
name = "honest"
os = "tiny"
files = ["in.txt"]
command = "cat in.txt"
[resources]
memory = "128MiB"
[limits]
max_runtime = "2m"
"""
VMLEND_PROTOCOLS = [
    HEARTBEAT_PROTOCOL_ID, CHUNKS_PROTOCOL_ID, TICKET_PROTOCOL, SYNC_PROTOCOL_ID,
    PROTOCOL_ID, LOGS_PROTOCOL_ID, TASKS_PROTOCOL_ID,
]  # fmt: skip
LIBP2P_PROTOCOLS = ["/ipfs/kad/1.0.0", "/ipfs/id/1.0.0", "/ipfs/ping/1.0.0", "/meshsub/1.1.0"]
FLOOD = 48  # streams per protocol at once: three times the per-peer limit
HELD_CONNECTIONS = 40  # data-channel connections without a ticket, held open
# What the attacker's own side may see go wrong (refused, reset, timed out): none of it matters.
ATTACKER_SIDE = (VmlendError, OSError, BaseLibp2pError, trio.TooSlowError, trio.BrokenResourceError)
FRAME_LENGTH = struct.Struct(">I")
ATTACKER_ADDRESS = "127.0.0.66"


async def attempt(what: Callable[[], Awaitable[Any]], *, limit: float = 20.0) -> Any:
    """Run one attack; its failing on the attacker's side is no finding."""
    with trio.move_on_after(limit):
        try:
            return await what()
        except ATTACKER_SIDE as e:
            name = getattr(what, "func", what).__name__
            print(f"attacker side: {name}: {e!r}"[:400])  # shown if the test fails
            return None
    return None


def data_channel_of(node: LocalNode) -> tuple[str, int] | None:
    for line in node.output:
        if found := re.search(r"chunk data channel on ([\d.]+):(\d+)", line):
            return found.group(1), int(found.group(2))
    return None


def tcp_port_of(node: LocalNode) -> int:
    found = re.search(r"/tcp/(\d+)/", node.addrs[0])
    assert found is not None
    return int(found.group(1))


# ---- the repertoire ----------------------------------------------------------------------------


async def raw_write(hostile: Node, peer: str, protocol: str, data: bytes) -> None:
    host: Any = hostile.p2p._host
    stream = await host.new_stream(ID.from_base58(peer), [TProtocol(protocol)])
    try:
        await stream.write(data)
        with trio.move_on_after(2):
            await stream.read(65536)
    finally:
        await stream.reset()


def nested_frame(depth: int) -> bytes:
    body = b"\x91" * depth + b"\xc0"  # [[[...[nil]...]]]
    return FRAME_LENGTH.pack(len(body)) + body


async def garbage_everywhere(nursery: trio.Nursery, hostile: Node, peer: str) -> None:
    """Random bytes, an oversized frame and a deeply nested one on every protocol."""
    payloads = [
        os.urandom(8192),
        FRAME_LENGTH.pack(0xFFFFFFF0) + os.urandom(65536),  # claims 4 GiB
        nested_frame(100_000),
        FRAME_LENGTH.pack(3) + b"\x81\xa0",  # a frame cut short, then silence
    ]
    for protocol in VMLEND_PROTOCOLS + LIBP2P_PROTOCOLS:
        for data in payloads:
            nursery.start_soon(attempt, functools.partial(raw_write, hostile, peer, protocol, data))


async def flood(nursery: trio.Nursery, hostile: Node, peer: str, hold: trio.Event) -> None:
    """Open FLOOD streams on every vmlend protocol and hold them until ``hold`` is set."""

    async def one(protocol: str) -> None:
        async with await hostile.p2p.open_stream(peer, protocol) as stream:
            await stream.send({"type": "x" * 10})  # a start, never finished
            await hold.wait()

    for protocol in VMLEND_PROTOCOLS:
        for _ in range(FLOOD):
            held = functools.partial(attempt, functools.partial(one, protocol), limit=120)
            nursery.start_soon(held)


async def tcp_from_elsewhere(host: str, port: int) -> trio.SocketStream:
    """A TCP connection from another address of this host: per-address limits are meant to keep
    one address from taking what others need, and on loopback every honest node is 127.0.0.1."""
    sock = trio.socket.socket()
    await sock.bind((ATTACKER_ADDRESS, 0))
    await sock.connect((host, port))
    return trio.SocketStream(sock)


async def raw_tcp(
    nursery: trio.Nursery, port: int, hold: trio.Event, *, host: str = "127.0.0.1"
) -> None:
    """Random bytes into a bare TCP port, and connections held open without a word."""

    async def noise() -> None:
        stream = await tcp_from_elsewhere(host, port)
        async with stream:
            await stream.send_all(os.urandom(4096))
            with trio.move_on_after(2):
                await stream.receive_some(65536)

    async def silent() -> None:
        stream = await tcp_from_elsewhere(host, port)
        async with stream:
            await hold.wait()

    for _ in range(4):
        nursery.start_soon(attempt, noise)
    for _ in range(HELD_CONNECTIONS):
        nursery.start_soon(functools.partial(attempt, silent, limit=120))


async def ask_tasks(hostile: Node, scheduler: str, frame: dict[str, Any]) -> Any:
    async with await hostile.p2p.open_stream(
        scheduler, TASKS_PROTOCOL_ID, limits=TASKS_WIRE_LIMITS
    ) as stream:
        stream.deadline = 60.0  # a submit with files waits for them to be fetched
        await stream.send(frame)
        await stream.send_end()
        return REPLIES.decode(await stream.receive())


async def hostile_submits(hostile: Node, scheduler: str, canary: str) -> list[Any]:
    """Submits that must each be refused: traversal IDs, package paths, an escaping archive, a
    files blob that repeats one chunk 100,000 times."""
    frames = [
        submit(task_id, task_map())
        for task_id in (f"../../../../../../tmp/{canary}", f"/tmp/{canary}", "..", "a/../../b")
    ]
    frames += [
        submit(f"pkg-{canary[-6:]}-{i}", task_map() | {"packages": [path]})
        for i, path in enumerate(["/etc/ssh", "../..", "./../../etc"])
    ]
    escaping = await hostile.blobs.blobs.add_bytes(
        tar_of([("a", b"x"), (f"../../../../../../tmp/{canary}", b"owned")])
    )
    chunk = os.urandom(4 << 20)
    await hostile.blobs.blobs.add_bytes(chunk)
    repeated = Manifest(chunks=(ChunkRef(hash_chunk(chunk), len(chunk)),) * 100_000)
    await hostile.blobs.blobs.begin_fetch(repeated)  # "holds" a 400 GB blob
    for i, blob in enumerate([escaping, repeated.blob_id]):
        hostile.blobs.announce(BlobId(blob))
        task = task_map() | {"files": ["a"], "cwd": "/task"}
        frame = submit(
            f"files-{canary[-6:]}-{i}", task, files_blob=bytes(blob), providers=hostile.p2p.addrs
        )
        frames.append(frame)
    answers = []
    for frame in frames:
        ask = functools.partial(ask_tasks, hostile, scheduler, frame)
        took = trio.current_time()
        answers.append(await attempt(ask, limit=90))
        print(f"submit {frame['task_id'][:30]!r}: {trio.current_time() - took:.2f} s")
    return answers


NOT_HELD = LeaseKey("honest-0000000000", 0, 1)


async def logs_not_held(hostile: Node, scheduler: str) -> None:
    """Log frames for a lease this peer does not hold (the scheduler drops them)."""
    async with await hostile.p2p.open_stream(
        scheduler, LOGS_PROTOCOL_ID, limits=LOGS_WIRE_LIMITS
    ) as stream:
        chunk = LOGS.encode(LogChunk(lease=NOT_HELD, stream="stdout", data=b"forged"))
        for _ in range(50):
            await stream.send(chunk)
        await stream.send_end()


async def report_not_held(hostile: Node, scheduler: str) -> Any:
    """A signed result report for a lease this peer does not hold: answered STALE at once."""
    lease = NOT_HELD
    report = await report_of(hostile, lease, b"a forged result\n")
    async with await hostile.p2p.open_stream(scheduler, PROTOCOL_ID, limits=WIRE_LIMITS) as stream:
        await stream.send(encode_request(7, report))
        return decode_reply(await stream.receive())


async def hostile_records(nursery: trio.Nursery, hostile: Node, scheduler: LocalNode) -> None:
    """An empty, an ill-typed and a forged scheduler record, each signed by its publisher."""
    payloads: list[dict[str, Any]] = [
        {},
        {"name": "wrong-type", "peer_id": hostile.p2p.peer_id, "addrs": hostile.p2p.addrs[0]},
        {"name": "impostor", "peer_id": scheduler.peer_id, "addrs": hostile.p2p.addrs},
    ]
    for payload in payloads:
        rogue = P2PNode(Identity.generate(), listen=[LOOPBACK], bootstrap=scheduler.addrs[:1])
        await nursery.start(rogue.run)
        put = functools.partial(rogue.put_record, scheduler_record.KIND, rogue.peer_id, payload)
        await attempt(functools.partial(put, ttl=600))


async def hostile_node(stack: AsyncExitStack, nursery: trio.Nursery, home: Path) -> Node:
    """A real libp2p host with a chunk store and blob service, on the defaults a real node uses
    (the tests' fast timeouts would make it drop nodes busy running VMs)."""
    store = await stack.enter_async_context(ChunkStore.open(home / "chunks"))
    p2p = P2PNode(Identity.generate(), listen=[LOOPBACK])
    await nursery.start(p2p.run)
    blobs = BlobService(p2p, BlobStore(store), data_host=data_host_for(p2p.addrs))
    await nursery.start(blobs.run)
    return Node(p2p, blobs, home)


# ---- the honest side ---------------------------------------------------------------------------


async def honest_tasks(
    owner: LocalNode, base: Path, count: int, done: list[str], halfway: trio.Event
) -> None:
    for i in range(count):
        where = base / f"honest-{i}"
        where.mkdir()
        content = f"honest task {i}: {secrets.token_hex(8)}\n".encode()
        (where / "in.txt").write_bytes(content)
        with trio.fail_after(150):
            answer = await owner.call("task.submit", {"text": TASK, "base_dir": str(where)})
            task_id = answer["task_id"]
            status = await owner.call("task.wait", {"task_id": task_id, "timeout": 140})
            assert status["state"] == "succeeded", status
            results = await owner.call("task.results", {"task_id": task_id})
        assert results["stdout"] == content, (results, content)
        done.append(task_id)
        if len(done) * 2 >= count:
            halfway.set()


@asynccontextmanager
async def three_nodes(base: Path) -> AsyncIterator[list[LocalNode]]:
    """A scheduler (everyone's bootstrap peer), a worker and an owner, stopped on exit."""
    async with trio.open_nursery() as nursery:
        nodes: list[LocalNode] = []
        try:
            for name, roles in (
                ("scheduler", ("scheduler",)),
                ("worker", ("worker",)),
                ("owner", ("owner",)),
            ):
                data = base / name
                data.mkdir(parents=True)
                if name == "scheduler":
                    (data / "node.toml").write_text(SCHEDULER_TOML)
                node = LocalNode(name, data, roles, nodes[0].addrs[:1] if nodes else ())
                nodes.append(node)
                await node.start(nursery)
            with trio.fail_after(60):
                for node in nodes[1:]:
                    await node.call("schedulers.wait", {"count": 1, "timeout": 60})
            yield nodes
        finally:
            await stop_all(nodes)
            nursery.cancel_scope.cancel()


def canaries(canary: str) -> list[Path]:
    return [*Path("/tmp").glob(f"*{canary}*"), *Path("/").glob(f"*{canary}*")]


def outside(base: Path, data_dirs: list[Path]) -> set[Path]:
    return {p for p in base.rglob("*") if not any(p.is_relative_to(d) for d in data_dirs)}


async def test_three_nodes_serve_honest_peers_through_a_hostile_peers_repertoire(
    tmp_path: Path,
) -> None:
    canary = f"vmlend-owned-{secrets.token_hex(6)}"
    started = trio.current_time()
    async with three_nodes(tmp_path / "nodes") as nodes, AsyncExitStack() as stack:
        scheduler, _, owner = nodes
        data_dirs = [n.data_dir for n in nodes]
        before = outside(tmp_path, data_dirs)
        async with trio.open_nursery() as nursery:
            hostile = await hostile_node(stack, nursery, tmp_path / "hostile")
            data_dirs.append(tmp_path / "hostile")
            for node in nodes:
                await hostile.p2p.connect(node.addrs[0])
            done: list[str] = []
            honest_base = tmp_path / "honest"
            honest_base.mkdir()
            data_dirs.append(honest_base)
            hold, halfway = trio.Event(), trio.Event()
            async with trio.open_nursery() as honest:
                honest.start_soon(honest_tasks, owner, honest_base, 3, done, halfway)
                async with trio.open_nursery() as attacks:
                    await hostile_records(nursery, hostile, scheduler)
                    # Its requests first: once it floods, its own streams are refused too.
                    answers = await hostile_submits(hostile, scheduler.peer_id, canary)
                    await attempt(functools.partial(logs_not_held, hostile, scheduler.peer_id))
                    forged = await attempt(
                        functools.partial(report_not_held, hostile, scheduler.peer_id)
                    )
                    for node in nodes:
                        await flood(attacks, hostile, node.peer_id, hold)
                        await garbage_everywhere(attacks, hostile, node.peer_id)
                        await raw_tcp(attacks, tcp_port_of(node), hold)
                        if (channel := data_channel_of(node)) is not None:
                            await raw_tcp(attacks, channel[1], hold, host=channel[0])
                    # The floods stay on while the honest tasks run.
                    with trio.fail_after(150):
                        await halfway.wait()
                    hold.set()
            nursery.cancel_scope.cancel()
        assert len(done) == 3
        assert all(isinstance(a, Refused) for a in answers), answers
        # A report for a lease it does not hold is answered STALE at once (nothing fetched).
        assert isinstance(forged, tuple), forged
        assert isinstance(forged[1], ResultAck), forged
        assert forged[1].status is ResultStatus.STALE
        for node in nodes:
            assert node.process is not None
            assert node.process.returncode is None, (node.name, node.output[-30:])
            # Still serving its local users too.
            with trio.fail_after(30):
                await node.call("node.info")
            bad = [line for line in node.output if "internal error" in line or "Traceback" in line]
            assert not bad, (node.name, bad[:5])
        assert outside(tmp_path, data_dirs) - before == set()
        assert not canaries(canary)
    assert trio.current_time() - started < 240
