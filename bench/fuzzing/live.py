"""The live half of the fuzz benchmark: a real ``vmlend node start`` (worker, scheduler and owner
roles) fed generated inputs on every protocol it serves, from a real py-libp2p host, and on its
local RPC socket and its chunk data channel.

Each input is one stream (or connection): the bytes are written, the node's reaction is awaited
briefly (an answer, a reset, a close), then the stream is reset. After every batch the node must
still be running and still answer honest requests (a heartbeat ping, a task-status request, the
``node.info`` RPC) within ``HEALTH_TIMEOUT``; a miss is a hang, a dead process a crash. Every
"internal error" the node logs (a handler bug that containment caught) is a crash too, kept with
its log lines and the last inputs sent on that protocol.
"""

from __future__ import annotations

import random
import re
import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import msgpack
import trio
from libp2p.custom_types import TProtocol
from libp2p.kad_dht.pb.kademlia_pb2 import Message as KadMessage

from catalog import dispatch, owner_protocol, replication_messages, scheduler_record
from catalog.data_channel import TICKET_PROTOCOL
from catalog.task_wire import task_to_wire
from catalog.transfer_messages import PROTOCOL_ID as CHUNKS_PROTOCOL
from node import dht_records
from node.errors import VmlendError
from node.heartbeat import PINGS, Ping
from node.heartbeat import PROTOCOL_ID as HEARTBEAT_PROTOCOL
from node.localnet import LocalNode
from node.p2p import P2PNode
from node.p2p_host import PEERSTORE_ERRORS, parse_peer_id
from node.p2p_stream import LIBP2P_IO_ERRORS
from node.wire import encode_frame

from . import targets
from .mutate import Mutator, Tree, encode

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
ROLES = ("worker", "scheduler", "owner")
KAD = "/ipfs/kad/1.0.0"
RECORDS = "dht: signed scheduler records"
LIBP2P_PROTOCOLS = (KAD, "/ipfs/id/1.0.0", "/ipfs/id/push/1.0.0", "/ipfs/ping/1.0.0")
WORKERS = 16
REACTION_S = 0.2  # how long an input's stream waits for the node's reaction
BATCH = 500
HEALTH_TIMEOUT = 15.0
END_FRAME = encode_frame({"type": "vmlend.end"})
# What a stream or a connection to a hostile-input-fed node may fail with, all expected.
_FAILURES: tuple[type[BaseException], ...] = (*LIBP2P_IO_ERRORS, trio.TooSlowError)
_HEALTH_FAILURES: tuple[type[BaseException], ...] = (*_FAILURES, VmlendError)
# A payload too big for a record, or one msgpack cannot encode.
_PUBLISH_FAILURES: tuple[type[BaseException], ...] = (*_HEALTH_FAILURES, ValueError, TypeError)
_KEPT = 32  # last inputs kept per target, as reproducers of a logged internal error


@dataclass
class LiveStats:
    inputs: int = 0
    refused: int = 0  # the node reset or refused the stream before it was written
    answered: int = 0  # the node sent something back
    seconds: float = 0.0
    last: deque[str] = field(default_factory=lambda: deque(maxlen=_KEPT))

    def report(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "streams_refused": self.refused,
            "answered": self.answered,
            "mean_ms_per_input": round(1000 * self.seconds / self.inputs, 1) if self.inputs else 0,
        }


# ---- inputs per protocol ---------------------------------------------------------------------


