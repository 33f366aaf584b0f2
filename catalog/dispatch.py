"""The dispatch protocol between a scheduler and its workers: the contract of the two roles.

A worker keeps one control stream to each scheduler it serves (``/vmlend/dispatch/1.0.0``) and
speaks first:

    worker -> scheduler   WorkRequest(offer)          answered by LeaseGrant or NoWork
    worker -> scheduler   Heartbeat(leases)           answered by HeartbeatAck(stop)
    worker -> scheduler   ResultReport(lease, ...)    answered by ResultAck
    worker -> scheduler   Lost(leases)                (after a crash; answered by HeartbeatAck)
    scheduler -> worker   Stop(leases, reason)        (pushed when a task ends; also in the acks)

and streams a running lease's output on ``/vmlend/tasklogs/1.0.0`` as :class:`LogChunk` frames.
Messages travel as msgpack maps in :mod:`node.wire` frames (use :data:`WIRE_LIMITS`). The worker's
identity is the stream's authenticated peer ID, never a field. Building a message with a bad field
raises :class:`LocalProtocolError` (our bug); :func:`decode_message` turns anything a peer sent that
is malformed, unknown, has extra or missing keys, or breaks a limit into
:class:`RemoteProtocolError`.

A lease is named by :class:`LeaseKey`: the attempt number makes a lease that lapsed and a later
lease of the same replica different names, so a late word from the first holder can never be taken
for the second.
"""

from __future__ import annotations

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
from node.wire_fields import (
    MAX_TEXT,
    as_bytes,
    as_id,
    as_int,
    as_map,
    as_seconds,
    as_text,
    as_tuple,
    check_keys,
)

PROTOCOL_ID = "/vmlend/dispatch/1.0.0"
LOGS_PROTOCOL_ID = "/vmlend/tasklogs/1.0.0"
MAX_LEASES = 256  # per message: far above any worker's concurrent VMs
MAX_IMAGES = 1024  # image IDs an offer may list as already held
MAX_REPLICAS = 16
MAX_ATTEMPT = 2**31 - 1
MAX_LOG_CHUNK = 64 * 1024
SIGNATURE_SIZE = 64  # Ed25519
ID_SIZE = 32
DIGEST_SIZE = 32

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

    room: Caps
    capacity: Caps
    images: frozenset[bytes] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if not isinstance(self.room, Caps) or not isinstance(self.capacity, Caps):
            raise LocalProtocolError("room and capacity must be Caps")
        images = frozenset(self.images)
        if len(images) > MAX_IMAGES:
            raise LocalProtocolError(f"an offer lists at most {MAX_IMAGES} images")
        for image in images:
            as_bytes("image ID", image, ID_SIZE)
        object.__setattr__(self, "images", images)

    def to_dict(self) -> dict[str, Any]:
        return {
            "room": self.room.to_wire(),
            "capacity": self.capacity.to_wire(),
            "images": sorted(self.images),
        }

    @classmethod
    def from_dict(cls, raw: object) -> Offer:
        value = as_map("offer", raw)
        check_keys("offer", value, {"room", "capacity", "images"}, frozenset())
        images = as_tuple(
            "images", value["images"], MAX_IMAGES, lambda v: as_bytes("image", v, ID_SIZE)
        )
        return cls(
            room=Caps.from_wire(value["room"]),
            capacity=Caps.from_wire(value["capacity"]),
            images=frozenset(images),
        )


# --- messages -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkRequest:
    TYPE: ClassVar[str] = "work_request"
    offer: Offer

    def __post_init__(self) -> None:
        if not isinstance(self.offer, Offer):
            raise LocalProtocolError("offer must be an Offer")

    def to_dict(self) -> dict[str, Any]:
        return {"offer": self.offer.to_dict()}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> WorkRequest:
        check_keys(cls.TYPE, raw, {"offer"}, frozenset())
        return cls(offer=Offer.from_dict(raw["offer"]))


