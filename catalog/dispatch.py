"""The dispatch protocol between a scheduler and its workers: the contract of the two roles.

A worker keeps one control stream to each scheduler it serves (``/vmlend/dispatch/2.0.0``) and
speaks first. Every request carries a ``request_id`` and its answer the same one, so the worker
matches answers to requests by ID (several may be out at once) and tells them from pushed stops::

    worker -> scheduler   WorkRequest(offer, wait?)   answered by LeaseGrant or NoWork (with
                                                       ``wait``, held up to that long for work)
    worker -> scheduler   Heartbeat(leases)           answered by HeartbeatAck(stop)
    worker -> scheduler   ResultReport(lease, ...)    answered by ResultAck
    worker -> scheduler   Lost(leases)                (after a crash; answered by HeartbeatAck)
    scheduler -> worker   Stop(leases, reason)        (pushed when a task ends, with no ID;
                                                       also in the heartbeat acks)

and streams a running lease's output on ``/vmlend/tasklogs/1.0.0`` as :class:`LogChunk` frames
(:data:`LOGS`). Messages travel as msgpack maps in :mod:`node.wire` frames (use
:data:`WIRE_LIMITS`); the ``request_id`` is a key of the map beside its ``type``. The worker's
identity is the stream's authenticated peer ID, never a field. Building a message with a bad
field raises :class:`LocalProtocolError` (our bug); :func:`decode_request` and
:func:`decode_reply` turn anything a peer sent that is malformed, unknown, sent the wrong way,
has extra or missing keys, or breaks a limit into :class:`RemoteProtocolError`.

A lease is named by :class:`LeaseKey`: the attempt number makes a lease that lapsed and a later
lease of the same replica different names, so a late word from the first holder can never be taken
for the second.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

import blake3
import msgpack

from catalog.caps import Caps
from node.errors import LocalProtocolError, RemoteProtocolError
from node.identity import verify
from node.wire import WireLimits
from node.wire_fields import MAX_TEXT, as_bytes, as_id, as_int, as_seconds, as_text
from node.wire_message import MessageSet, enum_of, record, tuple_of, wire

PROTOCOL_ID = "/vmlend/dispatch/2.0.0"
LOGS_PROTOCOL_ID = "/vmlend/tasklogs/1.0.0"
MAX_LEASES = 256  # per message: far above any worker's concurrent VMs
MAX_IMAGES = 1024  # image IDs an offer may list as already held
MAX_REPLICAS = 16
MAX_FETCHED = 1 << 40  # bytes of an image fetched, as a heartbeat reports them
MAX_ATTEMPT = 2**31 - 1
MAX_REQUEST_ID = 2**31 - 1
# A work request is held at most this long: well within the worker's own request timeout, so an
# answer (perhaps a lease) never arrives after the worker stopped waiting for it.
MAX_WORK_HOLD = 15.0
MAX_LOG_CHUNK = 64 * 1024
SIGNATURE_SIZE = 64  # Ed25519
ID_SIZE = 32
DIGEST_SIZE = 32
MAX_RESULT_OUTPUT = 1 << 20  # what a worker keeps of a result's stdout, and of its stderr
MAX_RESULT_ARCHIVE = 64 << 20  # a result's /out archive: the size of the guest's result disk
# Live output a worker streams per lease (the result keeps the last MAX_RESULT_OUTPUT anyway), and
# how fast: past either, it drops output and says so in the stream. The scheduler takes at most
# MAX_LIVE_LOG + LIVE_LOG_NOTE_ROOM per lease (the room is for those notes) and drops the rest.
MAX_LIVE_LOG = 8 << 20
LIVE_LOG_RATE = 1 << 20  # bytes/s, averaged
LIVE_LOG_BURST = 2 << 20
LIVE_LOG_NOTE_ROOM = 4096

WIRE_LIMITS = WireLimits(
    max_frame_size=256 * 1024,
    max_depth=5,
    max_items=MAX_IMAGES + 16,
    max_str=4 * MAX_TEXT,
    max_bin=SIGNATURE_SIZE,
)
LOGS_WIRE_LIMITS = WireLimits(
    max_frame_size=MAX_LOG_CHUNK + 4096, max_depth=3, max_items=16, max_str=1024,
    max_bin=MAX_LOG_CHUNK,
)  # fmt: skip


@dataclass(frozen=True, slots=True, order=True)
class LeaseKey:
    """One lease: replica ``replica`` of ``task_id``, ``attempt``-th time it was leased (from 1)."""

    task_id: str
    replica: int
    attempt: int

    def __str__(self) -> str:
        return f"{self.task_id}/{self.replica}#{self.attempt}"


def lease_to_list(lease: LeaseKey) -> list[Any]:
    return [lease.task_id, lease.replica, lease.attempt]


def lease_from_list(raw: object) -> LeaseKey:
    if not isinstance(raw, list | tuple) or len(raw) != 3:
        raise LocalProtocolError("a lease is [task, replica, attempt]")
    return LeaseKey(
        as_id("task", raw[0]),
        as_int("replica", raw[1], 0, MAX_REPLICAS - 1),
        as_int("attempt", raw[2], 1, MAX_ATTEMPT),
    )


def check_lease(lease: object) -> None:
    if not isinstance(lease, LeaseKey):
        raise LocalProtocolError("lease must be a LeaseKey")
    lease_from_list(lease_to_list(lease))


def _check_leases(name: str, leases: object) -> None:
    if type(leases) is not tuple or len(leases) > MAX_LEASES:
        raise LocalProtocolError(f"{name} must be a tuple of <= {MAX_LEASES} leases")
    for lease in leases:
        check_lease(lease)


def _leases_to_lists(leases: tuple[LeaseKey, ...]) -> list[list[Any]]:
    return [lease_to_list(lease) for lease in leases]


def _seconds(name: str) -> dict[str, Any]:
    return wire(decode=functools.partial(as_seconds, name))


def _image(value: object) -> bytes:
    return as_bytes("image ID", value, ID_SIZE)


def _images(raw: object) -> frozenset[bytes]:
    return frozenset(tuple_of(_image, limit=MAX_IMAGES)(raw))


# A lease travels as [task, replica, attempt]; caps as Caps.to_wire gives them.
_LEASE = wire(decode=lease_from_list, encode=lease_to_list)
_LEASES = wire(decode=tuple_of(lease_from_list, limit=MAX_LEASES), encode=_leases_to_lists)
_CAPS = wire(decode=Caps.from_wire, encode=Caps.to_wire)


_NO_ARCHIVE = bytes(DIGEST_SIZE)
_DIGEST_CONTEXT = b"vmlend result digest v1\0"


def result_digest(exit_code: int, stdout_digest: bytes, archive_id: bytes | None) -> bytes:
    """What two results must share to agree. stderr is left out: it carries timings and noise."""
    if len(stdout_digest) != DIGEST_SIZE:
        raise ValueError(f"stdout digest must be {DIGEST_SIZE} bytes")
    if archive_id is not None and len(archive_id) != DIGEST_SIZE:
        raise ValueError(f"archive ID must be {DIGEST_SIZE} bytes")
    packed = struct.pack(">q", exit_code) + stdout_digest + (archive_id or _NO_ARCHIVE)
    return blake3.blake3(_DIGEST_CONTEXT + packed).digest()


@dataclass(frozen=True, slots=True, kw_only=True)
class Offer:
    """What a worker can take: ``room`` now (its policy's ``remaining(running)``), ``capacity``
    when idle (``remaining([])``; used to explain waiting tasks), and the image IDs it holds."""

    room: Caps = field(metadata=_CAPS)
    capacity: Caps = field(metadata=_CAPS)
    images: frozenset[bytes] = field(default_factory=frozenset, metadata=wire(decode=_images))

    def __post_init__(self) -> None:
        if not isinstance(self.room, Caps) or not isinstance(self.capacity, Caps):
            raise LocalProtocolError("room and capacity must be Caps")
        images = frozenset(self.images)
        if len(images) > MAX_IMAGES:
            raise LocalProtocolError(f"an offer lists at most {MAX_IMAGES} images")
        for image in images:
            _image(image)
        object.__setattr__(self, "images", images)


# --- worker -> scheduler ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkRequest:
    """An offer of room. ``wait``: the worker will wait this long for an answer, so a scheduler
    with nothing that fits holds the request (at most :data:`MAX_WORK_HOLD`) and answers the
    moment a replica that fits is queued, instead of having the worker ask again and again."""

    TYPE: ClassVar[str] = "work_request"
    offer: Offer = field(metadata=wire(decode=record(Offer)))
    wait: float | None = field(
        default=None, metadata=wire(decode=functools.partial(as_seconds, "wait"), optional=True)
    )

    def __post_init__(self) -> None:
        if not isinstance(self.offer, Offer):
            raise LocalProtocolError("offer must be an Offer")
        if self.wait is not None:
            as_seconds("wait", self.wait)


def _fetched_bytes(value: object) -> int:
    return as_int("fetched", value, 0, MAX_FETCHED)


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    """The leases the worker holds; those in ``running`` have a VM running (the rest prepare).
    ``fetched`` (optional) says, lease by lease in the order of ``leases``, how many bytes of
    its image the worker has fetched so far: what an owner waiting for a VM is shown."""

    TYPE: ClassVar[str] = "heartbeat"
    leases: tuple[LeaseKey, ...] = field(metadata=_LEASES)
    running: tuple[LeaseKey, ...] = field(default=(), metadata=_LEASES)
    fetched: tuple[int, ...] | None = field(
        default=None,
        metadata=wire(decode=tuple_of(_fetched_bytes, limit=MAX_LEASES), optional=True),
    )

    def __post_init__(self) -> None:
        _check_leases("leases", self.leases)
        _check_leases("running", self.running)
        if not set(self.running) <= set(self.leases):
            raise LocalProtocolError("every running lease must be among the leases")
        if self.fetched is not None:
            if type(self.fetched) is not tuple or len(self.fetched) != len(self.leases):
                raise LocalProtocolError("fetched must give one byte count per lease")
            for n in self.fetched:
                _fetched_bytes(n)


@dataclass(frozen=True, slots=True, kw_only=True)
class Lost:
    """The worker crashed and lost these leases (their VMs are gone); re-queue them now."""

    TYPE: ClassVar[str] = "lost"
    leases: tuple[LeaseKey, ...] = field(metadata=_LEASES)

    def __post_init__(self) -> None:
        _check_leases("leases", self.leases)


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultReport:
    """A replica's result. The bytes live in the worker's chunk store (blob IDs); the digests let
    the scheduler compare results without fetching them. ``signature`` is the worker's Ed25519
    signature over :meth:`signed_bytes`."""

    TYPE: ClassVar[str] = "result"
    lease: LeaseKey = field(metadata=_LEASE)
    exit_code: int
    stdout_digest: bytes
    stderr_digest: bytes
    stdout_blob: bytes
    stderr_blob: bytes
    archive_blob: bytes | None = field(default=None, metadata=wire(optional=True))
    signature: bytes

    def __post_init__(self) -> None:
        check_lease(self.lease)
        as_int("exit_code", self.exit_code, -(2**31), 2**31 - 1)
        for name in ("stdout_digest", "stderr_digest", "stdout_blob", "stderr_blob"):
            as_bytes(name, getattr(self, name), DIGEST_SIZE)
        if self.archive_blob is not None:
            as_bytes("archive_blob", self.archive_blob, DIGEST_SIZE)
        as_bytes("signature", self.signature, SIGNATURE_SIZE)

    @property
    def digest(self) -> bytes:
        """What this result must share with others to agree (see :func:`result_digest`)."""
        return result_digest(self.exit_code, self.stdout_digest, self.archive_blob)

    def signed_bytes(self) -> bytes:
        """Canonical bytes the worker signs: every field but the signature, in a fixed order."""
        return signed_result_bytes(
            self.lease, self.exit_code, self.stdout_digest, self.stderr_digest,
            self.stdout_blob, self.stderr_blob, self.archive_blob,
        )  # fmt: skip


def signed_result_bytes(
    lease: LeaseKey,
    exit_code: int,
    stdout_digest: bytes,
    stderr_digest: bytes,
    stdout_blob: bytes,
    stderr_blob: bytes,
    archive_blob: bytes | None,
) -> bytes:
    payload = [
        "vmlend result v1",
        lease_to_list(lease),
        exit_code,
        stdout_digest,
        stderr_digest,
        stdout_blob,
        stderr_blob,
        archive_blob,
    ]
    packed: bytes = msgpack.packb(payload, use_bin_type=True)
    return packed


# --- scheduler -> worker ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseGrant:
    """Run ``image_id`` under ``caps``; heartbeat within ``lease_timeout`` s; stop after
    ``max_runtime`` s."""

    TYPE: ClassVar[str] = "lease_grant"
    lease: LeaseKey = field(metadata=_LEASE)
    image_id: bytes
    caps: Caps = field(metadata=_CAPS)
    lease_timeout: float = field(metadata=_seconds("lease_timeout"))
    max_runtime: float = field(metadata=_seconds("max_runtime"))

    def __post_init__(self) -> None:
        check_lease(self.lease)
        as_bytes("image_id", self.image_id, ID_SIZE)
        if not isinstance(self.caps, Caps):
            raise LocalProtocolError("caps must be Caps")
        as_seconds("lease_timeout", self.lease_timeout)
        as_seconds("max_runtime", self.max_runtime)


@dataclass(frozen=True, slots=True, kw_only=True)
class NoWork:
    """Nothing for this offer now; ask again after ``retry_after`` seconds."""

    TYPE: ClassVar[str] = "no_work"
    retry_after: float = field(metadata=_seconds("retry_after"))
    reason: str = ""

    def __post_init__(self) -> None:
        as_seconds("retry_after", self.retry_after)
        as_text("reason", self.reason)


@dataclass(frozen=True, slots=True, kw_only=True)
class HeartbeatAck:
    """Stop the leases in ``stop`` (the task is over, or the lease is no longer yours)."""

    TYPE: ClassVar[str] = "heartbeat_ack"
    stop: tuple[LeaseKey, ...] = field(default=(), metadata=_LEASES)

    def __post_init__(self) -> None:
        _check_leases("stop", self.stop)


class ResultStatus(StrEnum):
    RECORDED = "recorded"  # counted now
    DUPLICATE = "duplicate"  # this worker's result for this replica was already counted
    STALE = "stale"  # the lease is not yours (expired, re-leased, task over): not counted


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultAck:
    """The worker may forget its copy of the report once it has this (any status)."""

    TYPE: ClassVar[str] = "result_ack"
    lease: LeaseKey = field(metadata=_LEASE)
    status: ResultStatus = field(metadata=wire(decode=enum_of(ResultStatus)))

    def __post_init__(self) -> None:
        check_lease(self.lease)
        if not isinstance(self.status, ResultStatus):
            raise LocalProtocolError(f"status must be a ResultStatus, got {self.status!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Stop:
    """Pushed by the scheduler: stop these leases now and destroy their VMs."""

    TYPE: ClassVar[str] = "stop"
    leases: tuple[LeaseKey, ...] = field(metadata=_LEASES)
    reason: str = ""

    def __post_init__(self) -> None:
        _check_leases("leases", self.leases)
        as_text("reason", self.reason)


Request = WorkRequest | Heartbeat | ResultReport | Lost
Answer = LeaseGrant | NoWork | HeartbeatAck | ResultAck
Message = Request | Answer | Stop

REQUESTS: MessageSet[Request] = MessageSet(PROTOCOL_ID, WorkRequest, Heartbeat, ResultReport, Lost)
# What a scheduler sends: the answers, and the Stops it pushes.
REPLIES: MessageSet[Answer | Stop] = MessageSet(
    PROTOCOL_ID, LeaseGrant, NoWork, HeartbeatAck, ResultAck, Stop
)

# The ID numbers an exchange on one stream, not what is said in it, so it travels beside the
# message rather than in it: the queue builds and reads the messages without knowing of streams.
REQUEST_ID_KEY = "request_id"


def _request_id(value: object) -> int:
    return as_int(REQUEST_ID_KEY, value, 0, MAX_REQUEST_ID)


def encode_request(request_id: int, request: Request) -> dict[str, Any]:
    """The frame map of ``request``, numbered ``request_id`` (its answer carries the same)."""
    return {**REQUESTS.encode(request), REQUEST_ID_KEY: _request_id(request_id)}


def encode_answer(request_id: int, answer: Answer) -> dict[str, Any]:
    """The frame map of ``answer`` to the request numbered ``request_id``."""
    if isinstance(answer, Stop):
        raise LocalProtocolError("a Stop answers no request: send it with encode_stop")
    return {**REPLIES.encode(answer), REQUEST_ID_KEY: _request_id(request_id)}


def encode_stop(stop: Stop) -> dict[str, Any]:
    """The frame map of a pushed :class:`Stop` (it answers no request, so it has no ID)."""
    return REPLIES.encode(stop)


def _split_id(raw: Mapping[str, Any]) -> tuple[int | None, Mapping[str, Any]]:
    if not isinstance(raw, dict) or REQUEST_ID_KEY not in raw:
        return None, raw
    try:
        request_id = _request_id(raw[REQUEST_ID_KEY])
    except LocalProtocolError as e:
        raise RemoteProtocolError(f"{PROTOCOL_ID}: {e}") from None
    return request_id, {k: v for k, v in raw.items() if k != REQUEST_ID_KEY}


def decode_request(raw: Mapping[str, Any]) -> tuple[int, Request]:
    """A worker's request and its ID; :class:`RemoteProtocolError` if it is not one."""
    request_id, body = _split_id(raw)
    request = REQUESTS.decode(body)
    if request_id is None:
        raise RemoteProtocolError(f"{PROTOCOL_ID} {request.TYPE}: no {REQUEST_ID_KEY}")
    return request_id, request


def decode_reply(raw: Mapping[str, Any]) -> tuple[int, Answer] | Stop:
    """What a scheduler sent: an answer with the ID of the request it answers, or a pushed
    :class:`Stop` (with no ID); :class:`RemoteProtocolError` if it is neither."""
    request_id, body = _split_id(raw)
    reply = REPLIES.decode(body)
    if isinstance(reply, Stop):
        if request_id is not None:
            raise RemoteProtocolError(f"{PROTOCOL_ID} stop: a pushed stop has no {REQUEST_ID_KEY}")
        return reply
    if request_id is None:
        raise RemoteProtocolError(f"{PROTOCOL_ID} {reply.TYPE}: no {REQUEST_ID_KEY}")
    return request_id, reply


def verify_report(report: ResultReport, public_bytes: bytes) -> bool:
    """Whether ``report`` is signed by the worker with this Ed25519 public key (the glue gets the
    key from the stream's authenticated peer ID)."""
    return verify(public_bytes, report.signed_bytes(), report.signature)


# --- the task-log stream ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class LogChunk:
    """Output of a running lease, on the task-log stream (worker -> scheduler, unanswered)."""

    TYPE: ClassVar[str] = "log"
    lease: LeaseKey = field(metadata=_LEASE)
    stream: str
    data: bytes

    def __post_init__(self) -> None:
        check_lease(self.lease)
        if self.stream not in ("stdout", "stderr"):
            raise LocalProtocolError(f"stream must be stdout or stderr, got {self.stream!r}")
        if type(self.data) is not bytes or len(self.data) > MAX_LOG_CHUNK:
            raise LocalProtocolError(f"data must be <= {MAX_LOG_CHUNK} bytes")


LOGS: MessageSet[LogChunk] = MessageSet(LOGS_PROTOCOL_ID, LogChunk)
