"""Messages of the dispatch protocol (``/vmlend/dispatch/1.0.0``), as frozen dataclasses.

A worker keeps one control stream to each scheduler it serves and speaks first:

    worker -> scheduler   WorkRequest(offer)          answered by LeaseGrant or NoWork
    worker -> scheduler   Heartbeat(leases)           answered by HeartbeatAck(stop)
    worker -> scheduler   ResultReport(lease, ...)    answered by ResultAck
    worker -> scheduler   Lost(leases)                (after a crash; answered by HeartbeatAck)
    scheduler -> worker   Stop(leases, reason)        (pushed when a task ends; also in the acks)

They travel as msgpack maps in :mod:`node.wire` frames (use :data:`WIRE_LIMITS`). The worker's
identity is the stream's authenticated peer ID, never a field. Building a message with a bad field
raises :class:`LocalProtocolError` (our bug); :func:`decode_message` turns anything a peer sent that
is malformed, unknown, has extra or missing keys, or breaks a limit into
:class:`RemoteProtocolError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, TypeVar

import msgpack

from node.errors import LocalProtocolError, RemoteProtocolError
from node.identity import verify
from node.wire import WireLimits
from scheduler_role.end_conditions import DIGEST_SIZE, result_digest
from scheduler_role.errors import InvalidTaskError
from scheduler_role.task import MAX_REPLICAS, LeaseKey, check_id
from worker_role.caps import Caps, NetworkMode

PROTOCOL_ID = "/vmlend/dispatch/1.0.0"
MAX_LEASES = 256  # per message: far above any worker's concurrent VMs
MAX_IMAGES = 1024  # image IDs an offer may list as already held
MAX_NET_ALLOW = 64
MAX_TEXT = 512
MAX_ATTEMPT = 2**31 - 1
MAX_SECONDS = 7 * 24 * 3600.0
SIGNATURE_SIZE = 64  # Ed25519
ID_SIZE = 32

WIRE_LIMITS = WireLimits(
    max_frame_size=256 * 1024,
    max_depth=5,
    max_items=MAX_IMAGES + 16,
    max_str=4 * MAX_TEXT,
    max_bin=SIGNATURE_SIZE,
)

T = TypeVar("T")


def _int(name: str, value: object, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise LocalProtocolError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    return value


def _seconds(name: str, value: object, low_exclusive: float = 0.0) -> float:
    # bool is an int subclass; a peer's True is not one second.
    if type(value) not in (int, float) or not isinstance(value, int | float):
        raise LocalProtocolError(f"{name} must be a number of seconds")
    if not (math.isfinite(value) and low_exclusive < value <= MAX_SECONDS):
        raise LocalProtocolError(f"{name} must be seconds in ({low_exclusive}, {MAX_SECONDS}]")
    return float(value)


def _bytes(name: str, value: object, size: int) -> bytes:
    if type(value) is not bytes or len(value) != size:
        raise LocalProtocolError(f"{name} must be {size} bytes")
    return value


def _text(name: str, value: object) -> str:
    if type(value) is not str or len(value) > MAX_TEXT:
        raise LocalProtocolError(f"{name} must be a str of <= {MAX_TEXT} characters")
    return value


def _tuple(name: str, value: object, limit: int, item: Callable[[object], T]) -> tuple[T, ...]:
    if not isinstance(value, list | tuple) or len(value) > limit:
        raise LocalProtocolError(f"{name} must be a list of <= {limit} items")
    return tuple(item(v) for v in value)


def _keys(kind: str, raw: Mapping[str, Any], required: set[str], optional: frozenset[str]) -> None:
    given = set(raw)
    if not required <= given or not given <= required | optional:
        raise LocalProtocolError(
            f"{kind}: missing {sorted(required - given)}, "
            f"unexpected {sorted(given - required - optional)}"
        )


def _map(name: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise LocalProtocolError(f"{name} must be a map")
    return value


# --- shared parts -------------------------------------------------------------------------------

_CAPS_KEYS = {f for f in Caps.__dataclass_fields__}


def caps_to_dict(caps: Caps) -> dict[str, Any]:
    out = {f: getattr(caps, f) for f in _CAPS_KEYS}
    out["network"] = caps.network.value
    out["net_allow"] = list(caps.net_allow)
    return out


def caps_from_dict(raw: object) -> Caps:
    value = _map("caps", raw)
    _keys("caps", value, _CAPS_KEYS, frozenset())
    try:
        return Caps(
            vcpus=_int("vcpus", value["vcpus"], 1, 1024),
            cpu_share=_seconds("cpu_share", value["cpu_share"]),
            memory_mib=_int("memory_mib", value["memory_mib"], 32, 2**40),
            disk_mib=_int("disk_mib", value["disk_mib"], 1, 2**40),
            disk_bps=_int("disk_bps", value["disk_bps"], 0, 2**62),
            disk_iops=_int("disk_iops", value["disk_iops"], 0, 2**62),
            network=NetworkMode(_text("network", value["network"])),
            net_bps=_int("net_bps", value["net_bps"], 0, 2**62),
            net_allow=_tuple("net_allow", value["net_allow"], MAX_NET_ALLOW, _allow_entry),
        )
    except ValueError as e:  # Caps' own checks, and an unknown network mode
        raise LocalProtocolError(f"caps: {e}") from None


def _allow_entry(value: object) -> str:
    return _text("net_allow entry", value)


def lease_to_list(lease: LeaseKey) -> list[Any]:
    return [lease.task_id, lease.replica, lease.attempt]


def lease_from_list(raw: object) -> LeaseKey:
    if not isinstance(raw, list | tuple) or len(raw) != 3:
        raise LocalProtocolError("a lease is [task, replica, attempt]")
    task: object = raw[0]
    try:
        task_id = check_id("task", task)
    except InvalidTaskError as e:
        raise LocalProtocolError(str(e)) from None
    return LeaseKey(
        task_id,
        _int("replica", raw[1], 0, MAX_REPLICAS - 1),
        _int("attempt", raw[2], 1, MAX_ATTEMPT),
    )


def _check_lease(lease: object) -> None:
    if not isinstance(lease, LeaseKey):
        raise LocalProtocolError("lease must be a LeaseKey")
    lease_from_list(lease_to_list(lease))


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
            _bytes("image ID", image, ID_SIZE)
        object.__setattr__(self, "images", images)

    def to_dict(self) -> dict[str, Any]:
        return {
            "room": caps_to_dict(self.room),
            "capacity": caps_to_dict(self.capacity),
            "images": sorted(self.images),
        }

    @classmethod
    def from_dict(cls, raw: object) -> Offer:
        value = _map("offer", raw)
        _keys("offer", value, {"room", "capacity", "images"}, frozenset())
        images = _tuple(
            "images", value["images"], MAX_IMAGES, lambda v: _bytes("image", v, ID_SIZE)
        )
        return cls(
            room=caps_from_dict(value["room"]),
            capacity=caps_from_dict(value["capacity"]),
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
        _keys(cls.TYPE, raw, {"offer"}, frozenset())
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
        _check_lease(self.lease)
        _bytes("image_id", self.image_id, ID_SIZE)
        if not isinstance(self.caps, Caps):
            raise LocalProtocolError("caps must be Caps")
        _seconds("lease_timeout", self.lease_timeout)
        _seconds("max_runtime", self.max_runtime)

    def to_dict(self) -> dict[str, Any]:
        return {
            "lease": lease_to_list(self.lease),
            "image_id": self.image_id,
            "caps": caps_to_dict(self.caps),
            "lease_timeout": self.lease_timeout,
            "max_runtime": self.max_runtime,
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LeaseGrant:
        _keys(cls.TYPE, raw, {"lease", "image_id", "caps", "lease_timeout", "max_runtime"}, _NONE)
        return cls(
            lease=lease_from_list(raw["lease"]),
            image_id=raw["image_id"],
            caps=caps_from_dict(raw["caps"]),
            lease_timeout=_seconds("lease_timeout", raw["lease_timeout"]),
            max_runtime=_seconds("max_runtime", raw["max_runtime"]),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class NoWork:
    """Nothing for this offer now; ask again after ``retry_after`` seconds."""

    TYPE: ClassVar[str] = "no_work"
    retry_after: float
    reason: str = ""

    def __post_init__(self) -> None:
        _seconds("retry_after", self.retry_after)
        _text("reason", self.reason)

    def to_dict(self) -> dict[str, Any]:
        return {"retry_after": self.retry_after, "reason": self.reason}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> NoWork:
        _keys(cls.TYPE, raw, {"retry_after", "reason"}, _NONE)
        return cls(retry_after=_seconds("retry_after", raw["retry_after"]), reason=raw["reason"])


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
                _check_lease(lease)
        if not set(self.running) <= set(self.leases):
            raise LocalProtocolError("every running lease must be among the leases")

    def to_dict(self) -> dict[str, Any]:
        return {
            "leases": [lease_to_list(x) for x in self.leases],
            "running": [lease_to_list(x) for x in self.running],
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Heartbeat:
        _keys(cls.TYPE, raw, {"leases", "running"}, _NONE)
        return cls(
            leases=_tuple("leases", raw["leases"], MAX_LEASES, lease_from_list),
            running=_tuple("running", raw["running"], MAX_LEASES, lease_from_list),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class _LeaseList:
    leases: tuple[LeaseKey, ...]

    def __post_init__(self) -> None:
        if type(self.leases) is not tuple or len(self.leases) > MAX_LEASES:
            raise LocalProtocolError(f"leases must be a tuple of <= {MAX_LEASES} leases")
        for lease in self.leases:
            _check_lease(lease)


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
        _keys(cls.TYPE, raw, {"stop"}, _NONE)
        return cls(stop=_tuple("stop", raw["stop"], MAX_LEASES, lease_from_list))


@dataclass(frozen=True, slots=True, kw_only=True)
class Stop:
    """Pushed by the scheduler: stop these leases now and destroy their VMs."""

    TYPE: ClassVar[str] = "stop"
    leases: tuple[LeaseKey, ...]
    reason: str = ""

    def __post_init__(self) -> None:
        _LeaseList(leases=self.leases)
        _text("reason", self.reason)

    def to_dict(self) -> dict[str, Any]:
        return {"leases": [lease_to_list(x) for x in self.leases], "reason": self.reason}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Stop:
        _keys(cls.TYPE, raw, {"leases", "reason"}, _NONE)
        leases = _tuple("leases", raw["leases"], MAX_LEASES, lease_from_list)
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
        _keys(cls.TYPE, raw, {"leases"}, _NONE)
        return cls(leases=_tuple("leases", raw["leases"], MAX_LEASES, lease_from_list))


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
        _check_lease(self.lease)
        _int("exit_code", self.exit_code, -(2**31), 2**31 - 1)
        for name in ("stdout_digest", "stderr_digest", "stdout_blob", "stderr_blob"):
            _bytes(name, getattr(self, name), DIGEST_SIZE)
        if self.archive_blob is not None:
            _bytes("archive_blob", self.archive_blob, DIGEST_SIZE)
        _bytes("signature", self.signature, SIGNATURE_SIZE)

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
        _keys(cls.TYPE, raw, required, frozenset({"archive_blob"}))
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
        _check_lease(self.lease)
        if not isinstance(self.status, ResultStatus):
            raise LocalProtocolError(f"status must be a ResultStatus, got {self.status!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"lease": lease_to_list(self.lease), "status": self.status.value}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ResultAck:
        _keys(cls.TYPE, raw, {"lease", "status"}, _NONE)
        try:
            status = ResultStatus(raw["status"])
        except ValueError:
            raise LocalProtocolError(f"unknown result status {raw['status']!r}") from None
        return cls(lease=lease_from_list(raw["lease"]), status=status)


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


def to_dict(message: Message) -> dict[str, Any]:
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