def framed_input(mutator: Mutator, *, seeds: list[Tree], types: tuple[str, ...]) -> bytes:
    r = mutator.rng
    if r.random() < 0.15:
        return mutator.random_bytes()
    frames = []
    for _ in range(r.choice((1, 1, 1, 2, 3))):
        body = encode(mutator.mutate(r.choice(seeds), types)) or r.randbytes(16)
        frame = len(body).to_bytes(4, "big") + body
        if r.random() < 0.1:
            frame = r.choice((b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x00\x40\x00\x01")) + body
        frames.append(mutator.damage(frame) if r.random() < 0.1 else frame)
    if r.random() < 0.5:
        frames.append(END_FRAME)
    return b"".join(frames)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def kad_input(mutator: Mutator, record_seed: Tree, record_key: bytes) -> bytes:
    """A Kademlia message: mostly a PUT_VALUE of a mutated vmlend record, or a lookup."""
    r = mutator.rng
    if r.random() < 0.15:
        return mutator.random_bytes()
    message = KadMessage()
    message.type = r.choice((0, 0, 0, 1, 2, 3, 4, 5, r.randrange(6, 100)))  # type: ignore[assignment]
    message.key = r.choice((record_key, r.randbytes(r.choice((0, 1, 32, 300))), b"/vmlend/x/y"))
    if message.type == 0:
        value = encode(mutator.mutate(record_seed)) or b""
        message.record.key = message.key
        message.record.value = value
    data = message.SerializeToString()
    if r.random() < 0.2:
        data = mutator.damage(data)
    return _varint(len(data) if r.random() < 0.9 else r.getrandbits(35)) + data


Generator = Callable[[Mutator], bytes]


def generators() -> dict[str, Generator]:
    chunk_requests = [m for m in targets.chunk_messages() if m["type"].endswith("request")]
    ticket = [{"type": "ticket_request", "blob_id": targets.ID32}]
    record = targets.dht_record()
    key = dht_records.record_key("scheduler", targets.PEER_ID).encode()
    log = dispatch.LOGS.encode(dispatch.LogChunk(lease=targets.LEASE, stream="stdout", data=b"out"))
    vmlend: dict[str, tuple[list[Tree], tuple[str, ...]]] = {
        HEARTBEAT_PROTOCOL: ([{"type": "ping"}], ("ping", "pong")),
        dispatch.PROTOCOL_ID: (targets.dispatch_requests(), tuple(dispatch.REQUESTS._types)),
        dispatch.LOGS_PROTOCOL_ID: ([log], ("log",)),
        owner_protocol.PROTOCOL_ID: (targets.owner_requests(),
                                     tuple(owner_protocol.REQUESTS._types)),
        replication_messages.PROTOCOL_ID: (targets.replication_requests(),
                                           tuple(replication_messages.REQUESTS._types)),
        CHUNKS_PROTOCOL: (chunk_requests, ("have_request", "manifest_request", "chunk_request")),
        TICKET_PROTOCOL: (ticket, ("ticket_request",)),
    }  # fmt: skip
    out: dict[str, Generator] = {
        p: partial(framed_input, seeds=s, types=t) for p, (s, t) in vmlend.items()
    }
    out[KAD] = lambda m: kad_input(m, record, key)
    for protocol in LIBP2P_PROTOCOLS[1:]:
        out[protocol] = lambda m: m.rng.choice((m.random_bytes(), m.rng.randbytes(32)))
    return out


def rpc_seeds(base_dir: Path) -> list[Tree]:
    task = task_to_wire(targets.TASK)
    task.update(os="fuzz-none", packages=[], files=[])
    text = 'name = "f"\nos = "fuzz-none"\ncommand = "true"\n'
    h = targets.ID32.hex()
    calls: list[tuple[str, list[Any]]] = [
        ("node.info", []), ("peers.list", []), ("schedulers.list", []),
        ("peers.wait", [{"count": 1, "timeout": 0.5}]),
        ("schedulers.wait", [{"count": 1, "timeout": 0.5}]),
        ("catalog.list", [{"kind": "os"}]), ("catalog.show", ["tiny", {"kind": "os"}]),
        ("catalog.wait", ["a" * 64, {"timeout": 0.5}]), ("blob.ls", []), ("blob.check", [h]),
        ("blob.grant", [h, targets.PEER_ID]), ("blob.providers", [h]), ("blob.rm", [h]),
        ("task.status", [{"task_id": "t-1"}]), ("task.wait", [{"task_id": "t-1", "timeout": 0.5}]),
        ("task.results", [{"task_id": "t-1"}]), ("task.cancel", [{"task_id": "t-1"}]),
        ("task.logs", [{"task_id": "t-1", "follow": False}]),
        ("task.submit", [{"text": text, "base_dir": str(base_dir)}]),
        ("task.submit", [{"task": task, "base_dir": str(base_dir)}]),
    ]  # fmt: skip
    return [[0, i, method, params] for i, (method, params) in enumerate(calls)]


# ---- the run ---------------------------------------------------------------------------------


class LiveFuzz:
    def __init__(self, node: LocalNode, fuzzer: P2PNode, seed: int, base_dir: Path) -> None:
        self.node = node
        self.fuzzer = fuzzer
        self.rng = random.Random(f"{seed}/live")
        self.generators = generators()
        self.rpc_seeds = rpc_seeds(base_dir)
        self.stats: dict[str, LiveStats] = {}
        self.findings: list[dict[str, Any]] = []
        self.health_checks = 0
        self.hangs = 0
        self.node_peak_rss = 0
        self._errors_seen = 0
        self._data_port = _data_port(node)
        self._record_payload = msgpack.unpackb(targets.dht_record()["payload"])

    def targets(self, served: set[str]) -> list[str]:
        names = [p for p in self.generators if p in served]
        names += ["local-rpc", RECORDS] + (["data-channel"] if self._data_port else [])
        for name in names:
            self.stats.setdefault(name, LiveStats())
        return names

    async def run(self, total: int, names: list[str]) -> None:
        per_target, left = divmod(total, len(names))
        plan = [name for i, name in enumerate(names) for _ in range(per_target + (i < left))]
        self.rng.shuffle(plan)
        for start in range(0, len(plan), BATCH):
            batch = plan[start : start + BATCH]
            todo = iter(batch)
            async with trio.open_nursery() as nursery:
                for _ in range(WORKERS):
                    nursery.start_soon(self._worker, todo)
            await self.health_check()

    async def _worker(self, todo: Any) -> None:
        for name in todo:
            mutator = Mutator(random.Random(self.rng.getrandbits(64)))
            t0 = time.perf_counter()
            if name == "local-rpc":
                data = _rpc_input(mutator, self.rpc_seeds)
                await self._send_unix(name, data)
            elif name == RECORDS:
                await self._publish(mutator)
            elif name == "data-channel":
                await self._send_tcp(name, mutator.random_bytes())
            else:
                await self._send_stream(name, self.generators[name](mutator))
            self.stats[name].seconds += time.perf_counter() - t0

    def _count(self, name: str, data: bytes, answered: bool) -> None:
        stats = self.stats[name]
        stats.inputs += 1
        stats.answered += answered
        stats.last.append(data[:1024].hex())

    async def _send_stream(self, protocol: str, data: bytes) -> None:
        host = self.fuzzer._host
        try:
            with trio.fail_after(HEALTH_TIMEOUT):
                raw = await host.new_stream(parse_peer_id(self.node.peer_id), [TProtocol(protocol)])
        except _FAILURES:  # a refusal of the stream (reset, limit, timeout)
            self.stats[protocol].refused += 1
            return
        answered = False
        try:
            with trio.move_on_after(REACTION_S):
                await raw.write(data)
                while await raw.read(65536):
                    answered = True
        except _FAILURES:
            pass  # the node resetting a bad stream is its right
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1.0), suppress(*_FAILURES):
                await raw.reset()
        self._count(protocol, data, answered)

    async def _publish(self, mutator: Mutator) -> None:
        """A correctly signed scheduler record with a mutated payload, published (stored at the
        node and announced in the scheduler index): what the node's worker role reads when it
        looks for schedulers."""
        payload = mutator.mutate(self._record_payload)
        if not isinstance(payload, dict):
            payload = {}
        data = encode(payload)
        if data is None:  # not msgpack (an int past 64 bits): no record can carry it
            self.stats[RECORDS].refused += 1
            return
        try:
            with trio.fail_after(HEALTH_TIMEOUT):
                await self.fuzzer.put_record(
                    scheduler_record.KIND, self.fuzzer.peer_id, payload, ttl=60.0
                )
        except _PUBLISH_FAILURES:  # too big, not msgpack
            self.stats[RECORDS].refused += 1
            return
        self._count(RECORDS, data, True)

    async def _send_unix(self, name: str, data: bytes) -> None:
        await self._send_socket(name, data, None)

    async def _send_tcp(self, name: str, data: bytes) -> None:
        await self._send_socket(name, data, self._data_port)

    async def _send_socket(self, name: str, data: bytes, port: int | None) -> None:
        """Over the RPC socket (``port`` None) or a TCP connection to ``port``."""
        answered = False
        stream: trio.abc.Stream
        try:
            with trio.fail_after(HEALTH_TIMEOUT):
                if port is None:
                    stream = await trio.open_unix_socket(str(self.node.rpc_path))
                else:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
        except (OSError, trio.TooSlowError):
            self.stats[name].refused += 1
            return
        async with stream:
            try:
                with trio.move_on_after(REACTION_S):
                    await stream.send_all(data)
                    while await stream.receive_some(65536):
                        answered = True
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        self._count(name, data, answered)

    async def health_check(self) -> None:
        """The node is running and answers a ping, a task-status request and an RPC call."""
        self.health_checks += 1
        if self.node.process is None or self.node.process.returncode is not None:
            raise NodeDied(
                f"the node exited with {self.node.process and self.node.process.returncode}"
            )
        self._collect_internal_errors()
        self.node_peak_rss = max(self.node_peak_rss, _peak_rss(self.node))
        try:
            with trio.fail_after(HEALTH_TIMEOUT):
                pong = await self.fuzzer.request(
                    self.node.peer_id,
                    HEARTBEAT_PROTOCOL,
                    PINGS.encode(Ping()),
                    timeout=HEALTH_TIMEOUT,
                )
                status = await self.fuzzer.request(
                    self.node.peer_id, owner_protocol.PROTOCOL_ID,
                    owner_protocol.REQUESTS.encode(owner_protocol.StatusRequest(task_id="no-such")),
                    timeout=HEALTH_TIMEOUT, limits=owner_protocol.WIRE_LIMITS,
                )  # fmt: skip
                info = await self.node.call("node.info")
            healthy = pong.get("type") == "pong" and status.get("type") == "error" and info
        except _HEALTH_FAILURES as e:  # an honest request that fails is the finding
            healthy = False
            self.findings.append({"kind": "hang", "error": f"{type(e).__name__}: {e}"[:300]})
        if not healthy:
            self.hangs += 1

    def _collect_internal_errors(self) -> None:
        output = self.node.output
        for i, line in enumerate(output[self._errors_seen :], start=self._errors_seen):
            # One event per internal error (its traceback follows it), and any other traceback.
            after_error = i > 0 and "internal error" in output[i - 1]
            if "internal error" not in line and ("Traceback" not in line or after_error):
                continue
            protocol = next((p for p in self.stats if p in line), None)
            self.findings.append({
                "kind": "crash", "log": output[i : i + 40][:40], "protocol": protocol,
                "recent_inputs_hex": list(self.stats[protocol].last) if protocol else [],
            })  # fmt: skip
        self._errors_seen = len(output)


class NodeDied(Exception):
    """The fuzzed node's process ended."""


def _rpc_input(mutator: Mutator, seeds: list[Tree]) -> bytes:
    r = mutator.rng
    if r.random() < 0.1:
        return mutator.random_bytes()
    message = mutator.mutate(r.choice(seeds))
    data = encode(message) or b"\x90"
    return mutator.damage(data) if r.random() < 0.1 else data


def _data_port(node: LocalNode) -> int | None:
    for line in node.output:
        if found := re.search(r"chunk data channel on [\d.]+:(\d+)", line):
            return int(found.group(1))
    return None


def _peak_rss(node: LocalNode) -> int:
    """The node's peak resident set (VmHWM), in bytes."""
    assert node.process is not None
    try:
        status = Path(f"/proc/{node.process.pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(found.group(1)) * 1024 if found else 0


def served_protocols(fuzzer: P2PNode, peer_id: str) -> set[str]:
    """The protocols the node said it serves (identify), else every one we know of."""
    try:
        listed = fuzzer._host.get_peerstore().get_protocols(parse_peer_id(peer_id))
    except PEERSTORE_ERRORS:  # no identify answer yet: fall back to the full list
        listed = []
    return {str(p) for p in listed} or set(generators())


async def fuzz_live(base: Path, total: int, seed: int) -> dict[str, Any]:
    started = time.perf_counter()
    await trio.Path(base).mkdir(parents=True, exist_ok=True)
    async with trio.open_nursery() as nursery:
        node = LocalNode("fuzzed", base / "node", ROLES)
        await node.start(nursery)
        # The identity the record targets sign with: its records are well signed.
        fuzzer = P2PNode(targets.IDENTITY, listen=[LOOPBACK], stream_deadline=HEALTH_TIMEOUT)
        await nursery.start(fuzzer.run)
        await fuzzer.connect(node.addrs[0])
        await trio.sleep(2.0)  # let identify tell us the node's protocols
        served = served_protocols(fuzzer, node.peer_id)
        fuzz = LiveFuzz(node, fuzzer, seed, base)
        names = fuzz.targets(served)
        died = None
        try:
            await fuzz.health_check()
            await fuzz.run(total, names)
        except NodeDied as e:
            died = str(e)
        output_tail = node.output[-20:] if died else []
        if not died:
            await node.stop()
        nursery.cancel_scope.cancel()
    seconds = time.perf_counter() - started
    inputs = sum(s.inputs for s in fuzz.stats.values())
    crashes = sum(1 for f in fuzz.findings if f["kind"] == "crash") + (died is not None)
    return {
        "node_roles": list(ROLES),
        "protocols_served": sorted(served),
        "protocols_fuzzed": [n for n in names if n not in ("local-rpc", "data-channel")],
        "inputs": inputs,
        "crashes": crashes,
        "hangs": fuzz.hangs,
        "node_died": died,
        "node_output_tail": output_tail,
        "health_checks": fuzz.health_checks,
        "inputs_per_s": round(inputs / seconds, 1),
        "node_peak_rss_mib": round(fuzz.node_peak_rss / 2**20, 1),
        "per_target": {name: s.report() for name, s in fuzz.stats.items()},
        "findings": fuzz.findings[:20],
    }
