"""Every decoder a peer's bytes reach, as fuzz targets: the seeds (valid messages, built by the
real encoders), how a mutated tree becomes bytes, the decoding path the node runs on such bytes,
and the typed errors that decoder documents.

A target's ``decode`` runs what a receiving node runs: the frame checks of :mod:`node.wire` with
the protocol's own limits, then the protocol's typed decoder, then what the receiver does next
with the decoded value without any I/O (a signature check, a nested manifest or entry decoded).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from catalog import dispatch, owner_protocol, replication_messages, scheduler_record
from catalog import transfer_messages as chunks
from catalog.blob import ChunkRef, Manifest
from catalog.caps import Caps, NetworkMode
from catalog.chunking import ChunkId
from catalog.entries import DOMAIN, TrustPolicy, decode_entry, make_entry
from catalog.errors import CatalogError
from catalog.manifest import ImageManifest, LayerRef
from catalog.task_wire import task_from_wire, task_to_wire
from catalog.taskfile import Limits, Resources, TaskFile
from node import dht_records, heartbeat, rpc, rpc_params
from node.errors import ProtocolError, RpcError, VmlendError
from node.identity import Identity
from node.wire import DEFAULT_LIMITS, FrameDecoder, WireLimits, decode_body
from node.wire_message import MessageSet

from .mutate import Tree, encode

NOW = 1_900_000_000.0  # the wall clock the record targets sign and check at
IDENTITY = Identity(Ed25519PrivateKey.from_private_bytes(bytes(range(32))))
PEER_ID = dht_records.peer_id_of(IDENTITY.public_bytes)
ID32 = bytes(range(32))


@dataclass(frozen=True, slots=True)
class Target:
    """``decode`` raises one of ``expected`` for what it refuses; anything else is a crash."""

    name: str
    seeds: Sequence[Tree]
    decode: Callable[[bytes], object]
    expected: tuple[type[BaseException], ...]
    encoder: Callable[[Tree], bytes | None] = encode
    types: tuple[str, ...] = ()  # message types of the protocol, for cross-type swaps
    random_bytes: bool = True


# ---- seeds: valid messages, from the real encoders ------------------------------------------

TASK = TaskFile(
    name="fuzz", os="tiny", command=("sh", "-c", "echo hi"), packages=("busybox", "./pkg"),
    files=("data/in.txt",), env={"A": "1", "B_2": "two"}, cwd="/work", replicas=2, quorum=2,
    resources=Resources(network="proxy", allow=("example.org:443",)),
    limits=Limits(max_runtime=300.0, deadline=3600.0, max_attempts=3),
    base_dir=Path("/nonexistent"),
)  # fmt: skip
LEASE = dispatch.LeaseKey("task-1", 1, 2)
CAPS = Caps(vcpus=2, cpu_share=1.5, memory_mib=512, network=NetworkMode.PROXY,
            net_allow=("example.org:443",))  # fmt: skip


def _signed_report() -> dispatch.ResultReport:
    fields: dict[str, Any] = dict(
        lease=LEASE, exit_code=0, stdout_digest=bytes(32), stderr_digest=ID32,
        stdout_blob=ID32, stderr_blob=bytes(32), archive_blob=ID32,
    )  # fmt: skip
    unsigned = dispatch.ResultReport(**fields, signature=bytes(64))
    return dispatch.ResultReport(**fields, signature=IDENTITY.sign(unsigned.signed_bytes()))


def dispatch_requests() -> list[Tree]:
    offer = dispatch.Offer(room=CAPS, capacity=Caps(), images=frozenset({ID32, bytes(32)}))
    requests: list[dispatch.Request] = [
        dispatch.WorkRequest(offer=offer),
        dispatch.Heartbeat(leases=(LEASE, dispatch.LeaseKey("t2", 0, 1)), running=(LEASE,)),
        dispatch.Lost(leases=(LEASE,)),
        _signed_report(),
    ]
    return [dispatch.encode_request(7, r) for r in requests]


def dispatch_replies() -> list[Tree]:
    answers: list[dispatch.Answer] = [
        dispatch.LeaseGrant(
            lease=LEASE, image_id=ID32, caps=CAPS, lease_timeout=30.0, max_runtime=600.0
        ),
        dispatch.NoWork(retry_after=5.0, reason="nothing fits"),
        dispatch.HeartbeatAck(stop=(LEASE,)),
        dispatch.ResultAck(lease=LEASE, status=dispatch.ResultStatus.RECORDED),
    ]
    stop = dispatch.encode_stop(dispatch.Stop(leases=(LEASE,), reason="over"))
    return [*(dispatch.encode_answer(3, a) for a in answers), stop]


def owner_requests() -> list[Tree]:
    o = owner_protocol
    return [o.REQUESTS.encode(m) for m in (
        o.Submit(task_id="task-1", task=TASK, files_blob=ID32, providers=("/ip4/1.2.3.4/tcp/1",)),
        o.StatusRequest(task_id="task-1"), o.WaitRequest(task_id="task-1", timeout=30.0),
        o.CancelRequest(task_id="t"), o.ResultsRequest(task_id="t"),
        o.LogsRequest(task_id="t", follow=True),
    )]  # fmt: skip


def owner_replies() -> list[Tree]:
    o = owner_protocol
    status = o.TaskStatus(
        task_id="task-1", state="active", verdict=None, reason="", finished=False, exit_code=0,
        replicas=(o.ReplicaView(index=0, state="running", worker=PEER_ID, attempts=1),),
        results=1, reported_by=(PEER_ID,), dissenters=(), waiting=("no worker has room",),
    )  # fmt: skip
    return [o.REPLIES.encode(m) for m in (
        o.Submitted(task_id="task-1", new=True), status,
        o.TaskResults(status=status, stdout=b"hi\n", stderr=b"", archive_blob=ID32,
                      providers=("/ip4/1.2.3.4/tcp/1",)),
        o.LogData(stream="stdout", data=b"x" * 100), o.LogEnd(state="succeeded"),
        o.Refused(code="unknown_task", message="no such task"),
    )]  # fmt: skip


def replication_requests() -> list[Tree]:
    r = replication_messages
    return [r.REQUESTS.encode(m) for m in (
        r.SummaryRequest(root=ID32), r.IdsRequest(buckets=(0, 1, 255)),
        r.EntriesRequest(ids=(ID32, bytes(32))),
    )]  # fmt: skip


def _entry_bytes() -> list[bytes]:
    os_entry = make_entry(IDENTITY, kind="os", name="tiny", version="1.0", now=NOW,
                          blobs={"kernel": "a" * 64, "initrd": "b" * 64, "root": "c" * 64},
                          meta={"packages": {"busybox": "1.35"}, "arch": "x86_64"})  # fmt: skip
    image = make_entry(IDENTITY, kind="image", name="img", version="2", now=NOW,
                       blobs={"manifest": "d" * 64}, meta={"image_id": "e" * 64})  # fmt: skip
    return [os_entry.encode(), image.encode()]


def replication_replies() -> list[Tree]:
    r = replication_messages
    ids = r.Ids(buckets=(r.BucketIds(bucket=0, ids=(bytes(32),)), r.BucketIds(bucket=1, ids=())))
    return [r.REPLIES.encode(m) for m in (
        r.InSync(), r.Summary(buckets=(ID32,) * r.BUCKETS), ids,
        r.Entries(entries=tuple(_entry_bytes())),
    )]  # fmt: skip


def blob_manifest() -> Manifest:
    return Manifest((ChunkRef(ChunkId(ID32), 100), ChunkRef(ChunkId(bytes(32)), 5)))


def chunk_messages() -> list[Tree]:
    c = chunks
    return [c.MESSAGES.encode(m) for m in (
        c.HaveRequest(request_id=1, blob_id=ID32),
        c.HaveResponse.build(request_id=1, blob_id=ID32, chunk_count=9, positions=[0, 8]),
        c.HaveResponse.build(request_id=1, blob_id=ID32, chunk_count=300, positions=range(200)),
        c.ManifestRequest(request_id=2, blob_id=ID32),
        c.ManifestResponse(request_id=2, blob_id=ID32, manifest=blob_manifest().encoded),
        c.ChunkRequest(request_id=3, chunk_id=ID32),
        c.ChunkResponse(request_id=3, chunk_id=ID32, data=b"chunk"),
        c.CancelRequest(request_id=3),
        c.ErrorResponse(request_id=4, code=c.ErrorCode.BUSY, message="later"),
    )]  # fmt: skip


def image_manifest() -> ImageManifest:
    return ImageManifest(
        os="tiny", os_version="1.0", kernel="a" * 64, initramfs="b" * 64, cmdline="console=ttyS0",
        layers=(LayerRef(blob="c" * 64, what="task"), LayerRef(blob="d" * 64, what="os")),
        caps=Caps(vcpus=2, cpu_share=1.5, memory_mib=512, disk_bps=1000),
        command=("sh", "-c", "true"), env=(("A", "1"), ("B", "2")), cwd="/", timeout_s=60,
    )  # fmt: skip


def dht_record() -> Tree:
    payload = {"name": "s", "peer_id": PEER_ID, "addrs": [f"/ip4/1.2.3.4/tcp/1/p2p/{PEER_ID}"]}
    _, value = dht_records.make_record(IDENTITY, "scheduler", payload, ttl=300.0, now=NOW)
    return msgpack.unpackb(value, raw=False)


# ---- decoders, as the node runs them -------------------------------------------------------


def framed(
    limits: WireLimits, then: Callable[[dict[str, Any]], object]
) -> Callable[[bytes], object]:
    return lambda data: then(decode_body(data, limits))


def _dispatch_request(raw: dict[str, Any]) -> object:
    _, request = dispatch.decode_request(raw)
    if isinstance(request, dispatch.ResultReport):
        dispatch.verify_report(request, IDENTITY.public_bytes)
    return request


def _replication_reply(raw: dict[str, Any]) -> object:
    reply = replication_messages.decode_reply(raw)
    if isinstance(reply, replication_messages.Entries):
        for data in reply.entries:
            _entry(data)
    return reply


def _chunk_message(raw: dict[str, Any]) -> object:
    message = chunks.MESSAGES.decode(raw)
    if isinstance(message, chunks.HaveResponse):
        message.held()
    if isinstance(message, chunks.ManifestResponse):
        Manifest.decode(message.manifest)
    return message


_TRUST = TrustPolicy([IDENTITY.public_bytes])


def _entry(data: bytes) -> object:
    entry = decode_entry(data)
    _TRUST.admit(entry)
    return entry.to_dict()


def _signed_entry(tree: Tree) -> bytes | None:
    """An entry body re-signed by the publisher it names: mutations reach the kind rules."""
    body = encode(_sorted(tree))
    if body is None:
        return None
    return encode([body, IDENTITY.sign(DOMAIN + body)])


def _sorted(value: Tree) -> Tree:
    if isinstance(value, dict):
        try:
            return {k: _sorted(value[k]) for k in sorted(value)}
        except TypeError:  # keys of mixed types: leave the order as it is
            return {k: _sorted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def _image_manifest(data: bytes) -> object:
    manifest = ImageManifest.decode(data, expected_id=blake3.blake3(data).hexdigest())
    return manifest.id


_RECORD_KEY = dht_records.record_key("scheduler", PEER_ID)
_VALIDATOR = dht_records.RecordValidator(lambda: NOW)


def _dht_record(data: bytes) -> object:
    _VALIDATOR.select(_RECORD_KEY, [data, data])
    return dht_records.parse_record(_RECORD_KEY, data, now=NOW)


def _signed_scheduler_record(tree: Tree) -> bytes | None:
    """A scheduler record payload, correctly signed: the attack of a well-signed bad record."""
    if not isinstance(tree, dict):
        return None
    try:
        _, value = dht_records.make_record(IDENTITY, "scheduler", tree, ttl=300.0, now=NOW)
    except (TypeError, ValueError, OverflowError):
        return None
    return value


def _scheduler_record(data: bytes) -> object:
    record = dht_records.parse_record(_RECORD_KEY, data, now=NOW)
    found = scheduler_record.SchedulerDirectory(_NoRecords()).decode_all([record])
    return [s.to_payload() for s in found]


class _NoRecords:
    async def find_records(self, kind: str, *, timeout: float) -> list[dht_records.Record]:  # noqa: ASYNC109
        return []


def _unpacked(data: bytes) -> Any:
    """What a decoder of a nested map is handed: the frame's msgpack, within the wire limits."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, max_ext_len=0)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as e:
        raise ProtocolError(f"not msgpack: {e}") from e