@dataclass(frozen=True, slots=True, kw_only=True)
class LeaseGrant:
    """Run ``image_id`` under ``caps``; heartbeat within ``lease_timeout`` s; stop after
    ``max_runtime`` s."""

    TYPE: ClassVar[str] = "lease_grant"
    lease: LeaseKey
    image_id: bytes
    caps: Caps
    lease_timeout: float
    max_runtime: float

    def __post_init__(self) -> None:
        check_lease(self.lease)
        as_bytes("image_id", self.image_id, ID_SIZE)
        if not isinstance(self.caps, Caps):
            raise LocalProtocolError("caps must be Caps")
        as_seconds("lease_timeout", self.lease_timeout)
        as_seconds("max_runtime", self.max_runtime)

    def to_dict(self) -> dict[str, Any]:
        return {
            "lease": lease_to_list(self.lease),
            "image_id": self.image_id,
            "caps": self.caps.to_wire(),
            "lease_timeout": self.lease_timeout,
            "max_runtime": self.max_runtime,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LeaseGrant:
        check_keys(
            cls.TYPE, raw, {"lease", "image_id", "caps", "lease_timeout", "max_runtime"}, _NONE
        )
        return cls(
            lease=lease_from_list(raw["lease"]),
            image_id=raw["image_id"],
            caps=Caps.from_wire(raw["caps"]),
            lease_timeout=as_seconds("lease_timeout", raw["lease_timeout"]),
            max_runtime=as_seconds("max_runtime", raw["max_runtime"]),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class NoWork:
    """Nothing for this offer now; ask again after ``retry_after`` seconds."""

    TYPE: ClassVar[str] = "no_work"
    retry_after: float
    reason: str = ""

    def __post_init__(self) -> None:
        as_seconds("retry_after", self.retry_after)
        as_text("reason", self.reason)

    def to_dict(self) -> dict[str, Any]:
        return {"retry_after": self.retry_after, "reason": self.reason}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> NoWork:
        check_keys(cls.TYPE, raw, {"retry_after", "reason"}, _NONE)
        return cls(retry_after=as_seconds("retry_after", raw["retry_after"]), reason=raw["reason"])


@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    """The leases the worker holds; those in ``running`` have a VM running (the rest prepare)."""

    TYPE: ClassVar[str] = "heartbeat"
    leases: tuple[LeaseKey, ...]
    running: tuple[LeaseKey, ...] = ()

    def __post_init__(self) -> None:
        for name in ("leases", "running"):
            value = getattr(self, name)
            if type(value) is not tuple or len(value) > MAX_LEASES:
                raise LocalProtocolError(f"{name} must be a tuple of <= {MAX_LEASES} leases")
            for lease in value:
                check_lease(lease)
        if not set(self.running) <= set(self.leases):
            raise LocalProtocolError("every running lease must be among the leases")

    def to_dict(self) -> dict[str, Any]:
        return {
            "leases": [lease_to_list(x) for x in self.leases],
            "running": [lease_to_list(x) for x in self.running],
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Heartbeat:
        check_keys(cls.TYPE, raw, {"leases", "running"}, _NONE)
        return cls(
            leases=as_tuple("leases", raw["leases"], MAX_LEASES, lease_from_list),
            running=as_tuple("running", raw["running"], MAX_LEASES, lease_from_list),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class _LeaseList:
    leases: tuple[LeaseKey, ...]

    def __post_init__(self) -> None:
        if type(self.leases) is not tuple or len(self.leases) > MAX_LEASES:
            raise LocalProtocolError(f"leases must be a tuple of <= {MAX_LEASES} leases")
        for lease in self.leases:
            check_lease(lease)


@dataclass(frozen=True, slots=True, kw_only=True)
class HeartbeatAck:
    """Stop the leases in ``stop`` (the task is over, or the lease is no longer yours)."""

    TYPE: ClassVar[str] = "heartbeat_ack"
    stop: tuple[LeaseKey, ...] = ()

    def __post_init__(self) -> None:
        _LeaseList(leases=self.stop)

    def to_dict(self) -> dict[str, Any]:
        return {"stop": [lease_to_list(x) for x in self.stop]}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> HeartbeatAck:
        check_keys(cls.TYPE, raw, {"stop"}, _NONE)
        return cls(stop=as_tuple("stop", raw["stop"], MAX_LEASES, lease_from_list))


@dataclass(frozen=True, slots=True, kw_only=True)
class Stop:
    """Pushed by the scheduler: stop these leases now and destroy their VMs."""

    TYPE: ClassVar[str] = "stop"
    leases: tuple[LeaseKey, ...]
    reason: str = ""

    def __post_init__(self) -> None:
        _LeaseList(leases=self.leases)
        as_text("reason", self.reason)

    def to_dict(self) -> dict[str, Any]:
        return {"leases": [lease_to_list(x) for x in self.leases], "reason": self.reason}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Stop:
        check_keys(cls.TYPE, raw, {"leases", "reason"}, _NONE)
        leases = as_tuple("leases", raw["leases"], MAX_LEASES, lease_from_list)
        return cls(leases=leases, reason=raw["reason"])


@dataclass(frozen=True, slots=True, kw_only=True)
class Lost:
    """The worker crashed and lost these leases (their VMs are gone); re-queue them now."""

    TYPE: ClassVar[str] = "lost"
    leases: tuple[LeaseKey, ...]

    def __post_init__(self) -> None:
        _LeaseList(leases=self.leases)

    def to_dict(self) -> dict[str, Any]:
        return {"leases": [lease_to_list(x) for x in self.leases]}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Lost:
        check_keys(cls.TYPE, raw, {"leases"}, _NONE)
        return cls(leases=as_tuple("leases", raw["leases"], MAX_LEASES, lease_from_list))


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultReport:
    """A replica's result. The bytes live in the worker's chunk store (blob IDs); the digests let
    the scheduler compare results without fetching them. ``signature`` is the worker's Ed25519
    signature over :meth:`signed_bytes`."""

    TYPE: ClassVar[str] = "result"
    lease: LeaseKey
    exit_code: int
    stdout_digest: bytes
    stderr_digest: bytes
    stdout_blob: bytes
    stderr_blob: bytes
    archive_blob: bytes | None
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

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "lease": lease_to_list(self.lease),
            "exit_code": self.exit_code,
            "stdout_digest": self.stdout_digest,
            "stderr_digest": self.stderr_digest,
            "stdout_blob": self.stdout_blob,
            "stderr_blob": self.stderr_blob,
            "signature": self.signature,
        }
        if self.archive_blob is not None:
            out["archive_blob"] = self.archive_blob
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ResultReport:
        required = {"lease", "exit_code", "stdout_digest", "stderr_digest", "stdout_blob"}
        required |= {"stderr_blob", "signature"}
        check_keys(cls.TYPE, raw, required, frozenset({"archive_blob"}))
        values = {k: raw[k] for k in required - {"lease"}}
        return cls(
            lease=lease_from_list(raw["lease"]), archive_blob=raw.get("archive_blob"), **values
        )


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


class ResultStatus(StrEnum):
    RECORDED = "recorded"  # counted now
    DUPLICATE = "duplicate"  # this worker's result for this replica was already counted
    STALE = "stale"  # the lease is not yours (expired, re-leased, task over): not counted


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultAck:
    """The worker may forget its copy of the report once it has this (any status)."""

    TYPE: ClassVar[str] = "result_ack"
    lease: LeaseKey
    status: ResultStatus

    def __post_init__(self) -> None:
        check_lease(self.lease)
        if not isinstance(self.status, ResultStatus):
            raise LocalProtocolError(f"status must be a ResultStatus, got {self.status!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"lease": lease_to_list(self.lease), "status": self.status.value}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ResultAck:
        check_keys(cls.TYPE, raw, {"lease", "status"}, _NONE)
        try:
            status = ResultStatus(raw["status"])
        except ValueError:
            raise LocalProtocolError(f"unknown result status {raw['status']!r}") from None
        return cls(lease=lease_from_list(raw["lease"]), status=status)


@dataclass(frozen=True, slots=True, kw_only=True)
class LogChunk:
    """Output of a running lease, on the task-log stream (worker -> scheduler, unanswered)."""

    TYPE: ClassVar[str] = "log"
    lease: LeaseKey
    stream: str
    data: bytes

    def __post_init__(self) -> None:
        check_lease(self.lease)
        if self.stream not in ("stdout", "stderr"):
            raise LocalProtocolError(f"stream must be stdout or stderr, got {self.stream!r}")
        if type(self.data) is not bytes or len(self.data) > MAX_LOG_CHUNK:
            raise LocalProtocolError(f"data must be <= {MAX_LOG_CHUNK} bytes")

    def to_dict(self) -> dict[str, Any]:
        return {"lease": lease_to_list(self.lease), "stream": self.stream, "data": self.data}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LogChunk:
        check_keys(cls.TYPE, raw, {"lease", "stream", "data"}, _NONE)
        return cls(lease=lease_from_list(raw["lease"]), stream=raw["stream"], data=raw["data"])


_NONE: frozenset[str] = frozenset()

Message = (
    WorkRequest
    | LeaseGrant
    | NoWork
    | Heartbeat
    | HeartbeatAck
    | Stop
    | Lost
    | ResultReport
    | ResultAck
)

_TYPES: dict[str, Any] = {
    cls.TYPE: cls
    for cls in (
        WorkRequest,
        LeaseGrant,
        NoWork,
        Heartbeat,
        HeartbeatAck,
        Stop,
        Lost,
        ResultReport,
        ResultAck,
    )
}


def to_dict(message: Message | LogChunk) -> dict[str, Any]:
    """The msgpack-ready map for ``message``, with its ``type``."""
    return {"type": message.TYPE, **message.to_dict()}


def decode_message(raw: Mapping[str, Any]) -> Message:
    """Validate a decoded frame map into a message; :class:`RemoteProtocolError` if it is bad."""
    kind = raw.get("type")
    cls = _TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise RemoteProtocolError(f"unknown dispatch message type {kind!r}")
    body = {k: v for k, v in raw.items() if k != "type"}
    try:
        message: Message = cls.from_dict(body)
    except LocalProtocolError as e:
        raise RemoteProtocolError(f"{kind}: {e}") from None
    except TypeError as e:  # e.g. a non-hashable where a set member was needed
        raise RemoteProtocolError(f"{kind}: malformed: {e}") from None
    return message


def verify_report(report: ResultReport, public_bytes: bytes) -> bool:
    """Whether ``report`` is signed by the worker with this Ed25519 public key (the glue gets the
    key from the stream's authenticated peer ID)."""
    return verify(public_bytes, report.signed_bytes(), report.signature)


def decode_log_chunk(raw: Mapping[str, Any]) -> LogChunk:
    """Validate a frame of the task-log stream; :class:`RemoteProtocolError` if it is bad."""
    if raw.get("type") != LogChunk.TYPE:
        raise RemoteProtocolError(f"expected a log frame, got {raw.get('type')!r}")
    try:
        return LogChunk.from_dict({k: v for k, v in raw.items() if k != "type"})
    except LocalProtocolError as e:
        raise RemoteProtocolError(f"log: {e}") from None