def _rpc(data: bytes) -> object:
    connection = rpc.ServerConnection()
    connection.receive_data(data)
    events = []
    for _ in range(64):
        try:
            event = connection.next_event()
        except rpc.RejectedMessageError as e:  # the stream is still in sync: the server answers
            if e.msgid is not None:
                connection.send_rejection(e)
            continue
        if event is None:
            break
        events.append(event)
        if isinstance(event, rpc.Request):
            at = max(0, len(event.params) - 1)
            found = rpc_params.options(event.params, at, {"timeout", "count", "follow"})
            rpc_params.timeout_option(found, default=1.0, maximum=3600.0)
            rpc_params.int_option(found, "count", default=1, minimum=1)
            connection.send_response(event.msgid, None, {"ok": True})
    return events


def _frames(data: bytes) -> object:
    """A byte stream cut anywhere, through the streaming frame decoder."""
    decoder = FrameDecoder(DEFAULT_LIMITS)
    out = []
    step = max(1, len(data) // 3)
    for at in range(0, len(data), step):
        decoder.feed(data[at : at + step])
        while (message := decoder.next_message()) is not None:
            out.append(message)
    return out


def _frame_stream(tree: Tree) -> bytes | None:
    if not isinstance(tree, list):
        return None
    parts = []
    for message in tree:
        body = encode(message)
        if body is None:
            return None
        parts.append(len(body).to_bytes(4, "big") + body)
    return b"".join(parts)


def _heartbeat(raw: dict[str, Any]) -> object:
    return (heartbeat.PONGS if raw.get("type") == "pong" else heartbeat.PINGS).decode(raw)


def _rpc_seeds() -> list[Tree]:
    return [
        [0, 1, "node.info", []],
        [0, 2, "task.wait", ["task-1", {"timeout": 5.0}]],
        [0, 3, "schedulers.wait", [{"count": 1, "timeout": 10}]],
        [2, "rpc.cancel", [2]],
        [0, 4, "task.logs", ["t", {"follow": True}]],
    ]


def _types(messages: MessageSet[Any]) -> tuple[str, ...]:
    return tuple(messages._types)


PROTOCOL = (ProtocolError,)
CATALOG = (CatalogError, ProtocolError)


def all_targets() -> list[Target]:
    d, o, r, c = dispatch, owner_protocol, replication_messages, chunks
    decode_dispatch_reply = dispatch.decode_reply
    return [
        Target("dispatch.requests", dispatch_requests(), framed(d.WIRE_LIMITS, _dispatch_request),
               PROTOCOL, types=_types(d.REQUESTS)),
        Target("dispatch.replies", dispatch_replies(), framed(d.WIRE_LIMITS, decode_dispatch_reply),
               PROTOCOL, types=_types(d.REPLIES)),
        Target("tasklogs", [d.LOGS.encode(d.LogChunk(lease=LEASE, stream="stdout", data=b"x"))],
               framed(d.LOGS_WIRE_LIMITS, d.LOGS.decode), PROTOCOL, types=("log",)),
        Target("tasks.requests", owner_requests(), framed(o.WIRE_LIMITS, o.REQUESTS.decode),
               PROTOCOL, types=_types(o.REQUESTS)),
        Target("tasks.replies", owner_replies(), framed(o.WIRE_LIMITS, o.REPLIES.decode),
               PROTOCOL, types=_types(o.REPLIES)),
        Target("catalog-sync.requests", replication_requests(),
               framed(r.WIRE_LIMITS, r.decode_request), PROTOCOL, types=_types(r.REQUESTS)),
        Target("catalog-sync.replies", replication_replies(),
               framed(r.WIRE_LIMITS, _replication_reply), CATALOG, types=_types(r.REPLIES)),
        Target("chunks", chunk_messages(), framed(c.WIRE_LIMITS, _chunk_message), CATALOG,
               types=_types(c.MESSAGES)),
        Target("heartbeat", [{"type": "ping"}, {"type": "pong"}],
               framed(DEFAULT_LIMITS, _heartbeat), PROTOCOL, types=("ping", "pong")),
        Target("frame-stream", [dispatch_requests()[:2], [{"type": "ping"}] * 3],
               _frames, PROTOCOL, encoder=_frame_stream),
        Target("caps", [CAPS.to_wire(), Caps().to_wire()],
               lambda data: Caps.from_wire(_unpacked(data)), PROTOCOL),
        Target("task-wire", [task_to_wire(TASK)],
               lambda data: task_from_wire(_unpacked(data), base_dir=o.UNPLACED), PROTOCOL),
        Target("catalog-entry", [msgpack.unpackb(msgpack.unpackb(e)[0]) for e in _entry_bytes()],
               _entry, CATALOG, encoder=_signed_entry),
        Target("image-manifest", [image_manifest().to_dict()], _image_manifest, CATALOG,
               encoder=lambda tree: encode(_sorted(tree))),
        Target("blob-manifest", [msgpack.unpackb(blob_manifest().encoded)],
               lambda data: Manifest.decode(data), CATALOG),
        Target("dht-record", [dht_record()], _dht_record, PROTOCOL),
        Target("scheduler-record", [msgpack.unpackb(dht_record()["payload"])], _scheduler_record,
               PROTOCOL, encoder=_signed_scheduler_record),
        Target("local-rpc", _rpc_seeds(), _rpc, (ProtocolError, RpcError)),
    ]  # fmt: skip


def is_typed(error: BaseException) -> bool:
    return isinstance(error, VmlendError)


__all__ = ["NOW", "Target", "all_targets", "is_typed", "time"]
